"""Hugging Face checkpoint folders: GPT2LMHeadModel and LlamaForCausalLM.

    loaded = load_hf_folder("path/to/folder")   # config.json + *.safetensors

config.json becomes a ModelConfig; the weights of model.safetensors (or of
the shards listed in model.safetensors.index.json) are renamed to the
canonical GGUF names of fastattn.loaders.  F32, F16 and BF16 tensors stay as
stored, read-only views over the mapped files, except GPT-2's Conv1D weights,
which are stored [n_in, n_out] and are transposed (copied) to [n_out, n_in].
The tokenizer is left to fastattn.tokenizer ({"kind": "hf", "path": folder}).
"""
import os
import re

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFileError, UnsupportedError
from ..files import read_json_object, read_text
from ..weights import BF16, F16, F32, WeightTensor
from . import LoadedModel
from .safetensors import SafetensorsFile

# --------------------------------------------------------------- config.json


def _read_json(path):
    return read_json_object(path)


def _field(cfg, where, name, kind=int, default=None, required=True):
    """cfg[name] checked to be of `kind`; default if absent (or null) and allowed."""
    value = cfg.get(name)
    if value is None:
        if default is not None or not required:
            return default
        raise ModelFileError(f"{where}: field {name} is missing")
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          if kind is float else isinstance(value, kind) and not (
              kind is int and isinstance(value, bool)))
    if not ok:
        raise ModelFileError(f"{where}: field {name} has value {value!r}, expected "
                             f"{kind.__name__}")
    return float(value) if kind is float else value


def _family(cfg, where):
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    if model_type == "gpt2" or "GPT2LMHeadModel" in archs:
        return "gpt2"
    if model_type == "llama" or "LlamaForCausalLM" in archs:
        return "llama"
    raise UnsupportedError(f"{where}: field model_type has value {model_type!r} "
                           f"(architectures {archs}); supported: gpt2, llama")


def config_from_hf(cfg: dict, where: str) -> ModelConfig:
    """ModelConfig from a parsed config.json; `where` names the file in errors."""
    if not isinstance(cfg, dict):
        raise ModelFileError(f"{where}: expected a JSON object")
    family = _family(cfg, where)
    if family == "gpt2":
        act = cfg.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise UnsupportedError(f"{where}: field activation_function has value {act!r}; "
                                   f"only the tanh GELU (gelu_new) is supported")
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("scale_attn_weights") is False:
            raise UnsupportedError(f"{where}: attention scaling other than 1/sqrt(head_dim) "
                                   f"is not supported")
        n_embd = _field(cfg, where, "n_embd")
        config = ModelConfig(
            family="gpt2",
            n_vocab=_field(cfg, where, "vocab_size"),
            n_ctx=_field(cfg, where, "n_positions"),
            n_embd=n_embd,
            n_layer=_field(cfg, where, "n_layer"),
            n_head=_field(cfg, where, "n_head"),
            n_kv_head=_field(cfg, where, "n_head"),
            n_ff=_field(cfg, where, "n_inner", required=False) or 4 * n_embd,
            norm_eps=_field(cfg, where, "layer_norm_epsilon", float, 1e-5),
            tied_output=bool(cfg.get("tie_word_embeddings", True)),
        )
    else:
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedError(f"{where}: field hidden_act has value {act!r}; only "
                                   f"silu is supported")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ModelFileError(f"{where}: field rope_parameters has value {rope!r}")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in (None, "default"):
            raise UnsupportedError(f"{where}: field rope_type has value {rope_type!r}; only "
                                   f"the default rope is supported")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        n_embd = _field(cfg, where, "hidden_size")
        n_head = _field(cfg, where, "num_attention_heads")
        head_dim = cfg.get("head_dim")
        if head_dim is not None and n_head > 0 and head_dim * n_head != n_embd:
            raise UnsupportedError(f"{where}: field head_dim has value {head_dim!r}; only "
                                   f"head_dim == hidden_size / num_attention_heads "
                                   f"({n_embd} / {n_head}) is supported")
        config = ModelConfig(
            family="llama",
            n_vocab=_field(cfg, where, "vocab_size"),
            n_ctx=_field(cfg, where, "max_position_embeddings"),
            n_embd=n_embd,
            n_layer=_field(cfg, where, "num_hidden_layers"),
            n_head=n_head,
            n_kv_head=_field(cfg, where, "num_key_value_heads", int, n_head),
            n_ff=_field(cfg, where, "intermediate_size"),
            norm_eps=_field(cfg, where, "rms_norm_eps", float, 1e-6),
            rope_theta=_field({"rope_theta": theta}, where, "rope_theta", float),
            rope_neox=True,   # HF checkpoints rotate halves
            tied_output=bool(cfg.get("tie_word_embeddings", False)),
        )
    config.name = str(cfg.get("_name_or_path") or "")
    config.source = where
    return config.validate()


# ------------------------------------------------------------- tensor names

_GPT2_NAMES = [
    (r"wte\.weight", "token_embd.weight"),
    (r"wpe\.weight", "position_embd.weight"),
    (r"ln_f\.(weight|bias)", r"output_norm.\1"),
    (r"h\.(\d+)\.ln_1\.(weight|bias)", r"blk.\1.attn_norm.\2"),
    (r"h\.(\d+)\.ln_2\.(weight|bias)", r"blk.\1.ffn_norm.\2"),
    (r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", r"blk.\1.attn_qkv.\2"),
    (r"h\.(\d+)\.attn\.c_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"h\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"blk.\1.ffn_up.\2"),
    (r"h\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"blk.\1.ffn_down.\2"),
    (r"lm_head\.weight", "output.weight"),
]
_GPT2_DROP = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")  # causal-mask buffers

_LLAMA_NAMES = [
    (r"embed_tokens\.weight", "token_embd.weight"),
    (r"norm\.weight", "output_norm.weight"),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"blk.\1.attn_norm.weight"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"blk.\1.ffn_norm.weight"),
    (r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", r"blk.\1.attn_q.\2"),
    (r"layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", r"blk.\1.attn_k.\2"),
    (r"layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", r"blk.\1.attn_v.\2"),
    (r"layers\.(\d+)\.self_attn\.o_proj\.(weight|bias)", r"blk.\1.attn_output.\2"),
    (r"layers\.(\d+)\.mlp\.gate_proj\.(weight|bias)", r"blk.\1.ffn_gate.\2"),
    (r"layers\.(\d+)\.mlp\.up_proj\.(weight|bias)", r"blk.\1.ffn_up.\2"),
    (r"layers\.(\d+)\.mlp\.down_proj\.(weight|bias)", r"blk.\1.ffn_down.\2"),
    (r"lm_head\.weight", "output.weight"),
]
_LLAMA_DROP = re.compile(r"layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # a buffer

# GPT-2's Conv1D layers store their weight as [n_in, n_out]
_CONV1D = re.compile(r"blk\.\d+\.(attn_qkv|attn_output|ffn_up|ffn_down)\.weight")


def canonical_name(family: str, hf_name: str):
    """The GGUF name of an HF tensor; None for buffers that hold no weights."""
    prefix = "transformer." if family == "gpt2" else "model."
    short = hf_name[len(prefix):] if hf_name.startswith(prefix) else hf_name
    drop = _GPT2_DROP if family == "gpt2" else _LLAMA_DROP
    if drop.fullmatch(short):
        return None
    for pattern, repl in (_GPT2_NAMES if family == "gpt2" else _LLAMA_NAMES):
        if re.fullmatch(pattern, short):
            return re.sub(pattern, repl, short)
    return ""


# ----------------------------------------------------------------- tensors

_TYPES = {"F32": F32, "F16": F16, "BF16": BF16}


def _weight(f: SafetensorsFile, hf_name: str, name: str, transpose: bool) -> WeightTensor:
    info = f.info(hf_name)
    where = f"{f.path}: tensor {hf_name!r}"
    if info.dtype == "F64":   # rare; stored as F32 (a copy)
        array = f.array(hf_name).astype(np.float32)
        qtype = F32
    elif info.dtype in _TYPES:
        array = f.array(hf_name)
        qtype = _TYPES[info.dtype]
    else:
        raise UnsupportedError(f"{where}: field dtype has value {info.dtype!r}; supported: "
                               f"F32, F16, BF16")
    if array.ndim not in (1, 2) or 0 in array.shape:
        raise ModelFileError(f"{where}: field shape has value {list(info.shape)}; expected "
                             f"a non-empty vector or matrix")
    if transpose:
        if array.ndim != 2:
            raise ModelFileError(f"{where}: field shape has value {list(info.shape)}; "
                                 f"expected a Conv1D matrix [n_in, n_out]")
        array = np.ascontiguousarray(array.T)      # [n_in, n_out] -> [n_out, n_in]
    return WeightTensor(array.view(np.uint8), qtype, array.shape, name)


def _open_shards(folder):
    """[SafetensorsFile], {hf tensor name: its file}, from model.safetensors or
    the shards listed in model.safetensors.index.json."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(single):
        f = SafetensorsFile(single)
        return [f], {name: f for name in f.names()}
    if not os.path.exists(index_path):
        raise ModelFileError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                             f"(other weight formats, such as pytorch_model.bin, are not "
                             f"supported)")

    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFileError(f"{index_path}: field weight_map is missing or empty")
    files, where = {}, {}
    for name, shard in weight_map.items():
        if (not isinstance(shard, str) or os.path.basename(shard) != shard
                or not shard.endswith(".safetensors")):
            raise ModelFileError(f"{index_path}: weight_map[{name!r}] has value {shard!r}; "
                                 f"expected a .safetensors file name in the folder")
        if shard not in files:
            files[shard] = SafetensorsFile(os.path.join(folder, shard))
        if name not in files[shard].tensors:
            raise ModelFileError(f"{index_path}: weight_map[{name!r}] names {shard}, which "
                                 f"has no such tensor")
        where[name] = files[shard]
    for shard, f in files.items():
        for name in f.names():
            if where.get(name) is not f:
                raise ModelFileError(f"{f.path}: tensor {name!r} is not listed for this "
                                     f"file in {index_path}")
    return list(files.values()), where


def _chat_template(folder):
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.lexists(jinja):
        return read_text(jinja)
    path = os.path.join(folder, "tokenizer_config.json")
    if not os.path.exists(path):
        return None
    template = _read_json(path).get("chat_template")
    if isinstance(template, list):   # [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_hf_folder(path) -> LoadedModel:
    """Read a GPT2LMHeadModel or LlamaForCausalLM checkpoint folder."""
    folder = os.fspath(path)
    config_path = os.path.join(folder, "config.json")
    if os.path.isdir(folder) and not os.path.exists(config_path):
        raise ModelFileError(f"{folder}: a folder without config.json, so not a Hugging "
                             f"Face checkpoint (a model is a .gguf file or such a folder)")
    raw_config = _read_json(config_path)
    config = config_from_hf(raw_config, config_path)
    config.source = folder

    files, where = _open_shards(folder)
    weights = {}
    for hf_name, f in where.items():
        name = canonical_name(config.family, hf_name)
        if name is None:
            continue
        if name == "":
            raise ModelFileError(f"{f.path}: tensor {hf_name!r} is not a "
                                 f"{config.family} weight fastattn knows")
        if name == "output.weight" and config.tied_output:
            continue   # tied: the head is the embedding, as transformers loads it
        if name in weights:
            raise ModelFileError(f"{f.path}: tensor {hf_name!r} maps to {name}, which "
                                 f"another tensor already gave")
        transpose = config.family == "gpt2" and bool(_CONV1D.fullmatch(name))
        weights[name] = _weight(f, hf_name, name, transpose)

    return LoadedModel(
        config=config,
        weights=weights,
        tokenizer={"kind": "hf", "path": folder},
        chat_template=_chat_template(folder),
        metadata={"format": "hf", "config.json": raw_config},
        keepalive=files,
    )
