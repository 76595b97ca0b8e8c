"""OS processes for the write-behind, write-around and warm-up tests, and their SQLite origin.

Run as ``python tests/wb_procs.py <role> '<json options>'``; each role prints one JSON line when
it is done (``flusher``, ``writer``) or speaks a line protocol on stdin/stdout (``reader``).

* ``flusher``: a WriteBehind whose writer applies each item to the SQLite origin in its own
  transaction (so a kill leaves a batch half applied) and logs every application; ``stall_after``
  makes it touch ``marker`` after that many items of its first batch and hang there (the test
  SIGKILLs it); otherwise it flushes until nothing is pending (or runs ``run_for`` seconds).
* ``writer``: sets the given keys to ``<prefix><n>`` in random order, one at a time.
* ``reader``: loads a key from the origin through the cache, says ``ready``, and on ``go`` polls
  the cache until it shows ``expect`` (a write-around elsewhere must reach it).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # the repository root, for ``tiercache`` and ``tests``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tiercache import TieredCache, WriteBehind, WriteBehindItem

SCHEMA = """
CREATE TABLE IF NOT EXISTS origin (key TEXT PRIMARY KEY, value TEXT, version INTEGER);
CREATE TABLE IF NOT EXISTS applied (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT, version INTEGER, deleted INTEGER, pid INTEGER
);
"""


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection to the origin database (created if needed)."""
    db = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    return db


class SqliteOrigin:
    """A write-behind writer: each item in its own transaction, every application logged.

    The origin write is unconditional (the last applied item wins), so the tests see any
    out-of-order application by the library; ``conditional=True`` is the production pattern.
    """

    def __init__(
        self, path: str | Path, *, conditional: bool = False, stall_after: int | None = None
    ) -> None:
        self.db = connect(path)
        self.conditional = conditional
        self.stall_after = stall_after
        self.marker: Path | None = None
        self.calls = 0

    def __call__(self, batch: list[WriteBehindItem]) -> None:
        self.calls += 1
        for n, item in enumerate(batch):
            if self.stall_after is not None and n == self.stall_after:
                if self.marker is not None:
                    self.marker.write_text(str(n))
                time.sleep(600)  # the test kills this process here
            self.apply(item)

    def apply(self, item: WriteBehindItem) -> None:
        """Apply one item and log it, in one transaction."""
        key = str(item.key)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute(
                "INSERT INTO applied (key, version, deleted, pid) VALUES (?, ?, ?, ?)",
                (key, item.version, int(item.deleted), os.getpid()),
            )
            if item.deleted:
                cond = " AND version < ?" if self.conditional else ""
                args = (key, item.version) if self.conditional else (key,)
                self.db.execute(f"DELETE FROM origin WHERE key = ?{cond}", args)
            else:
                where = " WHERE excluded.version > origin.version" if self.conditional else ""
                self.db.execute(
                    "INSERT INTO origin (key, value, version) VALUES (?, ?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value, "
                    f"version = excluded.version{where}",
                    (key, json.dumps(item.value), item.version),
                )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise


def origin_rows(path: str | Path) -> dict[str, tuple[Any, int]]:
    """The origin: key -> (value, version)."""
    db = connect(path)
    try:
        rows = db.execute("SELECT key, value, version FROM origin").fetchall()
    finally:
        db.close()
    return {k: (json.loads(v), ver) for k, v, ver in rows}


def applied_log(path: str | Path) -> list[tuple[str, int, int]]:
    """Every application, in order: (key, version, pid)."""
    db = connect(path)
    try:
        return db.execute("SELECT key, version, pid FROM applied ORDER BY id").fetchall()
    finally:
        db.close()


def _cache(opts: dict[str, Any], **extra: Any) -> TieredCache:
    return TieredCache(opts["url"], namespace=opts["namespace"], **extra)


def run_flusher(opts: dict[str, Any]) -> dict[str, Any]:
    """The ``flusher`` role."""
    origin = SqliteOrigin(
        opts["db"], conditional=opts.get("conditional", False), stall_after=opts.get("stall_after")
    )
    if opts.get("marker"):
        origin.marker = Path(opts["marker"])
    with _cache(opts, heartbeat_interval=0) as cache:
        wb = WriteBehind(
            cache,
            origin,
            batch_size=opts.get("batch_size", 100),
            flush_interval=opts.get("flush_interval", 0.02),
            lock_ttl=opts.get("lock_ttl", 1.0),
            claim_idle=opts.get("claim_idle"),
            retry_backoff=0.01,
            start=False,
        )
        if opts.get("run_for"):
            wb.start()
            time.sleep(opts["run_for"])
            wb.close()
            ok = True
        else:
            ok = wb.flush(timeout=opts.get("timeout", 60.0))
            wb.close()
        stats = dict(wb._counts)
    return {"ok": ok, "pid": os.getpid(), **stats}


def run_writer(opts: dict[str, Any]) -> dict[str, Any]:
    """The ``writer`` role."""
    keys = list(opts["keys"])
    random.Random(opts.get("seed", 0)).shuffle(keys)
    with _cache(opts, heartbeat_interval=0) as cache:
        for n, key in enumerate(keys):
            cache[key] = f"{opts['prefix']}{n}"
            if opts.get("pause"):
                time.sleep(opts["pause"])
    return {"ok": True, "written": len(keys)}


def run_reader(opts: dict[str, Any]) -> None:
    """The ``reader`` role (line protocol)."""
    db_path = opts["db"]

    def load(key: str) -> Any:
        rows = origin_rows(db_path)
        if key not in rows:
            raise KeyError(key)
        return rows[key][0]

    with _cache(opts, heartbeat_interval=0, loader=load, local_ttl=300.0) as cache:
        cache.wait_ready(10.0)
        first = cache[opts["key"]]
        print(json.dumps({"ready": first}), flush=True)
        sys.stdin.readline()  # "go"
        deadline = time.monotonic() + opts.get("timeout", 10.0)
        value = cache[opts["key"]]
        while value != opts["expect"] and time.monotonic() < deadline:
            time.sleep(0.005)
            value = cache[opts["key"]]
        print(json.dumps({"value": value, "stats": cache.stats()["invalidations_received"]}))


def main() -> None:
    role, opts = sys.argv[1], json.loads(sys.argv[2])
    if role == "flusher":
        print(json.dumps(run_flusher(opts)), flush=True)
    elif role == "writer":
        print(json.dumps(run_writer(opts)), flush=True)
    elif role == "reader":
        run_reader(opts)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main()
