"""The default clock of the local tier: a cheap monotonic clock in seconds."""

from __future__ import annotations

import functools
import time

# CLOCK_MONOTONIC_COARSE costs a few ns (vDSO, no syscall) at jiffy resolution (1-4 ms), which is
# ample for cache TTLs; the Cython twin reads the same clock through ext/_clock.h.
_CLOCK_ID: int = getattr(time, "CLOCK_MONOTONIC_COARSE", getattr(time, "CLOCK_MONOTONIC", 1))

monotonic = functools.partial(time.clock_gettime, _CLOCK_ID)
monotonic.__doc__ = "Seconds on the coarse monotonic clock shared by both implementations."
