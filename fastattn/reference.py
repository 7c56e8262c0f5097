"""The reference forward pass: plain numpy, one function per step.

Every fast path in fastattn is tested against this file.  It computes in
float32 from the dequantized weights, recomputes the whole sequence on each
call (no KV cache) and favours reading over speed.

    >>> from fastattn import reference
    >>> logits = reference.forward(config, weights, [15496, 11, 995])  # [3, n_vocab]

Both families share the skeleton `embed -> n_layer blocks -> final norm ->
output head`; they differ inside the blocks:

    gpt2   learned positions, LayerNorm, fused qkv, GELU (tanh) MLP, biases
    llama  RoPE, RMSNorm, separate q/k/v with grouped-query attention,
           SwiGLU MLP, no biases (optional biases are honoured if present)

`weights` maps the canonical (GGUF) names listed in fastattn.loaders to
WeightTensor objects (or to float arrays of the same shapes).

The attention hook
------------------
`forward(..., attention=fn)` replaces the attention of one head by `fn`.
It is called once per layer and per query head as

    out = fn(q, k, v, mask)

    q     [n_q, head_dim]   the head's queries (after RoPE for llama)
    k, v  [n_k, head_dim]   keys and values the head attends to; with grouped-
                            query attention the KV head shared by this query
                            head (query head h reads KV head
                            h // (n_head // n_kv_head))
    mask  [n_q, n_k]        additive: 0 where query i may see key j, -inf
                            where it may not (causal: j > i)
    out   [n_q, head_dim]

Here n_q == n_k == n_seq.  The default, `attention_softmax`, is the plain
softmax(q k^T / sqrt(head_dim) + mask) v.  The scale is part of the callable,
so a replacement decides its own.

The KV cache's precision
------------------------
`forward(..., kv_cache="f16")` rounds every key and value to float16 (numpy's
round-to-nearest-even) and widens it back before attention, as the engine's
opt-in float16 KV cache stores them; the default "f32" keeps them as computed.
"""
import numpy as np

from .config import ModelConfig

# ----------------------------------------------------------------- basic maths


def gelu(x):
    """GELU, tanh approximation (GPT-2's "gelu_new")."""
    c = np.float32(np.sqrt(2.0 / np.pi))
    return 0.5 * x * (1.0 + np.tanh(c * (x + 0.044715 * x**3)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x):
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def layer_norm(x, g, b, eps):
    """[n_seq, n_embd] -> [n_seq, n_embd], normalized over the last axis."""
    mean = np.mean(x, axis=-1, keepdims=True)
    var = np.mean((x - mean) ** 2, axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * g + b


def rms_norm(x, g, eps):
    """[n_seq, n_embd] -> [n_seq, n_embd]."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * g


def linear(x, w, b=None):
    """[n_seq, n_in] @ [n_out, n_in]^T -> [n_seq, n_out]; weights are stored
    with rows as output features."""
    y = x @ w.T
    return y if b is None else y + b


# ------------------------------------------------------------------ attention


def causal_mask(n_seq):
    """[n_seq, n_seq]: 0 on and below the diagonal, -inf above."""
    return np.triu(np.full((n_seq, n_seq), -np.inf, dtype=np.float32), k=1)


def attention_softmax(q, k, v, mask):
    """softmax(q k^T / sqrt(head_dim) + mask) v.

    q [n_q, head_dim], k, v [n_k, head_dim], mask [n_q, n_k] -> [n_q, head_dim]
    """
    scores = q @ k.T / np.sqrt(np.float32(q.shape[-1])) + mask   # [n_q, n_k]
    return softmax(scores) @ v                                  # [n_q, head_dim]


def rope(x, theta, neox):
    """Rotary position embedding; row s is position s.

    x [n_seq, n_head, head_dim] -> same shape.  Pair i of a head turns by the
    angle s * theta^(-2i / head_dim).  neox pairs (i, i + head_dim/2), as in
    Hugging Face checkpoints; otherwise adjacent values (2i, 2i + 1), as in
    GGUF llama files (whose converter permuted q and k rows to match).
    """
    n_seq, _, head_dim = x.shape
    half = head_dim // 2

    # angles in float64, so the reference carries no rounding of its own here
    freqs = float(theta) ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)
    angles = np.arange(n_seq, dtype=np.float64)[:, None] * freqs    # [n_seq, half]
    cos = np.cos(angles).astype(np.float32)[:, None, :]             # [n_seq, 1, half]
    sin = np.sin(angles).astype(np.float32)[:, None, :]

    if neox:
        a, b = x[..., :half], x[..., half:]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    ra = a * cos - b * sin
    rb = a * sin + b * cos
    if neox:
        return np.concatenate([ra, rb], axis=-1)
    out = np.empty_like(x)
    out[..., 0::2] = ra
    out[..., 1::2] = rb
    return out


KV_DTYPES = {"f32": np.float32, "f16": np.float16}


def kv_round(x, kv_cache):
    """x as a KV cache of type kv_cache holds it: "f32" x itself, "f16" x
    rounded to float16 and widened back to float32."""
    if kv_cache not in KV_DTYPES:
        raise ValueError(f"kv_cache must be one of {sorted(KV_DTYPES)}, got {kv_cache!r}")
    if kv_cache == "f32":
        return x
    return x.astype(KV_DTYPES[kv_cache]).astype(np.float32)


def multi_head_attention(q, k, v, n_head, n_kv_head, attention, kv_cache="f32"):
    """q [n_seq, n_head*head_dim], k, v [n_seq, n_kv_head*head_dim]
    -> [n_seq, n_head*head_dim], calling `attention` once per query head;
    k and v as a KV cache of type kv_cache holds them (kv_round)."""
    k, v = kv_round(k, kv_cache), kv_round(v, kv_cache)
    n_seq = q.shape[0]
    head_dim = q.shape[1] // n_head
    q = q.reshape(n_seq, n_head, head_dim)                # [n_seq, n_head, head_dim]
    k = k.reshape(n_seq, n_kv_head, head_dim)             # [n_seq, n_kv_head, head_dim]
    v = v.reshape(n_seq, n_kv_head, head_dim)
    mask = causal_mask(n_seq)                             # [n_seq, n_seq]

    group = n_head // n_kv_head
    heads = [attention(q[:, h], k[:, h // group], v[:, h // group], mask)
             for h in range(n_head)]                      # n_head x [n_seq, head_dim]
    return np.stack(heads, axis=1).reshape(n_seq, n_head * head_dim)


# --------------------------------------------------------------------- blocks


def gpt2_block(x, w, i, config, attention, kv_cache="f32"):
    """One GPT-2 block; x [n_seq, n_embd] -> [n_seq, n_embd]."""
    p = f"blk.{i}."
    n_embd = config.n_embd

    def fc(h, name):     # h W^T + b with the block's tensor `name`
        return linear(h, w[p + name + ".weight"], w[p + name + ".bias"])

    def ln(h, name):
        return layer_norm(h, w[p + name + ".weight"], w[p + name + ".bias"],
                          config.norm_eps)

    # attention: x + c_proj(attn(c_attn(ln_1(x))))
    qkv = fc(ln(x, "attn_norm"), "attn_qkv")      # [n_seq, n_embd] -> [n_seq, 3*n_embd]
    q, k, v = qkv[:, :n_embd], qkv[:, n_embd:2 * n_embd], qkv[:, 2 * n_embd:]
    a = multi_head_attention(q, k, v, config.n_head, config.n_head, attention, kv_cache)
    x = x + fc(a, "attn_output")                  # [n_seq, n_embd]

    # MLP: x + c_proj(gelu(c_fc(ln_2(x))))
    h = gelu(fc(ln(x, "ffn_norm"), "ffn_up"))     # [n_seq, n_embd] -> [n_seq, n_ff]
    return x + fc(h, "ffn_down")                  # [n_seq, n_ff] -> [n_seq, n_embd]


def llama_block(x, w, i, config, attention, kv_cache="f32"):
    """One Llama block; x [n_seq, n_embd] -> [n_seq, n_embd]."""
    p = f"blk.{i}."
    n_seq, head_dim = x.shape[0], config.head_dim

    def fc(h, name):     # h W^T (+ b, if the checkpoint has biases)
        return linear(h, w[p + name + ".weight"], w.get(p + name + ".bias"))

    def heads(t, n_head):
        # [n_seq, n_head*head_dim] -> [n_seq, n_head, head_dim]
        return t.reshape(n_seq, n_head, head_dim)

    # attention: x + o(attn(rope(q h), rope(k h), v h)), h = rms_norm(x)
    h = rms_norm(x, w[p + "attn_norm.weight"], config.norm_eps)
    q = fc(h, "attn_q")                           # [n_seq, n_embd] -> [n_seq, n_embd]
    k = fc(h, "attn_k")                           # [n_seq, n_embd] -> [n_seq, n_embd_kv]
    v = fc(h, "attn_v")                           # [n_seq, n_embd] -> [n_seq, n_embd_kv]
    q = rope(heads(q, config.n_head), config.rope_theta, config.rope_neox)
    k = rope(heads(k, config.n_kv_head), config.rope_theta, config.rope_neox)
    a = multi_head_attention(q.reshape(n_seq, -1), k.reshape(n_seq, -1), v,
                             config.n_head, config.n_kv_head, attention, kv_cache)
    x = x + fc(a, "attn_output")                  # [n_seq, n_embd]

    # MLP: x + down(silu(gate h) * up h), h = rms_norm(x)
    h = rms_norm(x, w[p + "ffn_norm.weight"], config.norm_eps)
    h = silu(fc(h, "ffn_gate")) * fc(h, "ffn_up")  # [n_seq, n_embd] -> [n_seq, n_ff]
    return x + fc(h, "ffn_down")                  # [n_seq, n_ff] -> [n_seq, n_embd]


# ---------------------------------------------------------------- the model


def dequantize_weights(weights):
    """{name: WeightTensor or array} -> {name: float32 array}."""
    out = {}
    for name, t in weights.items():
        array = t.to_float() if hasattr(t, "to_float") else t
        out[name] = np.asarray(array, dtype=np.float32)
    return out


def forward(config: ModelConfig, weights, ids, attention=None, return_hidden=False,
            kv_cache="f32"):
    """Logits for every position of `ids`: [n_seq] -> [n_seq, n_vocab].

    With return_hidden, also the residual stream after each block, a list of
    n_layer arrays [n_seq, n_embd].  `attention` replaces the per-head
    attention; kv_cache="f16" rounds keys and values to float16 first (see
    the module docstring).
    """
    if kv_cache not in KV_DTYPES:
        raise ValueError(f"kv_cache must be one of {sorted(KV_DTYPES)}, got {kv_cache!r}")
    w = dequantize_weights(weights)
    attention = attention or attention_softmax
    ids = np.asarray(ids, dtype=np.int64)
    n_seq = len(ids)

    # embeddings
    x = w["token_embd.weight"][ids]                               # [n_seq, n_embd]
    if config.family == "gpt2":
        x = x + w["position_embd.weight"][:n_seq]                 # [n_seq, n_embd]

    # the blocks
    block = gpt2_block if config.family == "gpt2" else llama_block
    hidden = []
    for i in range(config.n_layer):
        x = block(x, w, i, config, attention, kv_cache)           # [n_seq, n_embd]
        hidden.append(x)

    # final norm and output head (tied to the embeddings unless output.weight exists)
    if config.family == "gpt2":
        x = layer_norm(x, w["output_norm.weight"], w["output_norm.bias"], config.norm_eps)
    else:
        x = rms_norm(x, w["output_norm.weight"], config.norm_eps)
    head = w.get("output.weight", w["token_embd.weight"])
    logits = linear(x, head)                                      # [n_seq, n_vocab]
    return (logits, hidden) if return_hidden else logits


def generate_greedy(config: ModelConfig, weights, ids, n_new):
    """The n_new tokens picked greedily after `ids`, recomputing the whole
    sequence at every step (no KV cache): the slow baseline benchmarks compare
    against.  Weights are dequantized once."""
    w = dequantize_weights(weights)
    ids = [int(i) for i in ids]
    new = []
    for _ in range(n_new):
        logits = forward(config, w, ids)                          # [n_seq, n_vocab]
        token = int(np.argmax(logits[-1]))
        ids.append(token)
        new.append(token)
    return new
