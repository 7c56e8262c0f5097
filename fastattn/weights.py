"""Weight tensors in their file's block form, and a numpy dequantizer.

A WeightTensor is a 2-D (or 1-D) array of one of the GGML storage types,
kept as raw bytes exactly as the file stores them: [n_out, row_bytes] for a
matrix whose rows are output features.  The C kernels read this form directly
and dequantize block by block inside their dot products; `dequantize` below is
the plain numpy spelling of the same formats, used by the reference model and
the tests.

Block layouts (32 values a block, little-endian):
  Q8_0  f16 d, int8 q[32]          x = d * q
  Q4_0  f16 d, u8 qs[16]           x = d * (nibble - 8)
  Q4_1  f16 d, f16 m, u8 qs[16]    x = d * nibble + m
where byte j of qs holds value j in its low nibble and value j + 16 in its high.
"""
from dataclasses import dataclass

import numpy as np

from .errors import ModelFileError, UnsupportedError

# Type ids are ggml's, so GGUF tensors pass through unchanged.
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30

# type id -> (name, values per block, bytes per block)
TYPES = {
    F32: ("F32", 1, 4),
    F16: ("F16", 1, 2),
    BF16: ("BF16", 1, 2),
    Q8_0: ("Q8_0", 32, 34),
    Q4_0: ("Q4_0", 32, 18),
    Q4_1: ("Q4_1", 32, 20),
}
TYPE_BY_NAME = {name: tid for tid, (name, _, _) in TYPES.items()}


def type_name(qtype: int) -> str:
    return TYPES[qtype][0] if qtype in TYPES else f"type id {qtype}"


def row_bytes(qtype: int, n_in: int, what: str = "tensor") -> int:
    """Bytes one row of n_in values takes; raises if the type or width is bad."""
    if qtype not in TYPES:
        raise UnsupportedError(f"{what}: tensor type {qtype} is not supported "
                               f"(supported: {', '.join(n for n, _, _ in TYPES.values())})")
    _, block, nbytes = TYPES[qtype]
    if n_in <= 0 or n_in % block:
        raise ModelFileError(f"{what}: row length {n_in} is not a positive multiple of "
                             f"the {TYPES[qtype][0]} block size {block}")
    return n_in // block * nbytes


@dataclass
class WeightTensor:
    """One weight in storage form.

    data  : uint8 array [n_out, row_bytes] (or [row_bytes] for a vector),
            C-contiguous, usually a read-only view over a mapped file
    qtype : ggml type id (F32, F16, BF16, Q8_0, Q4_0, Q4_1)
    shape : logical shape, (n_out, n_in) or (n_in,)
    name  : the canonical (GGUF-style) name, for messages
    """
    data: np.ndarray
    qtype: int
    shape: tuple
    name: str = ""

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        n_in = self.shape[-1]
        n_rows = int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1
        rb = row_bytes(self.qtype, n_in, self.name or "tensor")
        if self.data.dtype != np.uint8:
            self.data = self.data.view(np.uint8)
        if self.data.size != n_rows * rb:
            raise ModelFileError(f"{self.name}: holds {self.data.size} bytes, shape "
                                 f"{self.shape} of {type_name(self.qtype)} needs {n_rows * rb}")
        self.data = self.data.reshape((n_rows, rb) if len(self.shape) > 1 else (rb,))
        if not self.data.flags.c_contiguous:
            self.data = np.ascontiguousarray(self.data)

    @property
    def n_out(self) -> int:
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def n_in(self) -> int:
        return self.shape[-1]

    @classmethod
    def from_float(cls, array, qtype: int = F32, name: str = "") -> "WeightTensor":
        """Store a float array in the given type (quantizing if needed)."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        return cls(quantize(array, qtype), qtype, array.shape, name)

    def to_float(self) -> np.ndarray:
        """The float32 values, shape `self.shape`."""
        return dequantize(self.data, self.qtype, self.shape)


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)


def dequantize(data: np.ndarray, qtype: int, shape) -> np.ndarray:
    """Raw storage bytes -> float32 array of `shape`."""
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    n = int(np.prod(shape, dtype=np.int64))
    if qtype == F32:
        out = raw.view(np.float32)
    elif qtype == F16:
        out = raw.view(np.float16).astype(np.float32)
    elif qtype == BF16:
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif qtype in (Q8_0, Q4_0, Q4_1):
        _, block, nbytes = TYPES[qtype]
        blocks = raw.reshape(-1, nbytes)                             # [n_blocks, nbytes]
        d = _f16(blocks[:, 0:2])                                     # [n_blocks, 1]
        if qtype == Q8_0:
            q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # [n_blocks, 32]
            out = d * q
        else:
            qs = blocks[:, -16:]
            q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
            if qtype == Q4_0:
                out = d * (q - 8.0)
            else:
                out = d * q + _f16(blocks[:, 2:4])
    else:
        raise UnsupportedError(f"tensor type {qtype} is not supported")
    return out.reshape(-1)[:n].reshape(shape).astype(np.float32, copy=False)


def quantize(array: np.ndarray, qtype: int) -> np.ndarray:
    """float32 array -> raw storage bytes (rows of the last axis), for tests
    and for checkpoints stored in float.  The scales are chosen as ggml's
    reference quantizers choose them; the last bit of rounding may differ, which
    changes nothing for a reader: dequantize is the same either way."""
    x = np.ascontiguousarray(array, dtype=np.float32)
    if qtype == F32:
        return x.reshape(-1).view(np.uint8).copy()
    if qtype == F16:
        return x.astype(np.float16).reshape(-1).view(np.uint8).copy()
    if qtype == BF16:
        bits = x.reshape(-1).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        return rounded.view(np.uint8).copy()
    if qtype not in (Q8_0, Q4_0, Q4_1):
        raise UnsupportedError(f"cannot quantize to tensor type {qtype}")
    row_bytes(qtype, x.shape[-1])
    blocks = x.reshape(-1, 32)                                       # [n_blocks, 32]
    if qtype == Q8_0:
        amax = np.abs(blocks).max(axis=1)
        d = (amax / 127.0).astype(np.float16)
        inv = np.where(d != 0, 1.0 / np.maximum(d.astype(np.float32), 1e-30), 0.0)
        q = np.clip(np.round(blocks * inv[:, None]), -127, 127).astype(np.int8)
        return np.concatenate([d.view(np.uint8).reshape(-1, 2), q.view(np.uint8)],
                              axis=1).reshape(-1)
    if qtype == Q4_0:
        idx = np.abs(blocks).argmax(axis=1)
        mx = blocks[np.arange(len(blocks)), idx]
        d = (mx / -8.0).astype(np.float16)
        dd = d.astype(np.float32)
        inv = np.where(dd != 0, 1.0 / np.where(dd != 0, dd, 1.0), 0.0)
        q = np.clip(np.floor(blocks * inv[:, None] + 8.5), 0, 15).astype(np.uint8)
        head = d.view(np.uint8).reshape(-1, 2)
    else:
        lo = blocks.min(axis=1)
        hi = blocks.max(axis=1)
        d = ((hi - lo) / 15.0).astype(np.float16)
        m = lo.astype(np.float16)
        dd = d.astype(np.float32)
        inv = np.where(dd != 0, 1.0 / np.where(dd != 0, dd, 1.0), 0.0)
        q = np.clip(np.floor((blocks - m.astype(np.float32)[:, None]) * inv[:, None] + 0.5),
                    0, 15).astype(np.uint8)
        head = np.concatenate([d.view(np.uint8).reshape(-1, 2),
                               m.view(np.uint8).reshape(-1, 2)], axis=1)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([head, qs], axis=1).reshape(-1)


# Where a type keeps the exponent of its values (float types) or of its block
# scales (block types): (bytes per block, offsets of 16-bit scales in a block,
# or None for the float types), and the exponent mask of one value.
_FINITE_CHECK = {
    F32: (4, None, np.uint32, 0x7F800000),
    F16: (2, None, np.uint16, 0x7C00),
    BF16: (2, None, np.uint16, 0x7F80),
    Q8_0: (34, (0,), np.uint16, 0x7C00),
    Q4_0: (18, (0,), np.uint16, 0x7C00),
    Q4_1: (20, (0, 2), np.uint16, 0x7C00),
}


def first_nonfinite(t: WeightTensor):
    """Index of the first value (float types) or block (block types) of t that
    holds an infinity or NaN, or None.  A value or scale with every exponent
    bit set is one; the check reads the data in 32 MiB pieces, so a big
    float32 tensor costs no big temporary array."""
    if t.qtype not in _FINITE_CHECK:
        return None
    step, scales, utype, mask = _FINITE_CHECK[t.qtype]
    flat = t.data.reshape(-1)
    if flat.size % step:
        return None  # a size the shape checks refuse
    units = flat.size // step
    piece = (32 << 20) // step
    for u0 in range(0, units, piece):
        block = flat[u0 * step:min(units, u0 + piece) * step].reshape(-1, step)
        fields = [block.view(utype)] if scales is None else \
                 [block[:, o:o + 2].view(utype) for o in scales]
        for f in fields:
            bad = np.flatnonzero((f.reshape(-1) & utype(mask)) == utype(mask))
            if bad.size:
                return u0 + int(bad[0])
    return None
