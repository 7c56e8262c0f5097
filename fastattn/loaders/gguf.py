"""Read a llama.cpp GGUF file into a LoadedModel.

A GGUF file (versions 2 and 3, little-endian) is laid out as

    "GGUF"  u32 version  u64 tensor_count  u64 kv_count
    kv_count x      string key, u32 value type, value
    tensor_count x  string name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset
    padding to general.alignment (default 32)
    tensor data     each tensor at data_start + offset

where a string is a u64 length and that many UTF-8 bytes, and an array value
is a u32 element type, a u64 length and the elements.  ne[0] is the length of
a row (n_in), so a matrix with ne = [n_in, n_out] is our [n_out, n_in].

Loading goes in four steps:

  1. _scan_layout   walks the file's structure itself and checks every count,
                    length, type id and tensor extent against the file size,
                    before anything is allocated from a declared length.
  2. GGUFReader     the `gguf` package then decodes the metadata values.  It
                    trusts the file: on its own, a declared array length it
                    cannot read makes it loop without end (reads past the end
                    return empty arrays and it keeps going), a string length
                    past the end is silently cut short, np.prod of the dims
                    wraps around, and an unknown tensor type is a bare
                    ValueError.  Step 1 rules all of these out first; any
                    exception it still raises becomes a ModelFileError.
  3. _read_config, _read_tokenizer   map the metadata, checking each type.
  4. _read_weights  checks each tensor's shape against the config and makes a
                    read-only view of its bytes in the mapped file.
"""
import errno
import inspect
import logging
import math
import mmap
import os
import stat
import struct
import time
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..errors import FastAttnError, ModelFileError, OutOfMemoryError, UnsupportedError
from ..weights import TYPES, WeightTensor, row_bytes, type_name
from . import LoadedModel

logger = logging.getLogger(__name__)

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                # GGML_MAX_DIMS
INT64_MAX = (1 << 63) - 1

# GGUF value type ids -> (name, size in bytes of one value); STRING and ARRAY
# have no fixed size.
STRING, ARRAY = 8, 9
VALUE_TYPES = {
    0: ("uint8", 1), 1: ("int8", 1), 2: ("uint16", 2), 3: ("int16", 2),
    4: ("uint32", 4), 5: ("int32", 4), 6: ("float32", 4), 7: ("bool", 1),
    8: ("string", None), 9: ("array", None),
    10: ("uint64", 8), 11: ("int64", 8), 12: ("float64", 8),
}
INT_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}
FLOAT_TYPES = {6, 12}
BOOL_TYPE = 7

# GGUFReader reads array items one by one, keeping a couple of numpy objects
# (~250 bytes) per item and spending 4-15 us on each, so the items of all
# arrays together are capped.  The largest vocabularies in use (262k tokens
# with scores and types, or 150k tokens plus merges) need under 800k.
# Shortcoming: a file just under the cap still costs GGUFReader ~250 MB and
# several seconds, and on SmolLM2 (147k items) its item loop is most of the
# load time (~0.6 s of ~0.7 s); our own layout scan walks the same items in
# ~40 ms.  Decoding the values in the scan instead would remove both.
MAX_ARRAY_ITEMS = 1 << 20

# Metadata values kept in LoadedModel.metadata: scalars, strings up to this
# many characters, arrays up to this many items.
METADATA_MAX_STRING = 1 << 16
METADATA_MAX_ITEMS = 256

# ggml type ids we know of but cannot run (for messages).
try:
    from gguf import GGMLQuantizationType as _GGMLType
    GGML_TYPE_NAMES = {t.value: t.name for t in _GGMLType}
except ImportError:  # pragma: no cover - gguf is a dependency
    GGML_TYPE_NAMES = {}


# ------------------------------------------------------------ step 1: layout


@dataclass
class TensorInfo:
    """One tensor info record, as the file declares it."""
    name: str
    ne: tuple       # ggml order: ne[0] is the row length
    qtype: int
    offset: int     # from the start of the data section
    nbytes: int


@dataclass
class Layout:
    version: int
    file_size: int
    keys: dict      # key -> (value type id, file offset of the value)
    tensors: list   # [TensorInfo] in file order
    info_end: int   # first byte after the tensor infos
    alignment: int
    data_start: int


class _Cursor:
    """Reads little-endian fields from the mapped file, never past its end."""

    def __init__(self, buf, path):
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def take(self, n, what):
        """Advance over n bytes; return where they start."""
        left = self.size - self.pos
        if n > left:
            raise ModelFileError(
                f"{self.path}: truncated file: {what} at offset {self.pos} needs "
                f"{n} bytes, only {left} left (file size {self.size})")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what):
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what):
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string_length(self, what):
        at = self.pos
        n = self.u64(f"length of {what}")
        left = self.size - self.pos
        if n > left:
            raise ModelFileError(
                f"{self.path}: {what}: string length {n} at offset {at} runs past the "
                f"end of the file ({left} bytes left)")
        return n

    def text(self, what):
        n = self.string_length(what)
        raw = self.buf[self.take(n, what):self.pos]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(f"{self.path}: {what} at offset {self.pos - n} is not "
                                 f"valid UTF-8: {raw[:40]!r}") from None

    def skip_strings(self, count, what):
        """Skip `count` consecutive strings (the hot loop for vocabularies)."""
        buf, size, pos = self.buf, self.size, self.pos
        unpack = struct.Struct("<Q").unpack_from
        for i in range(count):
            if size - pos < 8:
                self.pos = pos
                self.take(8, f"length of {what}[{i}]")
            n = unpack(buf, pos)[0]
            if n > size - pos - 8:
                raise ModelFileError(
                    f"{self.path}: {what}[{i}]: string length {n} at offset {pos} runs "
                    f"past the end of the file ({size - pos - 8} bytes left)")
            pos += 8 + n
        self.pos = pos


def _check_header(cur):
    """magic, version, counts -> (version, n_tensors, n_kv)."""
    path = cur.path
    magic = cur.buf[cur.take(4, "magic"):cur.pos]
    if magic != MAGIC:
        raise ModelFileError(f"{path}: not a GGUF file (starts with {magic!r}, "
                             f"expected {MAGIC!r})")
    version = cur.u32("version")
    if version not in (2, 3):
        swapped = struct.unpack("<I", struct.pack(">I", version))[0]
        if swapped in (1, 2, 3):
            raise UnsupportedError(f"{path}: big-endian GGUF (version {swapped}) is not "
                                   f"supported; convert the model little-endian")
        if version == 1:
            raise UnsupportedError(f"{path}: GGUF version 1 is not supported (fastattn "
                                   f"reads versions 2 and 3); re-convert the model")
        raise UnsupportedError(f"{path}: unsupported GGUF version {version} "
                               f"(fastattn reads versions 2 and 3)")
    n_tensors = cur.u64("tensor_count")
    n_kv = cur.u64("kv_count")

    # a tensor info takes at least 8 + 4 + 8 + 4 + 8 bytes, a kv at least 8 + 4 + 1
    room = cur.size - cur.pos
    if n_tensors > room // 24 or n_kv > room // 12 or n_tensors * 24 + n_kv * 12 > room:
        raise ModelFileError(
            f"{path}: header declares tensor_count = {n_tensors} and kv_count = {n_kv}, "
            f"more than the {cur.size}-byte file can hold")
    return version, n_tensors, n_kv


def _skip_value(cur, key, vtype, budget):
    """Advance over one metadata value; return the array items it used up."""
    path = cur.path
    if vtype not in VALUE_TYPES:
        raise ModelFileError(f"{path}: metadata {key!r}: unknown value type id {vtype}")
    size = VALUE_TYPES[vtype][1]
    if size is not None:
        cur.take(size, f"value of {key!r}")
        return 0
    if vtype == STRING:
        cur.take(cur.string_length(f"value of {key!r}"), f"value of {key!r}")
        return 0

    # an array: element type, length, elements
    itype = cur.u32(f"element type of array {key!r}")
    at = cur.pos
    count = cur.u64(f"length of array {key!r}")
    if itype == ARRAY:
        raise UnsupportedError(f"{path}: metadata {key!r}: nested arrays are not supported")
    if itype not in VALUE_TYPES:
        raise ModelFileError(f"{path}: metadata {key!r}: unknown array element type "
                             f"id {itype}")
    item_size = VALUE_TYPES[itype][1] or 8     # a string takes at least its length
    left = cur.size - cur.pos
    if count > left // item_size:
        raise ModelFileError(f"{path}: metadata {key!r}: array length {count} at offset "
                             f"{at} cannot fit in the rest of the file ({left} bytes)")
    if count > budget:
        raise ModelFileError(
            f"{path}: metadata {key!r}: array of {count} items is more than fastattn "
            f"reads (at most {MAX_ARRAY_ITEMS} array items in one file)")
    if itype == STRING:
        cur.skip_strings(count, f"array {key!r}")
    else:
        cur.take(count * item_size, f"array {key!r}")
    return count


def _read_tensor_info(cur, i):
    path = cur.path
    name = cur.text(f"name of tensor {i}")
    n_dims = cur.u32(f"n_dims of tensor {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise ModelFileError(f"{path}: tensor {name!r}: n_dims = {n_dims}, must be "
                             f"1 to {MAX_DIMS}")
    ne = struct.unpack_from(f"<{n_dims}Q", cur.buf,
                            cur.take(8 * n_dims, f"dims of tensor {name!r}"))
    qtype = cur.u32(f"type of tensor {name!r}")
    offset = cur.u64(f"offset of tensor {name!r}")

    # dims: each positive, their product countable
    n_values = 1
    for d in ne:
        if d == 0:
            raise ModelFileError(f"{path}: tensor {name!r}: dims {list(ne)} contain 0")
        n_values *= d
    if n_values > INT64_MAX:
        raise ModelFileError(f"{path}: tensor {name!r}: dims {list(ne)} hold {n_values} "
                             f"values, more than int64 can count")

    # type: one fastattn's kernels run
    if qtype not in TYPES:
        supported = ", ".join(t[0] for t in TYPES.values())
        if qtype in GGML_TYPE_NAMES:
            raise UnsupportedError(
                f"{path}: tensor {name!r} has type {GGML_TYPE_NAMES[qtype]} (id {qtype}), "
                f"which fastattn does not support (supported: {supported})")
        raise UnsupportedError(f"{path}: tensor {name!r} has unknown type id {qtype} "
                               f"(supported: {supported})")
    nbytes = row_bytes(qtype, ne[0], f"{path}: tensor {name!r}") * (n_values // ne[0])
    return TensorInfo(name, tuple(ne), qtype, offset, nbytes)


def _read_alignment(cur, keys):
    if "general.alignment" not in keys:
        return DEFAULT_ALIGNMENT
    vtype, at = keys["general.alignment"]
    if vtype != 4:
        raise ModelFileError(f"{cur.path}: general.alignment must be a uint32, found "
                             f"{VALUE_TYPES[vtype][0]}")
    alignment = struct.unpack_from("<I", cur.buf, at)[0]
    if alignment == 0 or alignment & (alignment - 1):
        raise ModelFileError(f"{cur.path}: general.alignment = {alignment} is not a "
                             f"power of two")
    return alignment


def _check_extents(path, tensors, alignment, data_start, file_size):
    """Each tensor aligned, inside the file, and no two overlapping."""
    for t in tensors:
        if t.offset % alignment:
            raise ModelFileError(f"{path}: tensor {t.name!r}: offset {t.offset} is not a "
                                 f"multiple of the alignment {alignment}")
        if t.offset > file_size or data_start + t.offset + t.nbytes > file_size:
            raise ModelFileError(
                f"{path}: tensor {t.name!r}: data at offset {t.offset} (file offset "
                f"{data_start + t.offset}) of {t.nbytes} bytes runs past the end of the "
                f"file ({file_size} bytes)")
    ordered = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if b.offset < a.offset + a.nbytes:
            raise ModelFileError(
                f"{path}: tensors {a.name!r} (offset {a.offset}, {a.nbytes} bytes) and "
                f"{b.name!r} (offset {b.offset}) overlap")


def scan_layout(buf, path) -> Layout:
    """Walk the whole structure of a GGUF file held in `buf` (bytes or mmap),
    checking every length against the file size; raise ModelFileError or
    UnsupportedError on the first thing wrong."""
    cur = _Cursor(buf, path)
    version, n_tensors, n_kv = _check_header(cur)

    # metadata: remember where each value is, skip over it
    keys = {}
    budget = MAX_ARRAY_ITEMS
    for i in range(n_kv):
        key = cur.text(f"key of metadata entry {i}")
        if key in keys:
            raise ModelFileError(f"{path}: metadata key {key!r} appears twice")
        vtype = cur.u32(f"value type of {key!r}")
        keys[key] = (vtype, cur.pos)
        budget -= _skip_value(cur, key, vtype, budget)

    # tensor infos
    tensors = []
    names = set()
    for i in range(n_tensors):
        info = _read_tensor_info(cur, i)
        if info.name in names:
            raise ModelFileError(f"{path}: tensor name {info.name!r} appears twice")
        names.add(info.name)
        tensors.append(info)

    # data section
    alignment = _read_alignment(cur, keys)
    info_end = cur.pos
    data_start = -(-info_end // alignment) * alignment
    _check_extents(path, tensors, alignment, data_start, cur.size)
    return Layout(version, cur.size, keys, tensors, info_end, alignment, data_start)


# ------------------------------------------------------ step 2: the gguf package


def _reader_class():
    """GGUFReader, or a subclass whose `_get` slices a plain ndarray view of
    the mapping instead of the np.memmap itself: numpy's memmap subclass costs
    a few microseconds per slice, and GGUFReader slices several times per
    vocabulary entry (2.4 s -> 0.8 s on SmolLM2).  The override copies
    `_get`'s upstream behaviour; it is used only when `_get` still has the
    signature it was written against, otherwise the stock reader runs."""
    from gguf import GGUFReader

    expected = ["self", "offset", "dtype", "count", "override_order"]
    try:
        params = list(inspect.signature(GGUFReader._get).parameters)
    except (AttributeError, TypeError, ValueError):
        return GGUFReader
    if params != expected:
        return GGUFReader

    class PlainViewReader(GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
                self._dtypes = {}
            order = self.byte_order if override_order is None else override_order
            dt = self._dtypes.get((dtype, order))
            if dt is None:
                dt = self._dtypes[dtype, order] = np.dtype(dtype).newbyteorder(order)
            return plain[offset:offset + dt.itemsize * int(count)].view(dt)

    return PlainViewReader


_READER = None


def _no_room(path, size):
    """The error for a file that cannot be mapped for want of memory."""
    return OutOfMemoryError(f"{path}: cannot map the file: its {size} bytes "
                            f"({size / 2**20:.1f} MiB) do not fit in the memory "
                            f"(address space) left to this process")


def _open_reader(path, layout):
    global _READER
    if _READER is None:
        _READER = _reader_class()
    try:
        reader = _READER(path)
    except (FastAttnError, MemoryError):
        raise       # MemoryError: load_model_files says how big the file is
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise _no_room(path, layout.file_size) from None
        raise ModelFileError(f"{path}: the gguf package could not read the file: "
                             f"{type(e).__name__}: {e}") from e
    except Exception as e:  # MemoryError, IndexError, struct errors, ...
        raise ModelFileError(f"{path}: the gguf package could not read the file: "
                             f"{type(e).__name__}: {e}") from e

    # it must have seen the same tensors as the layout check
    seen = [(t.name, int(t.tensor_type), int(t.data_offset)) for t in reader.tensors]
    want = [(t.name, t.qtype, layout.data_start + t.offset) for t in layout.tensors]
    if seen != want:
        diff = next((a, b) for a, b in zip(seen + [None], want + [None]) if a != b)
        raise ModelFileError(f"{path}: the gguf package and fastattn's layout check "
                             f"disagree about the tensor infos: (name, type, offset) "
                             f"{diff[0]} against {diff[1]}")
    return reader


class Metadata:
    """Typed access to GGUFReader's fields; every bad value raises
    ModelFileError naming the file, the key and the value."""

    def __init__(self, fields, path):
        self.fields = fields
        self.path = path

    def __contains__(self, key):
        return key in self.fields

    def keys(self):
        return [k for k in self.fields if not k.startswith("GGUF.")]

    def type_of(self, key):
        """Value type id; for an array, (ARRAY, element type id or None if empty)."""
        types = self.fields[key].types
        if types[0] == ARRAY:
            return (ARRAY, int(types[1]) if len(types) > 1 else None)
        return int(types[0])

    def _type_name(self, key):
        t = self.type_of(key)
        if isinstance(t, tuple):
            return f"array of {VALUE_TYPES[t[1]][0]}" if t[1] is not None else "empty array"
        return VALUE_TYPES[t][0]

    def _missing(self, key, default):
        if default is _REQUIRED:
            raise ModelFileError(f"{self.path}: missing required metadata key {key!r}")
        return default

    def _wrong(self, key, want):
        shown = repr(self.value(key))
        if len(shown) > 60:
            shown = shown[:56] + " ..."
        raise ModelFileError(f"{self.path}: metadata {key!r} must be {want}, found "
                             f"{self._type_name(key)} {shown}")

    def _decode(self, key, raw):
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(f"{self.path}: metadata {key!r}: string is not valid "
                                 f"UTF-8: {bytes(raw)[:40]!r}") from None

    def value(self, key):
        """The value as Python objects: int, float, bool, str or a list."""
        field = self.fields[key]
        t = self.type_of(key)
        if isinstance(t, tuple):
            if t[1] == STRING:
                return [self._decode(key, field.parts[i]) for i in field.data]
            if not field.data:
                return []
            return np.concatenate([field.parts[i] for i in field.data]).tolist()
        if t == STRING:
            return self._decode(key, field.parts[field.data[0]])
        return field.parts[field.data[0]][0].item()

    def int(self, key, default=None, minimum=1):
        if key not in self.fields:
            return self._missing(key, default)
        if self.type_of(key) not in INT_TYPES:
            self._wrong(key, "an integer")
        value = int(self.value(key))
        if value < minimum:
            raise ModelFileError(f"{self.path}: metadata {key!r} = {value} must be at "
                                 f"least {minimum}")
        return value

    def float(self, key, default=None):
        """A positive finite number (float or integer type)."""
        if key not in self.fields:
            return self._missing(key, default)
        if self.type_of(key) not in FLOAT_TYPES | INT_TYPES:
            self._wrong(key, "a number")
        value = float(self.value(key))
        if not math.isfinite(value) or value <= 0:
            raise ModelFileError(f"{self.path}: metadata {key!r} = {value!r} must be a "
                                 f"positive finite number")
        return value

    def bool(self, key, default=None):
        if key not in self.fields:
            return self._missing(key, default)
        if self.type_of(key) != BOOL_TYPE:
            self._wrong(key, "a bool")
        return bool(self.value(key))

    def str(self, key, default=None):
        if key not in self.fields:
            return self._missing(key, default)
        if self.type_of(key) != STRING:
            self._wrong(key, "a string")
        return self.value(key)

    def list(self, key, kinds, want, default=None):
        """An array whose element type id is in `kinds` (an empty one is fine)."""
        if key not in self.fields:
            return self._missing(key, default)
        t = self.type_of(key)
        if not isinstance(t, tuple) or (t[1] is not None and t[1] not in kinds):
            self._wrong(key, want)
        return self.value(key)


_REQUIRED = object()


# ------------------------------------------------------- step 3: config, tokenizer


def _read_config(meta, layout, path):
    """Metadata -> ModelConfig (before n_vocab is settled; see _settle_vocab)."""
    arch = meta.str("general.architecture", _REQUIRED)
    if arch not in ("llama", "gpt2"):
        raise UnsupportedError(f"{path}: architecture {arch!r} (general.architecture) is "
                               f"not supported (supported: gpt2, llama)")
    p = arch + "."
    for key in (p + "attention.head_count", p + "attention.head_count_kv"):
        if key in meta and isinstance(meta.type_of(key), tuple):
            raise UnsupportedError(f"{path}: {key} is an array: per-layer head counts "
                                   f"are not supported")
    n_head = meta.int(p + "attention.head_count", _REQUIRED)
    if arch == "llama":
        norm_eps = meta.float(p + "attention.layer_norm_rms_epsilon", _REQUIRED)
        rope_theta = meta.float(p + "rope.freq_base", 10000.0)
    else:
        norm_eps = meta.float(p + "attention.layer_norm_epsilon", _REQUIRED)
        rope_theta = 10000.0
    config = ModelConfig(
        family=arch,
        n_vocab=1,   # settled from the token list and token_embd below
        n_ctx=meta.int(p + "context_length", _REQUIRED),
        n_embd=meta.int(p + "embedding_length", _REQUIRED),
        n_layer=meta.int(p + "block_count", _REQUIRED),
        n_head=n_head,
        n_kv_head=meta.int(p + "attention.head_count_kv", n_head),
        n_ff=meta.int(p + "feed_forward_length", _REQUIRED),
        norm_eps=norm_eps,
        rope_theta=rope_theta,
        rope_neox=False,   # GGUF llama rotates adjacent pairs
        tied_output=not any(t.name == "output.weight" for t in layout.tensors),
        name=meta.str("general.name", "") or os.path.basename(path),
        source=path,
        extra={"gguf_version": layout.version,
               "file_type": meta.int("general.file_type", None, minimum=0)},
    )
    if arch == "gpt2" and config.n_kv_head != config.n_head:
        raise UnsupportedError(f"{path}: gpt2 with n_kv_head = {config.n_kv_head} != "
                               f"n_head = {config.n_head} is not supported")
    config.validate()
    if arch == "llama":
        _check_llama_features(meta, config, path)
    return config


def _check_llama_features(meta, config, path):
    """Refuse llama variants whose maths fastattn does not implement, rather than
    run them wrongly."""
    p = "llama."
    n_rot = meta.int(p + "rope.dimension_count", config.head_dim)
    if n_rot != config.head_dim:
        raise UnsupportedError(f"{path}: llama.rope.dimension_count = {n_rot} differs from "
                               f"head_dim = {config.head_dim}: partial rotary embeddings "
                               f"are not supported")
    for key in (p + "attention.key_length", p + "attention.value_length"):
        n = meta.int(key, config.head_dim)
        if n != config.head_dim:
            raise UnsupportedError(f"{path}: {key} = {n} differs from n_embd / n_head = "
                                   f"{config.head_dim}; this is not supported")
    scaling = meta.str(p + "rope.scaling.type", "none")
    if scaling != "none":
        raise UnsupportedError(f"{path}: llama.rope.scaling.type = {scaling!r}: RoPE "
                               f"scaling is not supported")
    scale = meta.float(p + "rope.scale_linear", 1.0)
    if scale != 1.0:
        raise UnsupportedError(f"{path}: llama.rope.scale_linear = {scale}: RoPE scaling "
                               f"is not supported")
    experts = meta.int(p + "expert_count", 0, minimum=0)
    if experts:
        raise UnsupportedError(f"{path}: llama.expert_count = {experts}: mixture-of-"
                               f"experts models are not supported")


def _tokenizer_name(short):
    """tokenizer.ggml.X -> the key used in the tokenizer description."""
    if short.endswith("_token_id"):
        base = short[:-len("_token_id")]
        base = {"unknown": "unk", "padding": "pad", "seperator": "sep",
                "separator": "sep"}.get(base, base)
        return base + "_id"
    return {"add_bos_token": "add_bos", "add_eos_token": "add_eos"}.get(short, short)


# special ids a tokenizer uses; the others (pad, sep, mask, ...) are only
# passed along when they are inside the vocabulary
ESSENTIAL_IDS = ("bos_id", "eos_id", "eot_id", "unk_id")


def _read_tokenizer(meta, path):
    """tokenizer.ggml.* -> {"kind": "gguf", "path", "model", "pre", "tokens",
    "token_type", "scores", "merges", "bos_id", "eos_id", "add_bos", ...}."""
    tok = {"kind": "gguf", "path": path}
    prefix = "tokenizer.ggml."
    for key in meta.keys():
        if not key.startswith(prefix):
            continue
        short = key[len(prefix):]
        name = _tokenizer_name(short)
        if short in ("tokens", "merges"):
            tok[name] = meta.list(key, {STRING}, "an array of strings")
        elif short == "token_type":
            tok[name] = meta.list(key, INT_TYPES, "an array of integers")
        elif short == "scores":
            tok[name] = meta.list(key, FLOAT_TYPES, "an array of floats")
        elif name.endswith("_id"):
            tok[name] = meta.int(key, minimum=0)
        elif short.startswith("add_"):
            tok[name] = meta.bool(key)
        elif short in ("model", "pre"):
            tok[name] = meta.str(key)
        else:
            tok[name] = meta.value(key)

    tokens = tok.get("tokens")
    if tokens is None:
        logger.warning("%s: no tokenizer.ggml.tokens; text cannot be encoded", path)
        return tok
    for short in ("token_type", "scores"):
        if short in tok and len(tok[short]) != len(tokens):
            raise ModelFileError(f"{path}: tokenizer.ggml.{short} has {len(tok[short])} "
                                 f"entries, tokenizer.ggml.tokens has {len(tokens)}")
    for name in [n for n in tok if n.endswith("_id")]:
        if tok[name] < len(tokens):
            continue
        if name in ESSENTIAL_IDS:
            raise ModelFileError(f"{path}: tokenizer {name} = {tok[name]} is outside the "
                                 f"vocabulary of {len(tokens)} tokens")
        logger.warning("%s: ignoring tokenizer %s = %d outside the vocabulary",
                       path, name, tok[name])
        del tok[name]
    return tok


def _settle_vocab(config, tokenizer, meta, layout, path):
    """n_vocab from the token list, token_embd and {arch}.vocab_size; all present
    must agree."""
    sources = []
    if "tokens" in tokenizer:
        sources.append(("tokenizer.ggml.tokens has", len(tokenizer["tokens"]), "entries"))
    embd = [t for t in layout.tensors if t.name == "token_embd.weight"]
    if embd:
        rows = embd[0].ne[1] if len(embd[0].ne) > 1 else 1
        sources.append(("token_embd.weight has", rows, "rows"))
    key = config.family + ".vocab_size"
    if key in meta:
        sources.append((key + " =", meta.int(key), ""))
    if not sources:
        raise ModelFileError(f"{path}: no vocabulary size: no tokenizer.ggml.tokens, no "
                             f"token_embd.weight tensor")
    n_vocab = sources[0][1]
    for what, n, unit in sources[1:]:
        if n != n_vocab:
            a, b = sources[0], (what, n, unit)
            raise ModelFileError(f"{path}: vocabulary sizes disagree: "
                                 f"{a[0]} {a[1]} {a[2]}, {b[0]} {b[1]} {b[2]}".rstrip())
    config.n_vocab = n_vocab
    config.validate()


# ------------------------------------------------------------- step 4: weights


def expected_shapes(config):
    """{tensor name: (shape [n_out, n_in] or [n], required?)} for the config."""
    n_embd, n_ff, n_vocab = config.n_embd, config.n_ff, config.n_vocab
    shapes = {"token_embd.weight": ((n_vocab, n_embd), True),
              "output_norm.weight": ((n_embd,), True),
              "output.weight": ((n_vocab, n_embd), False)}
    if config.family == "gpt2":
        shapes["position_embd.weight"] = ((config.n_ctx, n_embd), True)
        shapes["output_norm.bias"] = ((n_embd,), True)
        block = {"attn_norm": (n_embd,), "ffn_norm": (n_embd,),
                 "attn_qkv": (3 * n_embd, n_embd), "attn_output": (n_embd, n_embd),
                 "ffn_up": (n_ff, n_embd), "ffn_down": (n_embd, n_ff)}
        bias_required = True
    else:
        n_kv = config.n_embd_kv
        block = {"attn_norm": (n_embd,), "ffn_norm": (n_embd,),
                 "attn_q": (n_embd, n_embd), "attn_k": (n_kv, n_embd),
                 "attn_v": (n_kv, n_embd), "attn_output": (n_embd, n_embd),
                 "ffn_gate": (n_ff, n_embd), "ffn_up": (n_ff, n_embd),
                 "ffn_down": (n_embd, n_ff)}
        bias_required = False   # llama biases are optional (some fine-tunes add them)
    for i in range(config.n_layer):
        for part, shape in block.items():
            shapes[f"blk.{i}.{part}.weight"] = (shape, True)
            is_norm = part.endswith("_norm")
            if config.family == "gpt2" or not is_norm:
                shapes[f"blk.{i}.{part}.bias"] = ((shape[0],), bias_required)
    return shapes


def _shape(ne, n_want):
    """ggml ne -> our shape [n_out, n_in]; trailing ne of 1 beyond the
    expected rank are dropped, as ggml pads every tensor to 4 dims with 1s."""
    ne = list(ne)
    while len(ne) > n_want and ne[-1] == 1:
        ne.pop()
    return tuple(reversed(ne))


def _read_weights(config, layout, data, path):
    """Check every tensor against the config and view its bytes."""
    # every layer has at least this many tensors; checked before listing the
    # expected names, which would take n_layer steps
    per_layer = 12 if config.family == "gpt2" else 9
    if config.n_layer * per_layer > len(layout.tensors):
        raise ModelFileError(
            f"{path}: missing tensors: {config.family}.block_count = {config.n_layer} "
            f"needs at least {config.n_layer * per_layer} tensors, the file has "
            f"{len(layout.tensors)}")
    want = expected_shapes(config)
    have = {t.name: t for t in layout.tensors}

    unexpected = [name for name in have if name not in want]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise UnsupportedError(f"{path}: tensor {unexpected[0]!r}{more} is not part of the "
                               f"{config.family} model fastattn implements")
    missing = [name for name, (_, required) in want.items()
               if required and name not in have]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelFileError(f"{path}: missing tensor {missing[0]!r}{more}")

    weights = {}
    for name, info in have.items():
        shape_wanted = want[name][0]
        shape = _shape(info.ne, len(shape_wanted))
        if shape != shape_wanted:
            raise ModelFileError(f"{path}: tensor {name!r} has shape {list(shape)}, "
                                 f"expected {list(shape_wanted)} from the metadata")
        start = layout.data_start + info.offset
        view = data[start:start + info.nbytes]     # read-only, no copy
        weights[name] = WeightTensor(view, info.qtype, shape, name)
    return weights


def _small_metadata(meta):
    """The plain fields, for display: no tokenizer tables, no giant values."""
    out = {}
    for key in meta.keys():
        if key.startswith("tokenizer.ggml.") or key == "tokenizer.chat_template":
            continue
        t = meta.type_of(key)
        if isinstance(t, tuple) and len(meta.fields[key].data) > METADATA_MAX_ITEMS:
            continue
        try:
            value = meta.value(key)
        except ModelFileError as e:
            logger.warning("%s", e)
            continue
        if isinstance(value, str) and len(value) > METADATA_MAX_STRING:
            continue
        out[key] = value
    return out


# ---------------------------------------------------------------- the loader


def load_gguf(path) -> LoadedModel:
    """Read a GGUF file: config, tokenizer description, chat template, and the
    weights as read-only views over the mapped file (nothing is copied or
    expanded to float32).

        >>> m = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
        >>> m.config.n_layer, m.weights["blk.0.attn_q.weight"].shape
        (30, (576, 576))
    """
    path = os.fspath(path)
    t0 = time.perf_counter()
    try:
        st = os.stat(path)
        # before open(): opening a FIFO would wait for a writer
        if not stat.S_ISREG(st.st_mode):
            raise ModelFileError(f"{path}: not a regular file, so not a GGUF model")
        size = st.st_size
        with open(path, "rb") as f:
            if size == 0:
                raise ModelFileError(f"{path}: empty file, not a GGUF model")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                layout = scan_layout(buf, path)
    except OSError as e:
        if e.errno == errno.ENOMEM:
            raise _no_room(path, size) from None
        raise ModelFileError(f"{path}: cannot read: {e.strerror or e}") from e

    reader = _open_reader(path, layout)
    meta = Metadata(reader.fields, path)
    config = _read_config(meta, layout, path)
    tokenizer = _read_tokenizer(meta, path)
    _settle_vocab(config, tokenizer, meta, layout, path)
    data = reader.data.view(np.ndarray)      # uint8 [file_size], read-only mapping
    weights = _read_weights(config, layout, data, path)
    chat_template = meta.str("tokenizer.chat_template", None)
    metadata = _small_metadata(meta)

    logger.info("loaded %s: %d tensors (%s), %.1f MiB, in %.2f s", path, len(weights),
                ", ".join(sorted({type_name(w.qtype) for w in weights.values()})),
                layout.file_size / 2**20, time.perf_counter() - t0)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer,
                       chat_template=chat_template, metadata=metadata,
                       keepalive=reader.data)
