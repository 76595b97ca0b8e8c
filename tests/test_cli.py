"""The ``tiercache`` command line, driven as a user would: real subprocesses, real servers.

``tiercache server`` is started, answers PING on the URL it prints and leaves no process behind
after SIGTERM; ``tiercache demo`` runs a short configuration to its verdict (plain output, as in
a pipe, with its PNG; and the live rich table, forced); ``tiercache stats`` shows the heartbeats
of two live processes; every command answers ``--help``.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.servers import RedisServer, pid_alive, wait_until
from tiercache import cli
from tiercache.tiered import TieredCache

COMMANDS = ("demo", "server", "stats", "bench")
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port that was free a moment ago (nothing listens on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiercache_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tiercache", *args]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tiercache_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


class Lines:
    """The stdout of a running process, line by line, read by a thread (waits have deadlines)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._proc = proc
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            for line in self.lines:
                m = re.search(pattern, line)
                if m:
                    return m
            if self._proc.poll() is not None and not self._thread.is_alive():
                raise AssertionError(f"exited {self._proc.returncode}: {self.lines}")
            return None

        return wait_until(found, timeout, message=f"output line matching {pattern!r}")

    def join(self) -> str:
        self._thread.join(10)
        return "\n".join(self.lines)


# -- --help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_of_every_command(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tiercache")
    if command is None:
        assert all(c in out for c in COMMANDS)
    else:
        assert f"tiercache {command}" in out


def test_the_installed_script_and_python_m_answer_help() -> None:
    script = Path(sys.executable).parent / "tiercache"
    assert script.exists(), "the `tiercache` script is installed by `pip install -e .`"
    for cmd in ([str(script), "--help"], tiercache_cmd("demo", "--help")):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
        assert out.startswith("usage: tiercache")


def test_no_command_or_a_wrong_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]):
    for argv in ([], ["demo", "--workers"], ["nope"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert "usage: tiercache" in capsys.readouterr().err


# -- tiercache server -----------------------------------------------------------------------------


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; killed (by pid) at teardown if still running."""
    procs: list[subprocess.Popen[str]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


def test_server_prints_its_url_answers_ping_and_stops_on_sigterm(spawned: list) -> None:
    proc = subprocess.Popen(
        tiercache_cmd("server"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    spawned.append(proc)
    out = Lines(proc)
    url = out.wait_for(r"^url: (redis://\S+)$").group(1)
    server_pid = int(out.wait_for(r", pid (\d+)$").group(1))
    out.wait_for(r"^RedisBloom: ")
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        assert client.ping() is True
        info = client.info("server")
        assert int(info["process_id"]) == server_pid
    finally:
        client.close()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert "stopped (SIGTERM)" in out.join()
    wait_until(lambda: not pid_alive(server_pid), 10, message="server process gone")


def test_server_with_a_fixed_port_and_password(spawned: list) -> None:
    taken = free_port()
    proc = subprocess.Popen(
        tiercache_cmd("server", "--port", str(taken), "--password", "s3cret", "--bloom", "no"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    spawned.append(proc)
    out = Lines(proc)
    url = out.wait_for(r"^url: (redis://\S+)$").group(1)
    assert url == f"redis://:s3cret@127.0.0.1:{taken}/0"
    out.wait_for(r"^RedisBloom: not loaded")
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        assert client.ping()
    finally:
        client.close()
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    assert proc.wait(20) == 0
    assert "stopped (SIGINT)" in out.join()


# -- tiercache demo -------------------------------------------------------------------------------

SHORT_DEMO = ("--no-local", "--workers", "2", "--duration", "2", "--warmup-keys", "40")


def _png_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG, after checking its signature and its header chunk's CRC."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    body = data[16 : 16 + length]
    (crc,) = struct.unpack(">I", data[16 + length : 20 + length])
    assert zlib.crc32(kind + body) == crc, "corrupt IHDR"
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")
    width, height = struct.unpack(">II", body[:8])
    return width, height


def test_demo_runs_to_a_consistent_verdict_without_a_terminal(tmp_path: Path) -> None:
    plot = tmp_path / "plots" / "demo.png"
    done = run("demo", *SHORT_DEMO, "--plot", str(plot), timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "\x1b[" not in out  # plain output in a pipe
    assert re.search(r"^consistency: OK \([\d,]+ operations checked", out, re.M), out
    assert re.search(r"^stampede: OK \(2 processes read 40 cold keys at once: 40 origin", out, re.M)
    warmed = r"^warm-up done in [\d.]+ s: 80 reads of 40 cold keys, 40 origin loads"
    assert re.search(warmed, out, re.M), out
    assert out.rstrip().endswith("verdict: OK")
    table = out[out.index("\nprocess ") + 1 :].splitlines()
    assert table[0].split()[:2] == ["process", "ops/s"] and table[3].split()[0] == "all"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plot: skipped, matplotlib is not installed" in out
        return
    assert f"plot: {plot}" in out
    width, height = _png_size(plot)
    assert width >= 400 and height >= 300


def test_demo_live_table_with_rich(tmp_path: Path) -> None:
    pytest.importorskip("rich")
    done = run("demo", *SHORT_DEMO, "--live", "--duration", "1.5", timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", done.stdout)  # without the terminal codes
    assert "per process, run phase" in text and "lease" in text
    assert "━" in text or "─" in text  # a drawn table, not plain lines
    assert re.search(r"consistency: OK", text) and "verdict: OK" in text


def test_demo_rejects_a_bad_configuration() -> None:
    done = run("demo", "--no-local", "--workers", "0")
    assert done.returncode == 2 and "workers" in done.stderr


# -- tiercache stats ------------------------------------------------------------------------------

HOLDER = """
import sys
from tiercache.tiered import TieredCache
cache = TieredCache(sys.argv[1], namespace=sys.argv[2], heartbeat_interval=0.2,
                    health_interval=0.1, health_timeout=5.0)
cache.wait_ready(10)
cache["from-child"] = 1
print("ready", flush=True)
sys.stdin.read()  # until the test closes it
cache.close()
"""


def test_stats_shows_two_live_processes(shared_redis: RedisServer, spawned: list) -> None:
    namespace = f"fleet-{os.getpid()}"
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, shared_redis.url, namespace],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    spawned.append(child)
    Lines(child).wait_for("^ready$", 30)
    with TieredCache(
        shared_redis.url,
        namespace=namespace,
        heartbeat_interval=0.2,
        health_interval=0.1,
        health_timeout=5.0,
    ) as cache:
        cache["from-parent"] = 2

        def both() -> list[dict[str, Any]] | None:
            done = run("stats", "--url", shared_redis.url, "--namespace", namespace, "--json")
            assert done.returncode == 0, done.stderr
            beats = json.loads(done.stdout)
            return beats if {b["pid"] for b in beats} == {os.getpid(), child.pid} else None

        beats = wait_until(both, 30, interval=0.2, message="both heartbeats")
        assert all("local_hits" in b["stats"] for b in beats)
        once = run("stats", "--url", shared_redis.url, "--namespace", namespace, "--once")
        assert once.returncode == 0, once.stderr
        lines = once.stdout.splitlines()
        assert re.search(rf"namespace '{namespace}' at .*, 2 live processes", lines[0])
        assert lines[1].split()[:3] == ["process", "origin", "age"]
        rows = lines[2:]
        assert len(rows) == 2
        assert {r.split()[0].rsplit(":", 1)[1] for r in rows} == {str(os.getpid()), str(child.pid)}
    assert child.stdin is not None
    child.stdin.close()
    assert child.wait(20) == 0


def test_stats_of_an_empty_namespace_and_of_no_server(shared_redis: RedisServer) -> None:
    done = run("stats", "--url", shared_redis.url, "--namespace", "nobody-here", "--once")
    assert done.returncode == 0
    assert "0 live processes" in done.stdout and "no heartbeat" in done.stdout
    done = run("stats", "--url", f"redis://127.0.0.1:{free_port()}/0", "--once")
    assert done.returncode == 2 and "cannot read" in done.stderr


def test_stats_refreshes_until_interrupted(shared_redis: RedisServer, spawned: list) -> None:
    proc = subprocess.Popen(
        tiercache_cmd("stats", "--url", shared_redis.url, "--interval", "0.2"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    spawned.append(proc)
    out = Lines(proc)
    wait_until(lambda: sum("tiercache fleet" in line for line in out.lines) >= 3, 20)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0


# -- tiercache bench ------------------------------------------------------------------------------


def test_bench_command_line_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    bench_dir = cli.find_bench_dir()
    assert bench_dir == ROOT / "bench"
    monkeypatch.setenv("TIERCACHE_NO_EXTENSIONS", "1")
    cmd, env = cli.bench_command(bench_dir, ["-k", "hit"], quick=True)
    assert cmd[:4] == [sys.executable, "-m", "pytest", str(bench_dir)]
    assert cmd[-2:] == ["-k", "hit"] and "--benchmark-sort=name" in cmd
    assert env["TIERCACHE_REQUIRE_EXTENSIONS"] == "1" and "TIERCACHE_NO_EXTENSIONS" not in env
    assert env["BENCH_QUICK"] == "1"
    _, env = cli.bench_command(bench_dir, [], pure=True)
    assert env["TIERCACHE_NO_EXTENSIONS"] == "1" and "TIERCACHE_REQUIRE_EXTENSIONS" not in env
    assert "BENCH_QUICK" not in env


def test_bench_without_a_suite_says_so(tmp_path: Path) -> None:
    assert cli.find_bench_dir(str(tmp_path)) is None
    done = run("bench", "--bench-dir", str(tmp_path))
    assert done.returncode == 2 and "no benchmark suite" in done.stderr


def test_server_leaves_nothing_behind_when_killed(spawned: list) -> None:
    """Even SIGKILL of the command (no clean-up possible) takes its server down with it."""
    proc = subprocess.Popen(
        tiercache_cmd("server", "--bloom", "no"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    spawned.append(proc)
    out = Lines(proc)
    server_pid = int(out.wait_for(r", pid (\d+)$").group(1))
    proc.kill()
    proc.wait(10)
    deadline = time.monotonic() + 10
    wait_until(lambda: not pid_alive(server_pid), max(1.0, deadline - time.monotonic()))


# -- tiercache bloom ------------------------------------------------------------------------------

BLOOM_KEYS = 2_000
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.parametrize("command", [["bloom"], ["bloom", "warm"], ["bloom", "stats"]])
def test_help_of_the_bloom_commands(command: list[str], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tiercache {' '.join(command)}")
    if command == ["bloom"]:
        assert "warm" in out and "stats" in out
    elif command[1] == "warm":
        assert all(opt in out for opt in ("--capacity", "--error-rate", "--url", "FILE"))
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "bloom" in capsys.readouterr().out


@pytest.fixture(params=["redisbloom", "lua"])
def bloom_target(request: pytest.FixtureRequest) -> tuple[str, RedisServer]:
    """(backend, server): a fresh server with RedisBloom, or the session's shared server (on
    which the test asks the CLI for the bitmap backend)."""
    backend = str(request.param)
    fixture = "redis_bloom_server" if backend == "redisbloom" else "shared_redis"
    return backend, request.getfixturevalue(fixture)


def test_bloom_warm_from_a_file_then_the_cache_filters(
    bloom_target: tuple[str, RedisServer], tmp_path: Path
) -> None:
    from tiercache.bloom import BloomConfig, BloomFilter

    backend, server = bloom_target
    namespace = f"cli-bloom-{backend}-{os.getpid()}"
    present = [f"user:{i}" for i in range(BLOOM_KEYS)]
    listing = tmp_path / "keys.txt"
    listing.write_text("".join(f"{k}\n" for k in present) + "\n", encoding="utf-8")
    # RedisBloom chosen by "auto" and plain progress lines; the bitmaps asked for, and the bar
    shown = ["--plain"] if backend == "redisbloom" else ["--backend", "lua", "--live"]
    warm = run(
        "bloom", "warm", "--url", server.url, "--namespace", namespace, "--capacity", "4000",
        "--batch", "100", "--pipeline", "1", *shown, str(listing),
    )  # fmt: skip
    assert warm.returncode == 0, warm.stdout + warm.stderr
    assert re.search(r"^warmed 2,000 keys in .*filter complete", warm.stdout, re.M), warm.stdout
    assert re.search(rf"^\s+backend\s+{backend}$", warm.stdout, re.M), warm.stdout
    assert re.search(r"^\s+inserted\s+2,000$", warm.stdout, re.M), warm.stdout
    progress = ANSI.sub("", warm.stderr)
    if backend == "redisbloom":  # plain lines, at every tenth of the 20 round trips
        lines = re.findall(r"^warm: ([\d,]+) of 2,000 keys sent \((\d+)%\)", progress, re.M)
        assert len(lines) >= 5 and lines[-1] == ("2,000", "100"), progress
    else:  # the rich bar, forced without a terminal
        assert re.search(r"warm .*2000/2000 keys\s+100%", progress), progress

    absent = [f"ghost:{i}" for i in range(500)]
    loaded: list[str] = []

    def loader(key: str) -> str:
        loaded.append(key)
        if key.startswith("ghost:"):
            raise KeyError(key)
        return f"value of {key}"

    with TieredCache(
        server.url, namespace=namespace, loader=loader, bloom=BloomConfig(4000)
    ) as cache:
        assert cache.wait_ready(10)
        bloom = cache.bloom
        assert isinstance(bloom, BloomFilter)
        try:
            assert bloom.complete  # (this cache reads the filter that exists, whatever it is)
            assert bloom.check_many(present) == [True] * BLOOM_KEYS  # every warmed key: maybe
            sample = present[::20]
            assert [cache.get(k) for k in sample] == [f"value of {k}" for k in sample]
            assert loaded == sample  # a warmed key reaches the loader
            loaded.clear()
            assert all(cache.get(k, "none") == "none" for k in absent)
            assert len(loaded) <= len(absent) // 20, loaded  # absent keys: mostly filtered
            stats = bloom.stats()
            assert stats["inserted"] == BLOOM_KEYS and stats["complete"] is True
            assert stats["backend"] == backend
            assert stats["loads_avoided"] == len(absent) - len(loaded)
        finally:
            bloom.close()

    done = run("bloom", "stats", "--url", server.url, "--namespace", namespace)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\s+inserted\s+2,000$", done.stdout, re.M), done.stdout
    assert re.search(r"^\s+status\s+complete$", done.stdout, re.M), done.stdout


def bloom_in_process(*argv: str, stdin: str | None = None) -> int:
    """``tiercache bloom ...`` run in this process (parsed as the command line parses it)."""
    args = cli.build_parser().parse_args(["bloom", *argv])
    if stdin is None:
        return cli.cmd_bloom(args)
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin.encode()), encoding="utf-8")
    try:
        return cli.cmd_bloom(args)
    finally:
        sys.stdin = saved


def test_bloom_warm_from_stdin_and_its_errors(
    shared_redis: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    from tiercache.bloom import BloomConfig, BloomFilter

    namespace = f"cli-bloom-stdin-{os.getpid()}"
    where = ("--url", shared_redis.url, "--namespace", namespace)
    assert bloom_in_process("warm", *where, "-", stdin="1\n2\n") == 2
    assert "give --capacity" in capsys.readouterr().err  # no filter yet: stdin is not counted
    int_keys = ("--key-type", "int", "--capacity", "100")
    assert bloom_in_process("warm", *where, *int_keys, "-", stdin="1\n2\nthree\n") == 2
    err = capsys.readouterr().err
    assert "line 3: not an int key: 'three'" in err and "not marked complete" in err
    assert bloom_in_process("stats", *where, "--json") == 0
    assert json.loads(capsys.readouterr().out)["complete"] is False

    done = subprocess.run(
        tiercache_cmd("bloom", "warm", *where, *int_keys, "--json", "-"),
        input="1\n\n2\n3\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)  # --json: stdout holds the stats only
    assert doc["complete"] is True and doc["capacity"] == 100 and doc["inserted"] == 3
    assert "warmed 3 keys" in done.stderr
    with TieredCache(shared_redis.url, namespace=namespace, bloom=BloomConfig(100)) as cache:
        bloom = cache.bloom
        assert isinstance(bloom, BloomFilter)
        try:  # int keys were registered: the str "1" is another key
            assert bloom.check_many([1, 2, 3, "1"]) == [True, True, True, False]
        finally:
            bloom.close()

    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    assert bloom_in_process("stats", "--url", nowhere, "--timeout", "1") == 2
    assert "cannot open the filter" in capsys.readouterr().err
