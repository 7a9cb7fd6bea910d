# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True
"""The codec compiled: request.py, response.py and serialize.py with the common case in C.

Same API, same events, same refusals (docs/hardening.md rules 1-4, 6, 7, 9, 11): the pure-Python
modules are the reference, and `tests/sidecar/protocol/` runs every codec test on both plus a
differential test that feeds them the same bytes and requires identical events.

How it stays identical while being fast:

* Framing (where a head ends, Content-Length bodies, chunked bodies, pipelining, upgrades, what
  happens after a refusal) is the reference's state machine, line for line, in C.
* A head is read by a strict fast path that accepts only the forms common traffic uses: a known
  method, an origin-form target, HTTP/1.0 or 1.1, token names without "_", values of visible
  characters, one Host of the simple form, at most one Content-Length (1-19 digits), at most one
  `Transfer-Encoding: chunked`, `Connection: close / keep-alive`, `Expect: 100-continue`, the
  hop-by-hop fields `Keep-Alive` and `TE`, and final (2xx-5xx) responses. Every byte class it
  accepts is one llhttp (strict) and the reference's own checks accept.
* Anything else (an error of any kind, absolute-form, an Upgrade, a 1xx, a field `Connection`
  nominates, a limit exceeded) is not judged here: the head goes to the reference's own head
  parser, whose answer (a head, or the refusal with its status and reason) is used as is.
  Unusual and hostile input therefore costs what it costs today; only the common case is faster.
* The serializers write heads with one allocation; any argument outside the fast path's types
  or rules goes to the reference, which writes it or raises the same `ValueError`.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy

from .events import Data, EndOfMessage, Reject, RequestHead, ResponseHead
from .limits import Limits

__all__ = [
    "LAST_CHUNK",
    "RequestParser",
    "ResponseParser",
    "chunk",
    "request_head",
    "response_head",
]

LAST_CHUNK = b"0\r\n\r\n"

# --- byte classes ------------------------------------------------------------------------------

cdef enum:
    C_NAME = 1  # tchar except "_": header and trailer names (rule 3)
    C_VALUE = 2  # HTAB, SP, VCHAR, obs-text: field values, reason phrases
    C_PATH = 4  # VCHAR except "#": origin-form targets as llhttp reads them (rule 11)
    C_HOST = 8  # A-Z a-z 0-9 "." "-" ":": the Host form checked without the regex
    C_TOKEN = 16  # tchar: chunk-extension names and values, methods
    C_QDTEXT = 32  # quoted-string text in chunk extensions
    C_HEX = 64

cdef unsigned char CLS[256]
cdef unsigned char LOWER[256]


cdef void _init_tables() noexcept:
    cdef int c
    cdef unsigned char k
    cdef bytes tchar_punct = b"!#$%&'*+-.^_`|~"
    for c in range(256):
        k = 0
        if (0x30 <= c <= 0x39) or (0x41 <= c <= 0x5A) or (0x61 <= c <= 0x7A) or (
            tchar_punct.find(bytes((c,))) >= 0
        ):
            k |= C_TOKEN
            if c != 0x5F:
                k |= C_NAME
        if c == 0x09 or (0x20 <= c <= 0x7E) or c >= 0x80:
            k |= C_VALUE
        if 0x21 <= c <= 0x7E and c != 0x23:
            k |= C_PATH
        if (0x30 <= c <= 0x39) or (0x41 <= c <= 0x5A) or (0x61 <= c <= 0x7A) or c in (
            0x2E, 0x2D, 0x3A
        ):
            k |= C_HOST
        if c == 0x09 or c == 0x20 or c == 0x21 or (0x23 <= c <= 0x5B) or (
            0x5D <= c <= 0x7E
        ) or c >= 0x80:
            k |= C_QDTEXT
        if (0x30 <= c <= 0x39) or (0x41 <= c <= 0x46) or (0x61 <= c <= 0x66):
            k |= C_HEX
        CLS[c] = k
        LOWER[c] = c + 0x20 if 0x41 <= c <= 0x5A else c


_init_tables()

# --- small byte helpers (all on a head that ends in CRLFCRLF, so scans stop inside it) ---------


cdef inline bint _is_ows(unsigned char c) noexcept nogil:
    return c == 0x20 or c == 0x09


cdef inline Py_ssize_t _value_end(const unsigned char* p, Py_ssize_t pos, Py_ssize_t stop) noexcept nogil:
    """Where the field value at p[pos:] stops being C_VALUE bytes (never past `stop`).

    Eight bytes at a time while none of them is below 0x20 or 0x7F (such a word is all VCHAR,
    SP and obs-text, all C_VALUE), then byte by byte through the class table: HTAB, the only
    C_VALUE byte below 0x20, and the line's CR end the word steps. The word test is exact (the
    "has a byte less than n" and "has a zero byte" bit tricks have no false negatives or
    positives for whether such a byte exists), so this returns what the byte loop alone does."""
    cdef uint64_t w
    cdef uint64_t ones = 0x0101010101010101ULL
    cdef uint64_t highs = 0x8080808080808080ULL
    cdef uint64_t d
    while pos + 8 <= stop:
        memcpy(&w, p + pos, 8)
        d = w ^ 0x7F7F7F7F7F7F7F7FULL
        if ((w - ones * 0x20) & ~w & highs) | ((d - ones) & ~d & highs):
            break
        pos += 8
    while CLS[p[pos]] & C_VALUE:
        pos += 1
    return pos


cdef bint _ieq(const unsigned char* s, const char* lower, Py_ssize_t n) noexcept nogil:
    """`s` equals the lower-case ASCII `lower`, ignoring case (letters, digits and "-" only).

    `c | 0x20` folds only A-Z onto a-z among the bytes that can reach here: the others that fold
    onto a letter, digit or "-" are control characters, which no caller lets through."""
    cdef Py_ssize_t i
    for i in range(n):
        if (s[i] | 0x20) != <unsigned char>lower[i]:
            return False
    return True


cdef Py_ssize_t _find_crlfcrlf(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    """Like `bytes.find(b"\\r\\n\\r\\n", pos)` on p[:end]."""
    cdef const unsigned char* q
    cdef Py_ssize_t i
    while end - pos >= 4:
        q = <const unsigned char*>memchr(p + pos + 3, 0x0A, end - pos - 3)
        if q == NULL:
            return -1
        i = (q - p) - 3
        if p[i] == 0x0D and p[i + 1] == 0x0A and p[i + 2] == 0x0D:
            return i
        pos = i + 1
    return -1


cdef Py_ssize_t _find_crlf(const unsigned char* p, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    """Like `bytes.find(b"\\r\\n", pos)` on p[:end]."""
    cdef const unsigned char* q
    cdef Py_ssize_t i
    while end - pos >= 2:
        q = <const unsigned char*>memchr(p + pos + 1, 0x0A, end - pos - 1)
        if q == NULL:
            return -1
        i = (q - p) - 1
        if p[i] == 0x0D:
            return i
        pos = i + 1
    return -1


cdef inline object _slice(bytes buf, Py_ssize_t start, Py_ssize_t stop):
    if start == 0 and stop == PyBytes_GET_SIZE(buf):
        return buf
    return PyBytes_FromStringAndSize(PyBytes_AS_STRING(buf) + start, stop - start)


cdef bytes _lower(const unsigned char* s, Py_ssize_t n):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char* o = <unsigned char*>PyBytes_AS_STRING(out)
    cdef Py_ssize_t i
    for i in range(n):
        o[i] = LOWER[s[i]]
    return out


cdef Py_ssize_t _limit(object value):
    """A `Limits` field as a C size (larger than any buffer means no limit)."""
    return min(value, 1 << 62)


cdef bint _simple_host(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """request.py::valid_host's fast path: simple characters and an optional 1-5 digit port.
    False does not mean invalid: the caller then asks the reference."""
    cdef Py_ssize_t i, colon = -1
    if n == 0:
        return False
    for i in range(n):
        if not CLS[s[i]] & C_HOST:
            return False
        if s[i] == 0x3A and colon < 0:
            colon = i
    if colon < 0:
        return True
    if colon == 0 or not (0 < n - colon - 1 <= 5):
        return False
    for i in range(colon + 1, n):
        if not (0x30 <= s[i] <= 0x39):
            return False
    return True


# --- the reference, for what the fast path does not judge --------------------------------------

cdef object _reference_modules = None


cdef object _reference():
    """(request, response, serialize) of the pure-Python codec, imported on first use: they
    import this module themselves, so it cannot import them while it loads."""
    global _reference_modules
    if _reference_modules is None:
        from . import request, response, serialize

        _reference_modules = (request, response, serialize)
    return _reference_modules


class _Refusal(Exception):
    """A refusal on its way to becoming a Reject: the status and the reason the reference gives."""

    def __init__(self, status, reason):
        super().__init__(reason)
        self.status = status
        self.reason = reason


cdef object _EOM = EndOfMessage()  # no fields: one instance serves every message

# --- events, built without their dataclass __init__ --------------------------------------------
#
# RequestHead(...) through its generated __init__ costs a Python frame and eleven attribute
# stores, about a fifth of a whole request head's parse. The events are slotted dataclasses:
# allocate one and fill its slots directly, which is all that __init__ does. The layout is read
# from the classes when this module loads, and a class that gains a field, loses its slots or
# grows a __post_init__ stops the import with a message (tests then fail loudly).

cdef extern from "Python.h":
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    object _alloc "PyType_GenericAlloc" (PyTypeObject* type, Py_ssize_t nitems)

cdef PyTypeObject* _REQUEST_HEAD_TYPE = <PyTypeObject*>RequestHead
cdef PyTypeObject* _RESPONSE_HEAD_TYPE = <PyTypeObject*>ResponseHead
cdef PyTypeObject* _DATA_TYPE = <PyTypeObject*>Data

cdef Py_ssize_t _REQUEST_HEAD[11]
cdef Py_ssize_t _RESPONSE_HEAD[9]
cdef Py_ssize_t _DATA_SLOT[1]


cdef int _slots(object cls, tuple names, Py_ssize_t* offsets) except -1:
    import dataclasses
    import types

    fields = tuple(field.name for field in dataclasses.fields(cls))
    if fields != names or hasattr(cls, "__post_init__"):
        raise ImportError(
            f"native.pyx builds {cls.__name__} with the fields {names} and no __post_init__, "
            f"but events.py now gives it {fields}: update native.pyx with events.py"
        )
    for i, name in enumerate(names):
        descriptor = cls.__dict__.get(name)
        if type(descriptor) is not types.MemberDescriptorType:
            raise ImportError(f"native.pyx needs events.py's {cls.__name__} to keep __slots__")
        offsets[i] = (<PyMemberDescrObject*><PyObject*>descriptor).d_member.offset
    return 0


_slots(
    RequestHead,
    (
        "method",
        "path",
        "authority",
        "version",
        "headers",
        "keep_alive",
        "content_length",
        "chunked",
        "expect_continue",
        "upgrade",
        "absolute_form",
    ),
    _REQUEST_HEAD,
)
_slots(
    ResponseHead,
    (
        "status",
        "reason",
        "version",
        "headers",
        "keep_alive",
        "content_length",
        "chunked",
        "has_body",
        "upgrade",
    ),
    _RESPONSE_HEAD,
)
_slots(Data, ("data",), _DATA_SLOT)


cdef inline void _fill(object event, Py_ssize_t offset, object value) noexcept:
    """Set a slot of a new event (still NULL, so nothing to release)."""
    Py_INCREF(value)
    (<PyObject**>((<char*><PyObject*>event) + offset))[0] = <PyObject*>value


cdef object _data(object data):
    event = _alloc(_DATA_TYPE, 0)
    _fill(event, _DATA_SLOT[0], data)
    return event

# --- chunked bodies ----------------------------------------------------------------------------

cdef enum:
    _SIZE = 0
    _DATA = 1
    _DATA_CRLF = 2
    _TRAILER = 3
    _CHUNK_DONE = 4


cdef Py_ssize_t _chunk_ext_end(const unsigned char* p, Py_ssize_t i, Py_ssize_t eol) noexcept nogil:
    """Where `[ chunk-ext ]` starting at i ends if it fills p[i:eol] (request.py's _CHUNK_LINE),
    else -1: `;` token [ `=` ( token / quoted-string ) ], repeated."""
    while i < eol:
        if p[i] != 0x3B:  # ";"
            return -1
        i += 1
        if i >= eol or not CLS[p[i]] & C_TOKEN:
            return -1
        while i < eol and CLS[p[i]] & C_TOKEN:
            i += 1
        if i < eol and p[i] == 0x3D:  # "="
            i += 1
            if i < eol and p[i] == 0x22:  # '"'
                i += 1
                while True:
                    if i >= eol:
                        return -1
                    if p[i] == 0x22:
                        i += 1
                        break
                    if p[i] == 0x5C:  # quoted-pair: "\" then HTAB, SP, VCHAR or obs-text
                        i += 1
                        if i >= eol or not CLS[p[i]] & C_VALUE:
                            return -1
                        i += 1
                    elif CLS[p[i]] & C_QDTEXT:
                        i += 1
                    else:
                        return -1
            else:
                if i >= eol or not CLS[p[i]] & C_TOKEN:
                    return -1
                while i < eol and CLS[p[i]] & C_TOKEN:
                    i += 1
    return i


cdef class _Chunked:
    """request.py::ChunkedDecoder, compiled."""

    cdef int state
    cdef unsigned long long remaining
    cdef Py_ssize_t ext_left
    cdef Py_ssize_t trailer_left

    def __cinit__(self, Py_ssize_t ext_left, Py_ssize_t trailer_left):
        self.state = _SIZE
        self.remaining = 0
        self.ext_left = ext_left
        self.trailer_left = trailer_left

    cdef Py_ssize_t step(self, bytes buf, Py_ssize_t pos, list events) except -1:
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t end = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t eol, i, digits, take
        cdef unsigned long long size
        cdef int state
        while pos < end:
            state = self.state
            if state == _DATA:
                take = end - pos
                if <unsigned long long>take > self.remaining:
                    take = <Py_ssize_t>self.remaining
                events.append(_data(_slice(buf, pos, pos + take)))
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.state = _DATA_CRLF
            elif state == _SIZE:
                eol = _find_crlf(p, pos, end)
                if eol < 0:
                    self.check_partial_line(end - pos)
                    return pos
                i = pos
                size = 0
                while i < eol and CLS[p[i]] & C_HEX:
                    size = (size << 4) | (
                        p[i] - 0x30 if p[i] <= 0x39 else (p[i] | 0x20) - 0x61 + 10
                    )
                    i += 1
                digits = i - pos
                if digits < 1 or digits > 16:
                    raise _Refusal(400, "malformed chunk size line")
                if i < eol:
                    if _chunk_ext_end(p, i, eol) != eol:
                        raise _Refusal(400, "malformed chunk size line")
                    self.ext_left -= eol - i
                    if self.ext_left < 0:
                        raise _Refusal(400, "too many chunk-extension bytes")
                pos = eol + 2
                if size:
                    self.remaining = size
                    self.state = _DATA
                else:
                    self.state = _TRAILER
            elif state == _DATA_CRLF:
                if end - pos < 2:
                    if p[pos] != 0x0D:
                        raise _Refusal(400, "chunk data not followed by CRLF")
                    return pos
                if p[pos] != 0x0D or p[pos + 1] != 0x0A:
                    raise _Refusal(400, "chunk data not followed by CRLF")
                pos += 2
                self.state = _SIZE
            elif state == _TRAILER:
                eol = _find_crlf(p, pos, end)
                if eol < 0:
                    self.check_partial_line(end - pos)
                    return pos
                if eol == pos:
                    self.state = _CHUNK_DONE
                    return pos + 2
                i = pos
                while CLS[p[i]] & C_NAME:
                    i += 1
                if i == pos or p[i] != 0x3A:
                    raise _Refusal(400, "malformed trailer field")
                i += 1
                while i < eol and CLS[p[i]] & C_VALUE:
                    i += 1
                if i != eol:
                    raise _Refusal(400, "malformed trailer field")
                self.trailer_left -= eol + 2 - pos
                if self.trailer_left < 0:
                    raise _Refusal(400, "trailer section too large")
                pos = eol + 2
            else:
                return pos
        return pos

    cdef int check_partial_line(self, Py_ssize_t pending) except -1:
        if self.state == _SIZE:
            if pending > 16 + self.ext_left + 1:
                raise _Refusal(400, "chunk size line too long")
        elif pending > self.trailer_left + 1:
            raise _Refusal(400, "trailer section too large")
        return 0


# --- fields of a head, read by the fast path ---------------------------------------------------

cdef enum:
    K_NONE = 0
    K_HOST = 1
    K_CL = 2
    K_TE = 3
    K_CONNECTION = 4
    K_UPGRADE = 5
    K_EXPECT = 6
    K_DROP = 7  # keep-alive, te: removed
    K_PROXY_CONNECTION = 8  # removed too, but llhttp reads it as Connection: left to the reference


# Names common in requests and responses, handed out as one shared (lower-case) bytes object
# each instead of a new one per field line: `_kind` gives them the kinds K_NAMED + their index.
cdef tuple _NAMES = (
    b"date",
    b"etag",
    b"vary",
    b"accept",
    b"server",
    b"user-agent",
    b"traceparent",
    b"content-type",
    b"x-request-id",
    b"accept-ranges",
    b"cache-control",
    b"last-modified",
    b"accept-encoding",
    b"accept-language",
)
cdef enum:
    K_NAMED = 16


cdef int _kind(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    if n == 2:
        if _ieq(s, b"te", 2):
            return K_DROP
    elif n == 4:
        if _ieq(s, b"host", 4):
            return K_HOST
        if _ieq(s, b"date", 4):
            return K_NAMED + 0
        if _ieq(s, b"etag", 4):
            return K_NAMED + 1
        if _ieq(s, b"vary", 4):
            return K_NAMED + 2
    elif n == 6:
        if _ieq(s, b"expect", 6):
            return K_EXPECT
        if _ieq(s, b"accept", 6):
            return K_NAMED + 3
        if _ieq(s, b"server", 6):
            return K_NAMED + 4
    elif n == 7:
        if _ieq(s, b"upgrade", 7):
            return K_UPGRADE
    elif n == 10:
        if _ieq(s, b"connection", 10):
            return K_CONNECTION
        if _ieq(s, b"keep-alive", 10):
            return K_DROP
        if _ieq(s, b"user-agent", 10):
            return K_NAMED + 5
    elif n == 11:
        if _ieq(s, b"traceparent", 11):
            return K_NAMED + 6
    elif n == 12:
        if _ieq(s, b"content-type", 12):
            return K_NAMED + 7
        if _ieq(s, b"x-request-id", 12):
            return K_NAMED + 8
    elif n == 13:
        if _ieq(s, b"accept-ranges", 13):
            return K_NAMED + 9
        if _ieq(s, b"cache-control", 13):
            return K_NAMED + 10
        if _ieq(s, b"last-modified", 13):
            return K_NAMED + 11
    elif n == 14:
        if _ieq(s, b"content-length", 14):
            return K_CL
    elif n == 15:
        if _ieq(s, b"accept-encoding", 15):
            return K_NAMED + 12
        if _ieq(s, b"accept-language", 15):
            return K_NAMED + 13
    elif n == 16:
        if _ieq(s, b"proxy-connection", 16):
            return K_PROXY_CONNECTION
    elif n == 17:
        if _ieq(s, b"transfer-encoding", 17):
            return K_TE
    return K_NONE


cdef struct Fields:
    Py_ssize_t lines  # field lines read
    Py_ssize_t host_start  # -1: no Host
    Py_ssize_t host_end
    bint has_length  # a Content-Length was read
    unsigned long long content_length  # 1-19 digits: always fits
    bint chunked
    bint close  # Connection: close
    bint keep_alive  # Connection: keep-alive
    bint expect_continue


cdef object _read_fields(
    const unsigned char* p, Py_ssize_t pos, Py_ssize_t stop, bint request, Fields* f
):
    """The field lines of p[pos:stop] (which ends with the head's final CRLF) as a header list
    without the framing and hop-by-hop fields, which go to `f`; None for anything the fast path
    leaves to the reference."""
    cdef list headers = []
    cdef Py_ssize_t name, name_end, value, value_end, i, n
    cdef unsigned long long length
    cdef int kind
    f.lines = 0
    f.host_start = -1
    f.host_end = -1
    f.has_length = False
    f.content_length = 0
    f.chunked = False
    f.close = False
    f.keep_alive = False
    f.expect_continue = False
    while True:
        if p[pos] == 0x0D:  # the empty line: only the final CRLF can start with CR here
            return headers if pos + 2 == stop else None
        name = pos
        while CLS[p[pos]] & C_NAME:
            pos += 1
        if pos == name or p[pos] != 0x3A:  # ":" right after a non-empty token
            return None
        name_end = pos
        pos += 1
        while _is_ows(p[pos]):
            pos += 1
        value = pos
        pos = _value_end(p, pos, stop)
        if p[pos] != 0x0D or p[pos + 1] != 0x0A:  # a control character, bare CR or bare LF
            return None
        value_end = pos
        while value_end > value and _is_ows(p[value_end - 1]):
            value_end -= 1
        pos += 2
        f.lines += 1
        kind = _kind(p + name, name_end - name)
        if kind >= K_NAMED:
            headers.append(
                (
                    <object>PyTuple_GET_ITEM(_NAMES, kind - K_NAMED),
                    PyBytes_FromStringAndSize(<const char*>p + value, value_end - value),
                )
            )
        elif kind == K_NONE or (not request and (kind == K_HOST or kind == K_EXPECT)):
            headers.append(
                (
                    _lower(p + name, name_end - name),
                    PyBytes_FromStringAndSize(<const char*>p + value, value_end - value),
                )
            )
        elif kind == K_DROP:
            pass
        elif kind == K_HOST:
            if f.host_start >= 0:
                return None
            f.host_start = value
            f.host_end = value_end
        elif kind == K_CL:
            n = value_end - value
            if f.has_length or n < 1 or n > 19:
                return None
            length = 0
            for i in range(value, value_end):
                if not (0x30 <= p[i] <= 0x39):
                    return None
                length = length * 10 + (p[i] - 0x30)
            f.content_length = length
            f.has_length = True
        elif kind == K_TE:
            if f.chunked or value_end - value != 7 or not _ieq(p + value, b"chunked", 7):
                return None
            f.chunked = True
        elif kind == K_CONNECTION:
            i = value
            while i <= value_end:  # comma-separated; empty elements are allowed
                n = i
                while n < value_end and p[n] != 0x2C:
                    n += 1
                name = i  # reuse: the element is p[name:name_end], OWS trimmed
                name_end = n
                while name < name_end and _is_ows(p[name]):
                    name += 1
                while name_end > name and _is_ows(p[name_end - 1]):
                    name_end -= 1
                if name_end - name == 5 and _ieq(p + name, b"close", 5):
                    f.close = True
                elif name_end - name == 10 and _ieq(p + name, b"keep-alive", 10):
                    f.keep_alive = True
                elif name_end != name:
                    return None  # upgrade, or a field to remove: the reference does those
                i = n + 1
        elif kind == K_EXPECT:
            if (
                f.expect_continue
                or value_end - value != 12
                or not _ieq(p + value, b"100-continue", 12)
            ):
                return None
            f.expect_continue = True
        else:  # K_UPGRADE, K_PROXY_CONNECTION
            return None


# --- the request parser ------------------------------------------------------------------------

cdef enum:
    _HEAD = 0
    _BODY = 1
    _CHUNKED = 2
    _UPGRADED = 3
    _CLOSED = 4
    _DEAD = 5

cdef bytes _CRLFCRLF = b"\r\n\r\n"
cdef bytes _CRLF = b"\r\n"
cdef bytes V10 = b"1.0"
cdef bytes V11 = b"1.1"
cdef bytes M_GET = b"GET"
cdef bytes M_HEAD = b"HEAD"
cdef bytes M_POST = b"POST"
cdef bytes M_PUT = b"PUT"
cdef bytes M_DELETE = b"DELETE"
cdef bytes M_PATCH = b"PATCH"
cdef bytes M_OPTIONS = b"OPTIONS"
cdef bytes M_TRACE = b"TRACE"
cdef bytes STAR = b"*"
cdef object _DEFAULT_LIMITS = Limits()


cdef object _method(const unsigned char* s, Py_ssize_t n):
    """The method as a shared bytes object, for the methods the fast path takes (llhttp knows
    many more; the reference judges those)."""
    if n == 3:
        if s[0] == b"G" and s[1] == b"E" and s[2] == b"T":
            return M_GET
        if s[0] == b"P" and s[1] == b"U" and s[2] == b"T":
            return M_PUT
    elif n == 4:
        if s[0] == b"P" and s[1] == b"O" and s[2] == b"S" and s[3] == b"T":
            return M_POST
        if s[0] == b"H" and s[1] == b"E" and s[2] == b"A" and s[3] == b"D":
            return M_HEAD
    elif n == 5:
        if memcmp(s, b"PATCH", 5) == 0:
            return M_PATCH
        if memcmp(s, b"TRACE", 5) == 0:
            return M_TRACE
    elif n == 6:
        if memcmp(s, b"DELETE", 6) == 0:
            return M_DELETE
    elif n == 7:
        if memcmp(s, b"OPTIONS", 7) == 0:
            return M_OPTIONS
    return None


cdef class RequestParser:
    """request.py::RequestParser, compiled (same events, same refusals)."""

    cdef object _limits
    cdef Py_ssize_t _max_request_line
    cdef Py_ssize_t _max_header_bytes
    cdef Py_ssize_t _max_headers
    cdef Py_ssize_t _max_chunk_ext_bytes
    cdef int _state
    cdef bytearray _buf  # unconsumed bytes when a feed ended mid-line
    cdef object _wait  # the delimiter they wait for, or None
    cdef Py_ssize_t _scan  # where to resume looking for it
    cdef unsigned long long _remaining
    cdef _Chunked _chunked
    cdef bytearray _rest
    cdef bint _ka  # keep-alive decision of the message whose body is being read
    cdef object _fallback  # request.py's parser, for heads the fast path leaves to it
    # the framing of the head just parsed, so that _run reads no attributes
    cdef bint _head_upgrade
    cdef bint _head_chunked
    cdef unsigned long long _head_length  # 0 when there is no Content-Length body

    def __init__(self, limits=_DEFAULT_LIMITS):
        self._limits = limits
        self._max_request_line = _limit(limits.max_request_line)
        self._max_header_bytes = _limit(limits.max_header_bytes)
        self._max_headers = _limit(limits.max_headers)
        self._max_chunk_ext_bytes = _limit(limits.max_chunk_ext_bytes)
        self._state = _HEAD
        self._buf = bytearray()
        self._wait = None
        self._scan = 0
        self._remaining = 0
        self._chunked = None
        self._rest = bytearray()
        self._ka = True
        self._fallback = None

    def feed(self, data):
        cdef int state = self._state
        cdef bytes buf
        cdef list events
        if state >= _UPGRADED:
            if state == _UPGRADED:
                self._rest += data
            return []
        if not data:
            return []
        if PyByteArray_GET_SIZE(self._buf):
            self._buf += data
            wait = self._wait
            if wait is not None and self._buf.find(wait, self._scan) < 0:
                self._scan = max(0, len(self._buf) - len(wait) + 1)
                try:
                    self._check_partial(self._buf, 0)
                except _Refusal as exc:
                    return [self._die(exc)]
                return []
            buf = bytes(self._buf)
            self._buf.clear()
        elif type(data) is bytes:
            buf = data
        else:
            buf = bytes(data)
        events = []
        try:
            self._run(buf, events)
        except _Refusal as exc:
            events.append(self._die(exc))
        return events

    def feed_eof(self):
        cdef int state = self._state
        if state >= _UPGRADED:
            return []
        if state == _HEAD and not self._buf.strip(b"\r\n"):
            self._state = _CLOSED
            return []
        return [self._die(_Refusal(400, "connection closed in the middle of a request"))]

    def take_upgrade_rest(self):
        """Raw bytes received after an upgrade request's head (tunnelled only after a 101)."""
        rest = bytes(self._rest)
        self._rest.clear()
        return rest

    # internals

    cdef object _die(self, exc):
        self._state = _DEAD
        self._buf = bytearray()
        return Reject(exc.status, exc.reason)

    cdef int _stash(self, bytes buf, Py_ssize_t pos, object wait) except -1:
        self._buf[:] = memoryview(buf)[pos:]
        self._wait = wait
        self._scan = 0 if wait is None else max(0, len(self._buf) - len(wait) + 1)
        return 0

    cdef int _check_partial(self, object buf, Py_ssize_t pos) except -1:
        if self._state == _HEAD:
            self._check_partial_head(buf, pos)
        elif self._chunked is not None:
            self._chunked.check_partial_line(len(buf) - pos)
        return 0

    cdef int _check_partial_head(self, object buf, Py_ssize_t pos) except -1:
        cdef Py_ssize_t lf = buf.find(b"\n", pos)
        if lf >= 0 and (lf == pos or buf[lf - 1] != 0x0D):
            raise _Refusal(400, "bare LF in request head")
        cdef Py_ssize_t eol = buf.find(_CRLF, pos)
        if eol < 0:
            if len(buf) - pos > self._max_request_line + 1:
                raise _Refusal(414, "request line too long")
            return 0
        if eol - pos > self._max_request_line:
            raise _Refusal(414, "request line too long")
        if len(buf) - eol - 2 > self._max_header_bytes:
            raise _Refusal(431, "request header section too large")
        if buf.count(_CRLF, eol + 2) > self._max_headers:
            raise _Refusal(431, "too many request header fields")
        return 0

    cdef int _run(self, bytes buf, list events) except -1:
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t end = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t stop, take
        cdef int state
        cdef _Chunked decoder
        while pos < end:
            state = self._state
            if state == _HEAD:
                while end - pos >= 2 and p[pos] == 0x0D and p[pos + 1] == 0x0A:
                    pos += 2  # RFC 9112 §2.2: ignore empty lines
                if pos >= end:
                    return 0
                stop = _find_crlfcrlf(p, pos, end)
                if stop < 0:
                    self._check_partial_head(buf, pos)
                    self._stash(buf, pos, _CRLFCRLF)
                    return 0
                stop += 4
                events.append(self._parse_head(buf, pos, stop))
                pos = stop
                if self._head_upgrade:
                    events.append(_EOM)
                    self._state = _UPGRADED
                    self._rest[:] = memoryview(buf)[pos:]
                    return 0
                if self._head_chunked:
                    self._chunked = _Chunked(self._max_chunk_ext_bytes, self._max_header_bytes)
                    self._state = _CHUNKED
                elif self._head_length:
                    self._remaining = self._head_length
                    self._state = _BODY
                else:
                    self._end_message(self._ka, events)
            elif state == _BODY:
                take = end - pos
                if <unsigned long long>take > self._remaining:
                    take = <Py_ssize_t>self._remaining
                events.append(_data(_slice(buf, pos, pos + take)))
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._end_message(self._ka, events)
            elif state == _CHUNKED:
                decoder = self._chunked
                pos = decoder.step(buf, pos, events)
                if decoder.state == _CHUNK_DONE:
                    self._chunked = None
                    self._end_message(self._ka, events)
                elif pos < end:
                    self._stash(
                        buf,
                        pos,
                        _CRLF if decoder.state == _SIZE or decoder.state == _TRAILER else None,
                    )
                    return 0
            else:  # _CLOSED: the proxy closes after this response; nothing more is parsed
                return 0
        return 0

    cdef int _end_message(self, bint keep_alive, list events) except -1:
        events.append(_EOM)
        self._state = _HEAD if keep_alive else _CLOSED
        return 0

    cdef object _parse_head(self, bytes buf, Py_ssize_t start, Py_ssize_t stop):
        """The head in buf[start:stop]; sets _ka and the _head_* framing fields."""
        head = self._fast_head(buf, start, stop)
        if head is not None:
            return head
        if self._fallback is None:
            self._fallback = _reference()[0].PyRequestParser(self._limits)
        try:
            head = self._fallback._parse_head(buf, start, stop)
        except _reference()[0].HeadError as exc:
            raise _Refusal(exc.status, exc.reason) from None
        self._ka = head.keep_alive
        self._head_upgrade = head.upgrade is not None
        self._head_chunked = head.chunked
        self._head_length = head.content_length or 0
        return head

    cdef object _fast_head(self, bytes buf, Py_ssize_t start, Py_ssize_t stop):
        """The head in buf[start:stop] (ending with CRLFCRLF), or None: left to the reference."""
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t pos = start, target, target_end, line_end
        cdef Fields f
        cdef bint v11
        cdef Py_ssize_t* slot = _REQUEST_HEAD
        while CLS[p[pos]] & C_TOKEN:
            pos += 1
        method = _method(p + start, pos - start)
        if method is None or p[pos] != 0x20:
            return None
        pos += 1
        target = pos
        if p[pos] == 0x2F:  # "/": origin-form
            pos += 1
            while CLS[p[pos]] & C_PATH:
                pos += 1
        elif p[pos] == 0x2A and method is M_OPTIONS:  # asterisk-form
            pos += 1
        else:
            return None  # absolute-form or an error
        target_end = pos
        if stop - pos < 12 or p[pos] != 0x20:
            return None
        if not (
            p[pos + 1] == b"H" and p[pos + 2] == b"T" and p[pos + 3] == b"T"
            and p[pos + 4] == b"P" and p[pos + 5] == b"/" and p[pos + 6] == b"1"
            and p[pos + 7] == b"." and (p[pos + 8] == b"0" or p[pos + 8] == b"1")
            and p[pos + 9] == 0x0D and p[pos + 10] == 0x0A
        ):
            return None
        v11 = p[pos + 8] == b"1"
        line_end = pos + 9
        headers = _read_fields(p, pos + 11, stop, True, &f)
        if headers is None:
            return None
        # rule 4: the limits, checked by the reference with their statuses
        if (
            line_end - start > self._max_request_line
            or stop - line_end - 2 > self._max_header_bytes
            or f.lines > self._max_headers
        ):
            return None
        # rule 2: framing; rule 3: one valid Host on HTTP/1.1
        if f.chunked and (f.has_length or not v11):
            return None
        if f.host_start < 0:
            if v11:
                return None
            authority = b""
        elif _simple_host(p + f.host_start, f.host_end - f.host_start):
            authority = _lower(p + f.host_start, f.host_end - f.host_start)
        else:
            return None
        self._ka = v11 and not f.close
        self._head_upgrade = False
        self._head_chunked = f.chunked
        self._head_length = 0 if f.chunked else f.content_length
        head = _alloc(_REQUEST_HEAD_TYPE, 0)
        _fill(head, slot[0], method)
        if target_end - target == 1 and p[target] == 0x2A:
            _fill(head, slot[1], STAR)
        else:
            path = PyBytes_FromStringAndSize(<const char*>p + target, target_end - target)
            _fill(head, slot[1], path)
        _fill(head, slot[2], authority)
        _fill(head, slot[3], V11 if v11 else V10)
        _fill(head, slot[4], headers)
        _fill(head, slot[5], self._ka)
        _fill(head, slot[6], None if f.chunked or not f.has_length else f.content_length)
        _fill(head, slot[7], f.chunked)
        _fill(head, slot[8], f.expect_continue)
        _fill(head, slot[9], None)
        _fill(head, slot[10], False)
        return head


# --- the response parser -----------------------------------------------------------------------

cdef enum:
    _R_HEAD = 0
    _R_BODY = 1
    _R_CHUNKED = 2
    _R_UNTIL_EOF = 3
    _R_DONE = 4
    _R_UPGRADED = 5
    _R_DEAD = 6

cdef bytes R_OK = b"OK"


cdef class ResponseParser:
    """response.py::ResponseParser, compiled (same events, same refusals)."""

    cdef object _limits
    cdef Py_ssize_t _max_response_header_bytes
    cdef Py_ssize_t _max_header_bytes
    cdef Py_ssize_t _max_chunk_ext_bytes
    cdef bytearray _buf
    cdef bytearray _rest
    cdef bint _head_request
    cdef int _state
    cdef unsigned long long _remaining
    cdef _Chunked _chunked
    cdef bint _keep_alive
    cdef bint _extra  # bytes arrived after the response ended
    cdef bint _seen  # any byte at all arrived
    cdef object _fallback  # response.py's parser, for heads the fast path leaves to it
    # the framing of the head just parsed, so that _run reads no attributes
    cdef bint _head_interim  # a 1xx
    cdef bint _head_upgrade
    cdef bint _head_has_body
    cdef bint _head_chunked
    cdef bint _head_has_length
    cdef unsigned long long _head_length

    def __init__(self, request_method, limits=_DEFAULT_LIMITS):
        self._limits = limits
        self._max_response_header_bytes = _limit(limits.max_response_header_bytes)
        self._max_header_bytes = _limit(limits.max_header_bytes)
        self._max_chunk_ext_bytes = _limit(limits.max_chunk_ext_bytes)
        self._buf = bytearray()
        self._rest = bytearray()
        self._fallback = None
        self.reset(request_method)

    def reset(self, request_method):
        """Ready for the response to the next request on the same connection."""
        self._head_request = request_method == b"HEAD"
        self._state = _R_HEAD
        self._remaining = 0
        self._chunked = None
        self._keep_alive = False
        self._extra = False
        self._seen = False
        if PyByteArray_GET_SIZE(self._buf):
            self._buf.clear()
        if PyByteArray_GET_SIZE(self._rest):
            self._rest.clear()

    @property
    def reusable(self):
        """The upstream connection may carry another request: the response ended cleanly,
        its framing allowed keep-alive, and nothing followed it."""
        return self._state == _R_DONE and self._keep_alive and not self._extra

    def feed(self, data):
        cdef int state = self._state
        cdef bytes buf
        cdef list events
        cdef Py_ssize_t scan
        if state >= _R_DONE:
            if state == _R_UPGRADED:
                self._rest += data
            elif state == _R_DONE and data:
                self._extra = True
            return []
        if not data:
            return []
        self._seen = True
        if PyByteArray_GET_SIZE(self._buf):
            pending = self._buf
            scan = max(0, PyByteArray_GET_SIZE(pending) - 3)
            pending += data
            if state == _R_HEAD and pending.find(_CRLFCRLF, scan) < 0:
                if len(pending) > self._max_response_header_bytes:
                    return [self._die("response head too large")]
                return []
            buf = bytes(self._buf)
            self._buf.clear()
        elif type(data) is bytes:
            buf = data
        else:
            buf = bytes(data)
        events = []
        try:
            self._run(buf, events)
        except _Refusal as exc:
            events.append(self._die(exc.reason))
        return events

    def feed_eof(self):
        cdef int state = self._state
        if state == _R_UNTIL_EOF:
            self._state = _R_DONE
            return [_EOM]
        if state >= _R_DONE:
            return []
        if not self._seen:
            return [self._die("upstream closed the connection before responding")]
        return [self._die("upstream closed the connection in the middle of a response")]

    def take_upgrade_rest(self):
        """Raw bytes the upstream sent after its 101 head (the start of the tunnel)."""
        rest = bytes(self._rest)
        self._rest.clear()
        return rest

    # internals

    cdef object _die(self, reason):
        self._state = _R_DEAD
        self._buf = bytearray()
        return Reject(502, reason)

    cdef int _finish(self, list events) except -1:
        events.append(_EOM)
        self._state = _R_DONE
        return 0

    cdef int _run(self, bytes buf, list events) except -1:
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t pos = 0
        cdef Py_ssize_t end = PyBytes_GET_SIZE(buf)
        cdef Py_ssize_t stop, take, lf
        cdef int state
        cdef _Chunked decoder
        while pos < end:
            state = self._state
            if state == _R_HEAD:
                stop = _find_crlfcrlf(p, pos, end)
                if stop < 0:
                    if end - pos > self._max_response_header_bytes:
                        raise _Refusal(502, "response head too large")
                    lf = buf.find(b"\n", pos)
                    if lf >= 0 and (lf == pos or p[lf - 1] != 0x0D):
                        raise _Refusal(502, "bare LF in response head")
                    self._buf[:] = memoryview(buf)[pos:]
                    return 0
                stop += 4
                if stop - pos > self._max_response_header_bytes:
                    raise _Refusal(502, "response head too large")
                events.append(self._parse_head(buf, pos, stop))
                pos = stop
                if self._head_interim:
                    events.append(_EOM)
                    if self._head_upgrade:
                        self._state = _R_UPGRADED
                        self._keep_alive = False
                        self._rest[:] = memoryview(buf)[pos:]
                        return 0
                elif not self._head_has_body:
                    self._finish(events)
                elif self._head_chunked:
                    self._chunked = _Chunked(self._max_chunk_ext_bytes, self._max_header_bytes)
                    self._state = _R_CHUNKED
                elif self._head_has_length:
                    self._remaining = self._head_length
                    self._state = _R_BODY
                    if not self._head_length:
                        self._finish(events)
                else:
                    self._state = _R_UNTIL_EOF
            elif state == _R_BODY:
                take = end - pos
                if <unsigned long long>take > self._remaining:
                    take = <Py_ssize_t>self._remaining
                events.append(_data(_slice(buf, pos, pos + take)))
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._finish(events)
            elif state == _R_CHUNKED:
                decoder = self._chunked
                pos = decoder.step(buf, pos, events)
                if decoder.state == _CHUNK_DONE:
                    self._chunked = None
                    self._finish(events)
                elif pos < end:
                    self._buf[:] = memoryview(buf)[pos:]
                    return 0
            elif state == _R_UNTIL_EOF:
                events.append(_data(_slice(buf, pos, end)))
                return 0
            else:  # _R_DONE: whatever follows a complete response poisons the connection
                self._extra = True
                return 0
        return 0

    cdef object _parse_head(self, bytes buf, Py_ssize_t start, Py_ssize_t stop):
        """The head in buf[start:stop]; sets _keep_alive and the _head_* framing fields."""
        head = self._fast_head(buf, start, stop)
        if head is not None:
            return head
        if self._fallback is None:
            self._fallback = _reference()[1].PyResponseParser(b"GET", self._limits)
        self._fallback.reset(b"HEAD" if self._head_request else b"GET")
        try:
            head = self._fallback._parse_head(_slice(buf, start, stop))
        except _reference()[0].HeadError as exc:
            raise _Refusal(exc.status, exc.reason) from None
        self._keep_alive = head.keep_alive
        self._head_interim = head.status < 200
        self._head_upgrade = head.upgrade is not None
        self._head_has_body = head.has_body
        self._head_chunked = head.chunked
        self._head_has_length = head.content_length is not None
        self._head_length = head.content_length or 0
        return head

    cdef object _fast_head(self, bytes buf, Py_ssize_t start, Py_ssize_t stop):
        """The final (2xx-5xx) response head in buf[start:stop], or None: left to the reference."""
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t pos = start + 12, reason
        cdef Fields f
        cdef int status
        cdef bint v11, keep_alive, has_body
        cdef Py_ssize_t* slot = _RESPONSE_HEAD
        if stop - start < 16:  # "HTTP/1.1 200\r\n\r\n": the reads below stay inside the head
            return None
        if not (
            p[start] == b"H" and p[start + 1] == b"T" and p[start + 2] == b"T"
            and p[start + 3] == b"P" and p[start + 4] == b"/" and p[start + 5] == b"1"
            and p[start + 6] == b"." and (p[start + 7] == b"0" or p[start + 7] == b"1")
            and p[start + 8] == 0x20
            and b"2" <= p[start + 9] <= b"9"
            and b"0" <= p[start + 10] <= b"9"
            and b"0" <= p[start + 11] <= b"9"
        ):
            return None
        v11 = p[start + 7] == b"1"
        status = (p[start + 9] - 0x30) * 100 + (p[start + 10] - 0x30) * 10 + p[start + 11] - 0x30
        if p[pos] == 0x20:
            pos += 1
            reason = pos
            while CLS[p[pos]] & C_VALUE:
                pos += 1
            if pos - reason == 2 and p[reason] == b"O" and p[reason + 1] == b"K":
                reason_phrase = R_OK
            else:
                reason_phrase = PyBytes_FromStringAndSize(<const char*>p + reason, pos - reason)
        else:
            reason_phrase = b""
        if p[pos] != 0x0D or p[pos + 1] != 0x0A:
            return None
        headers = _read_fields(p, pos + 2, stop, False, &f)
        if headers is None:
            return None
        if f.chunked and (f.has_length or not v11):
            return None
        keep_alive = v11
        if f.close:
            keep_alive = False
        elif f.keep_alive:
            keep_alive = True
        has_body = not (self._head_request or status == 204 or status == 304)
        if has_body and not f.chunked and not f.has_length:
            keep_alive = False  # close-delimited
        self._keep_alive = keep_alive
        self._head_interim = False
        self._head_upgrade = False
        self._head_has_body = has_body
        self._head_chunked = f.chunked
        self._head_has_length = f.has_length and not f.chunked
        self._head_length = f.content_length
        head = _alloc(_RESPONSE_HEAD_TYPE, 0)
        _fill(head, slot[0], status)
        _fill(head, slot[1], reason_phrase)
        _fill(head, slot[2], V11 if v11 else V10)
        _fill(head, slot[3], headers)
        _fill(head, slot[4], keep_alive)
        _fill(head, slot[5], f.content_length if self._head_has_length else None)
        _fill(head, slot[6], f.chunked)
        _fill(head, slot[7], has_body)
        _fill(head, slot[8], None)
        return head


# --- serializers -------------------------------------------------------------------------------

cdef bytes _FRAMING_CHUNKED = b"transfer-encoding: chunked\r\n\r\n"
cdef bytes _CONNECTION_CLOSE = b"connection: close\r\n"
cdef bytes _CONTENT_LENGTH = b"content-length: "


cdef bint _token(bytes s, unsigned char cls) noexcept:
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(s)
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(s)
    if n == 0:
        return False
    for i in range(n):
        if not CLS[p[i]] & cls:
            return False
    return True


cdef bint _field_value(bytes s) noexcept:
    """serialize.py's _VALUE: visible characters, inner SP/HTAB, nothing at either end."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(s)
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(s)
    if n == 0:
        return True
    if _is_ows(p[0]) or _is_ows(p[n - 1]):
        return False
    for i in range(n):
        if not CLS[p[i]] & C_VALUE:
            return False
    return True


cdef bint _reason_phrase(bytes s) noexcept:
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(s)
    cdef Py_ssize_t i
    for i in range(PyBytes_GET_SIZE(s)):
        if not CLS[p[i]] & C_VALUE:
            return False
    return True


cdef Py_ssize_t _fields_size(object headers, bint check) except -2:
    """Bytes that `name: value\\r\\n` lines of `headers` take; -1 when a field is not a pair of
    bytes (or, with `check`, not valid): the reference then writes or refuses it."""
    cdef Py_ssize_t i, size = 0
    cdef object item, name, value
    if type(headers) is not list:
        return -1
    for i in range(PyList_GET_SIZE(headers)):
        item = <object>PyList_GET_ITEM(headers, i)
        if type(item) is not tuple or PyTuple_GET_SIZE(item) != 2:
            return -1
        name = <object>PyTuple_GET_ITEM(item, 0)
        value = <object>PyTuple_GET_ITEM(item, 1)
        if type(name) is not bytes or type(value) is not bytes:
            return -1
        if check and not (_token(name, C_NAME) and _field_value(value)):
            return -1
        size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + 4
    return size


cdef inline char* _put(char* out, const char* s, Py_ssize_t n) noexcept:
    memcpy(out, s, n)
    return out + n


cdef inline char* _put_bytes(char* out, bytes s) noexcept:
    return _put(out, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))


cdef char* _put_fields(char* out, list headers) noexcept:
    cdef Py_ssize_t i
    cdef object item
    for i in range(PyList_GET_SIZE(headers)):
        item = <object>PyList_GET_ITEM(headers, i)
        out = _put_bytes(out, <bytes>PyTuple_GET_ITEM(item, 0))
        out = _put(out, b": ", 2)
        out = _put_bytes(out, <bytes>PyTuple_GET_ITEM(item, 1))
        out = _put(out, b"\r\n", 2)
    return out


cdef int _decimal(unsigned long long value, char* digits) noexcept:
    """`value` in decimal into digits[0:20], right-aligned; returns where it starts."""
    cdef int i = 20
    while True:
        i -= 1
        digits[i] = <char>(0x30 + value % 10)
        value //= 10
        if not value:
            return i


cdef Py_ssize_t _framing_size(object content_length, bint chunked, char* digits, int* first) except -2:
    """Bytes of the framing lines (and the final CRLF); -1 when the reference must decide."""
    cdef unsigned long long length
    if chunked:
        if content_length is not None:
            return -1
        return PyBytes_GET_SIZE(_FRAMING_CHUNKED)
    if content_length is None:
        return 2
    if type(content_length) is not int or content_length < 0 or content_length >= (1 << 63):
        return -1
    length = content_length
    first[0] = _decimal(length, digits)
    return PyBytes_GET_SIZE(_CONTENT_LENGTH) + (20 - first[0]) + 4


cdef char* _put_framing(char* out, object content_length, bint chunked, char* digits, int first) noexcept:
    if chunked:
        return _put_bytes(out, _FRAMING_CHUNKED)
    if content_length is not None:
        out = _put_bytes(out, _CONTENT_LENGTH)
        out = _put(out, digits + first, 20 - first)
        out = _put(out, b"\r\n", 2)
    return _put(out, b"\r\n", 2)


def request_head(
    method, path, authority, headers, *, content_length, chunked, parsed=False
):
    """serialize.py::request_head, compiled."""
    cdef Py_ssize_t fields, framing
    cdef char digits[20]
    cdef int first = 20
    cdef bytes out
    cdef char* o
    cdef bint is_chunked = chunked
    cdef const unsigned char* p
    if type(method) is bytes and type(path) is bytes and type(authority) is bytes:
        fields = _fields_size(headers, not parsed)
        if fields >= 0 and not parsed:
            p = <const unsigned char*>PyBytes_AS_STRING(path)
            if not (
                _token(method, C_TOKEN)
                and (
                    (PyBytes_GET_SIZE(path) >= 1 and p[0] == 0x2F and _path_chars(path))
                    or path == STAR
                )
                and _simple_host(
                    <const unsigned char*>PyBytes_AS_STRING(authority),
                    PyBytes_GET_SIZE(authority),
                )
            ):
                fields = -1
        framing = _framing_size(content_length, is_chunked, digits, &first) if fields >= 0 else -1
        if framing >= 0:
            out = PyBytes_FromStringAndSize(
                NULL,
                PyBytes_GET_SIZE(method) + PyBytes_GET_SIZE(path) + PyBytes_GET_SIZE(authority)
                + 20 + fields + framing,  # " ", " HTTP/1.1\r\nhost: ", "\r\n"
            )
            o = PyBytes_AS_STRING(out)
            o = _put_bytes(o, method)
            o = _put(o, b" ", 1)
            o = _put_bytes(o, path)
            o = _put(o, b" HTTP/1.1\r\nhost: ", 17)
            o = _put_bytes(o, authority)
            o = _put(o, b"\r\n", 2)
            o = _put_fields(o, headers)
            _put_framing(o, content_length, is_chunked, digits, first)
            return out
    return _reference()[2].py_request_head(
        method,
        path,
        authority,
        headers,
        content_length=content_length,
        chunked=chunked,
        parsed=parsed,
    )


cdef bint _path_chars(bytes s) noexcept:
    """serialize.py's _PATH after the "/": VCHAR only."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(s)
    cdef Py_ssize_t i
    for i in range(PyBytes_GET_SIZE(s)):
        if not 0x21 <= p[i] <= 0x7E:
            return False
    return True


def response_head(
    status,
    reason,
    headers,
    *,
    version=V11,
    content_length,
    chunked,
    close,
    parsed=False,
):
    """serialize.py::response_head, compiled."""
    cdef Py_ssize_t fields, framing
    cdef char digits[20]
    cdef int first = 20
    cdef bytes out
    cdef char* o
    cdef bint is_chunked = chunked
    cdef bint is_close = close
    cdef int code
    if (
        type(status) is int
        and 100 <= status <= 999
        and type(reason) is bytes
        and type(version) is bytes
        and (version == V11 or version == V10)
        and not (is_chunked and version == V10)
        and (parsed or _reason_phrase(reason))
    ):
        code = status
        fields = _fields_size(headers, not parsed)
        framing = _framing_size(content_length, is_chunked, digits, &first) if fields >= 0 else -1
        if framing >= 0:
            out = PyBytes_FromStringAndSize(
                NULL,
                15  # "HTTP/", the version, " 200 ", "\r\n"
                + PyBytes_GET_SIZE(reason)
                + fields
                + (PyBytes_GET_SIZE(_CONNECTION_CLOSE) if is_close else 0)
                + framing,
            )
            o = PyBytes_AS_STRING(out)
            o = _put(o, b"HTTP/", 5)
            o = _put_bytes(o, version)
            o[0] = b" "
            o[1] = <char>(0x30 + code // 100)
            o[2] = <char>(0x30 + code // 10 % 10)
            o[3] = <char>(0x30 + code % 10)
            o[4] = b" "
            o = _put_bytes(o + 5, reason)
            o = _put(o, b"\r\n", 2)
            o = _put_fields(o, headers)
            if is_close:
                o = _put_bytes(o, _CONNECTION_CLOSE)
            _put_framing(o, content_length, is_chunked, digits, first)
            return out
    return _reference()[2].py_response_head(
        status,
        reason,
        headers,
        version=version,
        content_length=content_length,
        chunked=chunked,
        close=close,
        parsed=parsed,
    )


cdef const char* _HEX_DIGITS = b"0123456789abcdef"


def chunk(data):
    """serialize.py::chunk, compiled: one chunk of a chunked body; empty data gives b""."""
    cdef Py_ssize_t n, size, digits = 0
    cdef bytes out
    cdef char* o
    cdef int i
    if type(data) is not bytes:
        return _reference()[2].py_chunk(data)
    n = PyBytes_GET_SIZE(data)
    if not n:
        return b""
    size = n
    while size:
        digits += 1
        size >>= 4
    out = PyBytes_FromStringAndSize(NULL, digits + n + 4)
    o = PyBytes_AS_STRING(out)
    size = n
    for i in range(digits - 1, -1, -1):
        o[i] = _HEX_DIGITS[size & 15]
        size >>= 4
    o[digits] = b"\r"
    o[digits + 1] = b"\n"
    memcpy(o + digits + 2, PyBytes_AS_STRING(data), n)
    o[digits + 2 + n] = b"\r"
    o[digits + 3 + n] = b"\n"
    return out
