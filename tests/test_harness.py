"""The test harness itself: a test that hangs where no timeout signal reaches still ends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_HANGS_HOLDING_THE_GIL = textwrap.dedent(
    """
    import ctypes

    import pytest


    @pytest.mark.timeout(1)
    def test_hangs_in_c_holding_the_gil():
        libc = ctypes.PyDLL(None)  # a PyDLL call keeps the GIL: no signal handler runs
        mutex = ctypes.create_string_buffer(64)  # a default pthread mutex is all zeros
        libc.pthread_mutex_lock(mutex)
        libc.pthread_mutex_lock(mutex)  # locked twice: never returns
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's pthread_mutex_lock")
def test_a_test_hung_in_c_with_the_gil_held_is_ended_by_the_last_resort(tmp_path: Path) -> None:
    (tmp_path / "test_hang.py").write_text(_HANGS_HOLDING_THE_GIL)
    env = {**os.environ, "TIERCACHE_TEST_HANG_GRACE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "-s",  # (output captured in the process dies with it: the stacks go to stderr)
            "-q",
            str(tmp_path / "test_hang.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,  # pytest-timeout alone would wait for ever: its SIGALRM never runs
    )
    assert proc.returncode != 0
    assert "Timeout (0:00:02)!" in proc.stderr, proc.stderr[-2000:]
    assert "test_hangs_in_c_holding_the_gil" in proc.stderr  # every thread's stack was printed
