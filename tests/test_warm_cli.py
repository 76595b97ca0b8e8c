"""``tiercache warm``: a real subprocess loading keys with a ``module:function`` loader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tests.servers import RedisServer
from tiercache import TieredCache, cli

LOADER = """
def load_many(keys):
    return {k: "loaded:" + k for k in keys if not k.startswith("gone")}


def some_keys():
    return ["a", "b", "gone1"]


def broken(keys):
    raise RuntimeError("origin unreachable")
"""


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.getcwd()]))
    return subprocess.run(
        [sys.executable, "-m", "tiercache", "warm", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )


@pytest.fixture
def origin_module(tmp_path: Path) -> Path:
    (tmp_path / "wb_origin.py").write_text(LOADER)
    return tmp_path


def test_warm_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["warm", "--help"])
    assert exit_info.value.code == 0
    assert "module:function" in capsys.readouterr().out


def test_warm_from_a_file_with_a_progress_bar(
    redis_server: RedisServer, origin_module: Path
) -> None:
    keys = origin_module / "keys.txt"
    keys.write_text("".join(f"k{i}\n" for i in range(1200)) + "gone2\n\nkept\n")
    with TieredCache(redis_server.url, namespace="cliw", heartbeat_interval=0) as cache:
        cache["kept"] = "newer"
        done = _run(
            origin_module,
            *("--url", redis_server.url, "--namespace", "cliw", "--loader"),
            *("wb_origin:load_many", "--keys", str(keys), "--batch-size", "100", "--live"),
        )
        assert done.returncode == 0, done.stderr
        assert "1202/1202" in done.stdout and "1200 loaded" in done.stdout
        assert cache["k1199"] == "loaded:k1199" and cache["kept"] == "newer"
        assert "gone2" not in cache


def test_warm_keys_from_a_function_as_json(redis_server: RedisServer, origin_module: Path) -> None:
    done = _run(
        origin_module,
        *("--url", redis_server.url, "--namespace", "cliw2", "--loader", "wb_origin:load_many"),
        *("--keys-from", "wb_origin:some_keys", "--json"),
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert (doc["keys"], doc["loaded"], doc["absent"]) == (3, 2, 1)
    client = redis.Redis.from_url(redis_server.url)
    assert client.dbsize() == 2
    client.close()


def test_warm_reports_errors_without_a_traceback(
    redis_server: RedisServer, origin_module: Path
) -> None:
    base = ("--url", redis_server.url, "--keys-from", "wb_origin:some_keys")
    bad_spec = _run(origin_module, *base, "--loader", "no_such_module:f")
    assert bad_spec.returncode == 2 and "no_such_module" in bad_spec.stderr
    failing = _run(origin_module, *base, "--loader", "wb_origin:broken")
    assert failing.returncode == 1 and "origin unreachable" in failing.stderr
    assert "Traceback" not in failing.stderr
