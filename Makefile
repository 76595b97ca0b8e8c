# tiercache — every target does its own set-up on a fresh machine (python3 with venv/pip, gcc).
#
#   make demo     venv + extension + Redis + the cli/plot extras, then `python -m tiercache demo`
#                 (live table, consistency verdict, plot in build/demo.png; DEMO_ARGS overrides)
#   make test     venv + extension + Redis, then the suite twice: Cython build, pure-Python twin
#                 (the asyncio tests, and every suite's async variant, turn warnings into
#                 errors: the aio mark / impl=async, tests/conftest.py)
#   make soak     the long chaos runs (-m slow), both implementations
#   make bench    the benchmark suite (installs the bench extra)
#   make docs     the documentation (MkDocs --strict, installs the docs extra) into build/site
#   make lint     ruff check + ruff format --check        make format: apply both
#   make redis    make a Redis server binary available (scripts/install-redis.sh)
#   make clean    remove the venv, build artifacts and the in-place .so/.c
#
# PYTEST_ARGS='-x -k name' is passed to every pytest run (PYTEST_WORKERS=3 parallel workers for
# make test, 0 for a serial run), TESTS='tests/test_x.py' narrows make
# test/soak to some files; PYTHON picks the interpreter of the venv.
# GNU make >= 4.3 (grouped targets).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test
.DELETE_ON_ERROR:

PYTHON ?= python3
PYTEST_ARGS ?=
PYTEST_WORKERS ?= 3
TESTS ?= tests
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PYTEST := $(VENV)/bin/pytest

# Stamps live inside the venv, so deleting .venv by hand also forgets them.
VENV_STAMP := $(VENV)/.stamp-install
BENCH_STAMP := $(VENV)/.stamp-bench
LINT_STAMP := $(VENV)/.stamp-lint
DEMO_STAMP := $(VENV)/.stamp-demo
DOCS_STAMP := $(VENV)/.stamp-docs
REDIS_STAMP := $(VENV)/.stamp-redis

# ext/NAME.pyx is built in place as tiercache/NAME<EXT_SUFFIX> (see setup.py).
EXT_SUFFIX := $(shell $(PYTHON) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
EXT_PYX := $(wildcard ext/*.pyx)
EXT_DEPS := $(wildcard ext/*.pxd ext/*.h)
EXT_SO := $(patsubst ext/%.pyx,tiercache/%$(EXT_SUFFIX),$(EXT_PYX))

# Requirements read from pyproject.toml: `$(call pyproject_reqs,build-system)` or an extra's name.
define pyproject_reqs
$(PY) -c 'import sys, tomllib; d = tomllib.load(open("pyproject.toml", "rb")); \
k = sys.argv[1]; r = d["build-system"]["requires"] if k == "build-system" \
else d["project"]["optional-dependencies"][k]; print("\n".join(r))' $(1)
endef

# Both implementations: the Cython build (required, never a silent fallback) and the twin. Both
# runs happen even if the first fails; the exit status is the first non-zero one.
define run_suite
rc1=0; rc2=0; \
echo "== $(1): Cython extension (TIERCACHE_REQUIRE_EXTENSIONS=1) =="; \
env -u TIERCACHE_NO_EXTENSIONS TIERCACHE_REQUIRE_EXTENSIONS=1 $(PYTEST) $(TESTS) $(2) $(PYTEST_ARGS) || rc1=$$?; \
echo "== $(1): pure-Python twin (TIERCACHE_NO_EXTENSIONS=1) =="; \
env -u TIERCACHE_REQUIRE_EXTENSIONS TIERCACHE_NO_EXTENSIONS=1 $(PYTEST) $(TESTS) $(2) $(PYTEST_ARGS) || rc2=$$?; \
exit $$(( rc1 != 0 ? rc1 : rc2 ))
endef

DEMO_ARGS ?= --plot build/demo.png

.PHONY: all venv .venv build ext redis test soak demo bench docs lint format clean

all: test

venv .venv: $(VENV_STAMP)

# The build requirements go into the venv too (setup.py build_ext runs there); the extension is
# built by the rule below (in place, tracking the ext/ sources), not by pip.
$(VENV_STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(call pyproject_reqs,build-system) | xargs -r -d '\n' $(PIP) install -q
	TIERCACHE_NO_EXTENSIONS=1 $(PIP) install -q --no-build-isolation -e '.[test]'
	touch $@

build ext: $(EXT_SO)

# Rebuilt in place whenever a Cython source or header changes (--force: headers included).
ifneq ($(EXT_SO),)
$(EXT_SO) &: $(EXT_PYX) $(EXT_DEPS) setup.py | $(VENV_STAMP)
	env -u TIERCACHE_NO_EXTENSIONS $(PY) setup.py -q build_ext --inplace --force
	for so in $(EXT_SO); do test -f "$$so" || { echo "missing $$so after build" >&2; exit 1; }; done
	touch $(EXT_SO)
endif

redis: | $(VENV_STAMP)
	PYTHON=$(PY) scripts/install-redis.sh
	touch $(REDIS_STAMP)

$(REDIS_STAMP): scripts/install-redis.sh | $(VENV_STAMP)
	PYTHON=$(PY) scripts/install-redis.sh
	touch $@

# The suite waits on servers and processes more than it computes: several workers (one test file
# each at a time, so module fixtures stay whole) keep both cores busy. PYTEST_WORKERS=0: serial.
test: build $(REDIS_STAMP)
	@$(call run_suite,test,-m 'not slow' -n $(PYTEST_WORKERS) --dist loadfile)

soak: build $(REDIS_STAMP)
	@( $(call run_suite,soak,-m slow) ) || { rc=$$?; [ $$rc = 5 ] && echo "no slow tests yet" || exit $$rc; }

# The demo's optional extras: rich (the live table) and matplotlib (the plot).
$(DEMO_STAMP): pyproject.toml | $(VENV_STAMP)
	{ $(call pyproject_reqs,cli); $(call pyproject_reqs,plot); } | xargs -r -d '\n' $(PIP) install -q
	touch $@

demo: build $(REDIS_STAMP) $(DEMO_STAMP)
	$(PY) -m tiercache demo $(DEMO_ARGS)

$(DOCS_STAMP): pyproject.toml | $(VENV_STAMP)
	$(call pyproject_reqs,docs) | xargs -r -d '\n' $(PIP) install -q
	touch $@

docs: $(DOCS_STAMP)
	$(VENV)/bin/mkdocs build --strict --clean --site-dir build/site

$(BENCH_STAMP): pyproject.toml | $(VENV_STAMP)
	$(call pyproject_reqs,bench) | xargs -r -d '\n' $(PIP) install -q
	touch $@

bench: build $(REDIS_STAMP) $(BENCH_STAMP)
	env -u TIERCACHE_NO_EXTENSIONS TIERCACHE_REQUIRE_EXTENSIONS=1 $(PYTEST) bench \
		-p no:cacheprovider --benchmark-columns=median,iqr,ops --benchmark-sort=name $(PYTEST_ARGS)

$(LINT_STAMP): pyproject.toml | $(VENV_STAMP)
	$(PIP) install -q 'ruff>=0.6'
	touch $@

lint: $(LINT_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(LINT_STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find tiercache -name '*.so' -delete
	find ext -name '*.c' -delete
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
