# cython: language_level=3, auto_pickle=False
"""The in-process tier in Cython: the twin of tiercache/_local_py.py, with the same behaviour.

The semantics are documented once, in tiercache/_local_py.py; this file mirrors it class for class.
What differs is how it stays thread-safe cheaply:

* List links are C structs embedded in each Entry and never own a reference (the map owns the
  entries), so a hit costs pointer writes, not reference counting.
* A read hit takes no lock: its dict lookup and list surgery run with the GIL held and call no
  Python code (unless a Python ``timer`` was injected: then the hit re-checks that the entry is
  still linked after calling it). Every mutation runs under a GIL-protected owner flag, and keeps
  the structures consistent wherever Python code can run inside it (key ``__eq__``, allocation
  triggering the garbage collector): an entry is linked before it enters the map and leaves the
  map before it is unlinked. Replaced and evicted values are released after the flag is cleared.
"""

cimport cython
from cpython.dict cimport PyDict_DelItem, PyDict_SetDefault, PyDict_SetItem
from cpython.exc cimport PyErr_NoMemory


from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject, PyObject_Hash
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memset

import heapq
import numbers
import operator
import sys
from collections.abc import KeysView, Mapping, MutableMapping

from tiercache._sentinel import MISSING
from tiercache._views import LocalItemsView, LocalValuesView


cdef extern from "_clock.h":
    double tc_monotonic() noexcept nogil

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "Python.h":
    void* PyThreadState_Get()
    # The hit path's lookup, on borrowed pointers: no reference counting of the map or key.
    PyObject* dict_lookup "PyDict_GetItemWithError"(PyObject* mp, PyObject* key) except? NULL
    Py_ssize_t PyDict_GET_SIZE(PyObject* mp)
    Py_ssize_t PyList_GET_SIZE(object op)
    Py_ssize_t Py_REFCNT(object o)

cdef extern from "<math.h>":
    const double INF "INFINITY"

cdef extern from "Python.h":
    ctypedef PyObject* (*ternaryfunc)(PyObject*, PyObject*, PyObject*)
    ctypedef struct PyTypeObject:
        ternaryfunc tp_call
    void PyType_Modified(PyTypeObject* t)
    Py_ssize_t PyTuple_GET_SIZE(object op)
    PyObject* PyTuple_GET_ITEM(object op, Py_ssize_t i)
    void Py_INCREF(object o)


cdef object _MISSING = object()
POLICIES = ("lru", "lfu", "tinylfu")

# W-TinyLFU layout (Caffeine's defaults) and its admission rule.
cdef enum:
    WINDOW_PERCENT = 1
    PROTECTED_PERCENT = 80
    ADMIT_HASHDOS_THRESHOLD = 6
    DEPTH = 4  # rows of the frequency sketch
    MAX_COUNT = 15  # 4-bit counters
    ROW_SPREAD = 4  # counters per row per unit of capacity
    SAMPLE_FACTOR = 10  # counted increments per unit of capacity between two halvings

# Segments an entry can be in (Entry.segment); NONE means not linked in any policy structure.
cdef enum:
    NONE = 0
    WINDOW = 1
    PROBATION = 2
    PROTECTED = 3
    LRU_RING = 4
    LFU_RING = 5

# 64-bit constants as typed globals: a bare literal above 2**31 would be a Python int.
cdef uint64_t GOLDEN = 0x9E3779B97F4A7C15
cdef uint64_t LOW32 = 0xFFFFFFFF
cdef uint64_t MIX1 = 0xBF58476D1CE4E5B9
cdef uint64_t MIX2 = 0x94D049BB133111EB
cdef uint64_t XORSHIFT_STAR = 0x2545F4914F6CDD1D
cdef uint64_t NIBBLE_LOW_BITS = 0x1111111111111111
cdef uint64_t NIBBLE_HALF_MASK = 0x7777777777777777
cdef uint64_t BYTE_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F
cdef uint64_t BYTE_ONES = 0x0101010101010101
MASK64 = 0xFFFFFFFFFFFFFFFF


# -- intrusive lists ----------------------------------------------------------------------------

cdef struct Link:
    Link* prev
    Link* next
    PyObject* owner  # the Entry (borrowed); NULL for a ring's sentinel


cdef struct Ring:
    Link head
    Py_ssize_t size


cdef inline void ring_init(Ring* r) noexcept:
    r.head.prev = &r.head
    r.head.next = &r.head
    r.head.owner = NULL
    r.size = 0


cdef inline void ring_push_front(Ring* r, Link* l) noexcept:
    cdef Link* first = r.head.next
    l.prev = &r.head
    l.next = first
    first.prev = l
    r.head.next = l
    r.size += 1


cdef inline void ring_remove(Ring* r, Link* l) noexcept:
    l.prev.next = l.next
    l.next.prev = l.prev
    l.prev = NULL
    l.next = NULL
    r.size -= 1


cdef inline void ring_move_front(Ring* r, Link* l) noexcept:
    cdef Link* first = r.head.next
    if first != l:
        l.prev.next = l.next
        l.next.prev = l.prev
        l.prev = &r.head
        l.next = first
        first.prev = l
        r.head.next = l


cdef inline PyObject* ring_back_except(Ring* r, PyObject* protect) noexcept:
    """The least recent entry other than ``protect``, or NULL."""
    cdef Link* l = r.head.prev
    if protect != NULL and l.owner == protect:
        l = l.prev
    return l.owner


# -- entries ------------------------------------------------------------------------------------

cdef struct FreqNode:
    Py_ssize_t count
    Ring ring
    FreqNode* prev
    FreqNode* next


@cython.final
@cython.freelist(64)
cdef class Entry:
    """One cached value and its metadata (read-only)."""

    # The fields a hit reads come first, so they share the object's first cache line.
    cdef readonly object value
    cdef readonly double expires
    cdef Link link  # the policy's order
    cdef readonly object key
    cdef Link tlink  # expiry order, for entries with the cache's default TTL
    cdef readonly double fresh_until
    cdef readonly unsigned long long version
    cdef readonly Py_ssize_t weight
    cdef uint64_t hash
    cdef unsigned long long heap_seq  # its item in the expiry heap (per-key TTLs), 0 if none
    cdef int segment
    cdef unsigned int sketch_epoch  # the sketch's epoch in which its counters were all at max
    cdef FreqNode* freq

    def __repr__(self):
        return f"Entry(key={self.key!r}, version={self.version}, expires={self.expires})"


cdef inline Entry new_entry(object key, object value):
    cdef Entry e = Entry.__new__(Entry)
    e.link.owner = <PyObject*>e
    e.tlink.owner = <PyObject*>e
    e.key = key
    e.value = value
    e.expires = INF
    e.fresh_until = INF
    return e


cdef inline Entry as_entry(PyObject* p):
    return None if p == NULL else <Entry>p


cdef inline PyObject* as_ptr(Entry e) noexcept:
    return NULL if e is None else <PyObject*>e


# -- policies -----------------------------------------------------------------------------------

cdef class _Policy:
    """Where entries are kept in use order and which one goes next."""

    cdef int insert(self, Entry e) noexcept:
        """Link a new entry; -1 with MemoryError set if that needs memory it cannot get."""
        return 0

    cdef int touch(self, Entry e) except -1:
        return 0

    cdef void remove(self, Entry e) noexcept:
        pass

    cdef Entry evict(self, Entry protect):
        return None


@cython.final
cdef class _LRU(_Policy):
    """Least recently used."""

    cdef Ring ring

    def __cinit__(self, Py_ssize_t maxsize, uint64_t seed):
        ring_init(&self.ring)

    cdef int insert(self, Entry e) noexcept:
        e.segment = LRU_RING
        ring_push_front(&self.ring, &e.link)
        return 0

    cdef int touch(self, Entry e) except -1:
        ring_move_front(&self.ring, &e.link)
        return 0

    cdef void remove(self, Entry e) noexcept:
        ring_remove(&self.ring, &e.link)
        e.segment = NONE

    cdef Entry evict(self, Entry protect):
        return as_entry(ring_back_except(&self.ring, as_ptr(protect)))


@cython.final
cdef class _LFU(_Policy):
    """Least frequently used, least recently used among equals; O(1) per operation."""

    cdef FreqNode head  # sentinel of the ascending list of counts

    def __cinit__(self, Py_ssize_t maxsize, uint64_t seed):
        self.head.count = 0
        ring_init(&self.head.ring)
        self.head.prev = &self.head
        self.head.next = &self.head

    def __dealloc__(self):
        cdef FreqNode* node = self.head.next
        cdef FreqNode* nxt
        while node != &self.head:
            nxt = node.next
            PyMem_Free(node)
            node = nxt

    cdef FreqNode* _node_after(self, FreqNode* node, Py_ssize_t count) noexcept:
        """The node for ``count`` right after ``node``, made if missing (NULL + MemoryError)."""
        cdef FreqNode* nxt = node.next
        if nxt != &self.head and nxt.count == count:
            return nxt
        cdef FreqNode* new = <FreqNode*>PyMem_Malloc(sizeof(FreqNode))
        if new == NULL:
            PyErr_NoMemory()
            return NULL
        new.count = count
        ring_init(&new.ring)
        new.prev = node
        new.next = nxt
        nxt.prev = new
        node.next = new
        return new

    cdef inline void _unlink_if_empty(self, FreqNode* node) noexcept:
        if node.ring.size == 0:
            node.prev.next = node.next
            node.next.prev = node.prev
            PyMem_Free(node)

    cdef int insert(self, Entry e) noexcept:
        cdef FreqNode* node = self._node_after(&self.head, 1)
        if node == NULL:
            return -1
        ring_push_front(&node.ring, &e.link)
        e.freq = node
        e.segment = LFU_RING
        return 0

    cdef int touch(self, Entry e) except -1:
        cdef FreqNode* node = e.freq
        cdef FreqNode* nxt = self._node_after(node, node.count + 1)
        if nxt == NULL:
            return -1
        ring_remove(&node.ring, &e.link)
        ring_push_front(&nxt.ring, &e.link)
        e.freq = nxt
        self._unlink_if_empty(node)
        return 0

    cdef void remove(self, Entry e) noexcept:
        cdef FreqNode* node = e.freq
        ring_remove(&node.ring, &e.link)
        e.freq = NULL
        e.segment = NONE
        self._unlink_if_empty(node)

    cdef Entry evict(self, Entry protect):
        cdef FreqNode* node = self.head.next
        cdef PyObject* victim
        while node != &self.head:
            victim = ring_back_except(&node.ring, as_ptr(protect))
            if victim != NULL:
                return <Entry>victim
            node = node.next
        return None


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    """splitmix64 finaliser: spreads the bits of a (possibly weak) 64-bit hash."""
    x = (x ^ (x >> 30)) * MIX1
    x = (x ^ (x >> 27)) * MIX2
    return x ^ (x >> 31)


cdef void clear_marks(Ring* r) noexcept:
    """Forget the saturation marks (Entry.sketch_epoch) of the entries in ``r``."""
    cdef Link* l = r.head.next
    while l != &r.head:
        (<Entry>l.owner).sketch_epoch = 0
        l = l.next


cdef inline Py_ssize_t odd_counters(uint64_t w) noexcept:
    """How many of the sixteen 4-bit counters packed in ``w`` are odd."""
    w &= NIBBLE_LOW_BITS
    w = (w + (w >> 4)) & BYTE_LOW_NIBBLES  # per byte: its two counters' low bits summed
    return <Py_ssize_t>((w * BYTE_ONES) >> 56)  # the top byte sums them all


cdef Py_ssize_t sketch_capacity(Py_ssize_t maxsize) noexcept:
    """The sketch's unit of size: the next power of two >= maxsize (at least 16)."""
    cdef Py_ssize_t capacity = 16
    while capacity < maxsize:
        capacity <<= 1
    return capacity


cdef inline Py_ssize_t sketch_width(Py_ssize_t maxsize) noexcept:
    """Counters per row: ``ROW_SPREAD`` per unit of capacity (a power of two)."""
    return ROW_SPREAD * sketch_capacity(maxsize)


@cython.final
cdef class _TinyLFU(_Policy):
    """W-TinyLFU: LRU window, frequency-gated admission, segmented LRU main space."""

    cdef Py_ssize_t window_cap, main_cap, protected_cap
    cdef Ring window, probation, protected
    cdef PyObject* candidate  # borrowed; cleared whenever it leaves probation
    cdef uint64_t rng
    # The count-min frequency sketch (tiercache/_sketch.py is its Python twin): DEPTH rows of
    # ``width`` 4-bit counters, row after row, sixteen to a 64-bit word.
    cdef uint64_t* table
    cdef uint64_t width, mask
    cdef Py_ssize_t words, sample_size, additions
    cdef unsigned int epoch  # halvings so far, plus one (0 never matches an entry's mark)

    def __cinit__(self, Py_ssize_t maxsize, uint64_t seed):
        self.window_cap = max(1, maxsize * WINDOW_PERCENT // 100)
        self.main_cap = max(0, maxsize - self.window_cap)
        self.protected_cap = self.main_cap * PROTECTED_PERCENT // 100
        ring_init(&self.window)
        ring_init(&self.probation)
        ring_init(&self.protected)
        self.candidate = NULL
        self.rng = mix64(seed ^ GOLDEN)
        if self.rng == 0:
            self.rng = 1
        self.width = sketch_width(maxsize)
        self.mask = self.width - 1
        self.sample_size = SAMPLE_FACTOR * sketch_capacity(maxsize)
        self.additions = 0
        self.epoch = 1
        self.words = DEPTH * self.width // 16
        self.table = <uint64_t*>PyMem_Malloc(self.words * sizeof(uint64_t))
        if self.table == NULL:
            raise MemoryError()
        memset(self.table, 0, self.words * sizeof(uint64_t))

    def __dealloc__(self):
        PyMem_Free(self.table)

    cdef inline uint64_t _counter(self, uint64_t h, int i) noexcept:
        """Where row ``i``'s counter of the key with spread hash ``h`` is, in the whole table."""
        return i * self.width + (((h & LOW32) + i * ((h >> 32) | 1)) & self.mask)

    cdef inline int _count(self, uint64_t c) noexcept:
        """The value of counter ``c`` (an index from ``_counter``)."""
        return (self.table[c >> 4] >> ((c & 15) << 2)) & 15

    cdef int _frequency(self, uint64_t h) noexcept:
        cdef int i, count, low = MAX_COUNT
        for i in range(DEPTH):
            count = self._count(self._counter(h, i))
            if count < low:
                low = count
        return low

    cdef bint _increment(self, uint64_t h) noexcept:
        """Count one access; True if every counter was already at its maximum (a no-op)."""
        cdef uint64_t c[DEPTH]
        cdef int counts[DEPTH]
        cdef int i, low = MAX_COUNT
        for i in range(DEPTH):
            c[i] = self._counter(h, i)
            counts[i] = self._count(c[i])
            if counts[i] < low:
                low = counts[i]
        if low == MAX_COUNT:
            return True  # saturated: not counted, so heavy hitters do not hasten the halving
        for i in range(DEPTH):  # branch-free: which counters are at the minimum is random
            self.table[c[i] >> 4] += (<uint64_t>(counts[i] == low)) << ((c[i] & 15) << 2)
        self.additions += 1
        if self.additions >= self.sample_size:
            self._age()  # halve all counters once per sample
        return False

    cdef inline void _record(self, Entry e) noexcept:
        """Count a use of ``e``, skipping the sketch while its counters are known saturated."""
        # Counters only grow between two halvings, so once all of an entry's are at the maximum
        # its increments are no-ops until the next halving: hot keys skip the table.
        if e.sketch_epoch != self.epoch and self._increment(e.hash):
            e.sketch_epoch = self.epoch

    cdef void _age(self) noexcept:
        """Halve every counter: old popularity fades."""
        cdef Py_ssize_t k, odd = 0
        cdef uint64_t w
        for k in range(self.words):
            w = self.table[k]
            odd += odd_counters(w)  # halving loses half a count of odd ones
            self.table[k] = (w >> 1) & NIBBLE_HALF_MASK
        # Halved as the counters were, less the half count flooring took from each odd counter
        # (an addition spans four counters), as Caffeine does.
        self.additions = max(0, self.additions - odd // DEPTH) >> 1
        self.epoch += 1
        if self.epoch == 0:  # wrapped after 2**32 halvings: forget every mark
            self.epoch = 1
            clear_marks(&self.window)
            clear_marks(&self.probation)
            clear_marks(&self.protected)

    cdef uint64_t _random(self) noexcept:
        cdef uint64_t x = self.rng  # xorshift64*
        x ^= x >> 12
        x ^= x << 25
        x ^= x >> 27
        self.rng = x
        return x * XORSHIFT_STAR

    cdef inline Ring* _ring(self, Entry e) noexcept:
        if e.segment == WINDOW:
            return &self.window
        return &self.probation if e.segment == PROBATION else &self.protected

    cdef int insert(self, Entry e) noexcept:
        cdef Entry cand
        self._record(e)
        e.segment = WINDOW
        ring_push_front(&self.window, &e.link)
        if self.window.size > self.window_cap:
            # The window's LRU entry moves to probation; it competes at the next eviction.
            cand = <Entry>self.window.head.prev.owner
            ring_remove(&self.window, &cand.link)
            cand.segment = PROBATION
            ring_push_front(&self.probation, &cand.link)
            self.candidate = <PyObject*>cand
        return 0

    cdef int touch(self, Entry e) except -1:
        self.use(e)
        return 0

    cdef inline void use(self, Entry e) noexcept:
        """``touch`` that cannot fail, for the cache's hit path to call directly."""
        cdef Entry demoted
        self._record(e)
        if e.segment == WINDOW:
            ring_move_front(&self.window, &e.link)
        elif e.segment == PROTECTED:
            ring_move_front(&self.protected, &e.link)
        else:
            ring_remove(&self.probation, &e.link)
            e.segment = PROTECTED
            ring_push_front(&self.protected, &e.link)
            if self.protected.size > self.protected_cap:
                demoted = <Entry>self.protected.head.prev.owner
                ring_remove(&self.protected, &demoted.link)
                demoted.segment = PROBATION
                ring_push_front(&self.probation, &demoted.link)
            if <PyObject*>e == self.candidate:
                self.candidate = NULL

    cdef void remove(self, Entry e) noexcept:
        ring_remove(self._ring(e), &e.link)
        e.segment = NONE
        if <PyObject*>e == self.candidate:
            self.candidate = NULL

    cdef bint _admit(self, Entry cand, Entry victim) noexcept:
        cdef int cand_freq = self._frequency(cand.hash)
        if cand_freq > self._frequency(victim.hash):
            return True
        # A popular-looking candidate still gets in now and then, so an attacker cannot pin
        # the victim by inflating its count with colliding keys (as Caffeine does).
        return cand_freq >= ADMIT_HASHDOS_THRESHOLD and (self._random() & 127) == 0

    cdef Entry evict(self, Entry protect):
        cdef PyObject* p = as_ptr(protect)
        cdef PyObject* victim = ring_back_except(&self.probation, p)
        if victim == NULL:
            victim = ring_back_except(&self.protected, p)
        if victim == NULL:
            return as_entry(ring_back_except(&self.window, p))
        cdef PyObject* cand = self.candidate
        if cand == NULL or cand == victim or cand == p:
            return <Entry>victim
        if self._admit(<Entry>cand, <Entry>victim):
            return <Entry>victim
        return <Entry>cand


# -- the cache ----------------------------------------------------------------------------------

cdef double _check_ttl(object ttl) except? -1.0:
    """The TTL as seconds (``inf`` for never); ``ValueError`` unless positive."""
    if ttl is None:
        return INF
    if isinstance(ttl, bool) or not isinstance(ttl, numbers.Real):
        raise TypeError(f"ttl must be a number of seconds or None, not {type(ttl).__name__}")
    cdef double seconds = float(ttl)
    if not seconds > 0:  # also rejects NaN
        raise ValueError(f"ttl must be a positive number of seconds or None, not {ttl!r}")
    return seconds


cdef _Policy _new_policy(str name, Py_ssize_t maxsize, uint64_t seed):
    if name == "lru":
        return _LRU(maxsize, seed)
    if name == "lfu":
        return _LFU(maxsize, seed)
    return _TinyLFU(maxsize, seed)


cdef class LocalCache:
    """In-process cache with a bounded size, optional weight bound and per-entry TTL."""

    cdef dict _map
    cdef _Policy _policy
    cdef _LRU _lru  # the policy again when it is LRU (a typed alias for the hit path), else None
    cdef _TinyLFU _tlfu  # likewise when it is W-TinyLFU
    cdef Py_ssize_t _maxsize
    cdef str _policy_name
    cdef double _ttl
    cdef object _maxbytes  # int or None
    cdef Py_ssize_t _maxbytes_c  # -1 when unbounded
    cdef object _getsizeof
    cdef object _timer  # None: the C coarse monotonic clock
    cdef object _timer_public
    cdef uint64_t _seed, _salt
    cdef bint _hashed
    # Expiry order: entries with the default TTL expire in the order they were written, so a
    # ring keeps them sorted for free (latest in front); other TTLs go to a heap of
    # (expires, seq, entry) items with lazy deletion.
    cdef Ring _ttl_ring
    cdef list _heap
    cdef unsigned long long _heap_seq
    cdef Py_ssize_t _bytes
    cdef unsigned long long _hits, _misses, _evictions, _expirations
    cdef size_t _owner  # thread state holding the mutation flag, 0 when free
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        # Safe defaults, so a subclass that forgets to call __init__ is an empty cache.
        self._map = {}
        self._heap = []
        ring_init(&self._ttl_ring)
        self._policy = self._lru = _LRU(0, 0)
        self._policy_name = "lru"
        self._ttl = INF
        self._maxbytes_c = -1

    def __init__(
        self,
        maxsize=128,
        *,
        str policy="lru",
        ttl=None,
        maxbytes=None,
        getsizeof=None,
        timer=None,
        seed=0,
    ):
        maxsize = operator.index(maxsize)
        if maxsize < 0:
            raise ValueError(f"maxsize must be >= 0, not {maxsize}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {policy!r}")
        if maxbytes is not None:
            maxbytes = operator.index(maxbytes)
            if maxbytes <= 0:
                raise ValueError(f"maxbytes must be > 0 or None, not {maxbytes}")
            if getsizeof is None:
                getsizeof = sys.getsizeof
        self._maxsize = maxsize
        self._policy_name = policy
        self._ttl = _check_ttl(ttl)
        self._maxbytes = maxbytes
        self._maxbytes_c = -1 if maxbytes is None else maxbytes
        self._getsizeof = getsizeof
        self._timer = timer
        if timer is None:
            from tiercache._clock import monotonic as timer
        self._timer_public = timer
        self._seed = operator.index(seed) & MASK64
        self._salt = mix64(self._seed ^ GOLDEN)
        self._set_policy(_new_policy(policy, maxsize, self._seed))
        self._hashed = policy == "tinylfu"

    cdef void _set_policy(self, _Policy policy) noexcept:
        self._policy = policy
        self._lru = policy if type(policy) is _LRU else None
        self._tlfu = policy if type(policy) is _TinyLFU else None

    # -- the mutation flag --------------------------------------------------------------------

    cdef inline int _lock(self) except -1:
        cdef size_t me = <size_t>PyThreadState_Get()
        if self._owner == 0:
            self._owner = me
            return 0
        if self._owner == me:
            raise RuntimeError("LocalCache mutated from a callback of its own mutation")
        while self._owner != 0:  # the holder is running Python code: let it have the GIL
            with nogil:
                sched_yield()
        self._owner = me
        return 0

    cdef inline void _unlock(self) noexcept:
        self._owner = 0

    cdef inline double _now(self) except? -1.0:
        if self._timer is None:
            return tc_monotonic()
        return float(self._timer())

    # -- reads --------------------------------------------------------------------------------

    def __getitem__(self, key):
        cdef PyObject* p = dict_lookup(<PyObject*>self._map, <PyObject*>key)
        # The common hit (LRU or W-TinyLFU, no TTL) without reference counting of the entry.
        if p != NULL and (<Entry>p).expires == INF and self._lru is not None:
            if (<Entry>p).link.prev != NULL:  # NULL: cleared mid-write, nothing to reorder
                ring_move_front(&self._lru.ring, &(<Entry>p).link)
            self._hits += 1
            return (<Entry>p).value
        if p != NULL and (<Entry>p).expires == INF and self._tlfu is not None:
            if (<Entry>p).link.prev != NULL:
                self._tlfu.use(<Entry>p)  # calls no Python code: the entry stays alive
            self._hits += 1
            return (<Entry>p).value
        return self._getitem_slow(key, p)

    cdef object _getitem_slow(self, object key, PyObject* p):
        cdef Entry e
        if p != NULL:
            e = <Entry>p  # a strong reference: the timer may run Python code and let it go
            if self._hit(e):
                return e.value
        self._misses += 1
        return self.__missing__(key)

    def __missing__(self, key):
        raise KeyError(key)

    def get(self, key, default=None):
        """The value of ``key`` (counted as a use), else ``default``."""
        cdef PyObject* p = dict_lookup(<PyObject*>self._map, <PyObject*>key)
        if p != NULL and (<Entry>p).expires == INF and self._lru is not None:
            if (<Entry>p).link.prev != NULL:
                ring_move_front(&self._lru.ring, &(<Entry>p).link)
            self._hits += 1
            return (<Entry>p).value
        if p != NULL and (<Entry>p).expires == INF and self._tlfu is not None:
            if (<Entry>p).link.prev != NULL:
                self._tlfu.use(<Entry>p)
            self._hits += 1
            return (<Entry>p).value
        cdef Entry e
        if p != NULL:
            e = <Entry>p  # a strong reference, as in _getitem_slow
            if self._hit(e):
                return e.value
        self._misses += 1
        return default

    cdef bint _hit(self, Entry e) except -1:
        """Count a use of ``e`` if it is live (True), else remove it as expired (False)."""
        if e.expires == INF or self._now() < e.expires:
            if e.link.prev != NULL:  # not removed while a Python timer ran
                self._policy.touch(e)
            self._hits += 1
            return True
        self._lock()
        try:
            if e.link.prev != NULL:
                self._remove(e)
                self._expirations += 1
        finally:
            self._unlock()
        return False

    def __contains__(self, key):
        cdef PyObject* p = dict_lookup(<PyObject*>self._map, <PyObject*>key)
        if p == NULL:
            return False
        cdef double expires = (<Entry>p).expires  # read before the timer runs any Python code
        return expires == INF or self._now() < expires

    def peek(self, key, default=None):
        """The value of ``key`` without counting a use or a hit, else ``default``."""
        e = self.entry(key)
        return default if e is None else e.value

    cpdef Entry entry(self, key):
        """The live entry of ``key`` with its metadata, without counting a use, else None."""
        cdef PyObject* p = dict_lookup(<PyObject*>self._map, <PyObject*>key)
        if p == NULL:
            return None
        cdef Entry e = <Entry>p
        if e.expires != INF and self._now() >= e.expires:
            return None
        return e

    def __len__(self):
        if not self._expiring():
            return len(self._map)
        return len(self._map) - self._count_expired(self._now())

    def __iter__(self):
        for e in self._live_entries():
            yield e.key

    def _live_entries(self):
        cdef double now = self._now() if self._expiring() else -INF
        cdef Entry e
        for e in self._map.values():
            if e.expires == INF or now < e.expires:
                yield e

    def keys(self):
        return KeysView(self)

    def values(self):
        return LocalValuesView(self)

    def items(self):
        return LocalItemsView(self)

    def __eq__(self, other):
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(self.items()) == dict(other.items())

    def __ne__(self, other):
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    __hash__ = None

    def __repr__(self):
        return (
            f"{type(self).__name__}(maxsize={self._maxsize}, policy={self._policy_name!r}, "
            f"currsize={len(self)})"
        )

    # -- writes -------------------------------------------------------------------------------

    def __setitem__(self, key, value):
        self._set(key, value, self._ttl, 0, INF)

    def set(self, key, value, ttl=None, *, version=0, double fresh_until=INF):
        """Store ``value`` under ``key`` for ``ttl`` seconds (None: the cache's default TTL).

        ``version`` and ``fresh_until`` (a time on this cache's timer) are metadata kept with
        the entry for the tier in front of Redis; the local tier itself never reads them.
        """
        cdef unsigned long long v = operator.index(version)
        self._set(key, value, self._ttl if ttl is None else _check_ttl(ttl), v, fresh_until)

    cdef object _set(
        self, object key, object value, double seconds, unsigned long long version,
        double fresh_until, bint only_if_absent=False,
    ):
        """Store ``value`` (or, ``only_if_absent``, keep a live value); return the one stored."""
        cdef Py_ssize_t weight = 0
        cdef object too_heavy = None  # (only_if_absent) raised only if the value would be stored
        if self._getsizeof is not None:
            try:
                weight = self._weigh(value)
            except ValueError as err:
                if not only_if_absent:
                    raise
                too_heavy = err
        cdef double expires = INF if seconds == INF else self._now() + seconds
        cdef bint default_ttl = seconds == self._ttl
        cdef uint64_t h = 0
        cdef Py_ssize_t size
        cdef PyObject* p
        cdef Entry e = None
        cdef Entry victim = None
        cdef Entry old
        # What the write replaces or evicts is released after the flag is cleared, at return.
        cdef object replaced = None
        cdef object evicted = None
        if self._hashed:
            h = mix64((<uint64_t>PyObject_Hash(key)) ^ self._salt)
        self._lock()
        try:
            if self._maxsize == 0:
                if only_if_absent:
                    self._misses += 1
                    if too_heavy is not None:
                        raise too_heavy
                self._evictions += 1
                return value
            if (
                self._lru is not None
                and self._maxbytes_c < 0
                and PyDict_GET_SIZE(<PyObject*>self._map) >= self._maxsize
                and not self._any_expired()
            ):
                victim = <Entry>self._lru.ring.head.prev.owner
                if self._recyclable(victim):
                    e = victim
            if e is None:
                e = new_entry(key, value)
                e.weight = weight
                e.version = version
                e.fresh_until = fresh_until
                e.hash = h
            # One probe finds an existing entry or inserts ``e``, which is otherwise dropped.
            # (Inserted: the map grew. The victim may be found under its own key: an update.)
            size = PyDict_GET_SIZE(<PyObject*>self._map)
            p = PyDict_SetDefault(self._map, key, e)
            if PyDict_GET_SIZE(<PyObject*>self._map) > size:
                if only_if_absent:
                    self._misses += 1
                    if too_heavy is not None:
                        PyDict_DelItem(self._map, key)  # nothing stored: undo the probe
                        raise too_heavy
                if e is victim:
                    # A full LRU cache: the victim's object is reused for the new key. It is in
                    # the map under both keys until the old one goes, which runs no Python code.
                    evicted = e.key
                    replaced = e.value
                    e.key = key
                    e.value = value
                    self._bytes += weight - e.weight
                    e.weight = weight
                    e.version = version
                    e.fresh_until = fresh_until
                    ring_move_front(&self._lru.ring, &e.link)
                    PyDict_DelItem(self._map, evicted)
                    self._evictions += 1
                    self._set_expiry(e, expires, default_ttl)
                    return value
                self._insert(e)
                self._bytes += weight
                self._set_expiry(e, expires, default_ttl)
                if self._over():
                    evicted = self._shrink(e)
                return value
            old = <Entry>p
            if old.expires == INF or self._now() < old.expires:
                if only_if_absent:
                    self._policy.touch(old)
                    self._hits += 1
                    return old.value
                replaced = old.value
                self._bytes += weight - old.weight
                old.value = value
                old.weight = weight
                old.version = version
                old.fresh_until = fresh_until
                self._set_expiry(old, expires, default_ttl)
                self._policy.touch(old)
                if self._over():
                    evicted = self._shrink(old)
                return value
            if only_if_absent:
                self._misses += 1
                if too_heavy is not None:
                    raise too_heavy  # nothing changed, not even an expiry
            self._remove(old)  # an expired entry is replaced by a new one, not updated
            self._expirations += 1
            replaced = old
            if e is victim:
                e = new_entry(key, value)
                e.weight = weight
                e.version = version
                e.fresh_until = fresh_until
            PyDict_SetItem(self._map, key, e)
            self._insert(e)
            self._bytes += weight
            self._set_expiry(e, expires, default_ttl)
            if self._over():
                evicted = self._shrink(e)
        finally:
            self._unlock()
        return value

    cdef inline bint _recyclable(self, Entry victim) noexcept:
        """Whether the victim's object can be reused without anyone noticing.

        Only the map and this write may reference it (no reader in a Python timer, no
        ``entry()`` caller), and its key must be an exact str, int or bytes so that deleting it
        from the map cannot run Python code while the object already carries the new key.
        """
        cdef type kt = type(victim.key)
        return Py_REFCNT(victim) == 2 and (kt is str or kt is int or kt is bytes)

    cdef inline int _insert(self, Entry e) except -1:
        """Link ``e``, just put in the map, into the policy (taken out of the map on failure)."""
        if self._lru is not None:
            e.segment = LRU_RING
            ring_push_front(&self._lru.ring, &e.link)
            return 0
        if self._policy.insert(e) < 0:
            PyDict_DelItem(self._map, e.key)
            return -1
        return 0

    cdef Py_ssize_t _weigh(self, object value) except -1:
        weight = self._getsizeof(value)
        if not isinstance(weight, int) or weight < 0:
            raise ValueError(f"getsizeof must return an int >= 0, not {weight!r}")
        if self._maxbytes is not None and weight > self._maxbytes:
            raise ValueError(f"value too large: weighs {weight} > maxbytes {self._maxbytes}")
        return weight

    cdef inline bint _over(self) noexcept:
        return PyDict_GET_SIZE(<PyObject*>self._map) > self._maxsize or (
            self._maxbytes_c >= 0 and self._bytes > self._maxbytes_c
        )

    cdef object _shrink(self, Entry protect):
        """Evict until both bounds hold: expired entries first, then the policy's victims.

        Returns what was dropped (None, an Entry or a list) for the caller to release later.
        """
        cdef object dropped = None
        cdef Entry victim
        if self._expiring():
            dropped = []
            self._purge_expired(self._now(), dropped)
        while self._over():
            victim = self._policy.evict(protect)
            if victim is None:
                break
            self._remove(victim)
            self._evictions += 1
            if dropped is None:
                dropped = victim
            elif type(dropped) is list:
                (<list>dropped).append(victim)
            else:
                dropped = [dropped, victim]
        return dropped

    cdef int _remove(self, Entry e) except -1:
        """Take ``e`` out of the map (first: readers stop finding it), then unlink it."""
        PyDict_DelItem(self._map, e.key)
        self._unlink(e)
        return 0

    cdef void _unlink(self, Entry e) noexcept:
        """Take ``e``, no longer in the map, out of the policy and the expiry order."""
        if self._lru is not None:
            ring_remove(&self._lru.ring, &e.link)
            e.segment = NONE
        else:
            self._policy.remove(e)
        self._bytes -= e.weight
        self._detach_expiry(e)

    def __delitem__(self, key):
        self.pop(key)

    def pop(self, key, default=_MISSING):
        """Remove ``key`` and return its value, else ``default`` (``KeyError`` if not given)."""
        cdef PyObject* p
        cdef Entry e = None
        self._lock()
        try:
            p = dict_lookup(<PyObject*>self._map, <PyObject*>key)
            if p != NULL:
                e = <Entry>p
                self._remove(e)
                if e.expires == INF or self._now() < e.expires:
                    return e.value
                self._expirations += 1
        finally:
            self._unlock()
        if default is _MISSING:
            raise KeyError(key)
        return default

    def popitem(self):
        """Remove and return the policy's victim as ``(key, value)``."""
        cdef list dropped = []
        cdef Entry victim
        self._lock()
        try:
            if self._expiring():
                self._purge_expired(self._now(), dropped)
            victim = self._policy.evict(None)
            if victim is None:
                raise KeyError("popitem(): cache is empty")
            self._remove(victim)
            return victim.key, victim.value
        finally:
            self._unlock()

    def setdefault(self, key, default=None):
        """The value of ``key`` (counted as a use); if absent, store and return ``default``."""
        return self._set(key, default, self._ttl, 0, INF, True)

    def update(self, other=(), /, **kwargs):
        """Store every pair of ``other`` (a mapping or pairs) and of ``kwargs``."""
        if isinstance(other, Mapping):
            for key in other:
                self._set(key, other[key], self._ttl, 0, INF)
        elif hasattr(other, "keys"):
            for key in other.keys():
                self._set(key, other[key], self._ttl, 0, INF)
        else:
            for key, value in other:
                self._set(key, value, self._ttl, 0, INF)
        for key, value in kwargs.items():
            self._set(key, value, self._ttl, 0, INF)

    def clear(self):
        """Remove every entry (statistics are kept)."""
        cdef Entry e
        cdef list old
        self._lock()
        try:
            old = list(self._map.values())  # released after the flag
            for e in old:
                e.link.prev = NULL  # concurrent hits holding it must not touch a dead ring
                e.link.next = NULL
                e.tlink.prev = NULL
                e.tlink.next = NULL
                e.freq = NULL
                e.segment = NONE
                e.heap_seq = 0
            self._map.clear()  # in place: an iteration in progress raises, as over a dict
            self._heap = []
            ring_init(&self._ttl_ring)
            self._bytes = 0
            self._set_policy(_new_policy(self._policy_name, self._maxsize, self._seed))
        finally:
            self._unlock()
        del old

    def expire(self):
        """Remove every expired entry now; return how many were removed."""
        cdef list dropped = []
        self._lock()
        try:
            return self._purge_expired(self._now(), dropped)
        finally:
            self._unlock()

    # -- expiry -------------------------------------------------------------------------------

    cdef inline bint _expiring(self) noexcept:
        """Whether any entry may expire."""
        return self._ttl_ring.size != 0 or PyList_GET_SIZE(self._heap) != 0

    cdef inline bint _any_expired(self) except -1:
        """Whether some entry may have expired (stale heap items count: a purge clears them)."""
        if not self._expiring():
            return False
        return self._expired_head()

    cdef bint _expired_head(self) except -1:
        cdef double now = self._now()
        cdef Link* oldest = self._ttl_ring.head.prev
        if oldest.owner != NULL and (<Entry>oldest.owner).expires <= now:
            return True
        return bool(self._heap) and <double>(<tuple>self._heap[0])[0] <= now

    cdef inline int _set_expiry(self, Entry e, double expires, bint default_ttl) except -1:
        if expires == e.expires and (expires == INF or (e.tlink.prev != NULL) == default_ttl):
            return 0
        return self._place_expiry(e, expires, default_ttl)

    cdef int _place_expiry(self, Entry e, double expires, bint default_ttl) except -1:
        self._detach_expiry(e)
        e.expires = expires
        if expires == INF:
            return 0
        cdef Link* latest = self._ttl_ring.head.next
        if default_ttl and (latest.owner == NULL or (<Entry>latest.owner).expires <= expires):
            # The latest expiry so far: it goes in front and the ring stays sorted. (A writer
            # that read the clock before another can come second with an earlier expiry: the
            # heap takes it.)
            ring_push_front(&self._ttl_ring, &e.tlink)
            return 0
        self._heap_seq += 1
        e.heap_seq = self._heap_seq
        heapq.heappush(self._heap, (expires, self._heap_seq, e))
        if len(self._heap) > 2 * len(self._map) + 64:
            self._compact_heap()
        return 0

    cdef inline void _detach_expiry(self, Entry e) noexcept:
        if e.tlink.prev != NULL:
            ring_remove(&self._ttl_ring, &e.tlink)
        e.heap_seq = 0

    cdef Py_ssize_t _purge_expired(self, double now, list dropped) except -1:
        cdef list heap = self._heap
        cdef tuple item
        cdef Entry e
        cdef Link* oldest
        cdef Py_ssize_t removed = 0
        while True:
            oldest = self._ttl_ring.head.prev
            if oldest.owner == NULL or (<Entry>oldest.owner).expires > now:
                break
            e = <Entry>oldest.owner
            self._remove(e)
            dropped.append(e)
            removed += 1
        while heap and <double>(<tuple>heap[0])[0] <= now:
            item = heapq.heappop(heap)
            e = <Entry>item[2]
            if e.heap_seq == <unsigned long long>item[1]:
                self._remove(e)
                dropped.append(e)
                removed += 1
        self._expirations += removed
        return removed

    cdef Py_ssize_t _count_expired(self, double now) except -1:
        """Live entries with ``expires <= now``: the ring's expired tail and the heap's prefix."""
        cdef Py_ssize_t count = 0, n = len(self._heap), i, child
        cdef Link* l = self._ttl_ring.head.prev
        while l.owner != NULL and (<Entry>l.owner).expires <= now:
            count += 1
            l = l.prev
        cdef list heap = self._heap
        cdef list stack = [0] if n else []
        cdef tuple item
        while stack:
            i = stack.pop()
            item = <tuple>heap[i]
            if <double>item[0] > now:
                continue
            if (<Entry>item[2]).heap_seq == <unsigned long long>item[1]:
                count += 1
            for child in range(2 * i + 1, min(2 * i + 3, n)):
                stack.append(child)
        return count

    cdef void _compact_heap(self) except *:
        self._heap = [
            item for item in self._heap if (<Entry>item[2]).heap_seq == <unsigned long long>item[1]
        ]
        heapq.heapify(self._heap)

    # -- introspection ------------------------------------------------------------------------

    @property
    def maxsize(self):
        """The most entries the cache holds."""
        return self._maxsize

    @property
    def currsize(self):
        """The number of live entries (same as ``len``)."""
        return len(self)

    @property
    def maxbytes(self):
        """The bound on the total weight of the values, or None."""
        return self._maxbytes

    @property
    def currbytes(self):
        """The total weight of the stored values (0 unless weights are measured)."""
        return self._bytes

    @property
    def policy(self):
        """The eviction policy: ``lru``, ``lfu`` or ``tinylfu``."""
        return self._policy_name

    @property
    def ttl(self):
        """The default TTL in seconds, or None."""
        return None if self._ttl == INF else self._ttl

    @property
    def timer(self):
        """The clock TTLs are measured on."""
        return self._timer_public

    def stats(self):
        """Counters since creation: hits, misses, evictions, expirations, and the sizes."""
        return {
            "hits": self._hits,
            "misses": self._misses,
            "evictions": self._evictions,
            "expirations": self._expirations,
            "currsize": len(self),
            "maxsize": self._maxsize,
            "currbytes": self._bytes,
            "maxbytes": self._maxbytes,
        }


MutableMapping.register(LocalCache)


cdef class LRUCache(LocalCache):
    """LocalCache with the ``lru`` policy."""

    def __init__(self, maxsize=128, **kwargs):
        LocalCache.__init__(self, maxsize, policy="lru", **kwargs)


cdef class LFUCache(LocalCache):
    """LocalCache with the ``lfu`` policy."""

    def __init__(self, maxsize=128, **kwargs):
        LocalCache.__init__(self, maxsize, policy="lfu", **kwargs)


cdef class TinyLFUCache(LocalCache):
    """LocalCache with the ``tinylfu`` (W-TinyLFU) policy."""

    def __init__(self, maxsize=128, **kwargs):
        LocalCache.__init__(self, maxsize, policy="tinylfu", **kwargs)


cdef class TieredFront:
    """The local-hit path of a TieredCache: a str key answered from the local tier alone.

    Everything else (other key types, a stale or missing entry, a local tier that may not serve
    because the invalidation channel is not whole) goes to the subclass's ``_getitem_slow`` and
    ``_get_slow``. The entry's ``fresh_until`` bounds how long a local copy is served.
    """

    cdef LocalCache _l1
    cdef bint _usable

    def _front_init(self, LocalCache l1):
        """Serve from ``l1`` (not until ``_set_usable(True)``)."""
        self._l1 = l1
        self._usable = False

    def _set_usable(self, bint usable):
        """Whether local copies may be served."""
        self._usable = usable

    @property
    def _local_usable(self):
        return self._usable

    def __getitem__(self, key):
        cdef LocalCache l1 = self._l1
        cdef PyObject* p
        # The common case, no reference counting: no Python code runs between lookup and return.
        if self._usable and type(key) is str and l1._timer is None:
            p = dict_lookup(<PyObject*>l1._map, <PyObject*>key)
            if (
                p != NULL
                and (<Entry>p).fresh_until > tc_monotonic()
                and (<Entry>p).value is not MISSING  # a cached absence: the slow path says so
            ):
                if (<Entry>p).link.prev != NULL:
                    if l1._lru is not None:
                        ring_move_front(&l1._lru.ring, &(<Entry>p).link)
                    else:
                        l1._policy.touch(<Entry>p)
                l1._hits += 1
                return (<Entry>p).value
            return self._getitem_slow(key)
        cdef object value = self._local_hit(key)
        if value is not _MISSING:
            return value
        return self._getitem_slow(key)

    def get(self, key, default=None):
        """The value of ``key`` (read-through when a loader is set), else ``default``."""
        cdef object value = self._local_hit(key)
        if value is not _MISSING:
            return value
        return self._get_slow(key, default)

    cdef inline object _local_hit(self, object key):
        cdef LocalCache l1 = self._l1
        cdef PyObject* p
        cdef Entry e
        if not self._usable or type(key) is not str:
            return _MISSING
        p = dict_lookup(<PyObject*>l1._map, <PyObject*>key)
        if p == NULL:
            return _MISSING
        e = <Entry>p  # a strong reference: an injected timer may run Python code
        if e.fresh_until <= l1._now() or e.value is MISSING:
            return _MISSING
        if e.link.prev != NULL:
            if l1._lru is not None:
                ring_move_front(&l1._lru.ring, &e.link)
            else:
                l1._policy.touch(e)
        l1._hits += 1
        return e.value


cdef class CallFront:
    """The local-hit path of a cached function: ``f(x)`` for one str or int ``x``, in C.

    The call slot is set by hand (below) so a call without keywords builds no keyword dict;
    everything else (other arguments, a miss, a local tier that may not serve) goes to the
    subclass's ``_call(args, kwargs)``.
    """

    cdef LocalCache _l1
    cdef TieredFront _cache
    cdef bint _fast  # single-argument calls may use the argument itself as the local key

    def _call_front_init(self, LocalCache l1, TieredFront cache, bint fast):
        """Serve hits from ``l1`` while ``cache`` may serve local copies."""
        self._l1 = l1
        self._cache = cache
        self._fast = fast

    @property
    def local(self):
        """The function's own local tier."""
        return self._l1

    def __call__(self, *args, **kwargs):
        # Only reached where the fast slot below is not installed; same behaviour, slower.
        return <object>_call_front_call(<PyObject*>self, <PyObject*>args, <PyObject*>kwargs)


cdef PyObject* _call_front_call(PyObject* self, PyObject* args, PyObject* kwargs) except NULL:
    cdef CallFront front = <CallFront>self
    cdef LocalCache l1 = front._l1
    cdef PyObject* arg
    cdef PyObject* p
    cdef object value
    if (
        front._fast
        and (kwargs == NULL or PyDict_GET_SIZE(kwargs) == 0)
        and PyTuple_GET_SIZE(<object>args) == 1
        and front._cache is not None
        and front._cache._usable
        and l1._timer is None
    ):
        arg = PyTuple_GET_ITEM(<object>args, 0)
        if type(<object>arg) is str or type(<object>arg) is int:
            p = dict_lookup(<PyObject*>l1._map, arg)
            if (
                p != NULL
                and (<Entry>p).fresh_until > tc_monotonic()
                and (<Entry>p).value is not MISSING
            ):
                if (<Entry>p).link.prev != NULL:
                    if l1._lru is not None:
                        ring_move_front(&l1._lru.ring, &(<Entry>p).link)
                    else:
                        l1._policy.touch(<Entry>p)
                l1._hits += 1
                value = (<Entry>p).value
                Py_INCREF(value)
                return <PyObject*>value
    value = (<object>self)._call(<object>args, <object>kwargs if kwargs != NULL else None)
    Py_INCREF(value)
    return <PyObject*>value


def install_fast_call(type cls):
    """Answer calls of ``cls`` (a CallFront subclass) through the C call slot directly.

    tp_call receives the positional tuple and NULL when there are no keywords, where a
    ``def __call__(self, *args, **kwargs)`` builds a dict on every call (about 20% of a
    functools.lru_cache hit). A Python subclass gets its call slot from ``__call__`` when it is
    created, so each one installs the fast slot again.
    """
    if not issubclass(cls, CallFront):
        raise TypeError("install_fast_call() takes a CallFront subclass")
    (<PyTypeObject*>cls).tp_call = <ternaryfunc>_call_front_call
    PyType_Modified(<PyTypeObject*>cls)
    return cls


install_fast_call(CallFront)
