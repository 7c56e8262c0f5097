"""forward.c's shortcuts keep the results exact.

The bias/rope/cache work of a head runs on the thread that computed the
head's rows when every thread's rows fall on head boundaries, and (token,
head) pairs are shared out after a barrier when they do not; the activation
of the MLP runs on the thread that computed its rows when up and gate give
the same rows; chunks of at most a few tokens (FA_OWN_ROWS in csrc/model.h)
have every thread norm every row into its own copy, and on more than one
thread they hand their products' rows out in chunks as they run, with that
work done chunk by chunk.  Which path a call takes depends on the thread
count and the sizes, so these tests sweep both and ask for bit-identical
logits against one thread and one pass.
"""
import numpy as np
import pytest

import fastattn.model
from fastattn.model import Transformer
from fastattn.testing import random_config, random_ids, random_weights
from fastattn.weights import F32, Q4_1, Q8_0

# head_dim 16 and 64 rows of q: 2 threads split q, k and v on head boundaries
# (fused path); 3 threads do not (shared path).  Biases exercise the bias of
# every head and of the MLP.
CASES = {
    "llama-aligned-biases": ("llama", dict(n_embd=64, n_head=4, n_kv_head=2, n_layer=2,
                                           n_ff=96), dict(biases=True)),
    "llama-odd-heads": ("llama", dict(n_embd=96, n_head=3, n_kv_head=1, n_layer=2,
                                      n_ff=64, rope_neox=True), {}),
    "gpt2-aligned": ("gpt2", dict(n_embd=64, n_head=4, n_layer=2, n_ff=128), {}),
    "gpt2-odd-heads": ("gpt2", dict(n_embd=40, n_head=5, n_layer=2, n_ff=72, n_vocab=53),
                       {}),
}


def build(name, qtype, activations="f32"):
    family, over, extra = CASES[name]
    config = random_config(family, **over)
    weights = random_weights(config, qtype, seed=3, **extra)
    return config, Transformer(config, weights, n_threads=1, activations=activations)


def qtype_for(name):
    return F32 if "odd" in name else Q4_1


@pytest.mark.parametrize("name", list(CASES))
def test_decode_is_exact_at_every_thread_count(name):
    config, model = build(name, qtype_for(name))
    ids = random_ids(config, 30, seed=1)
    one = model.forward(ids)
    for n_threads in (2, 3, 4):
        model.n_threads = n_threads
        np.testing.assert_array_equal(model.forward(ids), one)
        state = model.new_state()
        np.testing.assert_array_equal(model.prefill(state, ids[:9]), one[8])
        for t in range(9, 30):
            np.testing.assert_array_equal(model.decode(state, int(ids[t])), one[t])


@pytest.mark.parametrize("name", ["llama-aligned-biases", "gpt2-odd-heads"])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_small_and_large_chunks_agree(name, n_threads):
    """Pieces of 1 .. 6 tokens cross FA_OWN_ROWS (own norms below, shared
    norms above); internal chunks of 5 do too."""
    config, model = build(name, qtype_for(name))
    model.n_threads = n_threads
    ids = random_ids(config, 40, seed=2)
    whole = model.forward(ids)
    state = model.new_state()
    parts, at = [], 0
    for size in (1, 2, 3, 4, 5, 6, 1, 4, 6, 8):
        parts.append(model.prefill(state, ids[at:at + size], all_logits=True))
        at += size
    assert at == 40
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_internal_chunks_cross_own_rows(monkeypatch):
    config, model = build("llama-aligned-biases", Q8_0)
    model.n_threads = 2
    ids = random_ids(config, 23, seed=4)
    whole = model.forward(ids)
    for chunk in (3, 5):
        monkeypatch.setattr(fastattn.model, "MAX_CHUNK", chunk)
        state = model.new_state()
        np.testing.assert_array_equal(model.prefill(state, ids, all_logits=True), whole)


@pytest.mark.parametrize("name", ["llama-aligned-biases", "gpt2-aligned"])
def test_q8_activations_decode_is_exact_at_every_thread_count(name):
    """The q8 mode may share rows differently (fa_matmul_share asks it)."""
    config, model = build(name, Q4_1, activations="q8")
    ids = random_ids(config, 20, seed=5)
    one = model.forward(ids)
    for n_threads in (2, 3):
        model.n_threads = n_threads
        state = model.new_state()
        model.prefill(state, ids[:6])
        for t in range(6, 20):
            np.testing.assert_array_equal(model.decode(state, int(ids[t])), one[t])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("activations,kv_cache", [("f32", "f32"), ("q8", "f32"),
                                                  ("q8", "f16")])
def test_decode_rows_handed_out_give_one_threads_bits(level, family, activations, kv_cache):
    """A decode on several threads hands its products' rows out in chunks
    while they run (forward.c, claim_next); with more threads than cores the
    threads take chunks of each other's shares, in an order that changes
    from step to step.  Every step must give one thread's bits, at every
    SIMD level (the chunks follow the level's kernels), with row counts that
    are not whole units (n_ff 160 against the float path's 64-row units,
    n_vocab 301) and, for gpt2, heads of 8 (q, k and v then keep their fixed
    shares).  A build that skipped the residual add of a chunk taken from
    another thread's share failed 9 of these 18 cases."""
    if family == "llama":
        config = random_config("llama", n_embd=128, n_head=4, n_kv_head=2, n_layer=2,
                               n_ff=160, n_vocab=301)
        weights = random_weights(config, Q4_1, seed=11, biases=True)
    else:
        config = random_config("gpt2", n_embd=40, n_head=5, n_layer=2, n_ff=72, n_vocab=301)
        weights = random_weights(config, F32, seed=11)
    model = Transformer(config, weights, n_threads=1, activations=activations,
                        kv_cache=kv_cache)
    ids = random_ids(config, 24, seed=6)
    state = model.new_state()
    one = model.prefill(state, ids, all_logits=True)
    for n_threads in (2, 3, 7):
        model.n_threads = n_threads
        state = model.new_state()
        np.testing.assert_array_equal(model.prefill(state, ids[:4], all_logits=True), one[:4])
        for t in range(4, 24):
            np.testing.assert_array_equal(model.decode(state, int(ids[t])), one[t])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_decode_over_many_key_chunks_equals_one_forward(family):
    """Past 64 positions a decode's attention is split over key chunks of 64
    (spread over the threads, merged afterwards); a prefill walks the chunks
    in one thread.  Both must give the same bits, across chunk boundaries."""
    over = dict(n_embd=48, n_head=6, n_kv_head=2 if family == "llama" else 6, n_layer=2,
                n_ff=64, n_ctx=200)
    config = random_config(family, **over)
    model = Transformer(config, random_weights(config, F32, seed=9), n_threads=1)
    ids = random_ids(config, 170, seed=3)
    full = model.forward(ids)
    for n_threads in (1, 2, 3):
        model.n_threads = n_threads
        state = model.new_state()
        np.testing.assert_array_equal(model.prefill(state, ids[:61]), full[60])
        for t in range(61, 170):
            np.testing.assert_array_equal(model.decode(state, int(ids[t])), full[t])
