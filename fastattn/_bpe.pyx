# cython: language_level=3
"""The compiled core of the byte-level BPE tokenizer: pre-token scanner,
merge loop and word cache.

A text's UTF-8 bytes are first cut into pre-tokens ("words") by a scanner
that implements the pre-tokenizer regex of tokenizer.py on a table of
character classes (letter, number, whitespace, other) that tokenizer.py fills
from the `regex` package.  One word then becomes ids in three steps:

  1. each byte becomes the id of its one-byte symbol            [n] ids
     (a byte the vocabulary has no symbol for is left out)
  2. the adjacent pair with the lowest merge rank is merged, the
     leftmost one when several pairs share that rank, until no
     adjacent pair has a rank                                   [n] -> [m] ids
  3. the surviving symbols are read left to right

Ranks live in an open-addressing hash table keyed by (left_id, right_id);
pairs waiting to merge sit in a binary min-heap ordered by (rank, pos).  The
loop runs on C arrays without the GIL.  Python sees one class, BytePairEncoder,
whose encode_utf8() scans and merges a whole text without the GIL, keeping a
bounded C hash table of word -> ids for words that repeat.
"""
from cpython.number cimport PyNumber_Index
from cpython.pythread cimport (NOWAIT_LOCK, WAIT_LOCK, PyThread_acquire_lock,
                               PyThread_allocate_lock, PyThread_free_lock,
                               PyThread_release_lock, PyThread_type_lock)
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset

import numpy as np

cdef extern from "Python.h":
    object PyBytes_FromStringAndSize(const char *s, Py_ssize_t n)
    char *PyBytes_AS_STRING(object b)


# ----------------------------------------------------------------------------
# merge table: (left_id, right_id) -> (rank, new_id)

cdef struct MergeSlot:
    uint64_t key        # left_id << 32 | right_id; EMPTY_KEY when free
    int32_t rank
    int32_t new_id

cdef uint64_t EMPTY_KEY = 0xFFFFFFFFFFFFFFFF


cdef inline uint64_t pair_key(int32_t left, int32_t right) noexcept nogil:
    return (<uint64_t><uint32_t>left << 32) | <uint64_t><uint32_t>right


cdef inline size_t slot_of(uint64_t key, int shift) noexcept nogil:
    """Fibonacci hashing: the top bits of key * 2^64/phi."""
    return <size_t>((key * 0x9E3779B97F4A7C15ULL) >> shift)


# ----------------------------------------------------------------------------
# min-heap of candidate merges, ordered by (rank, pos)

cdef struct Candidate:
    int32_t rank
    int32_t pos         # index of the left symbol in the word's byte array
    int32_t left        # ids of the pair when it was pushed: a popped entry
    int32_t right       # whose symbols have changed since is stale
    int32_t new_id


cdef inline bint before(const Candidate *a, const Candidate *b) noexcept nogil:
    return a.rank < b.rank or (a.rank == b.rank and a.pos < b.pos)


cdef inline void heap_push(Candidate *heap, Py_ssize_t *size, Candidate c) noexcept nogil:
    cdef Py_ssize_t i = size[0]
    cdef Py_ssize_t parent
    size[0] += 1

    # sift up
    while i > 0:
        parent = (i - 1) >> 1
        if not before(&c, &heap[parent]):
            break
        heap[i] = heap[parent]
        i = parent
    heap[i] = c


cdef inline Candidate heap_pop(Candidate *heap, Py_ssize_t *size) noexcept nogil:
    cdef Candidate top = heap[0]
    cdef Candidate last
    cdef Py_ssize_t n, i, child
    size[0] -= 1
    n = size[0]
    if n == 0:
        return top
    last = heap[n]

    # sift the last entry down from the root
    i = 0
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and before(&heap[child + 1], &heap[child]):
            child += 1
        if not before(&heap[child], &last):
            break
        heap[i] = heap[child]
        i = child
    heap[i] = last
    return top


# ----------------------------------------------------------------------------
# scratch space for one word of n bytes, grown as longer words arrive

cdef struct Scratch:
    Py_ssize_t capacity
    int32_t *ids        # [n] symbol id at each start position, -1 once absorbed
    int32_t *next       # [n] start of the next live symbol (n past the end)
    int32_t *prev       # [n] start of the previous live symbol (-1 before it)
    Candidate *heap     # [3 n] initial n-1 pairs + at most 2 per merge


cdef int scratch_reserve(Scratch *s, Py_ssize_t n) noexcept nogil:
    """Make room for a word of n bytes; 0 on success, -1 when out of memory."""
    cdef void *p
    if n <= s.capacity:
        return 0
    n = max(n, 2 * s.capacity, 64)
    p = realloc(s.ids, n * sizeof(int32_t))
    if p == NULL:
        return -1
    s.ids = <int32_t *>p
    p = realloc(s.next, n * sizeof(int32_t))
    if p == NULL:
        return -1
    s.next = <int32_t *>p
    p = realloc(s.prev, n * sizeof(int32_t))
    if p == NULL:
        return -1
    s.prev = <int32_t *>p
    p = realloc(s.heap, 3 * n * sizeof(Candidate))
    if p == NULL:
        return -1
    s.heap = <Candidate *>p
    s.capacity = n
    return 0


cdef void scratch_free(Scratch *s) noexcept nogil:
    free(s.ids)
    free(s.next)
    free(s.prev)
    free(s.heap)
    memset(s, 0, sizeof(Scratch))


# ----------------------------------------------------------------------------
# pre-tokenizer scanner

# Character classes; the table [0x110000] comes from set_char_classes().
cdef enum:
    CLASS_OTHER = 0     # [^\s\p{L}\p{N}]
    CLASS_LETTER = 1    # \p{L}
    CLASS_NUMBER = 2    # \p{N}
    CLASS_SPACE = 3     # \s

# Pre-tokenizer modes, as in tokenizer.PRE_TOKENIZER_PATTERNS.
cdef enum:
    PRE_GPT2 = 0        # GPT-2's regex
    PRE_SMOLLM = 1      # every number char alone, then GPT-2's regex between

cdef const uint8_t *char_class = NULL
cdef object char_class_owner = None     # keeps the table's memory alive


def set_char_classes(table):
    """Install the [0x110000] uint8 table of code point -> class
    (0 other, 1 letter, 2 number, 3 whitespace)."""
    global char_class, char_class_owner
    cdef const uint8_t[::1] view = np.ascontiguousarray(table, dtype=np.uint8)
    if view.shape[0] != 0x110000:
        raise ValueError(f"char class table has {view.shape[0]} entries, expected 0x110000")
    char_class_owner = view
    char_class = &view[0]


cdef inline bint is_continuation(uint8_t b) noexcept nogil:
    return (b & 0xC0) == 0x80


cdef inline uint32_t code_point_at(const uint8_t *p, Py_ssize_t i, Py_ssize_t n,
                                   Py_ssize_t *size) noexcept nogil:
    """The code point whose UTF-8 form starts at p[i], and its size in bytes.
    A malformed or truncated sequence counts as one byte, U+FFFD (text from
    str.encode() has none)."""
    cdef uint8_t b0 = p[i]
    size[0] = 1
    if b0 < 0x80:
        return b0
    if b0 >= 0xC2 and b0 < 0xE0 and i + 1 < n and is_continuation(p[i + 1]):
        size[0] = 2
        return ((b0 & 0x1F) << 6) | (p[i + 1] & 0x3F)
    if (b0 >= 0xE0 and b0 < 0xF0 and i + 2 < n and is_continuation(p[i + 1])
            and is_continuation(p[i + 2])):
        size[0] = 3
        return ((b0 & 0x0F) << 12) | ((p[i + 1] & 0x3F) << 6) | (p[i + 2] & 0x3F)
    if (b0 >= 0xF0 and b0 < 0xF5 and i + 3 < n and is_continuation(p[i + 1])
            and is_continuation(p[i + 2]) and is_continuation(p[i + 3])):
        size[0] = 4
        return (((b0 & 0x07) << 18) | ((p[i + 1] & 0x3F) << 12)
                | ((p[i + 2] & 0x3F) << 6) | (p[i + 3] & 0x3F))
    return 0xFFFD


cdef inline int class_at(const uint8_t *p, Py_ssize_t i, Py_ssize_t n,
                         Py_ssize_t *size) noexcept nogil:
    cdef uint32_t c = code_point_at(p, i, n, size)
    if c >= 0x110000:
        return CLASS_OTHER
    return char_class[c]


cdef inline Py_ssize_t run_end(const uint8_t *p, Py_ssize_t i, Py_ssize_t n,
                               int cls) noexcept nogil:
    """End of the run of class cls that starts at i."""
    cdef Py_ssize_t size
    while i < n and class_at(p, i, n, &size) == cls:
        i += size
    return i


cdef Py_ssize_t piece_end(const uint8_t *p, Py_ssize_t i, Py_ssize_t n,
                          int mode) noexcept nogil:
    """End of the pre-token that starts at p[i], for the text p[0:n].

    The alternatives are tried in the regex's order:
      's|'t|'re|'ve|'m|'ll|'d
      ' ?\p{L}+'   ' ?\p{N}+' (gpt2) or '\p{N}' (smollm)   ' ?[^\s\p{L}\p{N}]+'
      '\s+(?!\S)' (smollm: a number also ends the run)   '\s+'"""
    cdef Py_ssize_t size, size2, last, end
    cdef int cls, cls2
    cdef uint8_t b
    cdef uint8_t b2

    # contractions, lower case only
    if p[i] == 39 and i + 1 < n:                             # '
        b = p[i + 1]
        if b == 115 or b == 116 or b == 109 or b == 100:    # s t m d
            return i + 2
        if i + 2 < n:
            b2 = p[i + 2]
            if ((b == 114 and b2 == 101) or (b == 118 and b2 == 101)   # re ve
                    or (b == 108 and b2 == 108)):                      # ll
                return i + 3

    # one space, then a run of letters, numbers (gpt2) or others
    cls = class_at(p, i, n, &size)
    if p[i] == 32 and i + 1 < n:
        cls2 = class_at(p, i + 1, n, &size2)
        if cls2 == CLASS_LETTER or cls2 == CLASS_OTHER or (
                cls2 == CLASS_NUMBER and mode == PRE_GPT2):
            return run_end(p, i + 1, n, cls2)

    # a run of letters, numbers or others without the space
    if cls == CLASS_LETTER or cls == CLASS_OTHER:
        return run_end(p, i, n, cls)
    if cls == CLASS_NUMBER:
        return run_end(p, i, n, cls) if mode == PRE_GPT2 else i + size

    # whitespace: all of it when nothing or (smollm) a number follows, else
    # all but its last char, which then starts the next pre-token
    end = run_end(p, i, n, CLASS_SPACE)
    if end == n:
        return end
    if mode == PRE_SMOLLM and class_at(p, end, n, &size2) == CLASS_NUMBER:
        return end
    last = end - 1
    while last > i and is_continuation(p[last]):             # back to a lead byte
        last -= 1
    return last if last > i else end


def split_utf8(bytes data, int mode):
    """UTF-8 text -> its pre-tokens (bytes), for tests and inspection."""
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t n = len(data), i = 0, j
    cdef list out = []
    if char_class == NULL:
        raise RuntimeError("set_char_classes() has not been called")
    if mode != PRE_GPT2 and mode != PRE_SMOLLM:
        raise ValueError(f"pre-tokenizer mode {mode}")
    while i < n:
        j = piece_end(p, i, n, mode)
        out.append(PyBytes_FromStringAndSize(<const char *>p + i, j - i))
        i = j
    return out


# ----------------------------------------------------------------------------
# word tables: UTF-8 word -> ids.  The word cache is one (bounded: it forgets
# everything when full), the whole-word vocabulary of ignore_merges another.

cdef struct WordSlot:
    uint64_t hash       # 0 when free
    int32_t key_off     # the word's bytes: keys[key_off : key_off + key_len]
    int32_t key_len
    int32_t ids_off     # its ids: ids[ids_off : ids_off + n_ids]
    int32_t n_ids

cdef struct WordTable:
    WordSlot *slots     # [mask + 1], at least twice max_words
    size_t mask
    Py_ssize_t n_words
    Py_ssize_t max_words
    uint8_t *keys       # [keys_cap] bytes of the words, one after another
    Py_ssize_t keys_used
    Py_ssize_t keys_cap
    int32_t *ids        # [ids_cap] ids of the words, one after another
    Py_ssize_t ids_used
    Py_ssize_t ids_cap


cdef int word_table_init(WordTable *t, Py_ssize_t max_words, Py_ssize_t keys_cap,
                         Py_ssize_t ids_cap) noexcept nogil:
    """0 on success, -1 when out of memory (t is then all NULL, safe to free)."""
    cdef size_t n_slot = 16
    memset(t, 0, sizeof(WordTable))
    while n_slot < <size_t>(2 * max_words):
        n_slot *= 2
    t.slots = <WordSlot *>calloc(n_slot, sizeof(WordSlot))
    t.keys = <uint8_t *>malloc(max(keys_cap, 1))
    t.ids = <int32_t *>malloc(max(ids_cap, 1) * sizeof(int32_t))
    if t.slots == NULL or t.keys == NULL or t.ids == NULL:
        word_table_free(t)
        return -1
    t.mask = n_slot - 1
    t.max_words = max_words
    t.keys_cap = keys_cap
    t.ids_cap = ids_cap
    return 0


cdef void word_table_clear(WordTable *t) noexcept nogil:
    memset(t.slots, 0, (t.mask + 1) * sizeof(WordSlot))
    t.n_words = 0
    t.keys_used = 0
    t.ids_used = 0


cdef void word_table_free(WordTable *t) noexcept nogil:
    free(t.slots)
    free(t.keys)
    free(t.ids)
    memset(t, 0, sizeof(WordTable))


cdef inline uint64_t word_hash(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    """FNV-1a over the bytes, never 0 (0 marks a free slot)."""
    cdef uint64_t h = 0xCBF29CE484222325ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ p[i]) * 0x100000001B3ULL
    return h | 1


cdef inline const WordSlot *word_table_find(const WordTable *t, const uint8_t *p,
                                            Py_ssize_t n, uint64_t h) noexcept nogil:
    cdef size_t k = <size_t>(h >> 7) & t.mask
    cdef const WordSlot *slot
    while True:
        slot = &t.slots[k]
        if slot.hash == 0:
            return NULL
        if (slot.hash == h and slot.key_len == n
                and memcmp(t.keys + slot.key_off, p, n) == 0):
            return slot
        k = (k + 1) & t.mask


cdef bint word_table_add(WordTable *t, const uint8_t *p, Py_ssize_t n, uint64_t h,
                         const int32_t *ids, Py_ssize_t n_ids) noexcept nogil:
    """Store word p[0:n] -> ids[0:n_ids]; False (nothing stored) when full."""
    cdef size_t k = <size_t>(h >> 7) & t.mask
    if (t.n_words >= t.max_words or t.keys_used + n > t.keys_cap
            or t.ids_used + n_ids > t.ids_cap):
        return False
    while t.slots[k].hash != 0:
        k = (k + 1) & t.mask
    memcpy(t.keys + t.keys_used, p, n)
    memcpy(t.ids + t.ids_used, ids, n_ids * sizeof(int32_t))
    t.slots[k] = WordSlot(h, <int32_t>t.keys_used, <int32_t>n, <int32_t>t.ids_used,
                          <int32_t>n_ids)
    t.keys_used += n
    t.ids_used += n_ids
    t.n_words += 1
    return True


# Words longer than this are merged every time rather than cached.
cdef enum:
    CACHE_MAX_WORD_BYTES = 128


cdef class BytePairEncoder:
    """Merge loop over one vocabulary.

    byte_ids    [256] int32   id of the one-byte symbol of each byte, -1 if none
    merges      [n_merge, 3] int32   (left_id, right_id, new_id); rank = row
    whole_words dict bytes -> id, or None: with it, a word that is itself a
                token skips the merges (the `ignore_merges` option of HF BPE)
    cache_size  words kept in the word -> ids cache
    """
    cdef MergeSlot *table
    cdef int shift              # 64 - log2(merge table size)
    cdef size_t mask
    cdef int32_t byte_ids[256]
    cdef readonly Py_ssize_t n_merge
    cdef readonly Py_ssize_t cache_size
    cdef WordTable cache        # guarded by cache_lock
    cdef PyThread_type_lock cache_lock
    cdef WordTable whole        # read-only after __init__
    cdef bint has_whole

    def __cinit__(self):
        self.table = NULL
        memset(&self.cache, 0, sizeof(WordTable))
        memset(&self.whole, 0, sizeof(WordTable))
        self.cache_lock = PyThread_allocate_lock()
        if self.cache_lock == NULL:
            raise MemoryError("word cache lock")

    def __init__(self, byte_ids, merges, whole_words=None, Py_ssize_t cache_size=1 << 16):
        cdef int32_t[::1] byte_view = np.ascontiguousarray(byte_ids, dtype=np.int32)
        cdef int32_t[:, ::1] merge_view = np.ascontiguousarray(
            np.asarray(merges, dtype=np.int32).reshape(-1, 3))
        cdef Py_ssize_t i, n_slot, n_keys
        cdef size_t h
        cdef uint64_t key
        cdef int bits
        cdef int32_t id
        cdef bytes word

        # check shapes and values before any pointer is touched
        if self.table != NULL:
            raise RuntimeError("BytePairEncoder is initialised once")
        if byte_view.shape[0] != 256:
            raise ValueError(f"byte_ids has {byte_view.shape[0]} entries, expected 256")
        if merge_view.shape[0] >= (1 << 30):
            raise ValueError(f"{merge_view.shape[0]} merges is more than this table holds")
        if cache_size < 1 or cache_size >= (1 << 24):
            raise ValueError(f"cache_size {cache_size} is outside [1, 2**24)")
        for i in range(merge_view.shape[0]):
            if merge_view[i, 0] < 0 or merge_view[i, 1] < 0 or merge_view[i, 2] < 0:
                raise ValueError(f"merge {i} has a negative id")
        for i in range(256):
            self.byte_ids[i] = byte_view[i]
        self.n_merge = merge_view.shape[0]
        self.cache_size = cache_size

        # merge table of at least twice as many slots as merges, a power of two
        bits = 4
        while (<Py_ssize_t>1 << bits) < 2 * self.n_merge:
            bits += 1
        n_slot = <Py_ssize_t>1 << bits
        self.shift = 64 - bits
        self.mask = n_slot - 1
        self.table = <MergeSlot *>malloc(n_slot * sizeof(MergeSlot))
        if self.table == NULL:
            raise MemoryError(f"merge table of {n_slot} slots")
        for i in range(n_slot):
            self.table[i].key = EMPTY_KEY

        # every merge; the caller has rejected duplicate pairs (a repeat would
        # keep the first rank)
        for i in range(self.n_merge):
            key = pair_key(merge_view[i, 0], merge_view[i, 1])
            h = slot_of(key, self.shift)
            while self.table[h].key != EMPTY_KEY and self.table[h].key != key:
                h = (h + 1) & self.mask
            if self.table[h].key == key:
                continue
            self.table[h].key = key
            self.table[h].rank = <int32_t>i
            self.table[h].new_id = merge_view[i, 2]

        # the word cache: words of 24 bytes and 8 ids on average fit
        if word_table_init(&self.cache, cache_size, 24 * cache_size, 8 * cache_size) != 0:
            raise MemoryError(f"word cache of {cache_size} words")

        # whole words that are tokens (ignore_merges)
        self.has_whole = whole_words is not None
        if self.has_whole:
            n_keys = sum(len(w) for w in whole_words)
            if n_keys >= (1 << 31) or len(whole_words) >= (1 << 30):
                raise ValueError(f"whole-word table of {n_keys} bytes is too large")
            if word_table_init(&self.whole, len(whole_words), n_keys,
                               len(whole_words)) != 0:
                raise MemoryError(f"whole-word table of {len(whole_words)} words")
            for word, value in whole_words.items():
                id = value
                if not word_table_add(&self.whole, word, len(word),
                                      word_hash(word, len(word)), &id, 1):
                    raise RuntimeError("whole-word table sized too small")

    def __dealloc__(self):
        free(self.table)
        word_table_free(&self.cache)
        word_table_free(&self.whole)
        if self.cache_lock != NULL:
            PyThread_free_lock(self.cache_lock)

    cdef inline const MergeSlot *lookup(self, int32_t left, int32_t right) noexcept nogil:
        cdef uint64_t key = pair_key(left, right)
        cdef size_t h = slot_of(key, self.shift)
        while self.table[h].key != EMPTY_KEY:
            if self.table[h].key == key:
                return &self.table[h]
            h = (h + 1) & self.mask
        return NULL

    cdef Py_ssize_t merge_word(self, const uint8_t *text, Py_ssize_t n,
                               Scratch *s) noexcept nogil:
        """text [n] bytes -> s.ids, s.next: the merged symbols; returns their count.

        A byte with no one-byte symbol is left out, and its neighbours become
        adjacent (what Hugging Face BPE does without an unk token, and
        llama.cpp too).  s must hold n entries."""
        cdef int32_t *ids = s.ids
        cdef int32_t *next = s.next
        cdef int32_t *prev = s.prev
        cdef Candidate *heap = s.heap
        cdef Py_ssize_t heap_size = 0
        cdef Py_ssize_t i, n_symbol = 0, n_live
        cdef int32_t q, r, id
        cdef const MergeSlot *m
        cdef Candidate c

        # one symbol per byte that has one
        for i in range(n):
            id = self.byte_ids[text[i]]
            if id >= 0:
                ids[n_symbol] = id
                next[n_symbol] = <int32_t>(n_symbol + 1)
                prev[n_symbol] = <int32_t>(n_symbol - 1)
                n_symbol += 1
        n = n_symbol
        n_live = n_symbol

        # every adjacent pair that has a rank is a candidate
        for i in range(n - 1):
            m = self.lookup(ids[i], ids[i + 1])
            if m != NULL:
                heap_push(heap, &heap_size,
                          Candidate(m.rank, <int32_t>i, ids[i], ids[i + 1], m.new_id))

        # merge the best candidate until none is left
        while heap_size > 0:
            c = heap_pop(heap, &heap_size)
            q = next[c.pos]
            if ids[c.pos] != c.left or q >= n or ids[q] != c.right:
                continue                              # stale: a symbol changed

            # symbol at c.pos absorbs the one at q
            ids[c.pos] = c.new_id
            ids[q] = -1
            r = next[q]
            next[c.pos] = r
            if r < n:
                prev[r] = c.pos
            n_live -= 1

            # the new symbol forms new pairs with its neighbours
            if prev[c.pos] >= 0:
                m = self.lookup(ids[prev[c.pos]], c.new_id)
                if m != NULL:
                    heap_push(heap, &heap_size, Candidate(
                        m.rank, prev[c.pos], ids[prev[c.pos]], c.new_id, m.new_id))
            if r < n:
                m = self.lookup(c.new_id, ids[r])
                if m != NULL:
                    heap_push(heap, &heap_size,
                              Candidate(m.rank, c.pos, c.new_id, ids[r], m.new_id))
        return n_live

    cdef Py_ssize_t word_to_ids(self, const uint8_t *p, Py_ssize_t n, int32_t *out,
                                Scratch *s, bint use_cache) noexcept nogil:
        """One word p[0:n] -> out[0:k], through the whole-word table, the cache
        or the merge loop; returns k, or -1 when out of memory.  out must hold
        n ids (a word never has more ids than bytes)."""
        cdef uint64_t h = word_hash(p, n)
        cdef const WordSlot *slot
        cdef Py_ssize_t k, n_live
        cdef int32_t pos

        # a word that is a token, or one seen before
        if self.has_whole:
            slot = word_table_find(&self.whole, p, n, h)
            if slot != NULL:
                out[0] = self.whole.ids[slot.ids_off]
                return 1
        if use_cache:
            slot = word_table_find(&self.cache, p, n, h)
            if slot != NULL:
                memcpy(out, self.cache.ids + slot.ids_off, slot.n_ids * sizeof(int32_t))
                return slot.n_ids

        # merge, read the live symbols left to right (positions are int32)
        if n >= (1 << 30) or scratch_reserve(s, n) != 0:
            return -1
        n_live = self.merge_word(p, n, s)
        pos = 0
        for k in range(n_live):
            out[k] = s.ids[pos]
            pos = s.next[pos]

        # remember it; a full cache forgets everything and starts again
        if use_cache and n <= CACHE_MAX_WORD_BYTES:
            if not word_table_add(&self.cache, p, n, h, out, n_live):
                word_table_clear(&self.cache)
                word_table_add(&self.cache, p, n, h, out, n_live)
        return n_live

    cdef Py_ssize_t encode_core(self, const uint8_t *p, Py_ssize_t n, int mode,
                                int32_t *out, Scratch *s, bint use_cache) noexcept nogil:
        """UTF-8 text p[0:n] -> out[0:k]; returns k, or -1 when out of memory.
        out must hold n ids."""
        cdef Py_ssize_t i = 0, j, k = 0, got
        cdef int32_t id
        while i < n:
            j = piece_end(p, i, n, mode)
            if j == i + 1:
                # a one-byte word is its byte's symbol, or nothing
                id = self.byte_ids[p[i]]
                if id >= 0:
                    out[k] = id
                    k += 1
            else:
                got = self.word_to_ids(p + i, j - i, out + k, s, use_cache)
                if got < 0:
                    return -1
                k += got
            i = j
        return k

    def encode_utf8(self, bytes data, int mode):
        """UTF-8 text -> list of ids: pre-tokens by the scanner (mode 0 gpt2,
        1 smollm), each through the word cache or the merge loop, all without
        the GIL.  A thread that finds the cache busy merges without it."""
        cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = len(data), k, x
        cdef int32_t *out
        cdef Scratch s
        cdef bint locked
        if char_class == NULL:
            raise RuntimeError("set_char_classes() has not been called")
        if mode != PRE_GPT2 and mode != PRE_SMOLLM:
            raise ValueError(f"pre-tokenizer mode {mode}")
        out = <int32_t *>malloc((n + 1) * sizeof(int32_t))
        if out == NULL:
            raise MemoryError(f"ids for {n} bytes of text")
        memset(&s, 0, sizeof(Scratch))
        with nogil:
            locked = PyThread_acquire_lock(self.cache_lock, NOWAIT_LOCK)
            k = self.encode_core(p, n, mode, out, &s, locked)
            if locked:
                PyThread_release_lock(self.cache_lock)
            scratch_free(&s)
        try:
            if k < 0:
                raise MemoryError(f"scratch space while encoding {n} bytes")
            return [out[x] for x in range(k)]
        finally:
            free(out)

    def encode_word(self, bytes word):
        """UTF-8 bytes of one pre-token -> list of ids, without the cache."""
        cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(word)
        cdef Py_ssize_t n = len(word), k, x
        cdef int32_t *out = <int32_t *>malloc((n + 1) * sizeof(int32_t))
        cdef Scratch s
        if out == NULL:
            raise MemoryError(f"ids for a word of {n} bytes")
        memset(&s, 0, sizeof(Scratch))
        with nogil:
            k = self.word_to_ids(p, n, out, &s, False)
            scratch_free(&s)
        try:
            if k < 0:
                raise MemoryError(f"scratch space for a word of {n} bytes")
            return [out[x] for x in range(k)]
        finally:
            free(out)

    def clear_cache(self):
        with nogil:
            PyThread_acquire_lock(self.cache_lock, WAIT_LOCK)
            word_table_clear(&self.cache)
            PyThread_release_lock(self.cache_lock)

    @property
    def n_cached(self):
        """Words in the word cache now."""
        return self.cache.n_words


def join_token_bytes(list table, ids):
    """ids -> the concatenated bytes of table[id]; IndexError naming the first
    id that is not an integer in [0, len(table))."""
    cdef Py_ssize_t n_vocab = len(table)
    cdef Py_ssize_t k = 0
    cdef list parts = []
    cdef object i
    cdef int64_t v

    for i in ids:
        if isinstance(i, bool):
            raise IndexError(f"token id {i!r} at position {k} is not an integer")
        try:
            # __index__, not __int__: numpy floats (2.5, NaN) are not ids
            v = PyNumber_Index(i)
        except (TypeError, OverflowError):
            raise IndexError(f"token id {i!r} at position {k} is not an integer "
                             f"in [0, {n_vocab})") from None
        if v < 0 or v >= n_vocab:
            raise IndexError(f"token id {i!r} at position {k} is outside the "
                             f"vocabulary [0, {n_vocab})")
        parts.append(table[v])
        k += 1
    return b"".join(parts)
