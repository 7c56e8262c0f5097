"""Rewrites of self-attention, for the attention lab (fastattn.lab).

Each function here computes attention its own way; the lab runs the model
with it and measures how far the answer moves from fastattn.reference.  None
of them calls the reference attention: a rewrite that only relabelled the
reference would prove nothing.

Two shapes of rewrite
---------------------
Per head, the reference's hook (reference.forward's `attention=`):

    out = attention(q, k, v, mask)

    q     [n_q, head_dim]   one query head (after RoPE for llama), float32
    k, v  [n_k, head_dim]   the KV head this query head reads (with grouped-
                            query attention, head h reads KV head
                            h // (n_head // n_kv_head))
    mask  [n_q, n_k]        additive: 0 where query i may see key j, -inf where
                            it may not
    out   [n_q, head_dim]

The 1/sqrt(head_dim) scale belongs to the callable.

Per layer, all heads in one call (the lab's own hook):

    out = attention_layer(q, k, v, mask)

    q     [n_seq, n_head, head_dim]
    k, v  [n_seq, n_kv_head, head_dim]
    mask  [n_seq, n_seq]
    out   [n_seq, n_head, head_dim]

and one decode step over a KV cache (kv_cache_decode):

    out = decode_attention(q, k_cache, v_cache, n_past)

    q                 [n_head, head_dim]   the newest token's queries
    k_cache, v_cache  [n_kv_head, n_ctx, head_dim]; rows 0..n_past-1 are filled
    out               [n_head, head_dim]

The deliberately wrong rewrites at the end exist to prove that the lab can
tell; the lab lists them as broken on purpose.
"""
import concurrent.futures
import os

import numpy as np


def _scale(head_dim, dtype=np.float32):
    """1/sqrt(head_dim) in the working precision."""
    return dtype(1.0) / np.sqrt(dtype(head_dim))


def _softmax_rows(scores):
    """Numerically stable softmax over the last axis, in the input dtype."""
    shifted = scores - scores.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------- per-head rewrites


def online_softmax(q, k, v, mask, block=16):
    """Flash-attention style: stream over blocks of `block` keys, keeping a
    running max m, a running sum l of exp(s - m) and a running weighted sum
    of values; the [n_q, n_k] score matrix never exists at once.

    When a block raises the max from m to m', the old sums are rescaled by
    exp(m - m').  Rows that have seen only masked keys so far keep m = -inf;
    they are shifted by 0 instead, so that no -inf - (-inf) = nan appears.
    """
    n_q, head_dim = q.shape
    n_k = k.shape[0]
    block = int(block)
    if block < 1:
        raise ValueError(f"online_softmax: block must be >= 1, got {block}")
    scale = _scale(head_dim, q.dtype.type)

    m = np.full(n_q, -np.inf, dtype=q.dtype)              # running max  [n_q]
    l = np.zeros(n_q, dtype=q.dtype)                      # running sum  [n_q]
    acc = np.zeros((n_q, head_dim), dtype=q.dtype)        # sum p v  [n_q, head_dim]
    for start in range(0, n_k, block):
        stop = min(start + block, n_k)
        s = (q @ k[start:stop].T) * scale + mask[:, start:stop]   # [n_q, b]

        # new running max, and the shift that keeps all-masked rows finite
        m_new = np.maximum(m, s.max(axis=1))
        shift = np.where(np.isfinite(m_new), m_new, 0).astype(q.dtype)

        # rescale what was summed so far, then add this block
        alpha = np.exp(m - shift)                                 # [n_q]
        p = np.exp(s - shift[:, None])                            # [n_q, b]
        l = l * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + p @ v[start:stop]            # [n_q, head_dim]
        m = m_new
    return acc / l[:, None]


def no_max_subtraction(q, k, v, mask):
    """softmax without subtracting the row max first: exp(s) / sum exp(s).

    The same function on paper; in float32 exp overflows to inf once a score
    passes ~88.7, and inf / inf is nan.  Fine for ordinary logits, broken for
    large ones: the lab reports where.
    """
    s = (q @ k.T) * _scale(q.shape[-1], q.dtype.type) + mask   # [n_q, n_k]
    e = np.exp(s)
    return (e / e.sum(axis=-1, keepdims=True)) @ v             # [n_q, head_dim]


def float64_attention(q, k, v, mask):
    """The whole head in float64 (scores, softmax sums, weighted values),
    rounded to float32 once at the end."""
    q64 = q.astype(np.float64)
    k64 = k.astype(np.float64)
    v64 = v.astype(np.float64)
    s = (q64 @ k64.T) * _scale(q.shape[-1], np.float64) + mask  # [n_q, n_k]
    return (_softmax_rows(s) @ v64).astype(q.dtype)             # [n_q, head_dim]


def unscaled_attention(q, k, v, mask):
    """softmax(q k^T + mask) v with no 1/sqrt(head_dim): correct only when the
    scale was folded into the query projection (scale_in_query)."""
    s = q @ k.T + mask                                          # [n_q, n_k]
    return _softmax_rows(s) @ v                                 # [n_q, head_dim]


# -------------------------------------------------------- per-layer rewrites


def _heads_first(q, k, v):
    """[n_seq, n_head, head_dim] -> [n_head, n_seq, head_dim], contiguous."""
    return (np.ascontiguousarray(q.transpose(1, 0, 2)),
            np.ascontiguousarray(k.transpose(1, 0, 2)),
            np.ascontiguousarray(v.transpose(1, 0, 2)))


def _one_head(q_h, k_h, v_h, mask):
    """q_h [n_q, head_dim], k_h, v_h [n_k, head_dim] -> [n_q, head_dim]."""
    s = (q_h @ k_h.T) * _scale(q_h.shape[-1], q_h.dtype.type) + mask
    return _softmax_rows(s) @ v_h


def heads_serial(q, k, v, mask):
    """One head after another in a Python loop, heads-first layout."""
    n_seq, n_head, head_dim = q.shape
    group = n_head // k.shape[1]
    qh, kh, vh = _heads_first(q, k, v)       # [n_head | n_kv_head, n_seq, head_dim]

    out = np.empty((n_head, n_seq, head_dim), dtype=q.dtype)
    for h in range(n_head):
        out[h] = _one_head(qh[h], kh[h // group], vh[h // group], mask)
    return out.transpose(1, 0, 2)                        # -> [n_seq, n_head, head_dim]


def heads_parallel(q, k, v, mask):
    """All heads in one batched product: queries grouped by the KV head they
    share, [n_kv_head, group, n_seq, head_dim], against keys broadcast over
    the group."""
    n_seq, n_head, head_dim = q.shape
    n_kv_head = k.shape[1]
    group = n_head // n_kv_head
    qh, kh, vh = _heads_first(q, k, v)
    qg = qh.reshape(n_kv_head, group, n_seq, head_dim)

    # scores for every head at once: [n_kv_head, group, n_seq, n_seq]
    s = np.matmul(qg, kh[:, None].swapaxes(-1, -2))
    s = s * _scale(head_dim, q.dtype.type) + mask
    out = np.matmul(_softmax_rows(s), vh[:, None])   # [n_kv_head, group, n_seq, head_dim]
    return out.reshape(n_head, n_seq, head_dim).transpose(1, 0, 2)


def heads_threads(q, k, v, mask, n_threads=None):
    """Heads shared out to a thread pool (numpy releases the GIL inside its
    products), each head computed as in heads_serial."""
    n_seq, n_head, head_dim = q.shape
    group = n_head // k.shape[1]
    qh, kh, vh = _heads_first(q, k, v)
    n_threads = n_threads or min(n_head, os.cpu_count() or 1)

    out = np.empty((n_head, n_seq, head_dim), dtype=q.dtype)

    def run(h):
        out[h] = _one_head(qh[h], kh[h // group], vh[h // group], mask)

    with concurrent.futures.ThreadPoolExecutor(max_workers=n_threads) as pool:
        list(pool.map(run, range(n_head)))
    return out.transpose(1, 0, 2)


# ------------------------------------------------------------- one decode step


def decode_attention(q, k_cache, v_cache, n_past):
    """The newest query of each head against keys/values 0..n_past-1 of the
    cache: one row of scores per head, no mask needed and no [n_seq, n_seq]
    matrix formed.

    q [n_head, head_dim], k_cache, v_cache [n_kv_head, n_ctx, head_dim]
    -> [n_head, head_dim]
    """
    n_head, head_dim = q.shape
    group = n_head // k_cache.shape[0]
    scale = _scale(head_dim, q.dtype.type)

    out = np.empty_like(q)
    for h in range(n_head):
        keys = k_cache[h // group, :n_past]              # [n_past, head_dim]
        values = v_cache[h // group, :n_past]
        s = (keys @ q[h]) * scale                        # [n_past]
        e = np.exp(s - s.max())
        out[h] = (e / e.sum()) @ values                  # [head_dim]
    return out


# ------------------------------------------- deliberately wrong, for the tests


def wrong_mask_shifted(q, k, v, mask):
    """BROKEN ON PURPOSE: the causal mask moved one key to the right, so
    query i also sees key i + 1 (the next token)."""
    shifted = np.full_like(mask, -np.inf)
    shifted[:, 1:] = mask[:, :-1]
    shifted[:, 0] = 0.0
    return _one_head(q, k, v, shifted)


def wrong_scale_missing(q, k, v, mask):
    """BROKEN ON PURPOSE: no 1/sqrt(head_dim) and no compensation for it."""
    return unscaled_attention(q, k, v, mask)


def wrong_softmax_axis(q, k, v, mask):
    """BROKEN ON PURPOSE: softmax over the queries (axis 0) instead of the
    keys; every column of the masked scores has at least its diagonal entry,
    so nothing is nan, it is just wrong."""
    s = (q @ k.T) * _scale(q.shape[-1], q.dtype.type) + mask   # [n_q, n_k]
    shifted = s - s.max(axis=0, keepdims=True)
    e = np.exp(shifted)
    return (e / e.sum(axis=0, keepdims=True)) @ v


def wrong_kv_heads_swapped(q, k, v, mask):
    """BROKEN ON PURPOSE (per layer): KV heads 0 and 1 trade keys and values,
    so the query heads of one read the other's.  Needs n_kv_head >= 2."""
    n_kv_head = k.shape[1]
    if n_kv_head < 2:
        raise ValueError(f"kv heads swapped needs n_kv_head >= 2, the model has "
                         f"n_kv_head = {n_kv_head}")
    order = np.arange(n_kv_head)
    order[[0, 1]] = [1, 0]
    return heads_serial(q, k[:, order], v[:, order], mask)
