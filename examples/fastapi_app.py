"""A FastAPI service with an AsyncTieredCache in front of its database.

Run it (Redis on localhost, the database a SQLite file):

    TIERCACHE_REDIS_URL=redis://127.0.0.1:6379/0 EXAMPLE_DB=/tmp/users.db \
        uvicorn examples.fastapi_app:app --port 8000

Start two of them on two ports: a PUT on one is seen by a GET on the other at once (the write
invalidates the key in every process' local tier through Redis pub/sub).

* ``GET /users/{id}``: read-through, cache-aside. The loader is a plain function (SQLite is
  blocking): the cache runs it in a worker thread, once per key across all processes at a time.
* ``PUT /users/{id}`` / ``DELETE /users/{id}``: write the database, then invalidate the key.
* ``GET /squares/{n}``: an ``async def`` memoized with ``@tiered_cache(cache)``.
* ``GET /stats``: the cache's counters.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from tiercache import AsyncTieredCache, tiered_cache

DB_PATH = os.environ.get("EXAMPLE_DB", "users.db")
cache = AsyncTieredCache(
    os.environ.get("TIERCACHE_REDIS_URL", "redis://127.0.0.1:6379/0"),
    namespace=os.environ.get("TIERCACHE_NAMESPACE", "example"),
    ttl=300.0,
    negative_ttl=30.0,
)
square_calls = 0  # how often the memoized function really ran in this process


def _db() -> sqlite3.Connection:
    conn = sqlite3.connect(DB_PATH, timeout=5.0)
    conn.execute("CREATE TABLE IF NOT EXISTS users (id INTEGER PRIMARY KEY, name TEXT)")
    return conn


def load_user(key: tuple[str, int]) -> dict[str, Any]:
    """The origin read (blocking, run in a worker thread); KeyError: no such user."""
    with _db() as conn:
        row = conn.execute("SELECT id, name FROM users WHERE id = ?", (key[1],)).fetchone()
    if row is None:
        raise KeyError(key)
    return {"id": row[0], "name": row[1]}


@tiered_cache(cache, ttl=60)
async def square(n: int) -> int:
    """Stands for an expensive coroutine (a remote call, a heavy query)."""
    global square_calls
    square_calls += 1
    await asyncio.sleep(0.01)
    return n * n


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await cache.start()  # the invalidation listener: local copies are served once it is up
    try:
        yield
    finally:
        await cache.aclose()


app = FastAPI(lifespan=lifespan)


class User(BaseModel):
    name: str


@app.get("/users/{user_id}")
async def get_user(user_id: int) -> dict[str, Any]:
    try:
        return await cache.get_or_load(("user", user_id), load_user)
    except KeyError:
        raise HTTPException(404, "no such user") from None


@app.put("/users/{user_id}")
async def put_user(user_id: int, user: User) -> dict[str, Any]:
    def write() -> None:
        with _db() as conn:
            conn.execute("INSERT OR REPLACE INTO users VALUES (?, ?)", (user_id, user.name))

    await asyncio.to_thread(write)
    await cache.invalidate(("user", user_id))  # the database first, then every process' copy
    return {"id": user_id, "name": user.name}


@app.delete("/users/{user_id}")
async def delete_user(user_id: int) -> dict[str, bool]:
    def delete() -> None:
        with _db() as conn:
            conn.execute("DELETE FROM users WHERE id = ?", (user_id,))

    await asyncio.to_thread(delete)
    return {"was_cached": await cache.invalidate(("user", user_id))}


@app.get("/squares/{n}")
async def get_square(n: int) -> dict[str, int]:
    return {"n": n, "square": await square(n), "calls": square_calls}


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return {**cache.stats(), "pid": os.getpid()}
