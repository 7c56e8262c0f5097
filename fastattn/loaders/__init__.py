"""Model file readers.  Each turns a file into the same LoadedModel, so the
model and the tokenizer never know which format they came from.

    gguf.py  a llama.cpp GGUF file (metadata, tokenizer and tensors in one file)
    hf.py    a Hugging Face checkpoint folder (config.json, *.safetensors,
             tokenizer files)

Canonical tensor names are GGUF's, whatever the source:
  token_embd.weight [n_vocab, n_embd]      position_embd.weight [n_ctx, n_embd] (gpt2)
  blk.{i}.attn_norm.weight / .bias          blk.{i}.ffn_norm.weight / .bias
  gpt2:  blk.{i}.attn_qkv.weight [3*n_embd, n_embd] + .bias, attn_output, ffn_up,
         ffn_down (each with .bias)
  llama: blk.{i}.attn_q.weight [n_embd, n_embd], attn_k / attn_v [n_embd_kv, n_embd],
         attn_output, ffn_gate / ffn_up [n_ff, n_embd], ffn_down [n_embd, n_ff]
  output_norm.weight / .bias                output.weight [n_vocab, n_embd] (absent if tied)
"""
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from ..config import ModelConfig
from ..errors import ModelFileError, OutOfMemoryError
from ..weights import WeightTensor


@dataclass
class LoadedModel:
    config: ModelConfig
    weights: dict[str, WeightTensor]
    # How to build the tokenizer: {"kind": "gguf", ...GGUF tokenizer fields...}
    # or {"kind": "hf", "path": folder}; see fastattn.tokenizer.Tokenizer.from_loaded.
    tokenizer: dict
    chat_template: Optional[str] = None
    metadata: dict = field(default_factory=dict)
    keepalive: Any = None  # the mapped file the weight views point into


def load_model_files(path) -> LoadedModel:
    """Read a GGUF file or a Hugging Face checkpoint folder."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file or folder")
    try:
        if os.path.isdir(path):
            from .hf import load_hf_folder
            return load_hf_folder(path)
        from .gguf import load_gguf
        return load_gguf(path)
    except OutOfMemoryError:
        raise
    except MemoryError:
        pass
    # Python ran out of memory somewhere in reading the metadata.  Out here the
    # failed load's frames are gone, and their memory with them: say how much
    # the files take (the weights stay mapped, not copied).
    size = _size_of(path)
    raise OutOfMemoryError(f"{path}: out of memory while loading the model: the files "
                           f"hold {size} bytes ({size / 2**20:.1f} MiB), mapped, plus "
                           f"the metadata read from them")


def _size_of(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path)
                   if os.path.isfile(os.path.join(path, name)))
    return os.path.getsize(path)
