"""The echo filter of the sync listener's socket, compiled: it reads and passes this process' own
echoes without the GIL. Behaviour and docs: its pure-Python twin, ``tiercache/_wire_py.py``."""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memmove
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec


cdef extern from "sys/socket.h" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)

cdef extern from "errno.h" nogil:
    int EWOULDBLOCK


cdef enum:
    CHUNK = 65536
    RING = 4096  # passed echoes Python has not taken yet stay below this
    INCOMPLETE = -1
    BAD = -2
    # read() outcomes
    GOT_DATA = 0
    GOT_NOTHING = 1
    GOT_EOF = 2
    GOT_ERROR = 3

cdef int64_t LIMIT = 1LL << 53
cdef int64_t MAX_COUNT = 1LL << 30


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline Py_ssize_t _crlf(const char *buf, Py_ssize_t i, Py_ssize_t size) noexcept nogil:
    """The index of the next CRLF at or after ``i``, or -1."""
    cdef const char *p
    while i < size:
        p = <const char *>memchr(buf + i, c'\n', size - i)
        if p == NULL:
            return -1
        if p > buf + i and (p - 1)[0] == c'\r':
            return (p - buf) - 1
        i = (p - buf) + 1
    return -1


cdef inline Py_ssize_t _line(const char *buf, Py_ssize_t i, Py_ssize_t size,
                             int64_t *out) noexcept nogil:
    """Parse the integer line at ``i`` into ``out``; the index after its CRLF, or -1/-2."""
    cdef Py_ssize_t j = _crlf(buf, i, size)
    cdef Py_ssize_t k = i
    cdef int64_t n = 0
    cdef bint negative = False
    if j < 0:
        return INCOMPLETE
    if k < j and buf[k] == c'-':
        negative = True
        k += 1
    if not 0 < j - k <= 18:
        return BAD
    while k < j:
        if not c'0' <= buf[k] <= c'9':
            return BAD
        n = n * 10 + (buf[k] - c'0')
        k += 1
    out[0] = -n if negative else n
    return j + 2


cdef Py_ssize_t _reply_end(const char *buf, Py_ssize_t i, Py_ssize_t size) noexcept nogil:
    """The index after the complete RESP2/RESP3 reply at ``i``; -1 incomplete, -2 not RESP."""
    cdef int64_t remaining = 1
    cdef int64_t n
    cdef Py_ssize_t j
    cdef char t
    while remaining:
        if i >= size:
            return INCOMPLETE
        t = buf[i]
        if t == c'+' or t == c'-' or t == c':' or t == c'_' or t == c',' or t == c'#' or t == c'(':
            j = _crlf(buf, i + 1, size)
            if j < 0:
                return INCOMPLETE
            i = j + 2
        elif (t == c'$' or t == c'=' or t == c'!' or t == c'*' or t == c'>' or t == c'~'
              or t == c'%' or t == c'|'):
            j = _line(buf, i + 1, size, &n)
            if j < 0:
                return j
            if n > MAX_COUNT:
                return BAD
            i = j
            if t == c'|':  # an attribute map precedes the reply it annotates
                remaining += 2 * (n if n > 0 else 0)
                continue
            if t == c'$' or t == c'=' or t == c'!':
                if n >= 0:
                    if i + n + 2 > size:
                        return INCOMPLETE
                    if buf[i + n] != c'\r' or buf[i + n + 1] != c'\n':
                        return BAD
                    i += n + 2
            elif n > 0:
                remaining += 2 * n if t == c'%' else n
        else:
            return BAD
        remaining -= 1
    return i


cdef inline Py_ssize_t _bulk(const char *buf, Py_ssize_t i, Py_ssize_t end,
                             Py_ssize_t *start, Py_ssize_t *length) noexcept nogil:
    """The bulk string at ``i`` (within a complete reply ending at ``end``): its start and
    length, and the index after it; -1 if it is not one."""
    cdef int64_t n
    cdef Py_ssize_t j
    if i >= end or buf[i] != c'$':
        return -1
    j = _line(buf, i + 1, end, &n)
    if j < 0 or n < 0 or j + n + 2 > end:
        return -1
    start[0] = j
    length[0] = n
    return j + n + 2


cdef inline int64_t _number(const char *p, Py_ssize_t n) noexcept nogil:
    """A decimal below 2**53 (at most 16 digits, no sign), or -1."""
    cdef int64_t v = 0
    cdef Py_ssize_t k
    if not 0 < n <= 16:
        return -1
    for k in range(n):
        if not c'0' <= p[k] <= c'9':
            return -1
        v = v * 10 + (p[k] - c'0')
    return v if v < LIMIT else -1


cdef inline Py_ssize_t _field(const char *p, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """The index of the space ending the field at ``i`` of the line ``p[:n]``, or -1."""
    cdef const char *q = <const char *>memchr(p + i, c' ', n - i)
    return -1 if q == NULL else q - p


cdef class EchoFilter:
    """Lets this process' own set/delete echoes pass on a subscribed socket (see the twin)."""

    cdef char *_buf
    cdef Py_ssize_t _start, _end, _cap
    cdef int _nchan
    cdef char **_chan
    cdef Py_ssize_t *_chan_len
    cdef int64_t *_pos
    cdef bytes _origin
    cdef const char *_origin_p
    cdef Py_ssize_t _origin_len
    cdef Py_ssize_t _max_message, _max_buffer
    cdef bint _armed, _passthrough
    cdef int64_t _ring[RING]
    cdef uint64_t _ring_next, _taken
    cdef int _errno

    def __cinit__(self):
        self._buf = NULL
        self._chan = NULL
        self._chan_len = NULL
        self._pos = NULL
        self._nchan = 0

    def __init__(self, origin, channels, Py_ssize_t max_message=1 << 20,
                 Py_ssize_t max_buffer=1 << 22):
        cdef bytes c
        cdef int i
        if max_message < 1 or max_buffer < 1:
            raise ValueError("max_message and max_buffer must be >= 1")
        channels = [bytes(c) for c in channels]
        self._origin = bytes(origin)
        self._origin_p = self._origin
        self._origin_len = len(self._origin)
        self._max_message = max_message
        self._max_buffer = max_buffer
        self._cap = CHUNK
        self._buf = <char *>malloc(self._cap)
        self._nchan = len(channels)
        self._chan = <char **>malloc(max(self._nchan, 1) * sizeof(char *))
        self._chan_len = <Py_ssize_t *>malloc(max(self._nchan, 1) * sizeof(Py_ssize_t))
        self._pos = <int64_t *>malloc(max(self._nchan, 1) * sizeof(int64_t))
        if self._buf == NULL or self._chan == NULL or self._chan_len == NULL or self._pos == NULL:
            raise MemoryError()
        for i in range(self._nchan):
            self._chan[i] = NULL
        for i in range(self._nchan):
            c = channels[i]
            self._chan_len[i] = len(c)
            self._chan[i] = <char *>malloc(max(len(c), 1))
            if self._chan[i] == NULL:
                raise MemoryError()
            memcpy(self._chan[i], <const char *>c, len(c))
        for i in range(RING):
            self._ring[i] = 0
        self._ring_next = self._taken = 0
        self.reset()

    def __dealloc__(self):
        cdef int i
        if self._chan != NULL:
            for i in range(self._nchan):
                free(self._chan[i])
        free(self._chan)
        free(self._chan_len)
        free(self._pos)
        free(self._buf)

    def reset(self):
        """Forget the buffer and the positions; pass nothing until ``arm`` (a new connection).
        Passed echoes not taken yet stay for ``take_passed``."""
        cdef int i
        self._start = self._end = 0
        for i in range(self._nchan):
            self._pos[i] = 0
        self._armed = False
        self._passthrough = False

    def arm(self, positions):
        """Start passing echoes, each channel at ``positions[i]`` (the last number applied)."""
        cdef int i
        if len(positions) != self._nchan:
            raise ValueError("one position per channel")
        if not all(0 <= p < LIMIT for p in positions):
            raise ValueError("positions are sequence numbers, 0 <= p < 2**53")
        for i in range(self._nchan):
            self._pos[i] = positions[i]
        self._armed = True

    def position(self, int index):
        """The last sequence number of channel ``index`` (passed echoes included)."""
        if not 0 <= index < self._nchan:
            raise IndexError(index)
        return self._pos[index]

    def take_passed(self):
        """The versions of the echoes passed since the last call, oldest first."""
        cdef uint64_t i
        out = [self._ring[i % RING] for i in range(self._taken, self._ring_next)]
        self._taken = self._ring_next
        return out

    def heard(self, version):
        """Whether an echo of ``version`` passed recently (among the last 4096)."""
        cdef int i
        cdef int64_t v
        if not 0 < version < LIMIT:
            return False
        v = version
        for i in range(RING):
            if self._ring[i] == v:
                return True
        return False

    @property
    def passthrough(self):
        """Whether it gave up framing replies (every byte goes to the caller until ``reset``)."""
        return self._passthrough

    def read(self, int fd, double timeout):
        """The next complete replies that are not passed echoes, as bytes (b"": none came in
        about ``timeout`` seconds; the socket's own receive timeout bounds each wait); None at
        end of stream. OSError for a failed receive."""
        cdef Py_ssize_t out_start = 0, out_end = 0
        cdef int outcome
        with nogil:
            outcome = self._run(fd, timeout, &out_start, &out_end)
        if outcome == GOT_DATA:
            data = PyBytes_FromStringAndSize(self._buf + out_start, out_end - out_start)
            self._start = out_end
            return data
        if outcome == GOT_NOTHING:
            return b""
        if outcome == GOT_EOF:
            return None
        if outcome == GOT_ERROR:
            raise OSError(self._errno, "recv failed on the pub/sub socket")
        raise MemoryError()

    cdef int _run(self, int fd, double timeout, Py_ssize_t *out_start,
                  Py_ssize_t *out_end) noexcept nogil:
        cdef double deadline = _monotonic() + timeout
        cdef bint waited = False
        cdef Py_ssize_t n, keep
        cdef char *grown
        while True:
            if self._consume(out_start, out_end):
                return GOT_DATA
            if waited and _monotonic() >= deadline:
                return GOT_NOTHING
            keep = self._end - self._start
            if keep >= self._max_buffer:
                self._passthrough = True
                continue
            if self._start:
                memmove(self._buf, self._buf + self._start, keep)
                self._start, self._end = 0, keep
            if self._end == self._cap:
                grown = <char *>realloc(self._buf, self._cap * 2)
                if grown == NULL:
                    return -1
                self._buf, self._cap = grown, self._cap * 2
            n = recv(fd, self._buf + self._end, self._cap - self._end, 0)
            if n > 0:
                waited = True
                self._end += n
                continue
            if n == 0:
                return GOT_EOF
            if errno == EINTR:
                continue
            if errno == EAGAIN or errno == EWOULDBLOCK:  # the socket's receive timeout passed
                return GOT_NOTHING
            self._errno = errno
            return GOT_ERROR

    cdef bint _consume(self, Py_ssize_t *out_start, Py_ssize_t *out_end) noexcept nogil:
        """Pass the echoes at the head of the buffer; the complete replies after them, if any."""
        cdef Py_ssize_t end, last, nxt
        if self._passthrough:
            out_start[0], out_end[0] = self._start, self._end
            return self._end > self._start
        while True:
            end = _reply_end(self._buf, self._start, self._end)
            if end == BAD:
                self._passthrough = True
                return self._consume(out_start, out_end)
            if end == INCOMPLETE:
                return False
            if self._armed and self._ring_next - self._taken < RING and self._pass(self._start, end):
                self._start = end
                continue
            last = end
            while True:
                nxt = _reply_end(self._buf, last, self._end)
                if nxt < 0:
                    break
                last = nxt
            out_start[0], out_end[0] = self._start, last
            return True

    cdef bint _pass(self, Py_ssize_t i, Py_ssize_t end) noexcept nogil:
        """Whether the reply ``buf[i:end]`` is a passable own echo; if so, take its number."""
        cdef const char *buf = self._buf
        cdef Py_ssize_t kind_at = 0, kind_len = 0, chan_at = 0, chan_len = 0, data_at = 0
        cdef Py_ssize_t data_len = 0
        cdef Py_ssize_t a, b, nl
        cdef const char *d
        cdef int index = -1, k
        cdef int64_t seq, version
        if end - i < 4 or (buf[i] != c'*' and buf[i] != c'>') or memcmp(buf + i + 1, b"3\r\n", 3):
            return False
        i = _bulk(buf, i + 4, end, &kind_at, &kind_len)
        if i < 0 or kind_len != 7 or memcmp(buf + kind_at, b"message", 7):
            return False
        i = _bulk(buf, i, end, &chan_at, &chan_len)
        if i < 0:
            return False
        i = _bulk(buf, i, end, &data_at, &data_len)
        if i != end or data_len > self._max_message:
            return False
        for k in range(self._nchan):
            if self._chan_len[k] == chan_len and not memcmp(self._chan[k], buf + chan_at, chan_len):
                index = k
                break
        if index < 0:
            return False
        d = buf + data_at
        nl = -1
        for a in range(data_len):
            if d[a] == c'\n':
                nl = a
                break
        if nl < 0 or nl == data_len - 1:  # no key line, or an empty key
            return False
        # TC1 <seq> + <version> <origin> <op> -
        if nl < 4 or memcmp(d, b"TC1 ", 4):
            return False
        a = 4
        b = _field(d, a, nl)
        if b < 0:
            return False
        seq = _number(d + a, b - a)
        a = b + 1
        if a + 2 > nl or d[a] != c'+' or d[a + 1] != c' ':
            return False
        a += 2
        b = _field(d, a, nl)
        if b < 0:
            return False
        version = _number(d + a, b - a)
        a = b + 1
        b = _field(d, a, nl)
        if b < 0 or b - a != self._origin_len or memcmp(d + a, self._origin_p, self._origin_len):
            return False
        a = b + 1
        if a + 3 != nl or (d[a] != c'S' and d[a] != c'D') or d[a + 1] != c' ' or d[a + 2] != c'-':
            return False
        if seq <= 0 or version < 0 or seq != self._pos[index] + 1:
            return False
        self._pos[index] = seq
        self._ring[self._ring_next % RING] = version
        self._ring_next += 1
        return True
