"""Random small models for tests: a config and weights of the right shapes.

    >>> config = random_config("llama", n_embd=64, n_head=4, n_kv_head=2)
    >>> weights = random_weights(config, qtype=Q4_1, seed=0)
    >>> Transformer(config, weights).forward([1, 2, 3]).shape
    (3, 96)

Weights are drawn so that activations stay of order one through the layers
(matrices with std 1/sqrt(n_in), norm gains near one), which keeps the logits
spread out enough for comparisons to mean something.
"""
import numpy as np

from .config import ModelConfig
from .model import expected_tensors
from .weights import F32, WeightTensor


def random_config(family: str = "llama", *, n_vocab: int = 96, n_ctx: int = 64,
                  n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
                  n_kv_head: int | None = None, n_ff: int = 96, tied_output: bool = True,
                  rope_neox: bool = False, rope_theta: float = 10000.0,
                  norm_eps: float = 1e-5) -> ModelConfig:
    """A validated ModelConfig; n_kv_head defaults to n_head (no GQA)."""
    return ModelConfig(
        family=family, n_vocab=n_vocab, n_ctx=n_ctx, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, n_kv_head=n_head if n_kv_head is None else n_kv_head, n_ff=n_ff,
        norm_eps=norm_eps, rope_theta=rope_theta, rope_neox=rope_neox,
        tied_output=tied_output, name=f"random-{family}", source="<random>",
    ).validate()


def random_weights(config: ModelConfig, qtype: int = F32, seed: int = 0,
                   embd_qtype: int | None = None, biases: bool = False) -> dict:
    """{canonical name: WeightTensor}.  Matrices are stored as `qtype`
    (token_embd, position_embd and output as `embd_qtype`, default `qtype`);
    1-D tensors as F32.  biases=True also draws the optional llama biases."""
    rng = np.random.default_rng(seed)
    embd_qtype = qtype if embd_qtype is None else embd_qtype
    required, optional = expected_tensors(config)
    shapes = dict(required)
    if not config.tied_output:
        shapes["output.weight"] = required["output.weight"]
    if biases:
        shapes.update({k: v for k, v in optional.items() if k.endswith(".bias")})

    weights = {}
    for name, shape in shapes.items():
        if len(shape) == 1 and name.endswith("norm.weight"):
            array = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) == 1:
            array = 0.1 * rng.standard_normal(shape)
        elif name in ("token_embd.weight", "position_embd.weight", "output.weight"):
            array = 0.5 * rng.standard_normal(shape)
        else:
            array = rng.standard_normal(shape) / np.sqrt(shape[1])
        kind = F32 if len(shape) == 1 else (
            embd_qtype if name in ("token_embd.weight", "position_embd.weight",
                                   "output.weight") else qtype)
        weights[name] = WeightTensor.from_float(array.astype(np.float32), kind, name)
    return weights


def random_ids(config: ModelConfig, n_seq: int, seed: int = 0) -> np.ndarray:
    """n_seq token ids drawn uniformly from the vocabulary, int32."""
    return np.random.default_rng(seed).integers(0, config.n_vocab, n_seq).astype(np.int32)
