"""The attention lab: does a rewrite of self-attention keep the model's answer?

Run the model on real text once with the reference attention and once with
each rewrite, then compare layer by layer:

    $ fastattn verify --text "The tower is 324 metres tall..."     # default model
    $ fastattn verify -m model.gguf --text essay.txt --variant online_softmax:block=1 \\
          --variant mypkg.myattn:attention --json out.json --plot layers.png

    >>> from fastattn import lab
    >>> report = lab.Lab.from_file("model.gguf").run(ids, ["online_softmax:block=16"])
    >>> print(report.table())

What is compared
----------------
The baseline is fastattn.reference.forward (float32 numpy, full recomputation,
causal mask).  For each variant the lab records, per layer, the residual
stream after the block, h [n_seq, n_embd], and reports

    max abs    max |h_var - h_ref| over the layer
    max rel    max over positions p of  max_j |h_var[p,j] - h_ref[p,j]|
                                        / max_j |h_ref[p,j]|
               (a max-norm relative difference per position: positions differ
               in scale by orders of magnitude, the first token especially)

and for the logits [n_seq, n_vocab]: the max abs difference, the mean and max
over positions of KL(p_ref || p_var) with p = softmax(logits) (log-softmax in
float64), and how many positions keep the same greedy (argmax) token.

The tolerance for "exact", and why
----------------------------------
A rewrite that is the same mathematics as the reference only changes the
order and grouping of float32 operations.  Both results are then float32
roundings of the same exact value v, so

    |h_var - h_ref| <= |h_var - v| + |h_ref - v|,

and the variant's rounding error is of the same kind and size as the
reference's.  The lab measures the reference's own error |h_ref - v| with a
shadow run of the same weights and the same computation in float64 (whose own
rounding, ~1e-16, is negligible), per layer and with the same max-rel measure:
err[l].  Errors grow with depth (rounding in layer 3 is carried and amplified
by layers 4..), and the shadow run carries its growth with it, which no fixed
formula like eps * sqrt(n_embd) * n_layer can do for a given model.  Then

    tol[l] = K * max(max(err[0..l]), eps32),   eps32 = 2^-23,  K = 16 (--tol)

K = 16 is 2 x 4 x 2: two rounding errors are summed; a correct rewrite may
round up to a few times worse than the reference (kv_cache_decode's one-row
products do: its own error against float64 reached 3.5x the reference's at
one layer of SmolLM2, because a one-row product sums in a different order
from a full one); and a maximum over thousands of values spreads.  Measured
on SmolLM2-135M over six texts (the built-in paragraph, prose, code, a chat,
a list of numbers, one word repeated), the correct rewrites stayed 4.7x to
37x below the line at every layer, closest kv_cache_decode.  The broken-on-
purpose ones, on the built-in paragraph, were 10^4 to 3*10^5 times above it
at layer 0.  The logits get the same rule on their max abs difference.

Known shortcomings of the rule: K is an engineering margin, not a proof.  A
correct rewrite that rounds much worse than the reference (sums in float16,
say) lands in "approx" although it is the same mathematics; a wrong rewrite
whose effect stays below float32 rounding on the given text (one that goes
wrong only past some length, or for larger scores than the text produces) is
"exact" on that text, which is true of that text and no more.  The shadow run uses the same dequantized weights
and the same float32 RoPE tables as the reference: it measures the rounding
of the computation, not the quantization of the weights.

Verdicts
--------
    exact      every layer within tol[l] and the logits within their tolerance
    approx     not exact, but the greedy token agrees at every position and the
               max KL is at most --kl-tol (default 1e-3 nats)
    different  anything else; the report names the first layer over tol[l]
    failed     the variant produced inf or nan (the report names the first
               layer, and whether the attention output or the block output
               went bad first), or raised (the message and the layer)

Variants
--------
Built in (lab.BUILTINS; `fastattn verify --list-variants`):

    reference           the lab's own layer loop with reference.attention_softmax
                        (the control: must match reference.forward bit for bit)
    kv_cache_decode     token by token over a growing KV cache: query i against
                        keys/values 0..i only, the whole model one row at a time
    online_softmax      flash-attention style streaming over key blocks
                        (online_softmax:block=N, default 16)
    no_max_subtraction  softmax without subtracting the max (overflows: fragile)
    scale_in_query      1/sqrt(head_dim) folded into the query weights and bias
    heads_serial        a loop over heads, heads-first layout (per-layer hook)
    heads_parallel      all heads in one batched product (per-layer hook)
    heads_threads       heads shared out to a thread pool (per-layer hook)
    float64             each head computed in float64
    engine              fastattn's compiled path, model.Transformer prefill of
                        the first half + decode of the rest; LOGITS ONLY (the
                        engine does not expose its hidden states)
    wrong_*             broken on purpose, for the tests: wrong_mask_shifted,
                        wrong_scale_missing, wrong_kv_heads_swapped,
                        wrong_softmax_axis

Timings (ms/token) are the wall time of the whole run over the number of
tokens: numpy for every variant but the engine, so they compare rewrites
with each other, not with a fast implementation.  On a busy machine, BLAS
threads that spin while they wait make every numpy product many times
slower (a whole run on a 2-core machine at load 8: 320 s, against 23 s with
OPENBLAS_NUM_THREADS=1 and --threads 1); the numbers judged do not change.

Your own: a callable with the per-head signature of fastattn.lab_variants
(`attention(q, k, v, mask) -> out`, q [n_q, head_dim], k, v [n_k, head_dim],
mask [n_q, n_k] additive, out [n_q, head_dim]; it scales the scores itself),
or its dotted path "package.module:function" (or "path/to/file.py:function").
A callable that takes a keyword argument `layer` is told the layer index.
Its output is cast to q's dtype, so the rest of the model stays float32.
Known shortcoming: the command line takes per-head rewrites only; a rewrite
of a whole layer (all heads at once, as heads_parallel) is passed from Python
as Variant(name, "layer", fn) with the per-layer shapes of lab_variants.
"""
import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import sys
import time
from typing import Callable, Optional

import numpy as np

from . import lab_variants, reference
from .errors import ContextOverflowError, FastAttnError, TokenizerError

EPS32 = float(np.finfo(np.float32).eps)      # 2^-23
DEFAULT_TOL = 16.0                           # K in tol[l] = K * max(err[0..l], eps32)
DEFAULT_KL_TOL = 1e-3                        # nats, max over positions, for "approx"
DEFAULT_MAX_TOKENS = 64

DEFAULT_TEXT = (
    "The Eiffel Tower was built for the 1889 World's Fair in Paris. At first many "
    "artists called it an eyesore, but within a few years it had become the symbol "
    "of the city. It is 330 metres tall, and on a hot day the iron expands so much "
    "that the top moves away from the sun by several centimetres."
)


class LabError(FastAttnError, ValueError):
    """The lab cannot judge: a bad tolerance, a reference that is itself not
    finite on the input, a plot without matplotlib."""


class VariantError(LabError):
    """A variant name, path or parameter the lab cannot use."""


# ===================================================================== layer loop
#
# The lab's own copy of reference.forward's skeleton, built from reference's
# step functions, with two things the reference hook cannot do: an attention
# hook that sees a whole layer (all heads) and its index, and decoding one
# token at a time over a KV cache.  It works in the dtype of its inputs, which
# is how the float64 shadow run is made.  With reference.attention_softmax it
# reproduces reference.forward bit for bit (tests/test_lab.py checks).


def rope_at(x, positions, theta, neox):
    """reference.rope for explicit positions (a decode step is not at 0).

    x [n_seq, n_head, head_dim], positions [n_seq] -> same shape as x.
    The angles are computed exactly as reference.rope computes them, so
    rope_at(x, arange(n_seq)) == reference.rope(x) bit for bit.

    Known shortcoming: this repeats reference.rope's arithmetic because
    reference.rope has no positions argument; if reference.rope changes, this
    copy must follow (tests/test_lab.py compares the two bit for bit, so it
    cannot drift silently).
    """
    head_dim = x.shape[-1]
    half = head_dim // 2

    freqs = float(theta) ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)
    angles = np.asarray(positions, dtype=np.float64)[:, None] * freqs   # [n_seq, half]
    cos = np.cos(angles).astype(np.float32)[:, None, :]           # [n_seq, 1, half]
    sin = np.sin(angles).astype(np.float32)[:, None, :]

    if neox:
        a, b = x[..., :half], x[..., half:]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    ra = a * cos - b * sin
    rb = a * sin + b * cos
    if neox:
        return np.concatenate([ra, rb], axis=-1)
    out = np.empty_like(ra, shape=x.shape)
    out[..., 0::2] = ra
    out[..., 1::2] = rb
    return out


def embed(config, w, ids, positions):
    """ids [n_seq], positions [n_seq] -> x [n_seq, n_embd]."""
    x = w["token_embd.weight"][ids]                               # [n_seq, n_embd]
    if config.family == "gpt2":
        x = x + w["position_embd.weight"][positions]
    return x


def attention_inputs(config, w, i, x, positions=None):
    """Block i's queries, keys and values, after RoPE for llama.

    x [n_seq, n_embd] -> q [n_seq, n_head*head_dim], k, v [n_seq, n_kv_head*head_dim].
    positions None means 0..n_seq-1 (reference.rope itself is used then).
    """
    p = f"blk.{i}."
    n_seq = x.shape[0]
    if config.family == "gpt2":
        n_embd = config.n_embd
        h = reference.layer_norm(x, w[p + "attn_norm.weight"], w[p + "attn_norm.bias"],
                                 config.norm_eps)
        qkv = reference.linear(h, w[p + "attn_qkv.weight"],
                               w[p + "attn_qkv.bias"])          # -> [n_seq, 3*n_embd]
        return qkv[:, :n_embd], qkv[:, n_embd:2 * n_embd], qkv[:, 2 * n_embd:]

    h = reference.rms_norm(x, w[p + "attn_norm.weight"], config.norm_eps)
    q = reference.linear(h, w[p + "attn_q.weight"], w.get(p + "attn_q.bias"))
    k = reference.linear(h, w[p + "attn_k.weight"], w.get(p + "attn_k.bias"))
    v = reference.linear(h, w[p + "attn_v.weight"], w.get(p + "attn_v.bias"))
    q = q.reshape(n_seq, config.n_head, config.head_dim)    # [n_seq, n_head, head_dim]
    k = k.reshape(n_seq, config.n_kv_head, config.head_dim)
    if positions is None:
        q = reference.rope(q, config.rope_theta, config.rope_neox)
        k = reference.rope(k, config.rope_theta, config.rope_neox)
    else:
        q = rope_at(q, positions, config.rope_theta, config.rope_neox)
        k = rope_at(k, positions, config.rope_theta, config.rope_neox)
    return q.reshape(n_seq, -1), k.reshape(n_seq, -1), v


def block_output(config, w, i, x, a):
    """x + attention projection, then the MLP: x [n_seq, n_embd] and the
    heads' output a [n_seq, n_head*head_dim] -> [n_seq, n_embd]."""
    p = f"blk.{i}."
    if config.family == "gpt2":
        x = x + reference.linear(a, w[p + "attn_output.weight"],
                                 w[p + "attn_output.bias"])
        h = reference.layer_norm(x, w[p + "ffn_norm.weight"], w[p + "ffn_norm.bias"],
                                 config.norm_eps)
        h = reference.gelu(reference.linear(h, w[p + "ffn_up.weight"],
                                            w[p + "ffn_up.bias"]))   # -> [n_seq, n_ff]
        return x + reference.linear(h, w[p + "ffn_down.weight"], w[p + "ffn_down.bias"])

    x = x + reference.linear(a, w[p + "attn_output.weight"],
                             w.get(p + "attn_output.bias"))
    h = reference.rms_norm(x, w[p + "ffn_norm.weight"], config.norm_eps)
    gate = reference.linear(h, w[p + "ffn_gate.weight"], w.get(p + "ffn_gate.bias"))
    up = reference.linear(h, w[p + "ffn_up.weight"], w.get(p + "ffn_up.bias"))
    return x + reference.linear(reference.silu(gate) * up, w[p + "ffn_down.weight"],
                                w.get(p + "ffn_down.bias"))       # -> [n_seq, n_embd]


def output_logits(config, w, x):
    """Final norm and output head: [n_seq, n_embd] -> [n_seq, n_vocab]."""
    if config.family == "gpt2":
        x = reference.layer_norm(x, w["output_norm.weight"], w["output_norm.bias"],
                                 config.norm_eps)
    else:
        x = reference.rms_norm(x, w["output_norm.weight"], config.norm_eps)
    return reference.linear(x, w.get("output.weight", w["token_embd.weight"]))


@dataclasses.dataclass
class Trace:
    """What one run of the model gave.

    hidden     n_layer arrays [n_seq, n_embd] (None when not observable: engine)
    logits     [n_seq, n_vocab]
    nonfinite  (layer, "attention output" | "block output" | "logits") where
               inf/nan first appeared, or None
    error      "ExcType: message (layer L)" if the variant raised, else None
    """
    hidden: Optional[list]
    logits: Optional[np.ndarray]
    seconds: float = 0.0
    nonfinite: Optional[tuple] = None
    error: Optional[str] = None


class _Raised(Exception):
    """A variant's callable raised inside layer `layer`."""

    def __init__(self, layer, exc):
        super().__init__(f"{type(exc).__name__}: {exc} (layer {layer})")


def _first_nonfinite(found, layer, where, array):
    """The earlier of `found` and (layer, where) if `array` holds inf or nan."""
    if np.isfinite(array).all():
        return found
    if found is None or layer < found[0]:
        return (layer, where)
    return found


def forward_layers(config, w, ids, attend):
    """The whole sequence at once, attention replaced by `attend`.

    attend(q, k, v, layer) -> a: q [n_seq, n_head*head_dim], k, v
    [n_seq, n_kv_head*head_dim] -> a [n_seq, n_head*head_dim].
    Returns a Trace (seconds left 0).
    """
    ids = np.asarray(ids, dtype=np.int64)
    n_seq = len(ids)
    nonfinite = None

    x = embed(config, w, ids, np.arange(n_seq))                   # [n_seq, n_embd]
    hidden = []
    for i in range(config.n_layer):
        q, k, v = attention_inputs(config, w, i, x)
        try:
            a = attend(q, k, v, i)                        # [n_seq, n_head*head_dim]
        except Exception as exc:
            raise _Raised(i, exc) from exc
        nonfinite = _first_nonfinite(nonfinite, i, "attention output", a)
        x = block_output(config, w, i, x, a)
        nonfinite = _first_nonfinite(nonfinite, i, "block output", x)
        hidden.append(x)

    logits = output_logits(config, w, x)                          # [n_seq, n_vocab]
    nonfinite = _first_nonfinite(nonfinite, config.n_layer, "logits", logits)
    return Trace(hidden, logits, nonfinite=nonfinite)


def forward_decode(config, w, ids, attend_one=lab_variants.decode_attention):
    """Token by token over a growing KV cache, as a generation loop runs:
    token t goes through every layer alone, its keys and values are appended
    to the cache, and its queries read cache rows 0..t.

    Cache per layer [n_kv_head, n_seq, head_dim].  Returns a Trace whose
    hidden[l][t] is token t's row after block l.
    """
    ids = np.asarray(ids, dtype=np.int64)
    n_seq = len(ids)
    n_head, n_kv_head, head_dim = config.n_head, config.n_kv_head, config.head_dim
    dtype = w["token_embd.weight"].dtype
    k_cache = np.zeros((config.n_layer, n_kv_head, n_seq, head_dim), dtype=dtype)
    v_cache = np.zeros_like(k_cache)
    hidden = [np.empty((n_seq, config.n_embd), dtype=dtype)
              for _ in range(config.n_layer)]
    logits = None
    nonfinite = None

    for t in range(n_seq):
        position = np.array([t])
        x = embed(config, w, ids[t:t + 1], position)              # [1, n_embd]
        for i in range(config.n_layer):
            q, k, v = attention_inputs(config, w, i, x, position)
            k_cache[i, :, t] = k.reshape(n_kv_head, head_dim)
            v_cache[i, :, t] = v.reshape(n_kv_head, head_dim)
            try:
                a = attend_one(q.reshape(n_head, head_dim), k_cache[i], v_cache[i],
                               t + 1)                             # [n_head, head_dim]
            except Exception as exc:
                raise _Raised(i, exc) from exc
            a = a.reshape(1, n_head * head_dim)
            nonfinite = _first_nonfinite(nonfinite, i, "attention output", a)
            x = block_output(config, w, i, x, a)
            nonfinite = _first_nonfinite(nonfinite, i, "block output", x)
            hidden[i][t] = x[0]
        row = output_logits(config, w, x)                         # [1, n_vocab]
        if logits is None:
            logits = np.empty((n_seq, row.shape[1]), dtype=row.dtype)
        logits[t] = row[0]

    nonfinite = _first_nonfinite(nonfinite, config.n_layer, "logits", logits)
    return Trace(hidden, logits, nonfinite=nonfinite)


def per_head(config, fn, check_shape=True):
    """A per-head callable -> the layer hook forward_layers takes.

    Heads are split and called exactly as reference.multi_head_attention
    does (it is that function that runs them).  If fn takes a keyword
    `layer`, it is passed the layer index.
    """
    takes_layer = _accepts_keyword(fn, "layer")

    def attend(q, k, v, layer):
        f = functools.partial(fn, layer=layer) if takes_layer else fn
        if check_shape:
            f = _shape_checked(f)
        return reference.multi_head_attention(q, k, v, config.n_head,
                                              config.n_kv_head, f)

    return attend


def per_layer(config, fn):
    """A per-layer callable on [n_seq, n_head, head_dim] arrays -> the layer
    hook forward_layers takes."""
    def attend(q, k, v, layer):
        n_seq = q.shape[0]
        q3 = q.reshape(n_seq, config.n_head, config.head_dim)
        k3 = k.reshape(n_seq, config.n_kv_head, config.head_dim)
        v3 = v.reshape(n_seq, config.n_kv_head, config.head_dim)
        out = fn(q3, k3, v3, reference.causal_mask(n_seq))  # [n_seq, n_head, head_dim]
        if out.shape != q3.shape:
            raise VariantError(f"returned shape {out.shape}, expected {q3.shape}")
        return out.astype(q.dtype, copy=False).reshape(n_seq, -1)

    return attend


def _shape_checked(fn):
    """fn, with its output checked for shape and cast to q's dtype (a head
    that returns float64 must not turn the rest of the model into float64)."""
    def checked(q, k, v, mask):
        out = np.asarray(fn(q, k, v, mask))
        if out.shape != q.shape:
            raise VariantError(f"returned shape {out.shape} for q of shape {q.shape}; "
                               f"a per-head attention must return [n_q, head_dim]")
        return out.astype(q.dtype, copy=False)
    return checked


def _accepts_keyword(fn, name):
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               or p.kind == p.VAR_KEYWORD for p in params)


class _AsFloat64(dict):
    """Read-only view of a float32 weight dict that hands out float64 copies
    (made on each access, so the float64 model is never all in memory)."""

    def __init__(self, w):
        super().__init__()
        self._w = w

    def __getitem__(self, name):
        return self._w[name].astype(np.float64)

    def get(self, name, default=None):
        return self[name] if name in self._w else default

    def __contains__(self, name):
        return name in self._w


# ====================================================================== variants


@dataclasses.dataclass
class Variant:
    """One way of computing attention.

    kind: "head"     fn is per head (lab_variants docstring), run in forward_layers
          "layer"    fn is per layer, all heads at once
          "decode"   forward_decode with fn as the one-step attention
          "weights"  prepare(config, w) -> w', then fn per head (scale_in_query)
          "engine"   the compiled model.Transformer; logits only
    """
    name: str
    kind: str
    fn: Optional[Callable] = None
    description: str = ""
    broken: bool = False               # wrong on purpose, to test the lab
    prepare: Optional[Callable] = None


def fold_scale_into_query(config, w):
    """Weights with 1/sqrt(head_dim) multiplied into the query projection
    (rows of attn_q, or the first n_embd rows of gpt2's attn_qkv) and its
    bias.  For head_dim 64 the scale is 1/8, a power of two, and the fold is
    exact to the bit; for other head dims it rounds once per weight."""
    scale = np.float32(1.0) / np.sqrt(np.float32(config.head_dim))
    w = dict(w)
    for i in range(config.n_layer):
        p = f"blk.{i}."
        if config.family == "gpt2":
            for name in (p + "attn_qkv.weight", p + "attn_qkv.bias"):
                t = w[name].copy()
                t[:config.n_embd] *= scale
                w[name] = t
        else:
            for name in (p + "attn_q.weight", p + "attn_q.bias"):
                if name in w:
                    w[name] = w[name] * scale
    return w


def _builtin_table():
    v = lab_variants
    return {
        "reference": (lambda: Variant(
            "reference", "head", reference.attention_softmax,
            "the lab's layer loop with reference.attention_softmax (control)"), {}),
        "kv_cache_decode": (lambda: Variant(
            "kv_cache_decode", "decode", v.decode_attention,
            "one token at a time, query t against cached keys/values 0..t"), {}),
        "online_softmax": (lambda block=16: Variant(
            f"online_softmax:block={block}", "head",
            functools.partial(v.online_softmax, block=block),
            f"streaming softmax over blocks of {block} keys (running max and sum)"),
            {"block": int}),
        "no_max_subtraction": (lambda: Variant(
            "no_max_subtraction", "head", v.no_max_subtraction,
            "exp(s) / sum exp(s) without subtracting the max (overflows)"), {}),
        "scale_in_query": (lambda: Variant(
            "scale_in_query", "weights", v.unscaled_attention,
            "1/sqrt(head_dim) folded into the query weights and bias",
            prepare=fold_scale_into_query), {}),
        "heads_serial": (lambda: Variant(
            "heads_serial", "layer", v.heads_serial,
            "a Python loop over heads, heads-first layout"), {}),
        "heads_parallel": (lambda: Variant(
            "heads_parallel", "layer", v.heads_parallel,
            "all heads in one batched matmul, GQA by broadcasting"), {}),
        "heads_threads": (lambda threads=0: Variant(
            "heads_threads" + (f":threads={threads}" if threads else ""), "layer",
            functools.partial(v.heads_threads, n_threads=threads or None),
            "heads shared out to a thread pool"), {"threads": int}),
        "float64": (lambda: Variant(
            "float64", "head", v.float64_attention,
            "each head in float64, rounded to float32 at the end"), {}),
        "engine": (lambda: Variant(
            "engine", "engine", None,
            "compiled model.Transformer, prefill + decode; logits only"), {}),
        "wrong_mask_shifted": (lambda: Variant(
            "wrong_mask_shifted", "head", v.wrong_mask_shifted,
            "BROKEN ON PURPOSE: causal mask shifted, query i sees token i+1",
            broken=True), {}),
        "wrong_scale_missing": (lambda: Variant(
            "wrong_scale_missing", "head", v.wrong_scale_missing,
            "BROKEN ON PURPOSE: no 1/sqrt(head_dim)", broken=True), {}),
        "wrong_kv_heads_swapped": (lambda: Variant(
            "wrong_kv_heads_swapped", "layer", v.wrong_kv_heads_swapped,
            "BROKEN ON PURPOSE: KV heads 0 and 1 swapped", broken=True), {}),
        "wrong_softmax_axis": (lambda: Variant(
            "wrong_softmax_axis", "head", v.wrong_softmax_axis,
            "BROKEN ON PURPOSE: softmax over queries, not keys", broken=True), {}),
    }


BUILTINS = _builtin_table()

# What `fastattn verify` runs when no --variant is given: every rewrite meant
# to be exact (no_max_subtraction included: when it overflows, that is news).
DEFAULT_VARIANTS = (
    "reference", "kv_cache_decode", "online_softmax:block=1", "online_softmax:block=16",
    "online_softmax:block=64", "no_max_subtraction", "scale_in_query", "heads_serial",
    "heads_parallel", "heads_threads", "float64", "engine",
)
BROKEN_VARIANTS = tuple(name for name in BUILTINS if name.startswith("wrong_"))


def resolve_variant(spec) -> Variant:
    """A Variant from a built-in name ("online_softmax:block=16"), a dotted
    path ("pkg.module:function", "path/file.py:function"), a callable (per
    head) or a Variant.  Raises VariantError with the reason otherwise."""
    if isinstance(spec, Variant):
        return spec
    if callable(spec):
        name = getattr(spec, "__qualname__", None) or getattr(spec, "__name__", None) \
            or type(spec).__name__
        module = getattr(spec, "__module__", None)
        label = f"{module}:{name}" if module and module != "__main__" else str(name)
        return Variant(label, "head", spec, "user attention (callable)")
    if not isinstance(spec, str) or not spec.strip():
        raise VariantError(f"variant {spec!r}: expected a name, a 'module:function' "
                           f"path or a callable")
    spec = spec.strip()

    base, _, params = spec.partition(":")
    if base in BUILTINS:
        return _builtin(base, params, spec)
    if ":" in spec or "." in spec:
        return Variant(spec, "head", load_callable(spec), f"user attention ({spec})")
    raise VariantError(f"variant {spec!r} is not a built-in (available: "
                       f"{', '.join(BUILTINS)}) nor a 'package.module:function' path")


def _builtin(base, params, spec):
    make, allowed = BUILTINS[base]
    kwargs = {}
    for item in filter(None, (s.strip() for s in params.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key not in allowed:
            takes = ", ".join(f"{k}=<{t.__name__}>" for k, t in allowed.items())
            raise VariantError(f"variant {spec!r}: {base} takes "
                               f"{takes or 'no parameters'}, got {item!r}")
        try:
            kwargs[key] = allowed[key](value)
        except ValueError:
            raise VariantError(f"variant {spec!r}: {key} must be an "
                               f"{allowed[key].__name__}, got {value!r}") from None
    if kwargs.get("block", 1) < 1:
        raise VariantError(f"variant {spec!r}: block must be >= 1")
    if kwargs.get("threads", 0) < 0:
        raise VariantError(f"variant {spec!r}: threads must be >= 0")
    return make(**kwargs)


def load_callable(path):
    """"package.module:function", "package.module.function" or
    "dir/file.py:function" -> the callable.  Raises VariantError naming what
    was not found."""
    if ":" in path:
        module_name, _, attr = path.rpartition(":")
    else:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise VariantError(f"variant {path!r}: expected 'package.module:function'")

    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise VariantError(f"variant {path!r}: no such file {module_name!r}")
        spec = importlib.util.spec_from_file_location(
            "fastattn_lab_user_" + os.path.basename(module_name)[:-3], module_name)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise VariantError(f"variant {path!r}: {module_name} failed to run: "
                               f"{type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:      # ImportError, or whatever the module raised
            raise VariantError(f"variant {path!r}: cannot import module "
                               f"{module_name!r} ({type(exc).__name__}: {exc})") from exc

    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise VariantError(f"variant {path!r}: module {module_name!r} has no "
                               f"attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise VariantError(f"variant {path!r}: {attr!r} is a {type(obj).__name__}, "
                           f"not a callable attention(q, k, v, mask)")
    return obj


def list_variants() -> list:
    """(name, description, broken) of every built-in."""
    return [(name, make().description, make().broken)
            for name, (make, _) in BUILTINS.items()]


# ================================================================== comparison


@dataclasses.dataclass
class VariantResult:
    """The numbers for one variant against the reference.

    Per layer lists are None where not observable (engine) or not computed.
    """
    name: str
    kind: str
    description: str
    broken: bool
    verdict: str                       # exact | approx | different | failed
    reason: str
    compared_on: str                   # "hidden states + logits" | "logits only"
    first_departing_layer: Optional[int]
    layer_max_abs: Optional[list]
    layer_max_rel: Optional[list]
    logit_max_abs: Optional[float]
    kl_mean: Optional[float]
    kl_max: Optional[float]
    greedy_agree: Optional[int]
    n_positions: int
    seconds_per_token: float
    nonfinite: Optional[dict] = None
    error: Optional[str] = None

    @property
    def greedy_fraction(self):
        if self.greedy_agree is None or not self.n_positions:
            return None
        return self.greedy_agree / self.n_positions

    @property
    def max_rel(self):
        if not self.layer_max_rel:
            return None
        return max(self.layer_max_rel)


def _layer_diff(h_var, h_ref):
    """(max abs, max rel) for one layer, rel as in the module docstring."""
    h_ref = h_ref.astype(np.float64)
    diff = np.abs(h_var.astype(np.float64) - h_ref)               # [n_seq, n_embd]
    scale = np.abs(h_ref).max(axis=1)                             # [n_seq]
    rel = diff.max(axis=1) / np.maximum(scale, np.finfo(np.float64).tiny)
    return float(diff.max()), float(rel.max())


def _log_softmax(logits):
    """[n_seq, n_vocab] -> log softmax in float64, stable."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def kl_divergence(logits_ref, logits_var):
    """KL(p_ref || p_var) per position, [n_seq]; p = softmax(logits)."""
    lp = _log_softmax(logits_ref)
    lq = _log_softmax(logits_var)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=1)
    return np.maximum(kl, 0.0)       # rounding can leave -1e-17 where p == q


@dataclasses.dataclass
class Tolerance:
    """tol[l] for the hidden states and the logits' abs tolerance, with the
    measured float32 error of the reference they came from."""
    k: float
    kl_tol: float
    ref_error: list                    # err[l], the reference vs its float64 shadow
    layers: list                       # tol[l]
    ref_logit_error: float
    logits: float

    @classmethod
    def measure(cls, base, shadow, k=DEFAULT_TOL, kl_tol=DEFAULT_KL_TOL):
        errors = [_layer_diff(h, h64)[1] for h, h64 in zip(base.hidden, shadow.hidden)]
        layers, running = [], 0.0
        for err in errors:
            running = max(running, err)
            layers.append(k * max(running, EPS32))
        logit_err = float(np.abs(base.logits.astype(np.float64) - shadow.logits).max())
        logit_floor = EPS32 * float(np.abs(base.logits).max())
        return cls(k, kl_tol, errors, layers, logit_err,
                   k * max(logit_err, logit_floor))

    def describe(self) -> list:
        """The rule in words, as lines."""
        return [f"exact  if per layer max rel |dh| <= {self.k:g} x the float32 "
                f"reference's own error there",
                f"       (measured against float64; at least {self.k:g} x eps32 = "
                f"{self.k * EPS32:.1e}), and max |dlogit| <= {self.logits:.2e}",
                f"approx if the greedy token agrees everywhere and max KL <= "
                f"{self.kl_tol:g} nats"]


def compare(variant, trace, base, tol, n_tokens) -> VariantResult:
    """Judge one trace against the baseline trace."""
    n_seq = base.logits.shape[0]
    result = VariantResult(
        name=variant.name, kind=variant.kind, description=variant.description,
        broken=variant.broken, verdict="", reason="",
        compared_on="logits only" if trace.hidden is None else "hidden states + logits",
        first_departing_layer=None, layer_max_abs=None, layer_max_rel=None,
        logit_max_abs=None, kl_mean=None, kl_max=None, greedy_agree=None,
        n_positions=n_seq, seconds_per_token=trace.seconds / max(n_tokens, 1),
        error=trace.error)
    if trace.error is not None:
        result.verdict = "failed"
        result.reason = "raised " + trace.error
        return result

    # per layer, up to (not past) the first layer that went non-finite
    bad_layer = trace.nonfinite[0] if trace.nonfinite else None
    if trace.hidden is not None:
        result.layer_max_abs, result.layer_max_rel = [], []
        for l, (h, h_ref) in enumerate(zip(trace.hidden, base.hidden)):
            if bad_layer is not None and l >= bad_layer:
                break
            max_abs, max_rel = _layer_diff(h, h_ref)
            result.layer_max_abs.append(max_abs)
            result.layer_max_rel.append(max_rel)
            if result.first_departing_layer is None and max_rel > tol.layers[l]:
                result.first_departing_layer = l

    if trace.nonfinite is not None:
        layer, where = trace.nonfinite
        result.nonfinite = {"layer": layer, "where": where}
        result.verdict = "failed"
        at = "the logits" if where == "logits" else f"layer {layer} ({where})"
        result.reason = f"inf/nan first in {at}"
        if result.first_departing_layer is not None:
            result.reason += (f", after departing from the reference at layer "
                              f"{result.first_departing_layer}")
        return result

    # the logits
    logits = trace.logits
    result.logit_max_abs = float(np.abs(logits.astype(np.float64) - base.logits).max())
    kl = kl_divergence(base.logits, logits)
    result.kl_mean, result.kl_max = float(kl.mean()), float(kl.max())
    same = logits.argmax(axis=1) == base.logits.argmax(axis=1)
    result.greedy_agree = int(same.sum())

    # the verdict
    logits_ok = result.logit_max_abs <= tol.logits
    if result.first_departing_layer is None and logits_ok:
        result.verdict = "exact"
        if result.max_rel == 0 and result.logit_max_abs == 0:
            result.reason = "bit-identical to the reference"
        else:
            result.reason = "within float32 rounding at every layer and in the logits"
        return result

    where = (f"departs at layer {result.first_departing_layer}"
             if result.first_departing_layer is not None
             else f"logits differ by {result.logit_max_abs:.2e} > {tol.logits:.2e}")
    if result.greedy_agree == n_seq and result.kl_max <= tol.kl_tol:
        result.verdict = "approx"
        result.reason = (f"{where}; same greedy token at all {n_seq} positions, "
                         f"max KL {result.kl_max:.1e}")
    else:
        result.verdict = "different"
        result.reason = (f"{where}; greedy agrees at {result.greedy_agree}/{n_seq}, "
                         f"max KL {result.kl_max:.1e}")
    return result


# ========================================================================= the lab


class Lab:
    """A model held in float32 (dequantized once), ready to run variants.

    config, weights: a ModelConfig and {name: WeightTensor or array}.
    loaded: the LoadedModel they came from (its tokenizer, for the CLI).
    engine_threads: threads for the engine variant (default: model.Transformer's,
    the machine's cores); its numbers do not depend on it, its speed does.
    """

    def __init__(self, config, weights, loaded=None, source="", engine_threads=None):
        self.config = config.validate()
        self.engine_threads = engine_threads
        self.weights = weights                      # storage form, for the engine
        self.w = reference.dequantize_weights(weights)
        self.loaded = loaded
        self.source = source or getattr(config, "source", "")
        self._engine = None

    @classmethod
    def from_file(cls, path, engine_threads=None) -> "Lab":
        from .loaders import load_model_files
        loaded = load_model_files(path)
        return cls(loaded.config, loaded.weights, loaded=loaded, source=str(path),
                   engine_threads=engine_threads)

    # ---------------------------------------------------------------- running

    def check_ids(self, ids):
        """ids as int64 [n_seq], after the checks that name the culprit."""
        array = np.asarray(ids)
        if array.size == 0:
            raise TokenizerError("the lab needs at least one token; the text gave none")
        if array.dtype == object and all(isinstance(i, int) and not isinstance(i, bool)
                                         for i in array.reshape(-1)):
            # Python ints too large for any numpy integer type
            big = next(int(i) for i in array.reshape(-1)
                       if not 0 <= i < self.config.n_vocab)
            raise TokenizerError(f"token id {big} is outside the vocabulary "
                                 f"[0, {self.config.n_vocab})")
        if array.dtype.kind not in "iu":
            raise TokenizerError(f"token ids must be integers, got {array.dtype} values")
        if array.ndim != 1:
            raise TokenizerError(f"token ids must be a flat sequence, got shape "
                                 f"{array.shape}")
        bad = array[(array < 0) | (array >= self.config.n_vocab)]
        if bad.size:
            raise TokenizerError(f"token id {int(bad[0])} is outside the vocabulary "
                                 f"[0, {self.config.n_vocab})")
        ids = array.astype(np.int64)
        if ids.size > self.config.n_ctx:
            raise ContextOverflowError(f"{ids.size} tokens is more than the context "
                                       f"(n_ctx) of {self.config.n_ctx}")
        return ids

    def baseline(self, ids):
        """reference.forward itself, timed."""
        start = time.perf_counter()
        logits, hidden = reference.forward(self.config, self.w, ids, return_hidden=True)
        return Trace(hidden, logits, seconds=time.perf_counter() - start)

    def shadow(self, ids):
        """The reference computation in float64 from the same weights, and
        the largest attention score q.k / sqrt(head_dim) of each layer
        (what decides whether a softmax without max subtraction overflows)."""
        peaks = [-np.inf] * self.config.n_layer

        def attention(q, k, v, mask, layer):
            s = q @ k.T / np.sqrt(np.float32(q.shape[-1])) + mask   # [n_q, n_k]
            peaks[layer] = max(peaks[layer], float(s.max()))
            return reference.attention_softmax(q, k, v, mask)

        attend = per_head(self.config, attention, check_shape=False)
        trace = forward_layers(self.config, _AsFloat64(self.w), ids, attend)
        return trace, peaks

    def trace(self, variant: Variant, ids) -> Trace:
        """Run the model with one variant; inf/nan and exceptions from the
        variant are recorded in the Trace, not raised."""
        config, w = self.config, self.w
        if variant.kind == "engine":
            try:
                self.engine()            # built before the clock starts
            except Exception as exc:
                return Trace(None, None, error=f"{type(exc).__name__}: {exc}")
        start = time.perf_counter()
        try:
            with np.errstate(all="ignore"):
                if variant.kind == "head":
                    trace = forward_layers(config, w, ids, per_head(config, variant.fn))
                elif variant.kind == "layer":
                    trace = forward_layers(config, w, ids,
                                           per_layer(config, variant.fn))
                elif variant.kind == "decode":
                    trace = forward_decode(config, w, ids, variant.fn)
                elif variant.kind == "weights":
                    trace = forward_layers(config, variant.prepare(config, w), ids,
                                           per_head(config, variant.fn))
                elif variant.kind == "engine":
                    trace = self._engine_trace(ids)
                else:
                    raise VariantError(f"variant {variant.name!r}: unknown kind "
                                       f"{variant.kind!r}")
        except _Raised as exc:
            trace = Trace(None, None, error=str(exc))
        trace.seconds = time.perf_counter() - start
        return trace

    def engine(self):
        """The compiled model.Transformer over the same weights, built once."""
        if self._engine is None:
            from .model import Transformer
            from .weights import F32, WeightTensor
            weights = {name: t if isinstance(t, WeightTensor)
                       else WeightTensor.from_float(t, F32, name)
                       for name, t in self.weights.items()}
            self._engine = Transformer(self.config, weights,
                                       n_threads=self.engine_threads)
        return self._engine

    def _engine_trace(self, ids):
        """model.Transformer: prefill of the first half of ids (all logits),
        then one decode per remaining token.

        Known shortcoming: the engine does not expose its hidden states, so it
        is judged on the logits alone and the report cannot say at which
        layer it departs; a departure shows only as a logit difference."""
        engine = self.engine()
        n_seq = len(ids)
        n_prefill = max(1, n_seq // 2)

        state = engine.new_state(n_ctx=n_seq)
        first = np.asarray(engine.prefill(state, [int(t) for t in ids[:n_prefill]],
                                          all_logits=True), dtype=np.float32)
        rows = [first.reshape(n_prefill, -1)]
        for t in ids[n_prefill:]:
            rows.append(np.asarray(engine.decode(state, int(t)),
                                   dtype=np.float32).reshape(1, -1))
        logits = np.concatenate(rows, axis=0)                     # [n_seq, n_vocab]
        nonfinite = _first_nonfinite(None, self.config.n_layer, "logits", logits)
        return Trace(None, logits, nonfinite=nonfinite)

    def run(self, ids, variants=None, tol=DEFAULT_TOL, kl_tol=DEFAULT_KL_TOL,
            progress=None) -> "Report":
        """Compare each variant with the reference on `ids`.

        variants: names, paths, callables or Variants (default
        DEFAULT_VARIANTS; the engine is skipped there if the compiled module
        is not built).  progress(result) is called as each one is judged.
        """
        ids = self.check_ids(ids)
        if variants is None:
            variants = default_variants()
        elif isinstance(variants, (str, Variant)) or callable(variants):
            variants = [variants]            # one variant, not a sequence of them
        variants = [resolve_variant(v) for v in variants]
        def real(x):
            return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
        if not (real(tol) and tol > 0):
            raise LabError(f"tol must be a finite number > 0, got {tol!r}")
        if not (real(kl_tol) and kl_tol >= 0):
            raise LabError(f"kl_tol must be a finite number >= 0, got {kl_tol!r}")

        with np.errstate(all="ignore"):
            base = self.baseline(ids)
            shadow, peaks = self.shadow(ids)
        for l, h in enumerate(base.hidden + [base.logits]):
            if not np.isfinite(h).all():
                where = "the logits" if l == len(base.hidden) else f"layer {l}"
                raise LabError(f"{self.source or 'the model'}: the reference itself "
                               f"gives inf/nan in {where} on this input; there is "
                               f"nothing to compare against")
        tolerance = Tolerance.measure(base, shadow, k=tol, kl_tol=kl_tol)

        results = []
        for variant in variants:
            trace = self.trace(variant, ids)
            result = compare(variant, trace, base, tolerance, len(ids))
            results.append(result)
            if progress:
                progress(result)
        engine_threads = self._engine.n_threads if self._engine is not None else None
        return Report(self.config, self.source, [int(t) for t in ids], tolerance,
                      base.seconds / len(ids), results, engine_threads, peaks)


def default_variants() -> list:
    """DEFAULT_VARIANTS, less the engine when the compiled module is not built."""
    try:
        from . import _engine  # noqa: F401
        have_engine = True
    except ImportError:
        have_engine = False
    return [v for v in DEFAULT_VARIANTS if v != "engine" or have_engine]


def verify(config, weights, ids, variants=None, **kwargs) -> "Report":
    """One-shot Lab(config, weights).run(ids, variants, ...)."""
    return Lab(config, weights).run(ids, variants, **kwargs)


# ======================================================================== report


def _fmt(x, spec=".1e"):
    if x is None:
        return "-"
    return format(x, spec)


@dataclasses.dataclass
class Report:
    config: object
    source: str
    ids: list
    tolerance: Tolerance
    reference_seconds_per_token: float
    results: list
    engine_threads: Optional[int] = None
    score_peaks: Optional[list] = None       # largest q.k/sqrt(head_dim) per layer

    def __getitem__(self, name) -> VariantResult:
        for r in self.results:
            if r.name == name:
                return r
        names = ", ".join(r.name for r in self.results)
        raise KeyError(f"no variant {name!r} in this report (it has: {names})")

    @property
    def ok(self) -> bool:
        """True if every variant not broken on purpose kept the answer."""
        return all(r.verdict in ("exact", "approx")
                   for r in self.results if not r.broken)

    def header(self) -> str:
        c = self.config
        t = self.tolerance
        worst = int(np.argmax(t.ref_error))
        lines = [
            f"model      = {self.source or c.name or '(in memory)'}",
            f"arch       = {c.family}, n_layer = {c.n_layer}, n_embd = {c.n_embd}, "
            f"n_head = {c.n_head}, n_kv_head = {c.n_kv_head}, head_dim = {c.head_dim}",
            f"tokens     = {len(self.ids)}",
        ]
        if self.engine_threads:
            lines.append(f"engine     = model.Transformer, "
                         f"n_threads = {self.engine_threads}")
        lines += [
            "tolerance  = " + "\n             ".join(t.describe()),
            f"ref error  = the float32 reference vs float64: max rel "
            f"{t.ref_error[worst]:.2e} (layer {worst}), logits {t.ref_logit_error:.2e}",
        ]
        if self.score_peaks:
            top = int(np.argmax(self.score_peaks))
            overflow = np.log(np.finfo(np.float32).max)            # 88.72
            lines.append(f"scores     = largest q.k/sqrt(head_dim) "
                         f"{self.score_peaks[top]:.1f} (layer {top}); float32 exp "
                         f"overflows above {overflow:.1f}")
        return "\n".join(lines)

    def table(self, per_layer=False) -> str:
        """The summary table (and, with per_layer, max rel |dh| by layer)."""
        cols = ("variant", "verdict", "departs", "max rel dh", "max dlogit", "KL mean",
                "KL max", "greedy", "ms/token")
        rows = [("reference.forward", "baseline", "-", "-", "-", "-", "-", "-",
                 f"{self.reference_seconds_per_token * 1e3:.2f}")]
        for r in self.results:
            greedy = ("-" if r.greedy_agree is None
                      else f"{r.greedy_agree}/{r.n_positions}")
            departs = r.first_departing_layer
            if r.verdict == "failed" and r.nonfinite:
                departs = f"nan@{r.nonfinite['layer']}"
            rows.append((
                r.name + (" (logits only)" if r.compared_on == "logits only" else "")
                + (" [broken]" if r.broken else ""),
                r.verdict, "-" if departs is None else str(departs), _fmt(r.max_rel),
                _fmt(r.logit_max_abs), _fmt(r.kl_mean), _fmt(r.kl_max), greedy,
                f"{r.seconds_per_token * 1e3:.2f}"))
        widths = [max(len(row[i]) for row in rows + [cols]) for i in range(len(cols))]
        fmt_row = lambda row: "  ".join(  # noqa: E731
            (cell.ljust(w) if i < 2 else cell.rjust(w)) for i, (cell, w)
            in enumerate(zip(row, widths)))
        out = [fmt_row(cols), "  ".join("-" * w for w in widths)]
        out += [fmt_row(row) for row in rows]

        notes = [f"{r.name}: {r.verdict}: {r.reason}" for r in self.results
                 if r.verdict in ("failed", "different", "approx")]
        if notes:
            out += [""] + notes
        if per_layer:
            out += ["", self.layer_table()]
        return "\n".join(out)

    def layer_table(self) -> str:
        """max rel |dh| per layer (rows) and variant (columns), with tol[l]."""
        shown = [r for r in self.results if r.layer_max_rel is not None]
        names = ["layer", "tol"] + [r.name for r in shown]
        rows = []
        for l in range(self.config.n_layer):
            row = [str(l), _fmt(self.tolerance.layers[l])]
            for r in shown:
                value = r.layer_max_rel[l] if l < len(r.layer_max_rel) else None
                mark = "*" if r.first_departing_layer == l else ""
                row.append(("nan" if value is None and r.verdict == "failed"
                            else _fmt(value)) + mark)
            rows.append(row)
        widths = [max(len(x[i]) for x in rows + [names]) for i in range(len(names))]
        lines = ["  ".join(n.rjust(w) for n, w in zip(names, widths))]
        lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
        return "max rel |dh| per layer (* = first layer over tol)\n" + "\n".join(lines)

    def to_dict(self) -> dict:
        c = self.config
        t = self.tolerance
        return _finite_or_none({
            "model": self.source,
            "config": {"family": c.family, "n_layer": c.n_layer, "n_embd": c.n_embd,
                       "n_head": c.n_head, "n_kv_head": c.n_kv_head,
                       "head_dim": c.head_dim, "n_vocab": c.n_vocab},
            "n_tokens": len(self.ids),
            "ids": self.ids,
            "tolerance": {"k": t.k, "kl_tol": t.kl_tol, "eps32": EPS32,
                          "reference_error_per_layer": t.ref_error,
                          "per_layer": t.layers,
                          "reference_logit_error": t.ref_logit_error,
                          "logits": t.logits, "rule": " ".join(t.describe())},
            "reference_seconds_per_token": self.reference_seconds_per_token,
            "engine_threads": self.engine_threads,
            "score_peak_per_layer": self.score_peaks,
            "variants": [dict(dataclasses.asdict(r), greedy_fraction=r.greedy_fraction)
                         for r in self.results],
        })

    def write_json(self, path):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    def plot(self, path):
        """Max rel |dh| per layer, one line per variant, log scale, with the
        tolerance dashed.  Needs matplotlib (raises LabError if absent); uses
        no pyplot state, so it does not touch the caller's figures or backend."""
        try:
            from matplotlib import colormaps
            from matplotlib.figure import Figure
        except ImportError:
            raise LabError("--plot needs matplotlib, which is not installed "
                           "(pip install matplotlib, or fastattn[plot])") from None
        floor = 1e-12      # a log axis has no 0: bit-identical layers sit here
        layers = np.arange(self.config.n_layer)
        fig = Figure(figsize=(11, 5.5))
        ax = fig.subplots()
        ax.plot(layers, self.tolerance.layers, "k--", lw=1.5, label="tolerance (exact)")
        ax.plot(layers, np.maximum(self.tolerance.ref_error, floor), "k:", lw=1,
                label="reference float32 error")
        tab20 = colormaps["tab20"].colors          # dark ones first, then light
        colors = list(tab20[0::2]) + list(tab20[1::2])
        for i, r in enumerate(x for x in self.results if x.layer_max_rel):
            values = np.maximum(np.asarray(r.layer_max_rel), floor)
            verdict = "bit-identical" if r.max_rel == 0 else r.verdict
            ax.plot(layers[:len(values)], values, color=colors[i % len(colors)],
                    ls="-." if r.broken else "-", marker="x" if r.broken else "o",
                    ms=3, label=f"{r.name} ({verdict})")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("max rel |h_variant - h_reference|  (0 drawn at 1e-12)")
        ax.set_title(f"{os.path.basename(self.source) or 'model'}: "
                     f"{len(self.ids)} tokens")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        ax.grid(True, which="major", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)


def _finite_or_none(obj):
    """JSON has no inf/nan: replace them with None, recursively."""
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


# ================================================================== command line


def _add_arguments(p):
    p.add_argument("-m", "--model", default=None,
                   help="GGUF file or Hugging Face folder "
                        "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=None,
                   help="the text to run: a file path, or the text itself "
                        "(default: a paragraph about the Eiffel Tower)")
    p.add_argument("--variant", action="append", default=None, metavar="NAME",
                   help="a built-in (name or name:key=value), 'package.module:function'"
                        " or 'file.py:function'; repeat for several.  'defaults' and "
                        "'broken' name the two built-in groups.  Default: the defaults")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help="threads of the engine variant (default: the machine's cores)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"use at most this many tokens of the text "
                        f"(default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL,
                   help=f"K in tol[layer] = K x the reference's float32 error "
                        f"(default {DEFAULT_TOL:g})")
    p.add_argument("--kl-tol", type=float, default=DEFAULT_KL_TOL,
                   help=f"max KL (nats) for 'approx' (default {DEFAULT_KL_TOL:g})")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write the report as JSON")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="plot the divergence per layer (needs matplotlib)")
    p.add_argument("--per-layer", action="store_true",
                   help="also print max rel |dh| per layer and variant")
    p.add_argument("--list-variants", action="store_true",
                   help="list the built-in variants and exit")
    return p


def add_verify_parser(subparsers):
    """Add `verify` to the fastattn command line's subparsers."""
    p = subparsers.add_parser(
        "verify", help="check which rewrites of attention keep the model's answer",
        description="Run the model on a text with the reference attention and with "
                    "each variant; compare hidden states layer by layer, logits, KL "
                    "and greedy tokens.  Exit status 0 if every variant not broken on "
                    "purpose is exact or approx, 1 if one is not, 2 on bad input.")
    _add_arguments(p)
    p.set_defaults(run=run_verify)          # cli.main calls args.run(args)
    return p


def _expand_variants(names):
    if not names:
        return None
    out = []
    for name in names:
        if name == "defaults":
            out += default_variants()
        elif name == "broken":
            out += list(BROKEN_VARIANTS)
        else:
            out.append(name)
    return out


def _read_text(text):
    """--text: a path to a text file, or else the text itself."""
    if text is None:
        return DEFAULT_TEXT, "(built-in paragraph)"
    if os.path.exists(text):
        from .files import read_text
        return read_text(text, 64 << 20, error=LabError, pipes=True), text
    return text, "(command line)"


def _check_outputs(args):
    """--json and --plot, checked before the run rather than after it."""
    from .model import MAX_THREADS
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise LabError(f"--threads must be in [1, {MAX_THREADS}], got {args.threads}")
    if not (math.isfinite(args.tol) and args.tol > 0):
        raise LabError(f"--tol must be a finite number > 0, got {args.tol}")
    if not (math.isfinite(args.kl_tol) and args.kl_tol >= 0):
        raise LabError(f"--kl-tol must be a finite number >= 0, got {args.kl_tol}")
    for flag, out in (("--json", args.json), ("--plot", args.plot)):
        if out is None:
            continue
        folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder):
            raise LabError(f"{flag} {out}: the folder {folder} does not exist")
        if os.path.isdir(out):
            raise LabError(f"{flag} {out}: is a directory")
    if args.plot is not None:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise LabError("--plot needs matplotlib (pip install matplotlib)") from None
        kinds = Figure().canvas.get_supported_filetypes()
        ext = os.path.splitext(args.plot)[1].lstrip(".").lower()
        if ext not in kinds:
            raise LabError(f"--plot {args.plot}: matplotlib cannot write .{ext} files "
                           f"(it writes {', '.join(sorted(kinds))})")


@contextlib.contextmanager
def _cwd_importable():
    """The current folder on sys.path while user variants are imported, so
    that 'mymodule:fn' finds ./mymodule.py from the `fastattn` script too;
    taken off again afterwards."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def run_verify(args) -> int:
    """`fastattn verify`: returns the exit code (0 all kept the answer, 1 some
    variant did not, 2 bad input)."""
    if args.list_variants:
        for name, description, broken in list_variants():
            print(f"{name:24s} {description}")
        return 0
    try:
        # variants first: a typo should not wait for a model load
        names = _expand_variants(args.variant) or default_variants()
        with _cwd_importable():
            variants = [resolve_variant(v) for v in names]
        if args.max_tokens is not None and args.max_tokens < 1:
            raise LabError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        _check_outputs(args)

        path = args.model
        if path is None:
            from .download import default_model_path
            path = str(default_model_path())
        text, origin = _read_text(args.text)
        start = time.perf_counter()
        lab = Lab.from_file(path, engine_threads=args.threads)

        from .tokenizer import Tokenizer
        ids = list(Tokenizer.from_loaded(lab.loaded.tokenizer).encode(text))
        if args.max_tokens and len(ids) > args.max_tokens:
            ids = ids[:args.max_tokens]
        load_s = time.perf_counter() - start
        print(f"text       = {origin}: {text[:60]!r}{'...' if len(text) > 60 else ''}")
        print(f"load       = {load_s * 1e3:.0f} ms (model, dequantize, tokenize)")

        def progress(r):
            ms = r.seconds_per_token * 1e3
            print(f"  {r.name:28s} {r.verdict:9s} {ms:8.2f} ms/token", file=sys.stderr)

        report = lab.run(ids, variants, tol=args.tol, kl_tol=args.kl_tol,
                         progress=progress)
    except FastAttnError as exc:
        print(f"fastattn verify: error: {exc}", file=sys.stderr)
        return 2

    print(report.header())
    print()
    print(report.table(per_layer=args.per_layer))
    status = 0 if report.ok else 1
    if args.json:
        try:
            report.write_json(args.json)
        except OSError as exc:
            print(f"fastattn verify: error: {args.json}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
        print(f"\nwrote {args.json}")
    if args.plot:
        try:
            report.plot(args.plot)
            print(f"wrote {args.plot}")
        except LabError as exc:
            print(f"fastattn verify: error: {exc}", file=sys.stderr)
            status = 2
    return status


def main(argv=None) -> int:
    parser = _add_arguments(argparse.ArgumentParser(
        prog="python -m fastattn.lab",
        description="The attention lab (same as `fastattn verify`)."))
    return run_verify(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
