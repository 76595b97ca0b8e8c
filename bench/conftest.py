"""pytest configuration of the benchmark suite (``make bench`` runs ``pytest bench``).

- Modules run in the order of their ``BENCH_ORDER`` (timing groups first, the long hit-ratio
  simulation last), so the timings are not taken right after a memory-heavy simulation.
- At the end, ``pytest_terminal_summary`` prints the Markdown report (``report.render_report``)
  and writes it to ``bench/results.md``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # harness/report/traces are plain modules next to this file
    sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import report  # noqa: E402

RESULTS_MD = HERE / "results.md"


def pytest_configure(config: pytest.Config) -> None:
    # pytest-benchmark's own table: fewer columns unless asked (its ns figures are per round)
    if hasattr(config.option, "benchmark_columns"):
        try:
            from pytest_benchmark.utils import DEFAULT_COLUMNS
        except ImportError:  # pragma: no cover - layout of another pytest-benchmark version
            DEFAULT_COLUMNS = None
        cols = config.option.benchmark_columns
        if cols is None or (DEFAULT_COLUMNS and list(cols) == list(DEFAULT_COLUMNS)):
            config.option.benchmark_columns = ["min", "median", "rounds"]
    _, ext = report.implementation()
    if ext is None:
        report.note("tiercache rows were skipped: the package is not importable yet")
    if harness.QUICK:
        report.note("BENCH_QUICK=1: smoke-run settings (few rounds, hit ratio on a prefix)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def order(item: pytest.Item) -> int:
        return getattr(getattr(item, "module", None), "BENCH_ORDER", 50)

    items.sort(key=order)  # stable: keeps parametrization order within a module


def pytest_report_header(config: pytest.Config) -> list[str]:
    impl, _ = report.implementation()
    return [f"tiercache bench: {impl}"]


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the report is the last word
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not report.TIMINGS and not any(s.rows for s in report.SECTIONS.values()):
        return
    text = report.render_report()
    terminalreporter.section("tiercache benchmark report (also in bench/results.md)")
    for line in text.splitlines():
        terminalreporter.write_line(line)
    if not os.environ.get("BENCH_NO_WRITE"):
        RESULTS_MD.write_text(text, encoding="utf-8")


@pytest.fixture(scope="session")
def tc():
    """The tiercache package (skips the test when it is not importable yet)."""
    mod = harness.tiercache_or_none()
    if mod is None:
        pytest.skip("tiercache is not importable yet")
    return mod
