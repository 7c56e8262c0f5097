"""The numpy reference (fastattn.reference): its attention hook as documented,
the properties of its pieces, and agreement with the fast model where the
two are meant to agree exactly (greedy choices)."""
import numpy as np
import pytest

from fastattn import reference
from fastattn.model import Transformer
from fastattn.testing import random_config, random_ids, random_weights
from fastattn.weights import F32, Q8_0, WeightTensor


def llama(**kw):
    over = dict(n_embd=64, n_head=4, n_kv_head=2, n_layer=2, n_ff=96)
    over.update(kw)
    return random_config("llama", **over)


def test_attention_hook_calls_and_arguments():
    config = llama(n_layer=3)
    weights = random_weights(config, seed=1)
    ids = random_ids(config, 9)
    calls = []

    def spy(q, k, v, mask):
        calls.append((q, k, v, mask))
        return reference.attention_softmax(q, k, v, mask)

    got = reference.forward(config, weights, ids, attention=spy)
    np.testing.assert_array_equal(got, reference.forward(config, weights, ids))

    # one call per layer and query head, shapes as documented
    assert len(calls) == config.n_layer * config.n_head
    for q, k, v, mask in calls:
        assert q.shape == k.shape == v.shape == (9, config.head_dim)
        assert mask.shape == (9, 9)
        assert np.all(mask[np.tril_indices(9)] == 0)
        assert np.all(np.isneginf(mask[np.triu_indices(9, k=1)]))

    # grouped-query attention: heads 0, 1 share KV head 0; heads 2, 3 share KV head 1
    layer0 = calls[:config.n_head]
    np.testing.assert_array_equal(layer0[0][1], layer0[1][1])
    np.testing.assert_array_equal(layer0[2][2], layer0[3][2])
    assert not np.array_equal(layer0[1][1], layer0[2][1])


def test_attention_hook_changes_the_result():
    config = random_config("gpt2", n_embd=32, n_head=2, n_layer=1, n_ff=64)
    weights = random_weights(config, seed=2)
    ids = random_ids(config, 6)

    def uniform(q, k, v, mask):
        p = np.exp(mask)                                   # 1 where allowed, 0 masked
        return (p / p.sum(-1, keepdims=True)) @ v

    a = reference.forward(config, weights, ids)
    b = reference.forward(config, weights, ids, attention=uniform)
    assert a.shape == b.shape
    np.testing.assert_array_equal(a[0], b[0])              # one key: nothing to mix
    assert not np.allclose(a[1:], b[1:])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causality(family):
    config = random_config(family, n_embd=32, n_head=2, n_layer=2, n_ff=32)
    weights = random_weights(config, seed=3)
    ids = random_ids(config, 12, seed=1)
    changed = ids.copy()
    changed[8:] = (changed[8:] + 1) % config.n_vocab
    a = reference.forward(config, weights, ids)
    b = reference.forward(config, weights, changed)
    np.testing.assert_array_equal(a[:8], b[:8])
    assert not np.allclose(a[8:], b[8:])


def test_return_hidden():
    config = llama(n_layer=3, tied_output=False)
    weights = random_weights(config, seed=4)
    ids = random_ids(config, 5)
    logits, hidden = reference.forward(config, weights, ids, return_hidden=True)
    assert len(hidden) == 3 and all(h.shape == (5, config.n_embd) for h in hidden)
    w = reference.dequantize_weights(weights)
    x = reference.rms_norm(hidden[-1], w["output_norm.weight"], config.norm_eps)
    np.testing.assert_allclose(reference.linear(x, w["output.weight"]), logits, rtol=1e-6)


def test_rope_properties():
    rng = np.random.default_rng(5)
    for neox in (False, True):
        x = rng.standard_normal((7, 3, 16)).astype(np.float32)     # [n_seq, n_head, hd]
        r = reference.rope(x, 10000.0, neox)
        np.testing.assert_array_equal(r[0], x[0])                  # position 0: identity
        np.testing.assert_allclose(np.linalg.norm(r, axis=-1), np.linalg.norm(x, axis=-1),
                                   rtol=1e-5)

        # q.k after rope depends only on the distance between positions
        q = np.tile(rng.standard_normal((1, 1, 16)).astype(np.float32), (7, 1, 1))
        k = np.tile(rng.standard_normal((1, 1, 16)).astype(np.float32), (7, 1, 1))
        rq, rk = reference.rope(q, 10000.0, neox), reference.rope(k, 10000.0, neox)
        np.testing.assert_allclose(rq[3, 0] @ rk[1, 0], rq[6, 0] @ rk[4, 0], rtol=1e-4)


def permute_for_adjacent_pairs(w, n_head):
    """Reorder the rows of a q or k weight [n_head*hd, n_in] so that the values
    rope pairs as (i, i + hd/2) come out adjacent (2i, 2i + 1): what llama.cpp's
    converter does to Hugging Face checkpoints."""
    n_out, n_in = w.shape
    hd = n_out // n_head
    return w.reshape(n_head, 2, hd // 2, n_in).swapaxes(1, 2).reshape(n_out, n_in)


def test_rope_layouts_agree_after_permutation():
    """A rotate-half (HF) model equals an adjacent-pair (GGUF) model whose q
    and k rows were permuted, in the reference and in the fast model."""
    neox = llama(rope_neox=True, n_layer=2)
    weights = random_weights(neox, seed=6)
    adjacent = llama(rope_neox=False, n_layer=2)
    permuted = dict(weights)
    for i in range(neox.n_layer):
        for name, heads in (("attn_q", neox.n_head), ("attn_k", neox.n_kv_head)):
            key = f"blk.{i}.{name}.weight"
            w = permute_for_adjacent_pairs(weights[key].to_float(), heads)
            permuted[key] = WeightTensor.from_float(w, F32, key)
    ids = random_ids(neox, 10)

    a = reference.forward(neox, weights, ids)
    b = reference.forward(adjacent, permuted, ids)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    c = Transformer(neox, weights).forward(ids)
    d = Transformer(adjacent, permuted).forward(ids)
    np.testing.assert_allclose(c, d, rtol=1e-5, atol=1e-5 * np.abs(a).max())
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_pieces_match_their_formulas():
    x = np.array([[1.0, 2.0, 3.0, 6.0]], np.float32)
    g = np.array([1.0, 2.0, 1.0, 0.5], np.float32)
    b = np.array([0.0, 1.0, 0.0, 0.0], np.float32)
    mean, var = 3.0, (4 + 1 + 0 + 9) / 4
    want = (x - mean) / np.sqrt(var + 1e-5) * g + b
    np.testing.assert_allclose(reference.layer_norm(x, g, b, 1e-5), want, rtol=1e-6)
    np.testing.assert_allclose(reference.rms_norm(x, g, 1e-5),
                               x / np.sqrt(50 / 4 + 1e-5) * g, rtol=1e-6)
    np.testing.assert_allclose(reference.gelu(np.float32([0.0, 1.0, -2.0])),
                               [0.0, 0.8411920, -0.0454023], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(reference.silu(np.float32([0.0, 2.0])),
                               [0.0, 2 / (1 + np.exp(-2))], rtol=1e-6)
    q = np.float32([[1.0, 0.0]])
    k = np.float32([[1.0, 0.0], [0.0, 1.0]])
    v = np.float32([[10.0, 0.0], [0.0, 10.0]])
    p = np.exp(1 / np.sqrt(2)) / (np.exp(1 / np.sqrt(2)) + 1)
    np.testing.assert_allclose(reference.attention_softmax(q, k, v, np.zeros((1, 2))),
                               [[10 * p, 10 * (1 - p)]], rtol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generate_greedy_matches_the_cached_model(family):
    config = random_config(family, n_embd=64, n_head=4, n_layer=2, n_ff=64)
    weights = random_weights(config, Q8_0, seed=7)
    prompt = random_ids(config, 5)
    new = reference.generate_greedy(config, weights, prompt, 8)
    assert len(new) == 8 and all(0 <= t < config.n_vocab for t in new)

    model = Transformer(config, weights)
    state = model.new_state()
    logits = model.prefill(state, prompt)
    fast = []
    for _ in range(8):
        fast.append(int(np.argmax(logits)))
        logits = model.decode(state, fast[-1])
    assert fast == new
