"""The GGUF loader on tiny files written with gguf.GGUFWriter, and (marked
`model`) on the real SmolLM2-135M-Instruct file."""
import gc
import os
import time

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT

from fastattn.errors import ModelFileError
from fastattn.loaders import load_model_files
from fastattn.loaders.gguf import expected_shapes, load_gguf
from fastattn.weights import BF16, F16, F32, Q4_0, Q4_1, Q8_0, dequantize

import hostile

# How far a stored value may be from the float it was made from, as a
# fraction of the row's largest magnitude.
TOLERANCE = {F32: 0.0, F16: 1e-3, BF16: 8e-3, Q8_0: 1e-2, Q4_0: 0.15, Q4_1: 0.1}


def write_gguf(path, arch, hparams, tensors, tokens, extra=None, alignment=None):
    """Write a GGUF file with gguf.GGUFWriter.

    tensors: {name: (float32 array [n_out, n_in] or [n], ggml type id)}
    Returns {name: (float array, stored bytes as gguf wrote them)}.
    """
    w = gguf.GGUFWriter(str(path), arch)
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(hparams["n_layer"])
    w.add_context_length(hparams["n_ctx"])
    w.add_embedding_length(hparams["n_embd"])
    w.add_feed_forward_length(hparams["n_ff"])
    w.add_head_count(hparams["n_head"])
    if "n_kv_head" in hparams:
        w.add_head_count_kv(hparams["n_kv_head"])
    if arch == "llama":
        w.add_layer_norm_rms_eps(hparams["norm_eps"])
        if "rope_theta" in hparams:
            w.add_rope_freq_base(hparams["rope_theta"])
        w.add_rope_dimension_count(hparams["n_embd"] // hparams["n_head"])
    else:
        w.add_layer_norm_eps(hparams["norm_eps"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["t 1", "t 2", "t 3"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for key, value in (extra or {}).items():
        w.add_uint32(key, value)

    stored = {}
    for name, (x, qtype) in tensors.items():
        if qtype == F32:
            raw = x.astype(np.float32)
            w.add_tensor(name, raw)
        elif qtype == F16:
            raw = x.astype(np.float16)
            w.add_tensor(name, raw)
        else:
            raw = gguf.quants.quantize(x, GT(qtype))      # uint8 [n_out, row_bytes]
            w.add_tensor(name, raw, raw_dtype=GT(qtype))
        stored[name] = (x, np.ascontiguousarray(raw).view(np.uint8).reshape(-1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


LLAMA = dict(n_layer=2, n_ctx=256, n_embd=64, n_head=4, n_kv_head=2, n_ff=96,
             norm_eps=1e-6, rope_theta=500000.0)
GPT2 = dict(n_layer=2, n_ctx=32, n_embd=64, n_head=4, n_ff=128, norm_eps=1e-5)
TOKENS = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, 40)]


def tensors_for(arch, hparams, n_vocab, types, seed=0, tied=True):
    """Random weights for every tensor the config needs; matrix types cycle
    through `types`, norms and biases are F32."""
    from fastattn.config import ModelConfig
    config = ModelConfig(family=arch, n_vocab=n_vocab, n_ctx=hparams["n_ctx"],
                         n_embd=hparams["n_embd"], n_layer=hparams["n_layer"],
                         n_head=hparams["n_head"],
                         n_kv_head=hparams.get("n_kv_head", hparams["n_head"]),
                         n_ff=hparams["n_ff"])
    rng = np.random.default_rng(seed)
    out = {}
    i = 0
    for name, (shape, required) in expected_shapes(config).items():
        if not required and not (name == "output.weight" and not tied):
            continue
        x = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 1:
            out[name] = (x, F32)
        else:
            out[name] = (x, types[i % len(types)])
            i += 1
    return out


def check_values(model, stored):
    """Each loaded tensor dequantizes to what gguf stored, and near the source."""
    for name, (x, raw) in stored.items():
        w = model.weights[name]
        assert w.shape == x.shape, name
        assert w.data.tobytes() == raw.tobytes(), name
        values = w.to_float()
        if w.qtype in (Q8_0, Q4_0, Q4_1):
            ref = gguf.quants.dequantize(w.data, GT(w.qtype)).reshape(x.shape)
            np.testing.assert_array_equal(values, ref, err_msg=name)
        scale = np.abs(x).max(axis=-1, keepdims=True)
        assert np.all(np.abs(values - x) <= TOLERANCE[w.qtype] * scale + 1e-7), name


def test_llama_config_and_values(tmp_path):
    path = tmp_path / "llama.gguf"
    tensors = tensors_for("llama", LLAMA, len(TOKENS), [Q8_0, Q4_0, Q4_1, F16, F32])
    stored = write_gguf(path, "llama", LLAMA, tensors, TOKENS)
    m = load_gguf(path)

    c = m.config
    assert (c.family, c.n_vocab, c.n_ctx, c.n_embd, c.n_layer) == ("llama", 40, 256, 64, 2)
    assert (c.n_head, c.n_kv_head, c.n_ff, c.head_dim) == (4, 2, 96, 16)
    assert c.norm_eps == pytest.approx(1e-6, rel=1e-6)
    assert c.rope_theta == 500000.0
    assert c.rope_neox is False and c.tied_output is True
    assert c.name == "tiny-llama" and c.source == str(path)
    assert "output.weight" not in m.weights
    assert set(m.weights) == set(tensors)
    assert {w.qtype for w in m.weights.values()} == {F32, F16, Q8_0, Q4_0, Q4_1}
    check_values(m, stored)


def test_weights_are_read_only_views_of_the_file(tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", LLAMA, tensors_for("llama", LLAMA, 40, [Q4_1]), TOKENS)
    m = load_gguf(path)
    for name, w in m.weights.items():
        assert not w.data.flags.writeable, name
        assert np.shares_memory(w.data, m.keepalive), name
        with pytest.raises(ValueError):
            w.data[0] = 1


def test_llama_tokenizer_template_metadata(tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", LLAMA, tensors_for("llama", LLAMA, 40, [Q8_0]), TOKENS)
    m = load_gguf(path)
    tok = m.tokenizer
    assert tok["kind"] == "gguf" and tok["model"] == "gpt2" and tok["pre"] == "default"
    assert tok["tokens"] == TOKENS
    assert tok["token_type"] == [3, 3, 3] + [1] * 37
    assert tok["merges"] == ["t 1", "t 2", "t 3"]
    assert (tok["bos_id"], tok["eos_id"], tok["add_bos"]) == (1, 2, False)
    assert m.chat_template.startswith("{% for m in messages %}")
    assert m.metadata["general.architecture"] == "llama"
    assert m.metadata["llama.block_count"] == 2
    assert not any(k.startswith("tokenizer.") for k in m.metadata)


def test_llama_untied_output_and_defaults(tmp_path):
    # no head_count_kv (-> n_head), no rope.freq_base (-> 10000), own output head
    hp = {k: v for k, v in LLAMA.items() if k not in ("n_kv_head", "rope_theta")}
    path = tmp_path / "llama.gguf"
    tensors = tensors_for("llama", hp, 40, [Q8_0, F16], tied=False)
    stored = write_gguf(path, "llama", hp, tensors, TOKENS)
    m = load_gguf(path)
    assert m.config.n_kv_head == 4 and m.config.rope_theta == 10000.0
    assert m.config.tied_output is False
    assert m.weights["output.weight"].shape == (40, 64)
    check_values(m, stored)


def test_gpt2_config_and_values(tmp_path):
    path = tmp_path / "gpt2.gguf"
    tensors = tensors_for("gpt2", GPT2, len(TOKENS), [F32, Q8_0, Q4_0, Q4_1, F16],
                          tied=False)
    stored = write_gguf(path, "gpt2", GPT2, tensors, TOKENS)
    m = load_gguf(path)
    c = m.config
    assert (c.family, c.n_vocab, c.n_ctx, c.n_embd, c.n_layer) == ("gpt2", 40, 32, 64, 2)
    assert (c.n_head, c.n_kv_head, c.n_ff) == (4, 4, 128)
    assert c.norm_eps == pytest.approx(1e-5, rel=1e-6)
    assert c.tied_output is False
    assert m.weights["position_embd.weight"].shape == (32, 64)
    assert m.weights["blk.1.attn_qkv.weight"].shape == (192, 64)
    assert m.weights["blk.1.attn_qkv.bias"].shape == (192,)
    assert m.weights["output_norm.bias"].shape == (64,)
    check_values(m, stored)


def test_gpt2_missing_bias_is_refused(tmp_path):
    path = tmp_path / "gpt2.gguf"
    tensors = tensors_for("gpt2", GPT2, len(TOKENS), [F32])
    del tensors["blk.1.ffn_up.bias"]
    write_gguf(path, "gpt2", GPT2, tensors, TOKENS)
    with pytest.raises(ModelFileError, match="missing tensor 'blk.1.ffn_up.bias'"):
        load_gguf(path)


def test_custom_alignment(tmp_path):
    path = tmp_path / "llama.gguf"
    tensors = tensors_for("llama", LLAMA, 40, [Q4_0, F32])
    stored = write_gguf(path, "llama", LLAMA, tensors, TOKENS, alignment=256)
    m = load_gguf(path)
    check_values(m, stored)
    for w in m.weights.values():
        assert (w.data.ctypes.data - m.keepalive.ctypes.data) % 256 == 0


def test_bf16_tensor(tmp_path):
    # GGUFWriter stores BF16 as raw bytes; gguf.quants makes them
    path = tmp_path / "llama.gguf"
    tensors = tensors_for("llama", LLAMA, 40, [BF16, Q8_0])
    stored = write_gguf(path, "llama", LLAMA, tensors, TOKENS)
    m = load_gguf(path)
    assert m.weights["token_embd.weight"].qtype == BF16
    assert m.weights["blk.0.attn_q.weight"].qtype == Q8_0
    check_values(m, stored)


def test_gguf_version_2_and_byte_built_file(tmp_path):
    # hostile.py's byte-level writer, whose variants the hostile tests break
    for version in (2, 3):
        g = hostile.tiny_llama(tied=False)
        g.version = version
        path = tmp_path / f"v{version}.gguf"
        path.write_bytes(g.build()[0])
        m = load_gguf(path)
        assert m.config.extra["gguf_version"] == version
        assert m.config.n_vocab == 48 and m.config.tied_output is False
        for t in g.tensors:
            w = m.weights[t.name]
            assert w.data.tobytes() == t.data
            assert w.shape == tuple(reversed(t.ne))


def test_load_model_files_dispatches_to_gguf(tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", LLAMA, tensors_for("llama", LLAMA, 40, [Q8_0]), TOKENS)
    assert load_model_files(path).config.n_layer == 2
    with pytest.raises(ModelFileError, match="no such file"):
        load_model_files(tmp_path / "absent.gguf")


def test_directory_is_not_a_gguf_file(tmp_path):
    with pytest.raises(ModelFileError, match=str(tmp_path)):
        load_gguf(tmp_path)


# ------------------------------------------------------------ the real model

@pytest.fixture(scope="module")
def real_path():
    from conftest import find_test_model
    path = find_test_model()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found: run `fastattn download` or set FASTATTN_TEST_MODEL")
    return path


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def real(real_path):
    gc.collect()
    before = rss_bytes()
    t0 = time.perf_counter()
    model = load_gguf(real_path)
    seconds = time.perf_counter() - t0
    gc.collect()
    return model, seconds, rss_bytes() - before


@pytest.mark.model
def test_real_config(real):
    c = real[0].config
    assert (c.family, c.n_layer, c.n_embd, c.n_head, c.n_kv_head) == ("llama", 30, 576, 9, 3)
    assert (c.head_dim, c.n_ff, c.n_vocab, c.n_ctx) == (64, 1536, 49152, 8192)
    assert c.rope_theta == 100000.0 and c.rope_neox is False
    assert c.norm_eps == pytest.approx(1e-5, rel=1e-6)
    assert c.tied_output is True


@pytest.mark.model
def test_real_tensor_types(real):
    w = real[0].weights
    assert len(w) == 2 + 9 * 30
    assert w["token_embd.weight"].qtype == Q8_0
    assert w["token_embd.weight"].shape == (49152, 576)
    for i in range(30):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                     "ffn_down"):
            assert w[f"blk.{i}.{part}.weight"].qtype == Q4_1
        assert w[f"blk.{i}.attn_norm.weight"].qtype == F32
    assert w["blk.7.attn_k.weight"].shape == (192, 576)
    assert w["blk.7.ffn_down.weight"].shape == (576, 1536)


@pytest.mark.model
def test_real_dequantized_equals_gguf(real, real_path):
    model = real[0]
    reader = gguf.GGUFReader(real_path)
    ref = {t.name: t for t in reader.tensors}
    names = (["token_embd.weight", "output_norm.weight", "blk.29.ffn_down.weight"]
             + [n for n in model.weights if n.startswith("blk.0.")])
    for name in names:
        t = ref[name]
        rows = slice(0, 4096)      # of token_embd's 49152: enough, and 12x faster
        w = model.weights[name]
        expected = gguf.quants.dequantize(t.data[rows], t.tensor_type)
        mine = dequantize(w.data[rows], w.qtype, expected.shape)
        np.testing.assert_array_equal(mine, expected, err_msg=name)


@pytest.mark.model
def test_real_tokenizer(real):
    model = real[0]
    tok = model.tokenizer
    assert (tok["model"], tok["pre"]) == ("gpt2", "smollm")
    assert len(tok["tokens"]) == 49152 and len(tok["merges"]) == 48900
    assert tok["tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok["merges"][0] == "Ġ t"
    assert (tok["bos_id"], tok["eos_id"], tok["add_bos"]) == (1, 2, False)
    assert "<|im_start|>" in model.chat_template


@pytest.mark.model
def test_real_load_is_mapped_not_copied(real):
    model, seconds, rss_growth = real
    for w in model.weights.values():
        assert np.shares_memory(w.data, model.keepalive)
    # the file is 94 MiB; weights that were copied or expanded would show here
    assert rss_growth < 80 * 2**20, rss_growth
    assert seconds < 10.0
