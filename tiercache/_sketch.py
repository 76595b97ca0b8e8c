"""Count-min frequency sketch with aging, the admission filter of W-TinyLFU (pure-Python twin).

Four rows of 4-bit counters (saturating at 15); an item's frequency is the minimum of its four
counters. After ``sample_size`` increments every counter is halved, so old popularity fades
(Einziger, Friedman, Manes: "TinyLFU", 2017). ext/_local.pyx implements the same arithmetic in C;
both must give identical answers for the same hashes.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
DEPTH = 4
MAX_COUNT = 15
_HALVE = bytes(i >> 1 for i in range(256))


def mix64(x: int) -> int:
    """splitmix64 finaliser: spreads the bits of a (possibly weak) 64-bit hash."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK64
    return x ^ (x >> 31)


def sketch_width(maxsize: int) -> int:
    """Counters per row: the next power of two >= maxsize (at least 16)."""
    width = 16
    while width < maxsize:
        width <<= 1
    return width


class FrequencySketch:
    """Approximate access counts of recently seen keys, by 64-bit key hash."""

    __slots__ = ("additions", "mask", "rows", "sample_size")

    def __init__(self, maxsize: int) -> None:
        width = sketch_width(maxsize)
        self.mask = width - 1
        self.rows = [bytearray(width) for _ in range(DEPTH)]
        self.sample_size = 10 * max(maxsize, 1)
        self.additions = 0

    def _indexes(self, h: int) -> list[int]:
        h1 = h & 0xFFFFFFFF
        h2 = (h >> 32) | 1
        mask = self.mask
        return [(h1 + i * h2) & mask for i in range(DEPTH)]

    def frequency(self, h: int) -> int:
        """Estimated count of the key with spread hash ``h`` (0..15)."""
        rows = self.rows
        return min(rows[i][j] for i, j in enumerate(self._indexes(h)))

    def increment(self, h: int) -> None:
        """Count one access of the key with spread hash ``h``; halve all counters periodically."""
        rows = self.rows
        for i, j in enumerate(self._indexes(h)):
            if rows[i][j] < MAX_COUNT:
                rows[i][j] += 1
        self.additions += 1
        if self.additions >= self.sample_size:
            self._age()

    def _age(self) -> None:
        for row in self.rows:
            row[:] = row.translate(_HALVE)
        self.additions >>= 1
