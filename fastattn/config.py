"""ModelConfig: the hyperparameters that fix a model's shapes.

Both loaders (GGUF and Hugging Face folders) produce one of these; the model
never knows which file format it came from.
"""
import math
from dataclasses import dataclass, field

from .errors import ModelFileError, UnsupportedError

FAMILIES = ("gpt2", "llama")

# The smallest positive and the largest finite float32.
FLOAT32_TINY = 1.401298464324817e-45
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class ModelConfig:
    family: str              # "gpt2" or "llama"
    n_vocab: int
    n_ctx: int               # longest sequence the model was trained for
    n_embd: int
    n_layer: int
    n_head: int
    n_kv_head: int           # == n_head without grouped-query attention
    n_ff: int                # hidden width of the MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_neox: bool = False  # llama only: rotate halves (HF) instead of pairs (GGUF)
    tied_output: bool = True  # output head shares token_embd
    name: str = ""
    source: str = ""         # path the model was read from, for messages
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.n_kv_head * self.head_dim

    def validate(self) -> "ModelConfig":
        """Raise ModelFileError unless every field is sane; returns self."""
        where = f"{self.source}: " if self.source else ""
        if self.family not in FAMILIES:
            raise UnsupportedError(f"{where}architecture {self.family!r} is not supported "
                                   f"(supported: {', '.join(FAMILIES)})")
        for name in ("n_vocab", "n_ctx", "n_embd", "n_layer", "n_head", "n_kv_head", "n_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelFileError(f"{where}{name} must be a positive integer, got {value!r}")
            if value > 1 << 31:
                raise ModelFileError(f"{where}{name} = {value} is implausibly large")
        if self.n_embd % self.n_head:
            raise ModelFileError(f"{where}n_embd = {self.n_embd} is not divisible by "
                                 f"n_head = {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ModelFileError(f"{where}n_head = {self.n_head} is not a multiple of "
                                 f"n_kv_head = {self.n_kv_head}")
        if self.family == "llama" and self.head_dim % 2:
            raise ModelFileError(f"{where}head_dim = {self.head_dim} must be even for RoPE")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ModelFileError(f"{where}{name} must be a positive finite number, "
                                     f"got {value!r}")
            # the kernels take it as a float32: 1e-129 would become 0, 1e39 inf
            if not FLOAT32_TINY <= value <= FLOAT32_MAX:
                raise ModelFileError(f"{where}{name} = {value!r} is outside the float32 "
                                     f"range [{FLOAT32_TINY}, {FLOAT32_MAX}]")
        return self

    def describe(self) -> list[tuple[str, object]]:
        """(key, value) pairs printed at load, llama.cpp style."""
        return [
            ("arch", self.family), ("n_vocab", self.n_vocab), ("n_ctx", self.n_ctx),
            ("n_embd", self.n_embd), ("n_layer", self.n_layer), ("n_head", self.n_head),
            ("n_kv_head", self.n_kv_head), ("head_dim", self.head_dim), ("n_ff", self.n_ff),
            ("norm_eps", self.norm_eps),
        ] + ([("rope_theta", self.rope_theta)] if self.family == "llama" else [])
