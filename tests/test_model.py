"""The compiled model (fastattn.model.Transformer) against the numpy reference,
and its promises: prefill + decode == one forward, bit for bit; results that
do not depend on the thread count or on how a prompt is cut; clear errors."""
import threading

import numpy as np
import pytest

import fastattn.model
from fastattn import reference
from fastattn.errors import ContextOverflowError, FastAttnError, ModelFileError, TokenizerError
from fastattn.model import Transformer
from fastattn.testing import random_config, random_ids, random_weights
from fastattn.weights import BF16, F16, F32, Q4_0, Q4_1, Q8_0, WeightTensor, type_name

# (family, config overrides): odd sizes, 1 and 3 layers, n_head 1, GQA 4/2 and
# 6/1 and none, tied and untied heads, both rope layouts, optional biases.
# Quantized types need n_embd and n_ff to be multiples of 32; the F32 runs
# also use sizes that are not.
CONFIGS = {
    "gpt2-1layer-1head": ("gpt2", dict(n_embd=32, n_head=1, n_layer=1, n_ff=64)),
    "gpt2-3layer": ("gpt2", dict(n_embd=96, n_head=6, n_layer=3, n_ff=128, n_vocab=101)),
    "gpt2-untied": ("gpt2", dict(n_embd=64, n_head=4, n_layer=2, n_ff=96,
                                 tied_output=False)),
    "llama-gqa-4/2": ("llama", dict(n_embd=64, n_head=4, n_kv_head=2, n_layer=3, n_ff=96)),
    "llama-gqa-6/1": ("llama", dict(n_embd=96, n_head=6, n_kv_head=1, n_layer=1, n_ff=160,
                                    n_vocab=77)),
    "llama-mha-untied-neox": ("llama", dict(n_embd=64, n_head=2, n_layer=3, n_ff=64,
                                            tied_output=False, rope_neox=True)),
    "llama-1head": ("llama", dict(n_embd=32, n_head=1, n_layer=1, n_ff=32,
                                  rope_theta=100000.0)),
}
ODD_CONFIGS = {
    "gpt2-odd": ("gpt2", dict(n_embd=40, n_head=5, n_layer=3, n_ff=72, n_vocab=53)),
    "llama-odd-gqa": ("llama", dict(n_embd=36, n_head=3, n_kv_head=1, n_layer=3, n_ff=50,
                                    n_vocab=61, rope_neox=True)),
}
QTYPES = [F32, Q8_0, Q4_0, Q4_1, F16, BF16]


def make(name, qtype=F32, n_threads=2, seed=0, **kw):
    family, over = {**CONFIGS, **ODD_CONFIGS}[name]
    config = random_config(family, **over)
    weights = random_weights(config, qtype, seed=seed, **kw)
    return config, weights, Transformer(config, weights, n_threads=n_threads)


def assert_close_rel(got, want, rel=1e-4):
    """|got - want| <= rel * max|want| everywhere."""
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= rel * scale, f"max error {err:.3g} > {rel} * {scale:.3g}"


# ------------------------------------------------------------ vs reference


@pytest.mark.parametrize("qtype", QTYPES, ids=type_name)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(name, qtype):
    config, weights, model = make(name, qtype)
    ids = random_ids(config, 23, seed=1)
    want = reference.forward(config, weights, ids)                 # [n_seq, n_vocab]
    got = model.forward(ids)
    assert got.shape == (23, config.n_vocab) and got.dtype == np.float32
    assert_close_rel(got, want)


@pytest.mark.parametrize("name", list(ODD_CONFIGS))
def test_matches_reference_odd_sizes(name):
    config, weights, model = make(name, F32)
    ids = random_ids(config, 31, seed=2)
    assert_close_rel(model.forward(ids), reference.forward(config, weights, ids))


def test_matches_reference_with_llama_biases():
    config, weights, model = make("llama-gqa-4/2", Q8_0, biases=True)
    assert "blk.0.attn_q.bias" in weights and "blk.2.ffn_gate.bias" in weights
    ids = random_ids(config, 17, seed=3)
    assert_close_rel(model.forward(ids), reference.forward(config, weights, ids))


def test_mixed_embedding_type():
    # SmolLM2's layout: Q4_1 matrices, a Q8_0 tied embedding
    config, weights, model = make("llama-gqa-6/1", Q4_1, embd_qtype=Q8_0)
    ids = random_ids(config, 12, seed=4)
    assert_close_rel(model.forward(ids), reference.forward(config, weights, ids))


# ---------------------------------------------- the KV cache is exact


@pytest.mark.parametrize("name", ["gpt2-3layer", "llama-gqa-4/2", "llama-gqa-6/1",
                                  "llama-mha-untied-neox", "gpt2-odd", "llama-odd-gqa"])
def test_prefill_then_decode_equals_full_forward(name):
    config, weights, model = make(name, Q4_1 if "odd" not in name else F32)
    ids = random_ids(config, 40, seed=5)
    full = model.forward(ids)                                      # [40, n_vocab]

    state = model.new_state()
    logits = model.prefill(state, ids[:13])
    np.testing.assert_array_equal(logits, full[12])
    for t in range(13, 40):
        logits = model.decode(state, int(ids[t]))
        # bit-identical, not merely close
        np.testing.assert_array_equal(logits, full[t])
    assert state.n_past == 40


@pytest.mark.parametrize("name", ["gpt2-3layer", "llama-gqa-4/2"])
def test_prefill_in_pieces_equals_one_prefill(name):
    config, weights, model = make(name, Q8_0)
    ids = random_ids(config, 50, seed=6)
    whole = model.forward(ids)

    state = model.new_state()
    parts = []
    for a, b in [(0, 7), (7, 8), (8, 30), (30, 31), (31, 50)]:
        parts.append(model.prefill(state, ids[a:b], all_logits=True))
    np.testing.assert_array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("name", ["gpt2-3layer", "llama-gqa-6/1"])
def test_internal_chunks_equal_one_pass(name, monkeypatch):
    """A prompt longer than a state's chunk runs in several passes inside C."""
    config, weights, model = make(name, Q4_0)
    ids = random_ids(config, 45, seed=7)
    whole = model.forward(ids)                                     # one chunk of 45
    monkeypatch.setattr(fastattn.model, "MAX_CHUNK", 8)
    state = model.new_state()
    np.testing.assert_array_equal(model.prefill(state, ids, all_logits=True), whole)
    state = model.new_state()
    np.testing.assert_array_equal(model.prefill(state, ids), whole[-1])


@pytest.mark.parametrize("name", ["gpt2-3layer", "llama-gqa-4/2", "llama-odd-gqa"])
def test_thread_count_does_not_change_results(name):
    config, weights, model = make(name, Q4_1 if "odd" not in name else F32, n_threads=1)
    ids = random_ids(config, 29, seed=8)
    one = model.forward(ids)
    for n_threads in (2, 3):
        model.n_threads = n_threads
        np.testing.assert_array_equal(model.forward(ids), one)
        state = model.new_state()
        model.prefill(state, ids[:20])
        for t in range(20, 29):
            np.testing.assert_array_equal(model.decode(state, int(ids[t])), one[t])


def test_rewind_and_reset():
    config, weights, model = make("llama-gqa-4/2", Q8_0)
    ids = random_ids(config, 20, seed=9)
    other = random_ids(config, 20, seed=10)
    state = model.new_state(32)
    model.prefill(state, ids)

    # keep the first 12 positions, continue differently
    state.rewind(12)
    assert state.n_past == 12
    got = model.prefill(state, other[12:], all_logits=True)
    want = model.forward(np.concatenate([ids[:12], other[12:]]))
    np.testing.assert_array_equal(got, want[12:])

    state.reset()
    assert state.n_past == 0
    np.testing.assert_array_equal(model.prefill(state, other), model.forward(other)[-1])

    with pytest.raises(ValueError, match="n_past"):
        state.rewind(21)
    with pytest.raises(ValueError):
        state.rewind(-1)


def test_states_share_a_model_across_threads():
    config, weights, model = make("gpt2-3layer", Q4_1, n_threads=1)
    prompts = [random_ids(config, 30, seed=s) for s in range(4)]
    want = [model.forward(p) for p in prompts]
    got = [None] * len(prompts)

    def run(i):
        state = model.new_state()
        rows = [model.prefill(state, prompts[i][:10])]
        rows += [model.decode(state, int(t)) for t in prompts[i][10:]]
        got[i] = np.stack(rows)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w[9:])


# ------------------------------------------------------------- bad input


def test_context_overflow():
    config, weights, model = make("llama-gqa-4/2")
    state = model.new_state(16)
    assert state.n_ctx == 16
    model.prefill(state, random_ids(config, 10))
    with pytest.raises(ContextOverflowError, match=r"n_past 10.*requested 7.*n_ctx 16"):
        model.prefill(state, random_ids(config, 7))
    assert state.n_past == 10  # nothing was appended
    model.prefill(state, random_ids(config, 6))
    with pytest.raises(ContextOverflowError, match=r"n_past 16.*requested 1.*n_ctx 16"):
        model.decode(state, 1)

    with pytest.raises(ContextOverflowError):
        model.new_state(config.n_ctx + 1)
    with pytest.raises(ContextOverflowError):
        model.forward(random_ids(config, config.n_ctx + 1))
    assert model.forward(random_ids(config, config.n_ctx)).shape == (64, config.n_vocab)


def test_bad_ids():
    config, weights, model = make("gpt2-1layer-1head")
    state = model.new_state()
    for bad in ([5, config.n_vocab], [-1], [2**40]):
        with pytest.raises(TokenizerError, match=str(bad[-1])) as info:
            model.prefill(state, bad)
        assert isinstance(info.value, ValueError)
    with pytest.raises(TokenizerError, match=str(config.n_vocab)):
        model.decode(state, config.n_vocab)
    with pytest.raises(TokenizerError, match="empty"):
        model.prefill(state, [])
    with pytest.raises(TokenizerError):
        model.prefill(state, [1.5, 2.0])
    with pytest.raises(TokenizerError):
        model.prefill(state, [[1, 2]])
    with pytest.raises(TokenizerError):
        model.decode(state, "3")
    assert state.n_past == 0


def test_c_checks_ids_and_room_itself():
    """The engine's own checks, reached without the Python layer's."""
    config, weights, model = make("llama-gqa-4/2")
    engine, state = model._engine, model.new_state(8)._state
    with pytest.raises(TokenizerError, match=f"token id {config.n_vocab} "):
        engine.forward(state, np.array([3, config.n_vocab], np.int32))
    with pytest.raises(TokenizerError, match="token id -4 "):
        engine.decode(state, -4)
    with pytest.raises(ContextOverflowError, match=r"n_past 0 \+ requested 9 > n_ctx 8"):
        engine.forward(state, np.zeros(9, np.int32))
    engine.forward(state, np.zeros(8, np.int32))
    with pytest.raises(ContextOverflowError, match=r"n_past 8 \+ requested 1 > n_ctx 8"):
        engine.decode(state, 1)
    assert state.n_past == 8


def test_state_of_another_model_is_refused():
    _, _, a = make("llama-gqa-4/2")
    _, _, b = make("llama-gqa-4/2", seed=1)
    with pytest.raises(FastAttnError, match="state"):
        a.prefill(b.new_state(), [1, 2])


def test_missing_tensor():
    config, weights, _ = make("llama-gqa-4/2")
    del weights["blk.2.attn_k.weight"]
    with pytest.raises(ModelFileError, match=r"blk\.2\.attn_k\.weight.*missing.*\(32, 64\)"):
        Transformer(config, weights)


def test_untied_model_needs_output_weight():
    config, weights, _ = make("gpt2-untied")
    del weights["output.weight"]
    with pytest.raises(ModelFileError, match=r"output\.weight.*missing"):
        Transformer(config, weights)


def test_misshapen_tensor():
    config, weights, _ = make("gpt2-3layer")
    weights["blk.1.ffn_up.weight"] = WeightTensor.from_float(
        np.zeros((96, 96), np.float32), Q8_0, "blk.1.ffn_up.weight")
    with pytest.raises(ModelFileError,
                       match=r"blk\.1\.ffn_up\.weight.*expected shape \(128, 96\).*\(96, 96\)"):
        Transformer(config, weights)
    config, weights, _ = make("gpt2-3layer")
    weights["output_norm.bias"] = WeightTensor.from_float(np.zeros(95, np.float32))
    with pytest.raises(ModelFileError, match=r"output_norm\.bias.*\(96,\).*\(95,\)"):
        Transformer(config, weights)


def test_wrong_kind_and_unknown_tensors():
    config, weights, _ = make("llama-gqa-4/2")
    weights["blk.0.attn_q.weight"] = np.zeros((64, 64), np.float32)
    with pytest.raises(ModelFileError, match=r"blk\.0\.attn_q\.weight.*WeightTensor.*ndarray"):
        Transformer(config, weights)
    config, weights, _ = make("llama-gqa-4/2")
    weights["rope_freqs.weight"] = WeightTensor.from_float(np.ones(8, np.float32))
    with pytest.raises(ModelFileError, match=r"rope_freqs\.weight"):
        Transformer(config, weights)


def test_n_threads_attribute():
    config, weights, model = make("llama-1head", n_threads=None)
    assert model.n_threads >= 1
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError):
            model.n_threads = bad
    model.n_threads = 1
    assert model.n_threads == 1


# ------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    pytest.importorskip("fastattn.loaders.gguf", reason="the GGUF loader is not there")
    from fastattn.loaders import load_model_files
    loaded = load_model_files(smollm2_path)
    return loaded, Transformer(loaded.config, loaded.weights, n_threads=2)


@pytest.mark.model
def test_smollm2_matches_reference(smollm2):
    loaded, model = smollm2
    ids = [1, 504, 3458, 282, 4649, 314, 216]
    want = reference.forward(loaded.config, loaded.weights, ids)
    assert_close_rel(model.forward(ids), want)


@pytest.mark.model
def test_smollm2_decode_is_exact_and_thread_independent(smollm2):
    loaded, model = smollm2
    ids = random_ids(loaded.config, 24, seed=11)
    full = model.forward(ids)
    state = model.new_state(64)
    np.testing.assert_array_equal(model.prefill(state, ids[:16]), full[15])
    model.n_threads = 1
    try:
        for t in range(16, 24):
            np.testing.assert_array_equal(model.decode(state, int(ids[t])), full[t])
    finally:
        model.n_threads = 2


def test_thread_counts(caplog):
    config, weights, m = make("llama-gqa-4/2", n_threads=1)
    for bad in (0, -1, 2.0, True, "2", fastattn.model.MAX_THREADS + 1, 2**31, 2**70):
        with pytest.raises(ValueError, match="n_threads must be"):
            m.n_threads = bad
    assert m.n_threads == 1
    # more threads than CPUs: allowed (the tests use it), but said to be slow
    over = fastattn.model.available_cpus() + 1
    with caplog.at_level("WARNING", logger="fastattn"):
        m.n_threads = over
    assert m.n_threads == over
    assert f"n_threads = {over} is more than the" in caplog.text
    ids = random_ids(config, 5)
    state = m.new_state(8)
    over_logits = m.prefill(state, ids)
    m.n_threads = 1
    state.reset()
    np.testing.assert_array_equal(m.prefill(state, ids), over_logits)
    assert Transformer(config, weights).n_threads == fastattn.model.available_cpus()


@pytest.mark.parametrize("qtype", QTYPES, ids=type_name)
def test_a_non_finite_weight_is_refused(qtype):
    """An infinity or NaN in a weight (a value, or a block's scale) would make
    every logit NaN: the build refuses it and names the tensor."""
    config = random_config("llama", **CONFIGS["llama-gqa-4/2"][1])
    weights = random_weights(config, qtype, seed=3)
    name = "blk.1.ffn_down.weight"
    t = weights[name]
    bb = {F32: 4, F16: 2, BF16: 2, Q8_0: 34, Q4_0: 18, Q4_1: 20}[qtype]
    bad = {F32: np.float32(np.nan).tobytes(), F16: np.float16(np.inf).tobytes(),
           BF16: bytes([0x80, 0x7F]), Q8_0: np.float16(-np.inf).tobytes(),
           Q4_0: np.float16(np.nan).tobytes(), Q4_1: np.float16(np.inf).tobytes()}[qtype]
    unit = 7
    # Q4_1: the min (at byte 2) is checked as well as the scale
    at = unit * bb + (2 if qtype == Q4_1 else 0)
    data = t.data.copy().reshape(-1)
    data[at:at + len(bad)] = np.frombuffer(bad, np.uint8)
    weights[name] = WeightTensor(data.reshape(t.data.shape), t.qtype, t.shape, t.name)
    what = "value" if qtype in (F32, F16, BF16) else "block scale"
    with pytest.raises(ModelFileError, match=f"tensor {name}: {what} {unit} is infinite "
                                             f"or NaN"):
        Transformer(config, weights)

    # a norm vector too
    weights = random_weights(config, qtype, seed=3)
    g = weights["blk.0.attn_norm.weight"]
    data = g.data.copy().reshape(-1)
    data[4:8] = np.frombuffer(np.float32(np.inf).tobytes(), np.uint8)
    weights["blk.0.attn_norm.weight"] = WeightTensor(data, g.qtype, g.shape, g.name)
    with pytest.raises(ModelFileError, match="blk.0.attn_norm.weight: value 1 is infinite"):
        Transformer(config, weights)
