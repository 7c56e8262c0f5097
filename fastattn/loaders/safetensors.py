"""A small, strict reader (and writer) of the safetensors format.

    with SafetensorsFile("model.safetensors") as f:
        f.names()                       # tensor names, in file order
        f.info("wte.weight")            # TensorInfo(dtype, shape, begin, end)
        f.array("wte.weight")           # a read-only numpy view over the mapped file

The format: an 8-byte little-endian header length N, N bytes of JSON, then the
data section.  The JSON maps each tensor name to {"dtype", "shape",
"data_offsets": [begin, end]} (offsets into the data section) and may hold a
"__metadata__" map of strings.  Everything the JSON claims is checked before a
byte of data is trusted: the header fits the file and a sane cap, the JSON
parses with no duplicate keys, dtypes are known, shapes are lists of
non-negative integers, offsets lie in the data section with begin <= end,
byte lengths equal the shape's size, and the tensors tile the data section
exactly (no overlap, no gap, nothing after the last one).  A failure raises
ModelFileError naming the file, the tensor, the field and the value.
"""
import json
import math
import mmap
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ModelFileError
from ..files import open_regular

# The largest header we accept, as the reference implementation does.
MAX_HEADER_BYTES = 100_000_000

# numpy's limit on dimensions (array() reshapes the view to the shape).
MAX_DIMS = 64

# dtype -> (numpy dtype of a view, bytes per element).  BF16 and the 8-bit
# floats have no numpy type; they are viewed as unsigned integers of their width.
DTYPES = {
    "BOOL": (np.bool_, 1), "U8": (np.uint8, 1), "I8": (np.int8, 1),
    "F8_E4M3": (np.uint8, 1), "F8_E5M2": (np.uint8, 1),
    "U16": (np.uint16, 2), "I16": (np.int16, 2), "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),
    "U32": (np.uint32, 4), "I32": (np.int32, 4), "F32": (np.float32, 4),
    "U64": (np.uint64, 8), "I64": (np.int64, 8), "F64": (np.float64, 8),
}
_NUMPY_TO_DTYPE = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8",
                   np.dtype(np.int8): "I8", np.dtype(np.uint16): "U16",
                   np.dtype(np.int16): "I16", np.dtype(np.float16): "F16",
                   np.dtype(np.uint32): "U32", np.dtype(np.int32): "I32",
                   np.dtype(np.float32): "F32", np.dtype(np.uint64): "U64",
                   np.dtype(np.int64): "I64", np.dtype(np.float64): "F64"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str       # safetensors dtype name, e.g. "F32", "BF16"
    shape: tuple
    begin: int       # byte offsets into the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicates(path):
    def hook(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise ModelFileError(f"{path}: header: key {key!r} appears twice")
            seen[key] = value
        return seen
    return hook


def _reject_constant(path):
    def hook(name):
        raise ModelFileError(f"{path}: header: {name} is not valid JSON")
    return hook


def parse_header(path: str, header: bytes, data_len: int):
    """(metadata, {name: TensorInfo} in file order) from the JSON header bytes,
    checked against a data section of data_len bytes."""
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(f"{path}: header: not valid UTF-8 ({e.reason} at byte "
                             f"{e.start})") from None
    if not text.lstrip().startswith("{"):
        raise ModelFileError(f"{path}: header: expected a JSON object, starts with "
                             f"{text[:20]!r}")
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates(path),
                         parse_constant=_reject_constant(path))
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: header: invalid JSON: {e.msg} at character "
                             f"{e.pos}") from None
    except ModelFileError:
        raise
    except ValueError as e:     # an integer of more than 4300 digits, say
        raise ModelFileError(f"{path}: header: invalid JSON: {e}") from None
    except RecursionError:
        raise ModelFileError(f"{path}: header: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path}: header: expected a JSON object, got "
                             f"{type(obj).__name__}")

    metadata = obj.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ModelFileError(f"{path}: header: __metadata__ must map strings to strings, "
                             f"got {str(metadata)[:80]}")

    tensors = {}
    for name, entry in obj.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise ModelFileError(f"{where}: expected an object, got {str(entry)[:60]}")
        keys = set(entry)
        if keys != {"dtype", "shape", "data_offsets"}:
            missing = {"dtype", "shape", "data_offsets"} - keys
            field = sorted(missing)[0] if missing else sorted(keys - {"dtype", "shape",
                                                                      "data_offsets"})[0]
            raise ModelFileError(f"{where}: field {field!r} is "
                                 f"{'missing' if missing else 'not a safetensors field'}")

        # dtype
        dtype = entry["dtype"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ModelFileError(f"{where}: field 'dtype' has unknown value {dtype!r}")
        itemsize = DTYPES[dtype][1]

        # shape: non-negative integers whose product fits the file
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise ModelFileError(f"{where}: field 'shape' has value {str(shape)[:80]}; "
                                 f"expected a list of non-negative integers")
        if len(shape) > MAX_DIMS:
            raise ModelFileError(f"{where}: field 'shape' has {len(shape)} dimensions, "
                                 f"more than the {MAX_DIMS} a numpy array can have")
        count = math.prod(shape)
        # each dimension too: numpy cannot shape [0, 10**30] even with no data
        if math.prod(max(d, 1) for d in shape) * itemsize >= 1 << 62:
            raise ModelFileError(f"{where}: field 'shape' has value {shape}, whose size "
                                 f"overflows")

        # data_offsets: [begin, end] inside the data section, matching the size
        offsets = entry["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) for o in offsets)):
            raise ModelFileError(f"{where}: field 'data_offsets' has value "
                                 f"{str(offsets)[:80]}; expected [begin, end] integers")
        begin, end = offsets
        if begin < 0 or begin > end:
            raise ModelFileError(f"{where}: field 'data_offsets' has value {offsets}: "
                                 f"begin must be in [0, end]")
        if end > data_len:
            raise ModelFileError(f"{where}: field 'data_offsets' has value {offsets}, past "
                                 f"the data section of {data_len} bytes")
        if end - begin != count * itemsize:
            raise ModelFileError(f"{where}: field 'data_offsets' has value {offsets}: "
                                 f"{end - begin} bytes, but shape {shape} of {dtype} needs "
                                 f"{count * itemsize}")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), begin, end)

    # the tensors must tile the data section: no overlap, no gap, no tail
    at = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin < at:
            raise ModelFileError(f"{path}: tensor {t.name!r}: field 'data_offsets' has "
                                 f"value [{t.begin}, {t.end}], overlapping the tensor "
                                 f"before it (which ends at {at})")
        if t.begin > at:
            raise ModelFileError(f"{path}: tensor {t.name!r}: field 'data_offsets' has "
                                 f"value [{t.begin}, {t.end}], leaving bytes {at}..{t.begin} "
                                 f"of the data section unused")
        at = t.end
    if at != data_len:
        raise ModelFileError(f"{path}: the data section has {data_len} bytes but the "
                             f"tensors cover only {at}")
    return metadata, tensors


class SafetensorsFile:
    """A safetensors file, mapped read-only and checked in full at open."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._map = None
        try:
            with open_regular(self.path) as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise ModelFileError(f"{self.path}: {size} bytes, too short for the "
                                         f"8-byte header length")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelFileError(f"{self.path}: cannot read: {e.strerror}") from None

        n = int.from_bytes(self._map[:8], "little")
        if n > MAX_HEADER_BYTES:
            raise ModelFileError(f"{self.path}: header length {n} exceeds the cap of "
                                 f"{MAX_HEADER_BYTES} bytes")
        if 8 + n > size:
            raise ModelFileError(f"{self.path}: header length {n} runs past the end of the "
                                 f"file ({size} bytes)")
        self.data_offset = 8 + n
        self.metadata, self.tensors = parse_header(self.path, self._map[8:8 + n],
                                                   size - self.data_offset)
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)   # read-only view

    def names(self) -> list[str]:
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ModelFileError(f"{self.path}: no tensor named {name!r}") from None

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, a read-only uint8 view over the mapped file."""
        t = self.info(name)
        return self._bytes[self.data_offset + t.begin:self.data_offset + t.end]

    def array(self, name: str) -> np.ndarray:
        """A read-only numpy view of the tensor's values, shaped (BF16 and F8
        as unsigned integers of their width).  Unaligned data is viewed as is;
        numpy handles it."""
        t = self.info(name)
        return self.raw(name).view(DTYPES[t.dtype][0]).reshape(t.shape)

    def close(self):
        """Drop this object's hold on the mapping; arrays handed out keep it
        alive until they go."""
        self._bytes = None
        self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_file(path) -> dict:
    """{name: numpy array} of a safetensors file, views over its mapping."""
    f = SafetensorsFile(path)
    return {name: f.array(name) for name in f.names()}


def save_file(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write {name: numpy array} as a safetensors file (tensors in name order,
    header padded with spaces to 8 bytes as the reference writer does)."""
    header, chunks, at = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        little = a.dtype.newbyteorder("<")
        if little not in _NUMPY_TO_DTYPE:
            raise ValueError(f"save_file: tensor {name!r} has unsupported dtype {a.dtype}")
        data = a.astype(little, copy=False).tobytes()
        header[name] = {"dtype": _NUMPY_TO_DTYPE[little], "shape": list(a.shape),
                        "data_offsets": [at, at + len(data)]}
        chunks.append(data)
        at += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for data in chunks:
            f.write(data)
