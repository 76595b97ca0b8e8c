"""examples/fastapi_app.py under a real ASGI server: two uvicorn processes, one real Redis.

Each app process runs ``python -m uvicorn`` on port 0 of 127.0.0.1 (the port it got is read from
its log), with the test's own redis-server and a SQLite file as the database. Over HTTP: a read
loads once and is then served by the local tier, the other process reads it from Redis without
loading, a PUT on one process is seen by the other (the invalidation crossed processes), a
DELETE is a 404 everywhere, the memoized ``async def`` runs once. The processes are stopped by
pid (SIGTERM, then SIGKILL at a deadline) and must exit cleanly: no traceback, no pending task,
no unclosed connection in their logs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import RedisServer, pid_alive, wait_until

ROOT = Path(__file__).resolve().parent.parent
STARTUP = 30.0  # deadline for an app process to listen
STOP = 10.0  # deadline for an app process to exit after SIGTERM


class App:
    """One uvicorn process serving examples.fastapi_app."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-W",
                "always::ResourceWarning",
                "-m",
                "uvicorn",
                "examples.fastapi_app:app",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--log-level",
                "info",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self._reader.start()
        self.port = int(wait_until(self._port, STARTUP, message=f"{name} listening"))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _port(self) -> int | None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.log()}")
        for line in list(self.lines):
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                return int(m.group(1))
        return None

    def log(self) -> str:
        return "\n".join(self.lines)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, JSON body) of one HTTP request."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, (status, body)
        return body

    def stop(self) -> int:
        """SIGTERM by pid, SIGKILL at the deadline; the exit status."""
        pid = self.proc.pid
        if self.proc.poll() is None:
            os.kill(pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP)
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self.proc.wait(STOP)
        self._reader.join(STOP)
        assert not pid_alive(pid)
        return self.proc.returncode


@pytest.fixture
def apps(redis_server: RedisServer, tmp_path: Path) -> Iterator[tuple[App, App]]:
    db = tmp_path / "users.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO users VALUES (1, 'ada'), (2, 'grace')")
    env = {
        **os.environ,
        "TIERCACHE_REDIS_URL": redis_server.url,
        "TIERCACHE_NAMESPACE": "example",
        "EXAMPLE_DB": str(db),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "PYTHONASYNCIODEBUG": "1",  # asyncio reports unawaited coroutines and slow callbacks
    }
    started: list[App] = []
    try:
        started.append(App("A", env))
        started.append(App("B", env))
        yield started[0], started[1]
    finally:
        codes = {a.name: a.stop() for a in started}
    for a in started:
        log = a.log()
        bad_signs = (
            "Traceback",
            "Task was destroyed",
            "Unclosed",
            "ResourceWarning",
            "never awaited",
        )
        for bad in bad_signs:
            assert bad not in log, f"{a.name}'s log shows {bad!r}:\n{log}"
        # uvicorn re-raises the SIGTERM it handled once its shutdown is complete.
        assert codes[a.name] in (0, -signal.SIGTERM), f"{a.name} exited {codes[a.name]}:\n{log}"
        assert "Application shutdown complete" in log and "Finished server process" in log


def test_the_fastapi_example_caches_and_invalidates_over_http(apps: tuple[App, App]) -> None:
    a, b = apps
    assert a.get("/stats")["pid"] != b.get("/stats")["pid"]
    wait_until(lambda: a.get("/stats")["local_usable"] and b.get("/stats")["local_usable"], 10)

    # A read loads once, then comes from the local tier; the other process reads Redis.
    assert a.get("/users/1") == {"id": 1, "name": "ada"}
    assert a.get("/users/1") == {"id": 1, "name": "ada"}
    sa = a.get("/stats")
    assert (sa["loads"], sa["local_hits"] >= 1) == (1, True), sa
    assert b.get("/users/1") == {"id": 1, "name": "ada"}
    sb = b.get("/stats")
    assert (sb["loads"], sb["remote_hits"]) == (0, 1), sb

    # A write through B reaches A's local copy (cache-aside: database, then invalidate).
    assert b.request("PUT", "/users/1", {"name": "lovelace"}) == (
        200,
        {"id": 1, "name": "lovelace"},
    )
    wait_until(lambda: a.get("/users/1")["name"] == "lovelace", 5, message="A sees B's write")
    assert a.get("/stats")["invalidations_received"] >= 1

    # Absent users: 404, and the absence is cached (one load for two reads).
    assert a.request("GET", "/users/9")[0] == 404
    assert b.request("GET", "/users/9")[0] == 404
    loads = a.get("/stats")["loads"] + b.get("/stats")["loads"]
    assert a.request("GET", "/users/9")[0] == 404
    assert a.get("/stats")["loads"] + b.get("/stats")["loads"] == loads

    # A delete through A is a 404 on B too; a new user created through B is seen by A.
    assert b.get("/users/2") == {"id": 2, "name": "grace"}
    assert a.request("DELETE", "/users/2")[0] == 200
    wait_until(lambda: b.request("GET", "/users/2")[0] == 404, 5, message="B sees the delete")
    assert b.request("PUT", "/users/9", {"name": "new"})[0] == 200
    wait_until(lambda: a.request("GET", "/users/9") == (200, {"id": 9, "name": "new"}), 5)

    # The memoized coroutine: computed once in A, then a local hit in A and a Redis hit in B.
    assert a.get("/squares/12") == {"n": 12, "square": 144, "calls": 1}
    assert a.get("/squares/12") == {"n": 12, "square": 144, "calls": 1}
    assert b.get("/squares/12") == {"n": 12, "square": 144, "calls": 0}
