"""Hostile GGUF files: small files each wrong in one way, with the fastattn
error they must raise and words its message must contain.

The files are written byte by byte (GGUFWriter refuses to write most of them)
from one tiny valid llama model, so each case differs from a file that loads
in exactly the way its name says.

    python tests/hostile.py OUTDIR     writes every case as OUTDIR/<name>.gguf
"""
import math
import os
import struct
import sys
from dataclasses import dataclass, field

import numpy as np

from fastattn.errors import ModelFileError, UnsupportedError
from fastattn.weights import F16, F32, Q4_0, Q4_1, Q8_0, quantize

# GGUF value type ids
U8, I8, U16, I16, U32, I32, F32V, BOOL, STR, ARR, U64, I64, F64V = range(13)
PACK = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32V: "<f",
        BOOL: "<?", U64: "<Q", I64: "<q", F64V: "<d"}


def gguf_string(s):
    raw = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def encode_value(vtype, value, item_type=None):
    """The bytes of one metadata value (without its type id)."""
    if vtype == STR:
        return gguf_string(value)
    if vtype == ARR:
        body = b"".join(encode_value(item_type, v) for v in value)
        return struct.pack("<IQ", item_type, len(value)) + body
    return struct.pack(PACK[vtype], value)


@dataclass
class Tensor:
    name: str
    ne: list            # ggml order, ne[0] = row length
    qtype: int
    data: bytes
    offset: int = None  # None: placed after the previous tensor, aligned


@dataclass
class GGUFBytes:
    """A GGUF file as parts that a case may change before `build`."""
    version: int = 3
    magic: bytes = b"GGUF"
    kvs: list = field(default_factory=list)      # [(key, vtype, raw value bytes)]
    tensors: list = field(default_factory=list)  # [Tensor]
    alignment: int = 32
    tensor_count: int = None                     # None: the true counts
    kv_count: int = None

    def add(self, key, vtype, value, item_type=None):
        self.kvs.append((key, vtype, encode_value(vtype, value, item_type)))
        return self

    def set(self, key, vtype, value, item_type=None):
        """Replace a key's value (and type) in place, keeping its position."""
        raw = encode_value(vtype, value, item_type)
        for i, (k, _, _) in enumerate(self.kvs):
            if k == key:
                self.kvs[i] = (key, vtype, raw)
                return self
        return self.add(key, vtype, value, item_type)

    def drop(self, key):
        self.kvs = [kv for kv in self.kvs if kv[0] != key]
        return self

    def tensor(self, name):
        return next(t for t in self.tensors if t.name == name)

    def build(self):
        """-> (file bytes, [(label, offset)] of every structural boundary)."""
        marks = []
        out = bytearray()

        def mark(label):
            marks.append((label, len(out)))

        out += self.magic
        mark("after magic")
        out += struct.pack("<I", self.version)
        mark("after version")
        n_t = len(self.tensors) if self.tensor_count is None else self.tensor_count
        n_kv = len(self.kvs) if self.kv_count is None else self.kv_count
        out += struct.pack("<Q", n_t)
        mark("after tensor_count")
        out += struct.pack("<Q", n_kv)
        mark("after kv_count")
        for key, vtype, raw in self.kvs:
            key_raw = gguf_string(key)
            out += key_raw[:8]
            mark(f"inside key {key!r}")
            out += key_raw[8:]
            mark(f"after key {key!r}")
            out += struct.pack("<I", vtype)
            mark(f"after type of {key!r}")
            out += raw[:len(raw) // 2]
            mark(f"inside value of {key!r}")
            out += raw[len(raw) // 2:]
            mark(f"after value of {key!r}")

        # offsets: packed in order, each aligned, unless a case fixed one (a
        # fixed offset does not grow the data section)
        offsets = []
        end = 0
        for t in self.tensors:
            if t.offset is None:
                offsets.append(-(-end // self.alignment) * self.alignment)
                end = offsets[-1] + len(t.data)
            else:
                offsets.append(t.offset)
        for t, at in zip(self.tensors, offsets):
            out += gguf_string(t.name)
            mark(f"after name of {t.name!r}")
            out += struct.pack("<I", len(t.ne))
            mark(f"after n_dims of {t.name!r}")
            out += struct.pack(f"<{len(t.ne)}Q", *t.ne)
            mark(f"after dims of {t.name!r}")
            out += struct.pack("<I", t.qtype)
            mark(f"after type of {t.name!r}")
            out += struct.pack("<Q", at)
            mark(f"after offset of {t.name!r}")

        # data section
        out += bytes(-len(out) % self.alignment)
        data_start = len(out)
        mark("at data start")
        blob = bytearray(end if self.tensors else 0)
        for t, at in zip(self.tensors, offsets):
            if at + len(t.data) <= len(blob):
                blob[at:at + len(t.data)] = t.data
        out += blob
        for t, at in zip(self.tensors, offsets):
            if at + len(t.data) <= len(blob):
                marks.append((f"inside data of {t.name!r}",
                              data_start + at + max(1, len(t.data) // 2)))
        return bytes(out), marks


# ------------------------------------------------------------ the valid model

# A tiny llama: n_vocab 48, n_embd 64, 4 heads of 16, 2 kv heads, n_ff 96.
TINY = dict(n_vocab=48, n_ctx=128, n_embd=64, n_layer=1, n_head=4, n_kv_head=2, n_ff=96,
            norm_eps=1e-5, rope_theta=10000.0)


def tiny_tokens(n):
    return ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, n)]


def tiny_llama(seed=0, tied=True):
    """A valid tiny llama GGUFBytes, every storage type used once at least."""
    c = TINY
    rng = np.random.default_rng(seed)
    g = GGUFBytes()
    g.add("general.architecture", STR, "llama")
    g.add("general.name", STR, "tiny-llama")
    g.add("llama.block_count", U32, c["n_layer"])
    g.add("llama.context_length", U32, c["n_ctx"])
    g.add("llama.embedding_length", U32, c["n_embd"])
    g.add("llama.feed_forward_length", U32, c["n_ff"])
    g.add("llama.attention.head_count", U32, c["n_head"])
    g.add("llama.attention.head_count_kv", U32, c["n_kv_head"])
    g.add("llama.rope.freq_base", F32V, c["rope_theta"])
    g.add("llama.attention.layer_norm_rms_epsilon", F32V, c["norm_eps"])
    g.add("llama.rope.dimension_count", U32, c["n_embd"] // c["n_head"])
    g.add("tokenizer.ggml.model", STR, "gpt2")
    g.add("tokenizer.ggml.tokens", ARR, tiny_tokens(c["n_vocab"]), STR)
    g.add("tokenizer.ggml.token_type", ARR, [3, 3, 3] + [1] * (c["n_vocab"] - 3), I32)
    g.add("tokenizer.ggml.merges", ARR, ["t 1", "t 2"], STR)
    g.add("tokenizer.ggml.bos_token_id", U32, 1)
    g.add("tokenizer.ggml.eos_token_id", U32, 2)
    g.add("tokenizer.chat_template", STR, "{{ messages }}")

    def weight(name, shape, qtype):
        x = rng.standard_normal(shape).astype(np.float32)
        g.tensors.append(Tensor(name, list(reversed(shape)), qtype,
                                quantize(x, qtype).tobytes()))

    e, f, kv = c["n_embd"], c["n_ff"], c["n_kv_head"] * c["n_embd"] // c["n_head"]
    weight("token_embd.weight", (c["n_vocab"], e), Q8_0)
    for i in range(c["n_layer"]):
        weight(f"blk.{i}.attn_norm.weight", (e,), F32)
        weight(f"blk.{i}.attn_q.weight", (e, e), Q4_0)
        weight(f"blk.{i}.attn_k.weight", (kv, e), Q4_1)
        weight(f"blk.{i}.attn_v.weight", (kv, e), F16)
        weight(f"blk.{i}.attn_output.weight", (e, e), F32)
        weight(f"blk.{i}.ffn_norm.weight", (e,), F32)
        weight(f"blk.{i}.ffn_gate.weight", (f, e), Q8_0)
        weight(f"blk.{i}.ffn_up.weight", (f, e), Q4_1)
        weight(f"blk.{i}.ffn_down.weight", (e, f), Q4_0)
    weight("output_norm.weight", (e,), F32)
    if not tied:
        weight("output.weight", (c["n_vocab"], e), Q8_0)
    return g


# ------------------------------------------------------------------- the cases


@dataclass
class Case:
    name: str
    data: bytes
    error: type                 # ModelFileError or UnsupportedError
    words: tuple                # substrings the message must contain; "a|b": either
    big: bool = False           # huge declared sizes: run under an address-space limit


def _variant(change):
    g = tiny_llama()
    change(g)
    return g.build()[0]


def _truncations():
    """The valid file cut at each structural boundary."""
    g = tiny_llama()
    data, marks = g.build()
    n_t, n_kv = len(g.tensors), len(g.kvs)
    keep = {"after magic", "after version", "after tensor_count", "after kv_count",
            "at data start"}
    first_key, last_key = g.kvs[0][0], g.kvs[-1][0]
    for what in ("inside key", "after key", "after type of", "inside value of",
                 "after value of"):
        keep.add(f"{what} {first_key!r}")
        keep.add(f"{what} {last_key!r}")
    keep.add("inside value of 'tokenizer.ggml.tokens'")
    keep.add("inside value of 'tokenizer.ggml.token_type'")
    first_t, last_t = g.tensors[0].name, g.tensors[-1].name
    for what in ("after name of", "after n_dims of", "after dims of", "after type of",
                 "after offset of"):
        keep.add(f"{what} {first_t!r}")
    keep.add(f"after dims of {last_t!r}")
    keep.add(f"inside data of {first_t!r}")
    keep.add(f"inside data of {last_t!r}")

    yield Case("truncated_empty", b"", ModelFileError, ("empty file",))
    yield Case("truncated_inside_magic", data[:2], ModelFileError, ("truncated", "magic"))
    for label, at in marks:
        if label not in keep or at >= len(data):
            continue
        name = "truncated_" + "".join(ch if ch.isalnum() else "_" for ch in label)
        room = at - 24
        if at < 24:
            words = ("truncated",)
        elif room < n_t * 24 + n_kv * 12:
            words = ("more than the", "file can hold")
        elif label == "at data start" or label.startswith("inside data"):
            words = ("runs past the end of the file",)
        else:
            words = ("truncated|runs past the end",)
        yield Case(name, data[:at], ModelFileError, words)


def cases():
    """Every hostile case."""
    out = list(_truncations())

    def add(name, change, error, *words, big=False):
        out.append(Case(name, _variant(change), error, words, big))

    # header
    add("bad_magic", lambda g: setattr(g, "magic", b"GGML"), ModelFileError,
        "not a GGUF file", "b'GGML'")
    add("version_1", lambda g: setattr(g, "version", 1), UnsupportedError, "version 1")
    add("version_4", lambda g: setattr(g, "version", 4), UnsupportedError,
        "unsupported GGUF version 4")
    add("big_endian", lambda g: setattr(g, "version", 3 << 24), UnsupportedError,
        "big-endian")
    add("tensor_count_2_63", lambda g: setattr(g, "tensor_count", 1 << 63), ModelFileError,
        f"tensor_count = {1 << 63}", "can hold", big=True)
    add("tensor_count_2_64_1", lambda g: setattr(g, "tensor_count", (1 << 64) - 1),
        ModelFileError, f"tensor_count = {(1 << 64) - 1}", big=True)
    add("kv_count_2_64_1", lambda g: setattr(g, "kv_count", (1 << 64) - 1),
        ModelFileError, f"kv_count = {(1 << 64) - 1}", big=True)
    add("kv_count_one_more", lambda g: setattr(g, "kv_count", len(g.kvs) + 1),
        ModelFileError, "name of tensor 0", "string length")  # a tensor info read as a kv

    # metadata structure
    out.append(Case("key_length_2_64_1", _patched_key_length((1 << 64) - 1),
                    ModelFileError, ("string length 18446744073709551615",
                                     "key of metadata entry 0"), big=True))
    add("string_value_length_huge",
        lambda g: g.kvs.__setitem__(0, ("general.architecture", STR,
                                         struct.pack("<Q", (1 << 64) - 1) + b"llama")),
        ModelFileError, "value of 'general.architecture'", "string length", big=True)
    add("array_length_huge_u8",
        lambda g: g.kvs.__setitem__(1, ("general.junk", ARR,
                                        struct.pack("<IQ", U8, 1 << 62) + bytes(16))),
        ModelFileError, "'general.junk'", f"array length {1 << 62}", "cannot fit", big=True)
    add("array_length_2_64_1_strings",
        lambda g: g.kvs.__setitem__(1, ("general.junk", ARR,
                                        struct.pack("<IQ", STR, (1 << 64) - 1))),
        ModelFileError, "'general.junk'", "cannot fit", big=True)
    add("array_too_many_items",
        lambda g: g.kvs.append(("general.junk", ARR, struct.pack("<IQ", U8, 3 << 20)
                                + bytes(3 << 20))),
        ModelFileError, "'general.junk'", "more than fastattn reads", big=True)
    add("array_string_item_length_huge",
        lambda g: g.kvs.__setitem__(_index(g, "tokenizer.ggml.merges"), (
            "tokenizer.ggml.merges", ARR, struct.pack("<IQ", STR, 2) + gguf_string("a b")
            + struct.pack("<Q", 1 << 60) + b"c d")),
        ModelFileError, "'tokenizer.ggml.merges'[1]", "string length", big=True)
    add("nested_array", lambda g: g.add("general.nested", ARR, [], ARR),
        UnsupportedError, "'general.nested'", "nested arrays")
    add("unknown_value_type",
        lambda g: g.kvs.__setitem__(1, ("general.name", 13, b"\0" * 8)),
        ModelFileError, "'general.name'", "unknown value type id 13")
    add("unknown_array_item_type",
        lambda g: g.kvs.__setitem__(1, ("general.name", ARR, struct.pack("<IQ", 99, 1))),
        ModelFileError, "'general.name'", "unknown array element type id 99")
    add("duplicate_key", lambda g: g.add("llama.block_count", U32, 1), ModelFileError,
        "'llama.block_count'", "appears twice")
    add("key_not_utf8", lambda g: g.kvs.__setitem__(1, (b"general.\xff\xfe", U32,
                                                         struct.pack("<I", 1))),
        ModelFileError, "key of metadata entry 1", "not valid UTF-8")
    add("key_clashes_with_reader", lambda g: g.add("GGUF.version", U32, 3),
        ModelFileError, "gguf package could not read the file", "GGUF.version")
    add("alignment_zero", lambda g: g.add("general.alignment", U32, 0), ModelFileError,
        "general.alignment = 0", "power of two")
    add("alignment_48", lambda g: g.add("general.alignment", U32, 48), ModelFileError,
        "general.alignment = 48", "power of two")
    add("alignment_string", lambda g: g.add("general.alignment", STR, "32"),
        ModelFileError, "general.alignment must be a uint32", "string")

    # tensor infos
    add("n_dims_0", lambda g: setattr(g.tensor("blk.0.attn_norm.weight"), "ne", []),
        ModelFileError, "'blk.0.attn_norm.weight'", "n_dims = 0")
    add("n_dims_5", lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "ne",
                                      [64, 64, 1, 1, 1]),
        ModelFileError, "'blk.0.attn_q.weight'", "n_dims = 5")
    add("dims_overflow_int64", lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "ne",
                                                 [1 << 32, 1 << 32]),
        ModelFileError, "'blk.0.attn_q.weight'", "more than int64", big=True)
    add("dims_product_wraps_to_zero",
        lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "ne", [64, 1 << 58, 1 << 6]),
        ModelFileError, "'blk.0.attn_q.weight'", "more than int64", big=True)
    add("dim_zero", lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "ne", [64, 0]),
        ModelFileError, "'blk.0.attn_q.weight'", "contain 0")
    add("offset_past_end", lambda g: setattr(g.tensor("blk.0.ffn_up.weight"), "offset",
                                             1 << 40),
        ModelFileError, "'blk.0.ffn_up.weight'", f"offset {1 << 40}", "runs past the end",
        big=True)
    add("offset_2_64_minus_32", lambda g: setattr(g.tensor("token_embd.weight"), "offset",
                                                  (1 << 64) - 32),
        ModelFileError, "'token_embd.weight'", "runs past the end", big=True)
    add("data_runs_past_end",
        lambda g: setattr(g.tensor("output_norm.weight"), "ne", [64 * 1024]),
        ModelFileError, "'output_norm.weight'", "262144 bytes", "runs past the end")
    add("offset_misaligned",
        lambda g: setattr(g.tensor("blk.0.attn_k.weight"), "offset", 4), ModelFileError,
        "'blk.0.attn_k.weight'", "offset 4", "not a multiple of the alignment 32")
    add("tensors_overlap", lambda g: setattr(g.tensor("blk.0.attn_v.weight"), "offset", 0),
        ModelFileError, "'blk.0.attn_v.weight'", "'token_embd.weight'", "overlap")
    add("tensor_type_99", lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "qtype", 99),
        UnsupportedError, "'blk.0.attn_q.weight'", "unknown type id 99")
    add("tensor_type_q2_k", lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "qtype",
                                              10),
        UnsupportedError, "'blk.0.attn_q.weight'", "Q2_K (id 10)")
    add("row_not_whole_blocks",
        lambda g: setattr(g.tensor("blk.0.attn_q.weight"), "ne", [48, 64]),
        ModelFileError, "'blk.0.attn_q.weight'", "row length 48", "Q4_0 block size 32")
    add("duplicate_tensor_name",
        lambda g: setattr(g.tensor("blk.0.ffn_up.weight"), "name", "blk.0.ffn_gate.weight"),
        ModelFileError, "'blk.0.ffn_gate.weight'", "appears twice")
    add("tensor_name_not_utf8",
        lambda g: setattr(g.tensor("blk.0.ffn_up.weight"), "name", b"blk.0.\xc3("),
        ModelFileError, "name of tensor", "not valid UTF-8")

    # hyperparameters
    add("architecture_unknown", lambda g: g.set("general.architecture", STR, "mamba"),
        UnsupportedError, "architecture 'mamba'", "supported: gpt2, llama")
    add("architecture_missing", lambda g: g.drop("general.architecture"), ModelFileError,
        "missing required metadata key 'general.architecture'")
    add("architecture_not_string", lambda g: g.set("general.architecture", U32, 1),
        ModelFileError, "'general.architecture'", "must be a string", "uint32 1")
    add("block_count_missing", lambda g: g.drop("llama.block_count"), ModelFileError,
        "missing required metadata key 'llama.block_count'")
    add("block_count_string", lambda g: g.set("llama.block_count", STR, "1"),
        ModelFileError, "'llama.block_count'", "must be an integer", "string '1'")
    add("embedding_length_float", lambda g: g.set("llama.embedding_length", F32V, 64.0),
        ModelFileError, "'llama.embedding_length'", "must be an integer", "float32 64.0")
    add("block_count_huge", lambda g: g.set("llama.block_count", U32, 1 << 30),
        ModelFileError, "block_count = 1073741824", "tensors", big=True)
    add("context_length_2_40", lambda g: g.set("llama.context_length", U64, 1 << 40),
        ModelFileError, "n_ctx = 1099511627776", "implausibly large")
    add("eps_nan", lambda g: g.set("llama.attention.layer_norm_rms_epsilon", F32V,
                                   math.nan),
        ModelFileError, "'llama.attention.layer_norm_rms_epsilon' = nan", "finite")
    add("eps_negative", lambda g: g.set("llama.attention.layer_norm_rms_epsilon", F32V,
                                        -1e-5),
        ModelFileError, "'llama.attention.layer_norm_rms_epsilon'", "positive")
    add("rope_theta_inf", lambda g: g.set("llama.rope.freq_base", F32V, math.inf),
        ModelFileError, "'llama.rope.freq_base' = inf", "finite")
    add("head_count_zero", lambda g: g.set("llama.attention.head_count", U32, 0),
        ModelFileError, "'llama.attention.head_count' = 0", "at least 1")
    add("head_count_negative", lambda g: g.set("llama.attention.head_count", I32, -4),
        ModelFileError, "'llama.attention.head_count' = -4")
    add("head_count_array", lambda g: g.set("llama.attention.head_count", ARR, [4], U32),
        UnsupportedError, "llama.attention.head_count is an array", "per-layer")
    add("n_embd_not_divisible_by_n_head",
        lambda g: (g.set("llama.attention.head_count", U32, 5),
                   g.set("llama.attention.head_count_kv", U32, 5)),
        ModelFileError, "n_embd = 64 is not divisible by n_head = 5")
    add("n_head_not_multiple_of_n_kv_head",
        lambda g: g.set("llama.attention.head_count_kv", U32, 3), ModelFileError,
        "n_head = 4 is not a multiple of n_kv_head = 3")
    add("partial_rotary", lambda g: g.set("llama.rope.dimension_count", U32, 8),
        UnsupportedError, "rope.dimension_count = 8", "partial rotary")
    add("rope_scaling_yarn", lambda g: g.set("llama.rope.scaling.type", STR, "yarn"),
        UnsupportedError, "'yarn'", "RoPE scaling")
    add("mixture_of_experts", lambda g: g.set("llama.expert_count", U32, 8),
        UnsupportedError, "expert_count = 8", "mixture-of-experts")

    # tokenizer
    add("vocab_disagrees_with_token_embd",
        lambda g: (g.set("tokenizer.ggml.tokens", ARR, tiny_tokens(40), STR),
                   g.set("tokenizer.ggml.token_type", ARR, [1] * 40, I32)),
        ModelFileError, "vocabulary sizes disagree", "tokenizer.ggml.tokens has 40",
        "token_embd.weight has 48 rows")
    add("vocab_size_key_disagrees", lambda g: g.set("llama.vocab_size", U32, 50),
        ModelFileError, "vocabulary sizes disagree", "llama.vocab_size = 50")
    add("tokens_not_strings",
        lambda g: g.set("tokenizer.ggml.tokens", ARR, list(range(48)), I32),
        ModelFileError, "'tokenizer.ggml.tokens'", "must be an array of strings")
    add("token_not_utf8",
        lambda g: g.set("tokenizer.ggml.tokens", ARR,
                        [b"\xff\xfe"] + tiny_tokens(48)[1:], STR),
        ModelFileError, "'tokenizer.ggml.tokens'", "not valid UTF-8")
    add("token_type_length",
        lambda g: g.set("tokenizer.ggml.token_type", ARR, [1] * 47, I32), ModelFileError,
        "tokenizer.ggml.token_type has 47 entries")
    add("bos_outside_vocab", lambda g: g.set("tokenizer.ggml.bos_token_id", U32, 48),
        ModelFileError, "bos_id = 48", "outside the vocabulary")
    add("chat_template_not_string", lambda g: g.set("tokenizer.chat_template", U32, 7),
        ModelFileError, "'tokenizer.chat_template'", "must be a string")

    # tensors against the config
    add("tensor_shape_disagrees",
        lambda g: _reshape(g, "blk.0.attn_k.weight", [64, 16]), ModelFileError,
        "'blk.0.attn_k.weight'", "has shape [16, 64]", "expected [32, 64]")
    add("tensor_missing",
        lambda g: g.tensors.remove(g.tensor("blk.0.ffn_down.weight")), ModelFileError,
        "missing tensor 'blk.0.ffn_down.weight'")
    add("no_tensors", lambda g: g.tensors.clear(), ModelFileError, "missing tensor")
    add("tensor_unexpected",
        lambda g: g.tensors.append(Tensor("rope_freqs.weight", [8], F32, bytes(32))),
        UnsupportedError, "'rope_freqs.weight'", "not part of the llama model")
    return out


def _index(g, key):
    return next(i for i, kv in enumerate(g.kvs) if kv[0] == key)


def _reshape(g, name, ne):
    """Give a tensor new dims and a data blob of the matching size."""
    t = g.tensor(name)
    old = np.prod(t.ne)
    t.ne = ne
    t.data = t.data[:len(t.data) * int(np.prod(ne)) // int(old)]


def _patched_key_length(n):
    """The valid file with the first key's length field set to n."""
    data = bytearray(tiny_llama().build()[0])
    data[24:32] = struct.pack("<Q", n)
    return bytes(data)


def write_all(folder):
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for case in cases():
        path = os.path.join(folder, case.name + ".gguf")
        with open(path, "wb") as f:
            f.write(case.data)
        paths[case.name] = path
    return paths


if __name__ == "__main__":
    written = write_all(sys.argv[1] if len(sys.argv) > 1 else "hostile-gguf")
    print(f"{len(written)} files")
