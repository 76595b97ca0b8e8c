# cython: language_level=3, auto_pickle=False
"""The in-process tier in Cython: the twin of tiercache/_local_py.py, with the same behaviour.

The semantics are documented once, in tiercache/_local_py.py; this file mirrors it class for class.
What differs is how it stays thread-safe and small cheaply:

* Keys map to entries through the cache's own hash table (see "the key table"), laid out and
  probed as a dict is, so keys iterate in a dict's order; it owns the entries.
* List links are C structs embedded in each Entry and never own a reference, so a hit costs
  pointer writes, not reference counting; a link leads back to its entry by its offset.
* Entries carry no garbage-collector header: the cache reports their keys and values to the
  collector itself (see "garbage collection"). A plain LRU cache stores the leanest Entry; what
  other policies and weighing need lives in its _RichEntry subclass.
* A read hit takes no lock: its lookup and list surgery run with the GIL held and call no
  Python code (unless a key's ``__eq__`` runs, after which the lookup starts over if the table
  changed, or a Python ``timer`` was injected: then the hit re-checks that the entry is still
  linked after calling it). Every mutation runs under a GIL-protected owner flag, and keeps the
  structures consistent wherever Python code can run inside it (key ``__hash__``/``__eq__``, a
  Python timer, allocation triggering the garbage collector). Replaced and evicted values are
  released after the flag is cleared, and ``on_evict`` is called after that too.
"""

cimport cython
from cpython.exc cimport PyErr_NoMemory
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport Py_EQ, PyObject, PyObject_Hash
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport INT32_MAX, int32_t, uint64_t
from libc.string cimport memset

import logging
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
    Py_ssize_t Py_REFCNT(object o)
    ctypedef struct PyASCIIObject:
        Py_hash_t hash  # -1 until computed
    bint PyUnicode_CheckExact(object o)
    # Reference counting and comparison on borrowed pointers, errors returned, not raised.
    void incref "Py_INCREF"(PyObject* o)
    void decref "Py_DECREF"(PyObject* o)
    int rich_compare_bool "PyObject_RichCompareBool"(PyObject* a, PyObject* b, int op)
    # The collector's callbacks, for the cache's traverse and clear (at the end of this file).
    ctypedef int (*visitproc)(PyObject* o, void* arg) noexcept
    ctypedef int (*traverseproc)(PyObject* o, visitproc visit, void* arg) noexcept
    ctypedef int (*inquiry)(PyObject* o) noexcept
    # CallFront's call slots, set by install_fast_call (at the end of this file).
    ctypedef PyObject* (*ternaryfunc)(PyObject*, PyObject*, PyObject*)
    ctypedef PyObject* (*vectorcallfunc)(
        PyObject* callable, PyObject* const* args, size_t nargsf, PyObject* kwnames
    )
    ctypedef struct TypeSlots "PyTypeObject":
        traverseproc tp_traverse
        inquiry tp_clear
        ternaryfunc tp_call
        Py_ssize_t tp_vectorcall_offset
        unsigned long tp_flags
    unsigned long Py_TPFLAGS_HAVE_VECTORCALL
    Py_ssize_t PyVectorcall_NARGS(size_t nargsf)
    void PyType_Modified(TypeSlots* t)
    Py_ssize_t PyDict_GET_SIZE(PyObject* mp)
    Py_ssize_t PyTuple_GET_SIZE(object op)
    PyObject* PyTuple_GET_ITEM(object op, Py_ssize_t i)


cdef extern from "<math.h>":
    const double INF "INFINITY"


cdef object _MISSING = object()
cdef object ABSENT = MISSING  # tiercache.MISSING as a C global: no module lookup on a hit
POLICIES = ("lru", "lfu", "tinylfu")
_log = logging.getLogger("tiercache.local")
# The causes on_evict is told.
cdef str SIZE = "size"
cdef str EXPIRED = "expired"

# W-TinyLFU layout (Caffeine's defaults) and its admission rule.
cdef enum:
    WINDOW_PERCENT = 1
    PROTECTED_PERCENT = 80
    ADMIT_HASHDOS_THRESHOLD = 6
    DEPTH = 4  # rows of the frequency sketch
    MAX_COUNT = 15  # 4-bit counters
    ROW_SPREAD = 4  # counters per row per unit of capacity
    SAMPLE_FACTOR = 10  # counted increments per unit of capacity between two halvings

# The W-TinyLFU segment an entry is in (_RichEntry.segment); NONE means not linked in any.
cdef enum:
    NONE = 0
    WINDOW = 1
    PROBATION = 2
    PROTECTED = 3

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


cdef struct Ring:
    Link head  # sentinel: head.next is the front (most recent), head.prev the back
    Py_ssize_t size


cdef inline void ring_init(Ring* r) noexcept:
    r.head.prev = &r.head
    r.head.next = &r.head
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


# A link does not point back to its entry: the entry is found by subtracting the link's offset
# inside the Entry object (the "container of" idiom), measured once at import by
# _measure_entry_layout() below. LINK_AT is for Entry.link (policy rings), TLINK_AT for
# Entry.exp.ring (the expiry ring). A ring's sentinel is no entry: compare with &ring.head first.
cdef Py_ssize_t LINK_AT = 0
cdef Py_ssize_t TLINK_AT = 0


cdef inline PyObject* entry_of(Link* l) noexcept:
    """The Entry whose ``link`` is ``l`` (borrowed)."""
    return <PyObject*>(<char*>l - LINK_AT)


cdef inline PyObject* entry_of_tlink(Link* l) noexcept:
    """The Entry whose ``exp.ring`` is ``l`` (borrowed)."""
    return <PyObject*>(<char*>l - TLINK_AT)


cdef inline PyObject* ring_back_except(Ring* r, PyObject* protect) noexcept:
    """The least recent entry of a policy ring other than ``protect``, or NULL."""
    cdef Link* l = r.head.prev
    if l != &r.head and entry_of(l) == protect:
        l = l.prev
    return NULL if l == &r.head else entry_of(l)


# -- entries ------------------------------------------------------------------------------------

cdef struct FreqNode:
    Py_ssize_t count
    Ring ring
    FreqNode* prev
    FreqNode* next


# An entry with a finite expiry is in one of two expiry orders, never both: the ring of the
# entries with the cache's default TTL, or the heap of the others. So its ring link and its heap
# place share memory: ``ring.prev != NULL`` means in the ring, else ``heap.pos != 0`` means in
# the heap (``heap.unlinked`` lies over ``ring.prev`` and stays NULL), else neither.

cdef struct HeapPlace:
    Link* unlinked
    Py_ssize_t pos  # 1-based place in the expiry heap, 0 if not in it


cdef union ExpiryPlace:
    Link ring
    HeapPlace heap


# Entries are not tracked by the cyclic garbage collector (no GC header, no traverse): only the
# key table owns them, and the cache's own traverse (_traverse_cache, at the end of this file)
# visits the key and value of each entry the table alone holds, so a cycle through a value or
# a key is still collected.
@cython.no_gc
@cython.freelist(64)
cdef class Entry:
    """One cached value and its metadata (read-only)."""

    # What a hit reads comes first, so that it shares a cache line: the key (the table's
    # lookup compares it), the value, the expiry and the policy's link.
    cdef readonly object key
    cdef readonly object value
    cdef readonly double expires
    cdef Link link  # the policy's order
    cdef readonly double fresh_until
    cdef Py_hash_t hash  # hash(key), for the key table
    cdef readonly unsigned long long version
    cdef ExpiryPlace exp  # its place in the expiry order, if it has a finite expiry

    @property
    def weight(self):
        """What ``getsizeof`` said the value weighs (0 when the cache does not weigh values)."""
        return (<_RichEntry>self).weight if type(self) is _RichEntry else 0

    def __repr__(self):
        return f"Entry(key={self.key!r}, version={self.version}, expires={self.expires})"


@cython.final
@cython.no_gc
cdef class _RichEntry(Entry):
    """An Entry with what LFU, W-TinyLFU and weighing caches keep per entry (a plain LRU cache,
    the common case, stores the leaner Entry)."""

    cdef Py_ssize_t weight  # what ``getsizeof`` said its value weighs
    cdef FreqNode* freq  # LFU: the node of its count
    cdef unsigned int sketch_epoch  # W-TinyLFU: the sketch's epoch its counters saturated in
    cdef int segment  # W-TinyLFU: the ring that holds it


cdef inline Entry new_entry(object key, Py_hash_t h, object value, bint rich):
    cdef Entry e
    if rich:
        e = _RichEntry.__new__(_RichEntry)
    else:
        e = Entry.__new__(Entry)
    e.key = key
    e.hash = h
    e.value = value
    e.expires = INF
    e.fresh_until = INF
    return e


cdef void _measure_entry_layout() noexcept:
    global LINK_AT, TLINK_AT
    cdef Entry probe = Entry.__new__(Entry)
    LINK_AT = <char*>&probe.link - <char*><PyObject*>probe
    TLINK_AT = <char*>&probe.exp.ring - <char*><PyObject*>probe


_measure_entry_layout()


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
        ring_push_front(&self.ring, &e.link)
        return 0

    cdef int touch(self, Entry e) except -1:
        ring_move_front(&self.ring, &e.link)
        return 0

    cdef void remove(self, Entry e) noexcept:
        ring_remove(&self.ring, &e.link)

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

    # Its entries are _RichEntry objects: ``freq`` is the node of their count.

    cdef int insert(self, Entry e) noexcept:
        cdef FreqNode* node = self._node_after(&self.head, 1)
        if node == NULL:
            return -1
        ring_push_front(&node.ring, &e.link)
        (<_RichEntry>e).freq = node
        return 0

    cdef int touch(self, Entry e) except -1:
        cdef FreqNode* node = (<_RichEntry>e).freq
        cdef FreqNode* nxt = self._node_after(node, node.count + 1)
        if nxt == NULL:
            return -1
        ring_remove(&node.ring, &e.link)
        ring_push_front(&nxt.ring, &e.link)
        (<_RichEntry>e).freq = nxt
        self._unlink_if_empty(node)
        return 0

    cdef void remove(self, Entry e) noexcept:
        cdef FreqNode* node = (<_RichEntry>e).freq
        ring_remove(&node.ring, &e.link)
        (<_RichEntry>e).freq = NULL
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
    """Forget the saturation marks (_RichEntry.sketch_epoch) of the entries in ``r``."""
    cdef Link* l = r.head.next
    while l != &r.head:
        (<_RichEntry>entry_of(l)).sketch_epoch = 0
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
    cdef uint64_t salt  # spreads the keys' hashes (the cache's seed makes it)
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
        self.salt = mix64(seed ^ GOLDEN)
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

    cdef inline uint64_t _spread(self, Entry e) noexcept:
        """The entry's key hash, spread for the sketch."""
        return mix64((<uint64_t>e.hash) ^ self.salt)

    cdef inline void _record(self, _RichEntry e) noexcept:
        """Count a use of ``e``, skipping the sketch while its counters are known saturated."""
        # Counters only grow between two halvings, so once all of an entry's are at the maximum
        # its increments are no-ops until the next halving: hot keys skip the table.
        if e.sketch_epoch != self.epoch and self._increment(self._spread(e)):
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

    # Its entries are _RichEntry objects: ``segment`` says which ring holds them,
    # ``sketch_epoch`` serves the sketch (with the spread Entry.hash).

    cdef inline Ring* _ring(self, _RichEntry e) noexcept:
        if e.segment == WINDOW:
            return &self.window
        return &self.probation if e.segment == PROBATION else &self.protected

    cdef int insert(self, Entry e) noexcept:
        cdef _RichEntry cand
        self._record(<_RichEntry>e)
        (<_RichEntry>e).segment = WINDOW
        ring_push_front(&self.window, &e.link)
        if self.window.size > self.window_cap:
            # The window's LRU entry moves to probation; it competes at the next eviction.
            cand = <_RichEntry>entry_of(self.window.head.prev)
            ring_remove(&self.window, &cand.link)
            cand.segment = PROBATION
            ring_push_front(&self.probation, &cand.link)
            self.candidate = <PyObject*>cand
        return 0

    cdef int touch(self, Entry e) except -1:
        self.use(<_RichEntry>e)
        return 0

    cdef inline void use(self, _RichEntry e) noexcept:
        """``touch`` that cannot fail, for the cache's hit path to call directly."""
        cdef _RichEntry demoted
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
                demoted = <_RichEntry>entry_of(self.protected.head.prev)
                ring_remove(&self.protected, &demoted.link)
                demoted.segment = PROBATION
                ring_push_front(&self.probation, &demoted.link)
            if <PyObject*>e == self.candidate:
                self.candidate = NULL

    cdef void remove(self, Entry e) noexcept:
        ring_remove(self._ring(<_RichEntry>e), &e.link)
        (<_RichEntry>e).segment = NONE
        if <PyObject*>e == self.candidate:
            self.candidate = NULL

    cdef bint _admit(self, _RichEntry cand, _RichEntry victim) noexcept:
        cdef int cand_freq = self._frequency(self._spread(cand))
        if cand_freq > self._frequency(self._spread(victim)):
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
        if self._admit(<_RichEntry>cand, <_RichEntry>victim):
            return <Entry>victim
        return <Entry>cand


# -- the key table ------------------------------------------------------------------------------

# The cache's own hash table, laid out as CPython's dict is: ``indices`` is an open-addressing
# table (probed as a dict probes) whose slots hold EMPTY, REMOVED or a position in ``entries``,
# and ``entries`` keeps the entries in insertion order, NULL where one was removed. So keys
# iterate in the order a dict would give, and the rules are a dict's: equal keys are found by
# identity, else by equal hash then ``==``. What it saves over a dict is the generic machinery: a
# lookup is a few loads, an entry is found again by its address without comparing keys, and an
# entry carries its key's hash (Entry.hash) for the table to grow without calling ``__hash__``.
#
# Thread safety is the cache's: writers hold the mutation flag, lock-free readers may run between
# any two steps that can run Python code, so none of these functions runs Python code while the
# table is inconsistent. The one that runs Python code (a key's ``__eq__``, in table_lookup)
# re-reads ``version``, which every insertion and removal changes, and starts over if it moved.

cdef enum:
    EMPTY = -1
    REMOVED = -2
    PERTURB_SHIFT = 5
    MIN_SIZE = 8

cdef int32_t EMPTY_INDICES[1]
EMPTY_INDICES[0] = EMPTY


cdef struct Table:
    int32_t* indices  # mask + 1 slots (EMPTY_INDICES, not allocated, while nothing was added)
    PyObject** entries  # entries[0:nentries]: owned references, or NULL where one was removed
    size_t mask
    Py_ssize_t nentries  # entries used so far, live or removed
    Py_ssize_t capacity  # length of ``entries``
    Py_ssize_t used  # live entries
    size_t version  # changes with every insertion, removal and rebuild


cdef inline void table_init(Table* t) noexcept:
    t.indices = EMPTY_INDICES
    t.entries = NULL
    t.mask = 0
    t.nentries = t.capacity = t.used = 0


cdef inline Py_hash_t key_hash(object key) except -1:
    """``hash(key)``, read from a str's cache when it has one."""
    cdef Py_hash_t h
    if PyUnicode_CheckExact(key):
        h = (<PyASCIIObject*>key).hash
        if h != -1:
            return h
    return PyObject_Hash(key)


cdef PyObject* table_lookup(Table* t, PyObject* key, Py_hash_t h) except? NULL:
    """The entry of ``key`` (borrowed), else NULL. May run the ``__eq__`` of keys with its hash."""
    cdef size_t i, perturb
    cdef Py_ssize_t ix
    cdef PyObject* e
    cdef PyObject* other
    cdef size_t version
    cdef int equal
    while True:  # once more each time Python code changed the table under the probe
        i = <size_t>h & t.mask
        perturb = <size_t>h
        while True:
            ix = t.indices[i]
            if ix >= 0:
                e = t.entries[ix]
                other = <PyObject*>(<Entry>e).key
                if other == key:
                    return e
                if (<Entry>e).hash == h:
                    version = t.version
                    incref(other)  # the table may let it go while ``==`` runs
                    equal = rich_compare_bool(other, key, Py_EQ)
                    decref(other)
                    if equal < 0:
                        return NULL
                    if t.version != version:
                        break  # the table changed while ``==`` ran: start over
                    if equal:
                        return e
            elif ix == EMPTY:
                return NULL
            perturb >>= PERTURB_SHIFT
            i = (i * 5 + perturb + 1) & t.mask


cdef inline size_t table_free_slot(Table* t, Py_hash_t h) noexcept:
    """The first slot of ``h``'s probe that holds no entry."""
    cdef size_t i = <size_t>h & t.mask
    cdef size_t perturb = <size_t>h
    while t.indices[i] >= 0:
        perturb >>= PERTURB_SHIFT
        i = (i * 5 + perturb + 1) & t.mask
    return i


cdef inline size_t table_slot_of(Table* t, PyObject* e) noexcept:
    """The slot that holds ``e`` (which is in the table): found by address, no key compared."""
    cdef Py_hash_t h = (<Entry>e).hash
    cdef size_t i = <size_t>h & t.mask
    cdef size_t perturb = <size_t>h
    cdef Py_ssize_t ix
    while True:
        ix = t.indices[i]
        if ix >= 0 and t.entries[ix] == e:
            return i
        perturb >>= PERTURB_SHIFT
        i = (i * 5 + perturb + 1) & t.mask


cdef int table_rebuild(Table* t) except -1:
    """Compact ``entries`` into new arrays with room for as many insertions as there are live
    entries again (at least); the old arrays are freed. MemoryError leaves the table as it was."""
    cdef size_t size = MIN_SIZE
    cdef Py_ssize_t capacity, i, n = 0
    cdef int32_t* indices
    cdef PyObject** entries
    cdef PyObject* e
    while size < <size_t>(3 * t.used):  # as a dict grows: at most 2/3 of the slots in use
        size <<= 1
    capacity = <Py_ssize_t>((size << 1) // 3)
    if capacity > INT32_MAX:
        raise MemoryError("LocalCache: too many entries")
    indices = <int32_t*>PyMem_Malloc(size * sizeof(int32_t))
    entries = <PyObject**>PyMem_Malloc(capacity * sizeof(PyObject*))
    if indices == NULL or entries == NULL:
        PyMem_Free(indices)
        PyMem_Free(entries)
        raise MemoryError()
    memset(indices, 0xFF, size * sizeof(int32_t))  # all EMPTY (-1)
    t.mask = size - 1
    if t.indices != EMPTY_INDICES:
        PyMem_Free(t.indices)
    t.indices = indices
    for i in range(t.nentries):
        e = t.entries[i]
        if e != NULL:
            entries[n] = e
            indices[table_free_slot(t, (<Entry>e).hash)] = <int32_t>n
            n += 1
    PyMem_Free(t.entries)
    t.entries = entries
    t.nentries = n
    t.capacity = capacity
    t.version += 1
    return 0


cdef inline int table_reserve(Table* t) except -1:
    """Room to add one entry (rebuilding the table if it has none)."""
    if t.nentries == t.capacity:
        table_rebuild(t)
    return 0


cdef inline void table_attach(Table* t, PyObject* e) noexcept:
    """Add ``e``, whose key is absent, after the others; ``table_reserve`` made room. The
    table takes over the caller's reference."""
    t.indices[table_free_slot(t, (<Entry>e).hash)] = <int32_t>t.nentries
    t.entries[t.nentries] = e
    t.nentries += 1
    t.used += 1
    t.version += 1


cdef inline void table_detach(Table* t, PyObject* e) noexcept:
    """Take ``e`` out; its reference passes to the caller."""
    cdef size_t i = table_slot_of(t, e)
    t.entries[t.indices[i]] = NULL
    t.indices[i] = REMOVED
    t.used -= 1
    t.version += 1


cdef inline PyObject* table_next(Table* t, Py_ssize_t* pos) noexcept:
    """The live entry at or after ``pos[0]`` (borrowed; ``pos`` moves past it), else NULL."""
    cdef Py_ssize_t i = pos[0]
    while i < t.nentries:
        if t.entries[i] != NULL:
            pos[0] = i + 1
            return t.entries[i]
        i += 1
    pos[0] = i
    return NULL


cdef void table_release(Table* t) noexcept:
    """Drop the table's references (which may run finalizers) and free its arrays."""
    cdef Py_ssize_t i
    for i in range(t.nentries):
        if t.entries[i] != NULL:
            decref(t.entries[i])
    if t.indices != EMPTY_INDICES:
        PyMem_Free(t.indices)
    PyMem_Free(t.entries)
    table_init(t)


# -- the expiry heap ----------------------------------------------------------------------------

# Entries whose TTL is not the cache's default are kept in a binary min-heap on ``expires``.
# Its items borrow their entries (the table owns them): an entry leaves the heap whenever it
# leaves the table, so the heap never holds a dead entry, and Entry.exp.heap.pos, its 1-based
# place in ``items``, makes that removal O(log n).

cdef struct HeapItem:
    double expires  # a copy of the entry's, so that sifting reads no entry
    PyObject* entry


cdef struct Heap:
    HeapItem* items  # items[1..size]; items[0] is unused
    Py_ssize_t size, cap


cdef inline void heap_put(Heap* h, Py_ssize_t i, HeapItem item) noexcept:
    h.items[i] = item
    (<Entry>item.entry).exp.heap.pos = i


cdef void heap_sift_up(Heap* h, Py_ssize_t i) noexcept:
    cdef HeapItem item = h.items[i]
    cdef Py_ssize_t parent
    while i > 1:
        parent = i >> 1
        if h.items[parent].expires <= item.expires:
            break
        heap_put(h, i, h.items[parent])
        i = parent
    heap_put(h, i, item)


cdef void heap_sift_down(Heap* h, Py_ssize_t i) noexcept:
    cdef HeapItem item = h.items[i]
    cdef Py_ssize_t child
    while True:
        child = 2 * i
        if child > h.size:
            break
        if child < h.size and h.items[child + 1].expires < h.items[child].expires:
            child += 1
        if item.expires <= h.items[child].expires:
            break
        heap_put(h, i, h.items[child])
        i = child
    heap_put(h, i, item)


cdef int heap_reserve(Heap* h) except -1:
    """Room for one more item."""
    cdef Py_ssize_t cap
    cdef HeapItem* items
    if h.size + 1 < h.cap:
        return 0
    cap = max(16, 2 * h.cap)
    items = <HeapItem*>PyMem_Realloc(h.items, cap * sizeof(HeapItem))
    if items == NULL:
        raise MemoryError()
    h.items = items
    h.cap = cap
    return 0


cdef inline void heap_push(Heap* h, Entry e) noexcept:
    """Add ``e`` (not in the heap) at its ``expires``; ``heap_reserve`` made room."""
    cdef HeapItem item
    item.expires = e.expires
    item.entry = <PyObject*>e
    h.size += 1
    h.items[h.size] = item
    heap_sift_up(h, h.size)


cdef void heap_remove(Heap* h, Entry e) noexcept:
    """Take ``e`` out of the heap (it is in it)."""
    cdef Py_ssize_t i = e.exp.heap.pos
    cdef HeapItem last = h.items[h.size]
    h.size -= 1
    e.exp.heap.pos = 0
    if i <= h.size:  # the last item fills the hole, then moves up or down
        h.items[i] = last
        if i > 1 and last.expires < h.items[i >> 1].expires:
            heap_sift_up(h, i)
        else:
            heap_sift_down(h, i)


cdef Py_ssize_t heap_count_until(Heap* h, Py_ssize_t i, double now) noexcept:
    """How many items of the subtree at ``i`` expire at or before ``now`` (recursion depth is
    the heap's height)."""
    if i > h.size or h.items[i].expires > now:
        return 0
    return 1 + heap_count_until(h, 2 * i, now) + heap_count_until(h, 2 * i + 1, now)


# -- the cache ----------------------------------------------------------------------------------

cdef inline int _note(list notes, object key, object value, str cause) except -1:
    """Add what on_evict is to be told to ``notes`` (None: no hook, nothing to keep)."""
    if notes is not None:
        notes.append(key)  # a flat list: appending allocates no object that the GC tracks
        notes.append(value)
        notes.append(cause)
    return 0


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

    cdef Table _table  # key -> entry; owns the entries
    cdef _Policy _policy
    cdef _LRU _lru  # the policy again when it is LRU (a typed alias for the hit path), else None
    cdef _TinyLFU _tlfu  # likewise when it is W-TinyLFU
    cdef _LFU _lfu  # and when it is LFU
    cdef Py_ssize_t _maxsize
    cdef str _policy_name
    cdef double _ttl
    cdef object _maxbytes  # int or None
    cdef Py_ssize_t _maxbytes_c  # -1 when unbounded
    cdef object _getsizeof
    cdef object _timer  # None: the C coarse monotonic clock
    cdef object _timer_public
    cdef uint64_t _seed
    cdef bint _rich  # its entries are _RichEntry objects (policy not LRU, or values weighed)
    # Expiry order: entries with the default TTL expire in the order they were written, so a
    # ring keeps them sorted for free (latest in front); other TTLs go to a heap.
    cdef Ring _ttl_ring
    cdef Heap _heap
    cdef Py_ssize_t _bytes
    cdef unsigned long long _hits, _misses, _evictions, _expirations
    cdef size_t _owner  # thread state holding the mutation flag, 0 when free
    cdef object _on_evict  # None, or told (key, value, cause) of what the cache lets go
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        # Safe defaults, so a subclass that forgets to call __init__ is an empty cache.
        table_init(&self._table)
        self._heap.items = NULL
        self._heap.size = self._heap.cap = 0
        ring_init(&self._ttl_ring)
        self._policy = self._lru = _LRU(0, 0)
        self._policy_name = "lru"
        self._ttl = INF
        self._maxbytes_c = -1

    def __dealloc__(self):
        table_release(&self._table)
        PyMem_Free(self._heap.items)

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
        on_evict=None,
    ):
        if self._table.used:
            self.clear()  # initialised again: its entries may not fit the new configuration
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
        if on_evict is not None and not callable(on_evict):
            raise TypeError(f"on_evict must be callable or None, not {type(on_evict).__name__}")
        self._maxsize = maxsize
        self._policy_name = policy
        self._on_evict = on_evict
        self._ttl = _check_ttl(ttl)
        self._maxbytes = maxbytes
        self._maxbytes_c = -1 if maxbytes is None else maxbytes
        self._getsizeof = getsizeof
        self._timer = timer
        if timer is None:
            from tiercache._clock import monotonic as timer
        self._timer_public = timer
        self._seed = operator.index(seed) & MASK64
        self._set_policy(_new_policy(policy, maxsize, self._seed))
        self._rich = policy != "lru" or getsizeof is not None

    cdef void _set_policy(self, _Policy policy) noexcept:
        self._policy = policy
        self._lru = policy if type(policy) is _LRU else None
        self._tlfu = policy if type(policy) is _TinyLFU else None
        self._lfu = policy if type(policy) is _LFU else None

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

    cdef inline PyObject* _find(self, object key) except? NULL:
        """The entry of ``key`` (borrowed), expired or not, else NULL (may run Python code)."""
        return table_lookup(&self._table, <PyObject*>key, key_hash(key))

    # -- reads --------------------------------------------------------------------------------

    cdef bint _live_by_clock(self, PyObject* p) noexcept:
        """Whether the entry (with a finite expiry) is live on the C clock (False if the cache
        has a Python timer: asking it may run Python code)."""
        return self._timer is None and tc_monotonic() < (<Entry>p).expires

    def __getitem__(self, key):
        cdef PyObject* p = self._find(key)
        # The common hit without reference counting of the entry: no Python code runs from the
        # lookup to the return (a Python timer, or an expired entry, takes the slow path).
        if p != NULL and ((<Entry>p).expires == INF or self._live_by_clock(p)):
            if self._lru is not None:
                if (<Entry>p).link.prev != NULL:  # NULL: cleared mid-write, nothing to reorder
                    ring_move_front(&self._lru.ring, &(<Entry>p).link)
                self._hits += 1
                return (<Entry>p).value
            if self._tlfu is not None:
                if (<Entry>p).link.prev != NULL:
                    self._tlfu.use(<_RichEntry>p)  # calls no Python code: the entry stays alive
                self._hits += 1
                return (<Entry>p).value
            if self._lfu is not None:
                if (<Entry>p).link.prev != NULL:
                    self._lfu.touch(<Entry>p)  # likewise (it can only fail for memory)
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
        cdef PyObject* p = self._find(key)
        if p != NULL and ((<Entry>p).expires == INF or self._live_by_clock(p)):
            if self._lru is not None:
                if (<Entry>p).link.prev != NULL:
                    ring_move_front(&self._lru.ring, &(<Entry>p).link)
                self._hits += 1
                return (<Entry>p).value
            if self._tlfu is not None:
                if (<Entry>p).link.prev != NULL:
                    self._tlfu.use(<_RichEntry>p)
                self._hits += 1
                return (<Entry>p).value
            if self._lfu is not None:
                if (<Entry>p).link.prev != NULL:
                    self._lfu.touch(<Entry>p)
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
        cdef bint removed = False
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
                removed = True
        finally:
            self._unlock()
        if removed and self._on_evict is not None:
            self._notify([e.key, e.value, EXPIRED])
        return False

    def __contains__(self, key):
        cdef PyObject* p = self._find(key)
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
        cdef PyObject* p = self._find(key)
        if p == NULL:
            return None
        cdef Entry e = <Entry>p
        if e.expires != INF and self._now() >= e.expires:
            return None
        return e

    def __len__(self):
        if not self._expiring():
            return self._table.used
        return self._table.used - self._count_expired(self._now())

    def __iter__(self):
        for e in self._live_entries():
            yield e.key

    def _live_entries(self):
        """The live entries in insertion order. Like a dict's iterator, it raises RuntimeError
        if the cache changes size between two steps, or yields more entries than it had."""
        cdef double now = self._now() if self._expiring() else -INF
        cdef Py_ssize_t used = self._table.used
        cdef Py_ssize_t left = used
        cdef Py_ssize_t pos = 0
        cdef PyObject* p
        cdef Entry e
        while True:
            if self._table.used != used:
                raise RuntimeError("LocalCache changed size during iteration")
            p = table_next(&self._table, &pos)
            if p == NULL:
                return
            if left == 0:
                raise RuntimeError("LocalCache keys changed during iteration")
            left -= 1
            e = <Entry>p
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

    cdef inline object _set(
        self, object key, object value, double seconds, unsigned long long version,
        double fresh_until, bint only_if_absent=False,
    ):
        """Store ``value`` (or, ``only_if_absent``, keep a live value); return the one stored.
        Then tell ``on_evict`` what the write let go."""
        if self._on_evict is None:
            return self._store(key, value, seconds, version, fresh_until, only_if_absent, None)
        cdef list notes = []
        try:
            return self._store(key, value, seconds, version, fresh_until, only_if_absent, notes)
        finally:
            self._notify(notes)

    cdef object _store(
        self, object key, object value, double seconds, unsigned long long version,
        double fresh_until, bint only_if_absent, list notes,
    ):
        """``_set`` under the flag; what it lets go is added to ``notes`` (unless None)."""
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
        cdef Py_hash_t h
        cdef PyObject* p
        cdef Entry e
        cdef Entry old
        # What the write replaces or evicts is released after the flag is cleared, at return.
        cdef object replaced = None
        cdef object evicted = None
        self._lock()
        try:
            if self._maxsize == 0:
                if only_if_absent:
                    self._misses += 1
                    if too_heavy is not None:
                        raise too_heavy
                self._evictions += 1
                _note(notes, key, value, SIZE)  # the value written is evicted at once
                return value
            h = key_hash(key)
            p = table_lookup(&self._table, <PyObject*>key, h)  # may run Python code (``==``)
            if p != NULL:
                old = <Entry>p
                if old.expires == INF or self._now() < old.expires:
                    if only_if_absent:
                        self._policy.touch(old)
                        self._hits += 1
                        return old.value
                    replaced = old.value
                    old.value = value
                    self._describe(old, weight, version, fresh_until)
                    self._set_expiry(old, expires, default_ttl)
                    self._policy.touch(old)
                    if self._over():
                        evicted = self._shrink(old, notes)
                    return value
                if only_if_absent:
                    self._misses += 1
                    if too_heavy is not None:
                        raise too_heavy  # nothing changed, not even an expiry
                self._remove(old)  # an expired entry is replaced by a new one, not updated
                self._expirations += 1
                replaced = old
                _note(notes, old.key, old.value, EXPIRED)
            else:
                if only_if_absent:
                    self._misses += 1
                    if too_heavy is not None:
                        raise too_heavy  # nothing stored
                if (
                    self._lru is not None
                    and self._maxbytes_c < 0
                    and self._table.used >= self._maxsize
                    and not self._any_expired()
                ):
                    # A full LRU cache: the least recent entry makes room, and its object is
                    # reused for the new key if nothing but the table holds it (no reader in a
                    # Python timer, no ``entry()`` caller): it moves to the new key's place in
                    # the table.
                    e = as_entry(ring_back_except(&self._lru.ring, NULL))
                    if e is not None and Py_REFCNT(e) == 2:  # the table and ``e``
                        table_reserve(&self._table)
                        evicted = e.key
                        replaced = e.value
                        table_detach(&self._table, <PyObject*>e)
                        e.key = key
                        e.hash = h
                        e.value = value
                        table_attach(&self._table, <PyObject*>e)  # the reference moves along
                        self._describe(e, weight, version, fresh_until)
                        ring_move_front(&self._lru.ring, &e.link)
                        self._evictions += 1
                        _note(notes, evicted, replaced, SIZE)
                        self._set_expiry(e, expires, default_ttl)
                        return value
            e = new_entry(key, h, value, self._rich)
            e.version = version
            e.fresh_until = fresh_until
            if self._rich:
                (<_RichEntry>e).weight = weight
            table_reserve(&self._table)
            Py_INCREF(e)
            table_attach(&self._table, <PyObject*>e)
            self._insert(e)
            self._bytes += weight
            self._set_expiry(e, expires, default_ttl)
            if self._over():
                evicted = self._shrink(e, notes)
        finally:
            self._unlock()
        return value

    cdef inline void _describe(
        self, Entry e, Py_ssize_t weight, unsigned long long version, double fresh_until
    ) noexcept:
        """Give the entry, in the table, the metadata of its new value."""
        if self._rich:
            self._bytes += weight - (<_RichEntry>e).weight
            (<_RichEntry>e).weight = weight
        e.version = version
        e.fresh_until = fresh_until

    cdef inline Py_ssize_t _weight(self, Entry e) noexcept:
        return (<_RichEntry>e).weight if self._rich else 0

    cdef inline int _insert(self, Entry e) except -1:
        """Link ``e``, just added to the table, into the policy (taken out again on failure)."""
        if self._lru is not None:
            ring_push_front(&self._lru.ring, &e.link)
            return 0
        if self._policy.insert(e) < 0:
            table_detach(&self._table, <PyObject*>e)
            Py_DECREF(e)  # the caller holds it too
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
        return self._table.used > self._maxsize or (
            self._maxbytes_c >= 0 and self._bytes > self._maxbytes_c
        )

    cdef object _shrink(self, Entry protect, list notes):
        """Evict until both bounds hold: expired entries first, then the policy's victims.

        Returns what was dropped (None, an Entry or a list) for the caller to release later;
        ``notes`` (unless None) gets what on_evict is to be told.
        """
        cdef object dropped = None
        cdef Entry victim
        if self._expiring():
            dropped = []
            self._purge_expired(self._now(), dropped, notes)
        while self._over():
            victim = self._policy.evict(protect)
            if victim is None:
                break
            self._remove(victim)
            self._evictions += 1
            _note(notes, victim.key, victim.value, SIZE)
            if dropped is None:
                dropped = victim
            elif type(dropped) is list:
                (<list>dropped).append(victim)
            else:
                dropped = [dropped, victim]
        return dropped

    cdef void _remove(self, Entry e) noexcept:
        """Take ``e`` out of the table (first: readers stop finding it), then unlink it. The
        caller holds a reference to ``e``: nothing is released here, no Python code runs."""
        table_detach(&self._table, <PyObject*>e)
        Py_DECREF(e)
        self._unlink(e)

    cdef void _unlink(self, Entry e) noexcept:
        """Take ``e``, no longer in the table, out of the policy and the expiry order."""
        if self._lru is not None:
            ring_remove(&self._lru.ring, &e.link)
        else:
            self._policy.remove(e)
        self._bytes -= self._weight(e)
        self._detach_expiry(e)

    def __delitem__(self, key):
        self.pop(key)

    def pop(self, key, default=_MISSING):
        """Remove ``key`` and return its value, else ``default`` (``KeyError`` if not given)."""
        cdef PyObject* p
        cdef Entry e = None
        self._lock()
        try:
            p = self._find(key)
            if p != NULL:
                e = <Entry>p
                self._remove(e)
                if e.expires == INF or self._now() < e.expires:
                    return e.value
                self._expirations += 1
        finally:
            self._unlock()
        if e is not None and self._on_evict is not None:  # it had expired
            self._notify([e.key, e.value, EXPIRED])
        if default is _MISSING:
            raise KeyError(key)
        return default

    def popitem(self):
        """Remove and return the policy's victim as ``(key, value)``."""
        cdef list dropped = []
        cdef list notes = None if self._on_evict is None else []
        cdef Entry victim
        try:
            self._lock()
            try:
                if self._expiring():
                    self._purge_expired(self._now(), dropped, notes)
                victim = self._policy.evict(None)
                if victim is None:
                    raise KeyError("popitem(): cache is empty")
                self._remove(victim)
                return victim.key, victim.value
            finally:
                self._unlock()
        finally:
            self._notify(notes)

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
        cdef _Policy policy = _new_policy(self._policy_name, self._maxsize, self._seed)
        cdef Table old
        self._lock()
        try:
            old = self._take_entries(policy)
        finally:
            self._unlock()
        table_release(&old)  # values are released with the flag cleared: finalizers may write

    cdef Table _take_entries(self, _Policy policy) noexcept:
        """Empty the cache (but for statistics) with a new ``policy``, and return its former
        table, whose entries no longer link to anything: releasing it is the caller's."""
        cdef Table old = self._detach_table()
        self._set_policy(policy)
        return old

    cdef Table _detach_table(self) noexcept:
        """Leave the cache with no entries and return its former table, whose entries no longer
        link to anything (its policy still has them in its rings: it must be replaced)."""
        cdef Table old = self._table
        cdef Py_ssize_t pos = 0
        cdef PyObject* p
        cdef Entry e
        table_init(&self._table)
        self._table.version = old.version + 1  # a lookup running ``==`` starts over
        while True:
            p = table_next(&old, &pos)
            if p == NULL:
                break
            e = <Entry>p
            e.link.prev = NULL  # concurrent hits holding it must not touch a dead ring
            e.link.next = NULL
            e.exp.ring.prev = NULL  # and neither in the expiry ring nor in the heap
            e.exp.ring.next = NULL
            if self._rich:
                (<_RichEntry>e).freq = NULL
                (<_RichEntry>e).segment = NONE
        self._heap.size = 0
        ring_init(&self._ttl_ring)
        self._bytes = 0
        return old

    def expire(self):
        """Remove every expired entry now; return how many were removed."""
        cdef list dropped = []
        cdef list notes = None if self._on_evict is None else []
        try:
            self._lock()
            try:
                return self._purge_expired(self._now(), dropped, notes)
            finally:
                self._unlock()
        finally:
            self._notify(notes)

    cdef int _notify(self, list notes) except -1:
        """Tell ``on_evict`` what a mutation let go; called once the flag is cleared."""
        cdef Py_ssize_t i
        cdef object hook = self._on_evict
        if hook is None or not notes:
            return 0
        for i in range(0, len(notes), 3):
            try:
                hook(notes[i], notes[i + 1], notes[i + 2])
            except Exception:
                _log.exception("LocalCache on_evict hook raised (cause %s)", notes[i + 2])
        return 0

    # -- expiry -------------------------------------------------------------------------------

    cdef inline bint _expiring(self) noexcept:
        """Whether any entry may expire."""
        return self._ttl_ring.size != 0 or self._heap.size != 0

    cdef inline bint _any_expired(self) except -1:
        """Whether some entry has expired (then a write purges before it evicts)."""
        if not self._expiring():
            return False
        return self._expired_head()

    cdef bint _expired_head(self) except -1:
        cdef double now = self._now()
        cdef Link* oldest = self._ttl_ring.head.prev
        if oldest != &self._ttl_ring.head and (<Entry>entry_of_tlink(oldest)).expires <= now:
            return True
        return self._heap.size != 0 and self._heap.items[1].expires <= now

    cdef inline int _set_expiry(self, Entry e, double expires, bint default_ttl) except -1:
        if expires == e.expires and (
            expires == INF or (e.exp.ring.prev != NULL) == default_ttl
        ):
            return 0
        return self._place_expiry(e, expires, default_ttl)

    cdef int _place_expiry(self, Entry e, double expires, bint default_ttl) except -1:
        if expires != INF:
            heap_reserve(&self._heap)  # the one step that can fail, before anything changes
        self._detach_expiry(e)
        e.expires = expires
        if expires == INF:
            return 0
        cdef Link* latest = self._ttl_ring.head.next
        if default_ttl and (
            latest == &self._ttl_ring.head or (<Entry>entry_of_tlink(latest)).expires <= expires
        ):
            # The latest expiry so far: it goes in front and the ring stays sorted. (A writer
            # that read the clock before another can come second with an earlier expiry: the
            # heap takes it.)
            ring_push_front(&self._ttl_ring, &e.exp.ring)
            return 0
        heap_push(&self._heap, e)
        return 0

    cdef inline void _detach_expiry(self, Entry e) noexcept:
        if e.exp.ring.prev != NULL:
            ring_remove(&self._ttl_ring, &e.exp.ring)
        elif e.exp.heap.pos != 0:
            heap_remove(&self._heap, e)

    cdef Py_ssize_t _purge_expired(self, double now, list dropped, list notes) except -1:
        cdef Entry e
        cdef Link* oldest
        cdef Py_ssize_t removed = 0
        while True:
            oldest = self._ttl_ring.head.prev
            if oldest == &self._ttl_ring.head or (<Entry>entry_of_tlink(oldest)).expires > now:
                break
            e = <Entry>entry_of_tlink(oldest)
            self._remove(e)
            dropped.append(e)
            _note(notes, e.key, e.value, EXPIRED)
            removed += 1
        while self._heap.size != 0 and self._heap.items[1].expires <= now:
            e = <Entry>self._heap.items[1].entry
            self._remove(e)
            dropped.append(e)
            _note(notes, e.key, e.value, EXPIRED)
            removed += 1
        self._expirations += removed
        return removed

    cdef Py_ssize_t _count_expired(self, double now) noexcept:
        """Live entries with ``expires <= now``: the ring's expired tail and the heap's top."""
        cdef Py_ssize_t count = 0
        cdef Link* l = self._ttl_ring.head.prev
        while l != &self._ttl_ring.head and (<Entry>entry_of_tlink(l)).expires <= now:
            count += 1
            l = l.prev
        return count + heap_count_until(&self._heap, 1, now)

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

    @property
    def on_evict(self):
        """The hook told about evicted and expired entries, or None."""
        return self._on_evict

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


# -- garbage collection -------------------------------------------------------------------------

# Entries are not tracked by the collector, so it cannot see their references to keys and values:
# the cache reports them as its own. It does so for each entry that only its table holds: then
# every path from outside to that key and value goes through the cache, and a cycle (value ->
# cache -> entry -> value) is garbage exactly when the collector finds the cache unreachable. An
# entry someone else also holds (an ``entry()`` result, a write in progress) is not reported: its
# key and value count as reachable from outside, so a cycle through it lives until that
# reference goes, and nothing the program can still reach is ever collected. (No Python code
# runs while the collector traverses, so the counts read here cannot change between its passes.)
# To break such a cycle the collector clears the cache: that releases the table too.

cdef traverseproc _traverse_fields = NULL  # Cython's traverse of the cache's own fields
cdef inquiry _clear_fields = NULL  # and its clear


cdef int _traverse_cache(PyObject* o, visitproc visit, void* arg) noexcept:
    cdef Table* t = &(<LocalCache>o)._table
    cdef Py_ssize_t pos = 0
    cdef PyObject* e
    cdef int r = _traverse_fields(o, visit, arg)
    while r == 0:
        e = table_next(t, &pos)
        if e == NULL:
            break
        if Py_REFCNT(<object>e) == 1:
            r = visit(<PyObject*>(<Entry>e).key, arg)
            if r == 0:
                r = visit(<PyObject*>(<Entry>e).value, arg)
    return r


cdef int _clear_cache(PyObject* o) noexcept:
    # The table is detached before its references go (which may run Python code): anything
    # that still reaches the cache then finds it empty, not entries being freed.
    cdef Table old = (<LocalCache>o)._detach_table()
    _clear_fields(o)  # drops the policy, whose rings linked the entries, among the rest
    table_release(&old)  # the references that make the cycles
    return 0


cdef void _report_entries_to_gc() noexcept:
    """Put _traverse_cache and _clear_cache in the slots of the cache types (Python subclasses
    inherit them)."""
    global _traverse_fields, _clear_fields
    cdef TypeSlots* t = <TypeSlots*><PyObject*>LocalCache
    _traverse_fields = t.tp_traverse
    _clear_fields = t.tp_clear
    for cls in (LocalCache, LRUCache, LFUCache, TinyLFUCache):
        t = <TypeSlots*><PyObject*>cls
        if t.tp_traverse == _traverse_fields and t.tp_clear == _clear_fields:
            t.tp_traverse = _traverse_cache
            t.tp_clear = _clear_cache


_report_entries_to_gc()


cdef inline void _note_hit(LocalCache l1, Entry e):
    """A front's hit on ``e``: the policy's recency (unless ``e`` leads already) and the count."""
    if e.link.prev != NULL:
        if l1._lru is not None:
            ring_move_front(&l1._lru.ring, &e.link)
        else:
            l1._policy.touch(e)
    l1._hits += 1


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
        # The common case, no reference counting: table_lookup returns an entry the table holds
        # (a stored key's ``__eq__`` that changed the table made it probe again), and no Python
        # code runs from there to the return, so the borrowed pointer stays valid.
        if self._usable and type(key) is str and l1._timer is None:
            p = table_lookup(&l1._table, <PyObject*>key, key_hash(key))
            if (
                p != NULL
                and (<Entry>p).fresh_until > tc_monotonic()
                and (<Entry>p).value is not ABSENT  # a cached absence: the slow path says so
            ):
                _note_hit(l1, <Entry>p)
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
        p = table_lookup(&l1._table, <PyObject*>key, key_hash(key))
        if p == NULL:
            return _MISSING
        e = <Entry>p  # a strong reference: an injected timer may run Python code
        if e.fresh_until <= l1._now() or e.value is ABSENT:
            return _MISSING
        _note_hit(l1, e)
        return e.value


cdef class CallFront:
    """The local-hit path of a cached function: ``f(x)`` for one str or int ``x``, in C.

    The call slots are set by hand (below): a call is answered through vectorcall, so a call
    without keywords builds neither an argument tuple nor a keyword dict; everything else
    (other arguments, a miss, a local tier that may not serve) goes to the subclass's
    ``_call(args, kwargs)``.
    """

    cdef vectorcallfunc _vectorcall  # the per-instance entry point vectorcall reads
    cdef LocalCache _l1
    cdef TieredFront _cache
    cdef bint _fast  # single-argument calls may use the argument itself as the local key

    def __cinit__(self, *args, **kwargs):
        self._vectorcall = <vectorcallfunc>_call_front_vectorcall

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
        # Only reached where the fast slots below are not installed; same behaviour, slower.
        return <object>_call_front_call(<PyObject*>self, <PyObject*>args, <PyObject*>kwargs)


cdef inline PyObject* _front_hit(CallFront front, PyObject* arg):
    """The value of a fresh local copy for the single argument ``arg``, borrowed; NULL if none.

    As TieredFront.__getitem__: a borrowed entry, and no Python code until the return (the
    hash of a str or an int runs none).
    """
    cdef LocalCache l1 = front._l1
    cdef PyObject* p
    if not (
        front._fast
        and front._cache is not None
        and front._cache._usable
        and l1._timer is None
        and (type(<object>arg) is str or type(<object>arg) is int)
    ):
        return NULL
    p = table_lookup(&l1._table, arg, key_hash(<object>arg))
    if p == NULL or (<Entry>p).fresh_until <= tc_monotonic() or (<Entry>p).value is ABSENT:
        return NULL
    _note_hit(l1, <Entry>p)
    return <PyObject*>(<Entry>p).value


cdef PyObject* _call_front_call(PyObject* self, PyObject* args, PyObject* kwargs) except NULL:
    cdef PyObject* value
    cdef object result
    if (kwargs == NULL or PyDict_GET_SIZE(kwargs) == 0) and PyTuple_GET_SIZE(<object>args) == 1:
        value = _front_hit(<CallFront>self, PyTuple_GET_ITEM(<object>args, 0))
        if value != NULL:
            incref(value)
            return value
    result = (<object>self)._call(<object>args, <object>kwargs if kwargs != NULL else None)
    Py_INCREF(result)
    return <PyObject*>result


cdef PyObject* _call_front_vectorcall(
    PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames
) except NULL:
    cdef Py_ssize_t n = PyVectorcall_NARGS(nargsf)
    cdef Py_ssize_t i
    cdef PyObject* value
    cdef object result
    cdef dict kwargs = None
    if n == 1 and kwnames == NULL:
        value = _front_hit(<CallFront>self, args[0])
        if value != NULL:
            incref(value)
            return value
    positional = tuple([<object>args[i] for i in range(n)])
    if kwnames != NULL and PyTuple_GET_SIZE(<object>kwnames):
        kwargs = {}
        for i in range(PyTuple_GET_SIZE(<object>kwnames)):
            kwargs[<object>PyTuple_GET_ITEM(<object>kwnames, i)] = <object>args[n + i]
    result = (<object>self)._call(positional, kwargs)
    Py_INCREF(result)
    return <PyObject*>result


cdef Py_ssize_t _vectorcall_offset() except -1:
    cdef CallFront probe = CallFront.__new__(CallFront)
    return <Py_ssize_t>(<char*>&probe._vectorcall - <char*><PyObject*>probe)


cdef Py_ssize_t VECTORCALL_OFFSET = _vectorcall_offset()


def install_fast_call(type cls):
    """Answer calls of ``cls`` (a CallFront subclass) through the C call slots directly.

    vectorcall hands the arguments over as they lie on the caller's stack, and tp_call gets
    NULL when there are no keywords, where a ``def __call__(self, *args, **kwargs)`` builds a
    tuple and a dict on every call (together about a third of a functools.lru_cache hit). A
    Python subclass gets its call slot from ``__call__`` when it is created, and does not
    inherit vectorcall, so each one installs the fast slots again.
    """
    if not issubclass(cls, CallFront):
        raise TypeError("install_fast_call() takes a CallFront subclass")
    cdef TypeSlots* slots = <TypeSlots*><PyObject*>cls
    slots.tp_call = <ternaryfunc>_call_front_call
    slots.tp_vectorcall_offset = VECTORCALL_OFFSET
    slots.tp_flags |= Py_TPFLAGS_HAVE_VECTORCALL
    PyType_Modified(slots)
    return cls


install_fast_call(CallFront)
