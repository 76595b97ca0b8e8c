"""Count-min frequency sketch with aging, the admission filter of W-TinyLFU (pure-Python twin).

Four rows of 4-bit counters (saturating at 15), each row ``4 * capacity`` counters wide, where
``capacity`` is the next power of two >= the cache's ``maxsize``: 16 counters per cached entry,
as in Caffeine and theine. An item's frequency is the minimum of its four counters, and an
increment raises only the counters at that minimum (conservative update), so a collision inflates
a count less. After ``sample_size`` (ten per unit of capacity) increments that raised a counter,
every counter is halved, so old popularity fades (Einziger, Friedman, Manes: "TinyLFU", 2017).
ext/_local.pyx implements the same arithmetic in C on packed counters; both must give identical
answers for the same hashes.
"""

from __future__ import annotations

MASK64 = (1 << 64) - 1
DEPTH = 4
MAX_COUNT = 15
ROW_SPREAD = 4  # counters per row per unit of capacity
SAMPLE_FACTOR = 10  # counted increments per unit of capacity between two halvings
_HALVE = bytes(i >> 1 for i in range(256))
_EVEN = bytes(range(0, 256, 2))


def mix64(x: int) -> int:
    """splitmix64 finaliser: spreads the bits of a (possibly weak) 64-bit hash."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK64
    return x ^ (x >> 31)


def sketch_capacity(maxsize: int) -> int:
    """The sketch's unit of size: the next power of two >= maxsize (at least 16)."""
    capacity = 16
    while capacity < maxsize:
        capacity <<= 1
    return capacity


def sketch_width(maxsize: int) -> int:
    """Counters per row: ``ROW_SPREAD`` per unit of capacity (a power of two)."""
    return ROW_SPREAD * sketch_capacity(maxsize)


class FrequencySketch:
    """Approximate access counts of recently seen keys, by 64-bit key hash."""

    __slots__ = ("additions", "epoch", "mask", "rows", "sample_size")

    def __init__(self, maxsize: int) -> None:
        width = sketch_width(maxsize)
        self.mask = width - 1
        self.rows = [bytearray(width) for _ in range(DEPTH)]  # one counter per byte
        self.sample_size = SAMPLE_FACTOR * sketch_capacity(maxsize)
        self.additions = 0
        self.epoch = 1  # halvings so far, plus one (0 never matches an entry's mark)

    def _indexes(self, h: int) -> list[int]:
        h1 = h & 0xFFFFFFFF
        h2 = (h >> 32) | 1
        mask = self.mask
        return [(h1 + i * h2) & mask for i in range(DEPTH)]

    def frequency(self, h: int) -> int:
        """Estimated count of the key with spread hash ``h`` (0..15)."""
        rows = self.rows
        return min(rows[i][j] for i, j in enumerate(self._indexes(h)))

    def increment(self, h: int) -> bool:
        """Count one access of the key with spread hash ``h``; True if that was a no-op."""
        rows = self.rows
        indexes = self._indexes(h)
        low = min(rows[i][j] for i, j in enumerate(indexes))
        if low == MAX_COUNT:
            return True  # saturated: not counted, so heavy hitters do not hasten the halving
        for i, j in enumerate(indexes):
            if rows[i][j] == low:
                rows[i][j] = low + 1
        self.additions += 1
        if self.additions >= self.sample_size:
            self._age()  # halve all counters once per sample
        return False

    def _age(self) -> None:
        """Halve every counter: old popularity fades."""
        odd = 0
        for row in self.rows:
            odd += len(row.translate(None, _EVEN))  # halving loses half a count of odd ones
            row[:] = row.translate(_HALVE)
        # Halved as the counters were, less the half count flooring took from each odd counter
        # (an addition spans four counters), as Caffeine does.
        self.additions = max(0, self.additions - odd // DEPTH) >> 1
        self.epoch += 1
