"""Hugging Face folders: fastattn's logits against transformers' own.

Randomly initialised models are saved with save_pretrained into a temporary
folder, read back through fastattn.loaders.load_model_files and run by the
compiled Transformer; the logits must match GPT2LMHeadModel /
LlamaForCausalLM (float32, eval, eager attention) on the same ids.  The
loader's refusals are tested without torch, on folders written by hand.
"""
import json

import numpy as np
import pytest

from fastattn.errors import ModelFileError, UnsupportedError
from fastattn.loaders import load_model_files
from fastattn.loaders.hf import load_hf_folder
from fastattn.loaders.safetensors import save_file
from fastattn.model import Transformer
from fastattn.weights import BF16, F32


def torch_and_transformers():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return torch, transformers


def assert_logits_match(got, want, tol=1e-4):
    """|got - want| <= tol * max(1, max|want|) everywhere."""
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"max error {err:.3g} > {tol} * {scale:.3g}"


def hf_logits(torch, model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_gpt2_124m_shapes(tmp_path):
    torch, transformers = torch_and_transformers()
    config = transformers.GPT2Config(attn_implementation="eager")   # the 124M shapes
    assert (config.n_embd, config.n_layer, config.n_positions) == (768, 12, 1024)
    hf = transformers.GPT2LMHeadModel(config).eval()
    # sharded, to read the index too
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200MB")
    assert (tmp_path / "model.safetensors.index.json").exists()

    loaded = load_model_files(tmp_path)
    c = loaded.config
    assert (c.family, c.n_vocab, c.n_ctx, c.n_embd, c.n_layer, c.n_head, c.n_ff) == (
        "gpt2", 50257, 1024, 768, 12, 12, 3072)
    assert c.tied_output and "output.weight" not in loaded.weights
    assert loaded.weights["blk.0.attn_qkv.weight"].shape == (3 * 768, 768)
    assert loaded.tokenizer == {"kind": "hf", "path": str(tmp_path)}

    model = Transformer(loaded.config, loaded.weights, n_threads=2)
    ids = np.random.default_rng(0).integers(0, c.n_vocab, 24).tolist()
    want = hf_logits(torch, hf, ids)
    got = model.forward(ids)
    assert_logits_match(got, want)

    # the cached path agrees with transformers too
    state = model.new_state()
    model.prefill(state, ids[:20])
    for t in range(20, 24):
        assert_logits_match(model.decode(state, ids[t]), want[t])


def make_llama(transformers, **kw):
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=50000.0, rms_norm_eps=1e-5, attn_implementation="eager", **kw)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_llama_gqa(tmp_path, tied):
    torch, transformers = torch_and_transformers()
    hf = make_llama(transformers, tie_word_embeddings=tied)
    with torch.no_grad():   # norms away from 1, so a wrong norm weight would show
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path, safe_serialization=True)

    loaded = load_model_files(tmp_path)
    c = loaded.config
    assert (c.family, c.n_head, c.n_kv_head, c.rope_neox, c.rope_theta, c.tied_output) == (
        "llama", 8, 2, True, 50000.0, tied)
    model = Transformer(loaded.config, loaded.weights, n_threads=2)
    ids = np.random.default_rng(1).integers(0, 300, 40).tolist()
    assert_logits_match(model.forward(ids), hf_logits(torch, hf, ids))


def test_llama_bf16_kept_as_stored(tmp_path):
    torch, transformers = torch_and_transformers()
    hf = make_llama(transformers)
    hf.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    hf.to(torch.float32)   # the same bf16-rounded values, run in float32

    loaded = load_model_files(tmp_path)
    assert loaded.weights["blk.0.attn_q.weight"].qtype == BF16
    assert not loaded.weights["blk.0.attn_q.weight"].data.flags.writeable  # mapped
    model = Transformer(loaded.config, loaded.weights)
    ids = np.random.default_rng(2).integers(0, 300, 16).tolist()
    assert_logits_match(model.forward(ids), hf_logits(torch, hf, ids))


# ------------------------------------------------ refusals, without torch

LLAMA_JSON = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 40,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 16,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
    "tie_word_embeddings": True,
}


def llama_tensors():
    rng = np.random.default_rng(0)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": f(40, 32), "model.norm.weight": f(32)}
    p = "model.layers.0."
    t.update({p + "input_layernorm.weight": f(32), p + "post_attention_layernorm.weight": f(32),
              p + "self_attn.q_proj.weight": f(32, 32), p + "self_attn.k_proj.weight": f(16, 32),
              p + "self_attn.v_proj.weight": f(16, 32), p + "self_attn.o_proj.weight": f(32, 32),
              p + "mlp.gate_proj.weight": f(64, 32), p + "mlp.up_proj.weight": f(64, 32),
              p + "mlp.down_proj.weight": f(32, 64),
              p + "self_attn.rotary_emb.inv_freq": f(8)})   # a buffer, dropped
    return t


def write_folder(path, config=LLAMA_JSON, tensors=None, extra=None):
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors if tensors is not None else llama_tensors(), path / "model.safetensors")
    for name, text in (extra or {}).items():
        (path / name).write_text(text)
    return path


def test_hand_written_folder_loads(tmp_path):
    folder = write_folder(tmp_path / "m", extra={
        "tokenizer_config.json": json.dumps({"chat_template": "{{ messages }}"})})
    loaded = load_hf_folder(folder)
    assert loaded.chat_template == "{{ messages }}"
    assert loaded.weights["blk.0.attn_k.weight"].shape == (16, 32)
    assert loaded.weights["blk.0.attn_k.weight"].qtype == F32
    assert "rope_freqs.weight" not in loaded.weights
    model = Transformer(loaded.config, loaded.weights)
    assert model.forward([1, 2, 3]).shape == (3, 40)


@pytest.mark.parametrize("change, error, match", [
    ({"hidden_act": "gelu"}, UnsupportedError, "hidden_act.*gelu"),
    ({"model_type": "mamba", "architectures": ["MambaForCausalLM"]}, UnsupportedError,
     "model_type.*mamba"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, UnsupportedError, "llama3"),
    ({"hidden_size": "32"}, ModelFileError, "hidden_size.*'32'"),
    ({"num_hidden_layers": None}, ModelFileError, "num_hidden_layers.*missing"),
    ({"num_key_value_heads": 3}, ModelFileError, "n_kv_head = 3"),
    ({"head_dim": 8}, UnsupportedError, "head_dim"),
])
def test_bad_config(tmp_path, change, error, match):
    folder = write_folder(tmp_path / "m", config={**LLAMA_JSON, **change})
    with pytest.raises(error, match=match):
        load_hf_folder(folder)


def test_bad_folders(tmp_path):
    with pytest.raises(ModelFileError, match="config.json"):
        load_hf_folder(tmp_path)

    tensors = llama_tensors()
    tensors["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    with pytest.raises(ModelFileError, match="q_norm"):
        load_hf_folder(write_folder(tmp_path / "a", tensors=tensors))

    tensors = llama_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"] = np.ones((64, 32), np.int32)
    with pytest.raises(UnsupportedError, match="up_proj.*I32"):
        load_hf_folder(write_folder(tmp_path / "b", tensors=tensors))

    tensors = llama_tensors()
    del tensors["model.layers.0.mlp.down_proj.weight"]
    loaded = load_hf_folder(write_folder(tmp_path / "c", tensors=tensors))
    with pytest.raises(ModelFileError, match="blk.0.ffn_down.weight.*missing"):
        Transformer(loaded.config, loaded.weights)

    folder = write_folder(tmp_path / "d")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="no model.safetensors"):
        load_hf_folder(folder)

    # a shard index pointing outside the folder
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../x.safetensors"}}))
    with pytest.raises(ModelFileError, match=r"weight_map.*\.\./x\.safetensors"):
        load_hf_folder(folder)


def test_files_in_a_folder_that_are_not_regular_files(tmp_path):
    """A FIFO in place of any file of a folder is refused at once: opening it
    for reading would otherwise wait for a writer forever.  Run in a child
    with a timeout, so that a regression fails instead of hanging the suite."""
    import os
    import subprocess
    import sys
    import fastattn
    root = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "config.json"):
        folder = write_folder(tmp_path / name.replace(".", "_"))
        path = folder / name
        if path.exists():
            path.unlink()
        os.mkfifo(path)
        code = ("import sys, fastattn\n"
                "try:\n    fastattn.load(sys.argv[1], n_threads=1)\n"
                "except fastattn.FastAttnError as e:\n    print(e)\n")
        done = subprocess.run([sys.executable, "-c", code, str(folder)], timeout=60,
                              capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=root))
        assert f"{name}: not a regular file" in done.stdout, (name, done.stdout,
                                                             done.stderr[-500:])


def test_json_files_nested_too_deeply_or_of_the_wrong_kind(tmp_path):
    folder = write_folder(tmp_path / "deep")
    (folder / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ModelFileError, match="config.json: not valid JSON: nested too deeply"):
        load_hf_folder(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelFileError, match="config.json: holds a JSON list, not an object"):
        load_hf_folder(folder)

    folder = write_folder(tmp_path / "tc", extra={"tokenizer_config.json": "[]"})
    with pytest.raises(ModelFileError, match="tokenizer_config.json: holds a JSON list"):
        load_hf_folder(folder)

    folder = write_folder(tmp_path / "jinja")
    (folder / "chat_template.jinja").write_bytes(b"{{ messages }}\xff")
    with pytest.raises(ModelFileError, match=r"chat_template.jinja: not UTF-8 text "
                                             r"\(invalid start byte at byte 14\)"):
        load_hf_folder(folder)
