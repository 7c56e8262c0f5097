"""The model: weights checked against the config, and generation states.

    >>> from fastattn.loaders import load_model_files
    >>> loaded = load_model_files("SmolLM2-135M-Instruct.Q4_1.gguf")
    >>> model = Transformer(loaded.config, loaded.weights)
    >>> state = model.new_state()
    >>> logits = model.prefill(state, [1, 2, 3])        # [n_vocab], position 2
    >>> logits = model.decode(state, int(logits.argmax()))

A Transformer is read-only once built; each State holds one sequence's KV
cache, so one model serves several states (and Python threads) at once.
Every forward call runs all layers in one call into C (fastattn._engine).
"""
import logging
import operator
import os

import numpy as np

from .config import ModelConfig
from .errors import ArgumentError, ContextOverflowError, FastAttnError, ModelFileError, TokenizerError
from .weights import TYPES, WeightTensor, first_nonfinite, type_name

log = logging.getLogger("fastattn")

# Most threads a forward call may use.  Each is an OpenMP thread with its own
# stack, and libgomp ends the whole process (no exception) when it cannot
# create one, so an absurd count is refused here rather than there.
MAX_THREADS = 256


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1

# Tokens per pass through the layers during a prefill: bounds the scratch
# memory of a state ([max_chunk, n_ff] floats and the like) while keeping the
# matrix products wide enough to run fast.
MAX_CHUNK = 256


def expected_tensors(config: ModelConfig) -> tuple[dict, dict]:
    """({name: shape} of the required tensors, {name: shape} of the optional
    ones) for `config`, with the canonical (GGUF) names."""
    E, F, V = config.n_embd, config.n_ff, config.n_vocab
    Ekv = config.n_embd_kv
    required = {"token_embd.weight": (V, E), "output_norm.weight": (E,)}
    optional = {}
    if config.tied_output:
        optional["output.weight"] = (V, E)
    else:
        required["output.weight"] = (V, E)

    if config.family == "gpt2":
        required["position_embd.weight"] = (config.n_ctx, E)
        required["output_norm.bias"] = (E,)
        for i in range(config.n_layer):
            p = f"blk.{i}."
            for name, shape in [("attn_norm", (E,)), ("ffn_norm", (E,)),
                                ("attn_qkv", (3 * E, E)), ("attn_output", (E, E)),
                                ("ffn_up", (F, E)), ("ffn_down", (E, F))]:
                required[p + name + ".weight"] = shape
                required[p + name + ".bias"] = (shape[0],)
    else:
        for i in range(config.n_layer):
            p = f"blk.{i}."
            required[p + "attn_norm.weight"] = (E,)
            required[p + "ffn_norm.weight"] = (E,)
            for name, shape in [("attn_q", (E, E)), ("attn_k", (Ekv, E)),
                                ("attn_v", (Ekv, E)), ("attn_output", (E, E)),
                                ("ffn_gate", (F, E)), ("ffn_up", (F, E)),
                                ("ffn_down", (E, F))]:
                required[p + name + ".weight"] = shape
                optional[p + name + ".bias"] = (shape[0],)  # Qwen-style biases
    return required, optional


def check_weights(config: ModelConfig, weights: dict) -> None:
    """Raise ModelFileError unless every tensor the config needs is present as
    a WeightTensor of a supported type and the expected shape, and no tensor
    is one this model would silently ignore."""
    where = f"{config.source}: " if config.source else ""
    required, optional = expected_tensors(config)
    for name, shape in {**required, **optional}.items():
        t = weights.get(name)
        if t is None:
            if name in required:
                raise ModelFileError(f"{where}tensor {name} is missing "
                                     f"(expected shape {shape})")
            continue
        if not isinstance(t, WeightTensor):
            raise ModelFileError(f"{where}tensor {name}: expected a WeightTensor, "
                                 f"found {type(t).__name__}")
        if t.qtype not in TYPES:
            raise ModelFileError(f"{where}tensor {name}: type {type_name(t.qtype)} "
                                 f"is not supported")
        if tuple(t.shape) != tuple(shape):
            raise ModelFileError(f"{where}tensor {name}: expected shape {shape}, "
                                 f"found {tuple(t.shape)}")
        # an infinity or NaN in a weight makes every logit NaN downstream
        bad = first_nonfinite(t)
        if bad is not None:
            what = "value" if TYPES[t.qtype][1] == 1 else "block scale"
            raise ModelFileError(f"{where}tensor {name}: {what} {bad} is infinite or "
                                 f"NaN ({type_name(t.qtype)})")
    unknown = sorted(set(weights) - set(required) - set(optional))
    if unknown:
        # Ignoring a tensor (rope frequency factors, say) would give wrong answers
        # silently, so an unknown name is an error, not a warning.
        raise ModelFileError(f"{where}tensor {unknown[0]} is not used by a "
                             f"{config.family} model ({len(unknown)} unknown tensors)")


def check_kv_cache(kv_cache):
    """kv_cache itself if it names a KV cache type ("f32", "f16"), else ValueError."""
    if not isinstance(kv_cache, str) or kv_cache not in Transformer.KV_CACHES:
        raise ArgumentError(f"kv_cache must be one of {sorted(Transformer.KV_CACHES)}, "
                         f"got {kv_cache!r}")
    return kv_cache


class State:
    """One sequence's KV cache: positions 0 .. n_past - 1 are filled, up to n_ctx."""

    def __init__(self, engine_state):
        self._state = engine_state

    @property
    def n_past(self) -> int:
        return self._state.n_past

    @property
    def n_ctx(self) -> int:
        return self._state.n_ctx

    @property
    def kv_cache(self) -> str:
        """"f32" or "f16": the type of the cache's keys and values."""
        return "f16" if self._state.kv_type == 1 else "f32"

    def reset(self) -> None:
        """Forget every position."""
        self._state.n_past = 0

    def rewind(self, n_past: int) -> None:
        """Forget positions >= n_past (0 <= n_past <= self.n_past); cheap: the
        cache entries are overwritten by the next tokens."""
        n_past = operator.index(n_past)
        if not 0 <= n_past <= self.n_past:
            raise ArgumentError(f"rewind: n_past must be in [0, {self.n_past}], got {n_past}")
        self._state.n_past = n_past

    def __repr__(self):
        return (f"State(n_past={self.n_past}, n_ctx={self.n_ctx}, "
                f"kv_cache={self.kv_cache!r})")


class Transformer:
    """A GPT-2 or Llama model over weights in their storage form.

    config   : ModelConfig (validated here)
    weights  : {canonical name: WeightTensor}; matrices stay in their block
               form, 1-D norms and biases become float32 arrays
    n_threads: OpenMP threads per forward call, 1 .. MAX_THREADS (default: the
               CPUs this process may use; more than that is allowed but slow);
               may be changed later by setting the attribute
    activations: "f32" (default) multiplies every weight by float32
               activations, exactly; "q8" rounds the activations to 8-bit
               blocks for Q4_0 / Q4_1 / Q8_0 weights and uses integer dot
               products: faster, not exact (see csrc/quant_act.c); fixed
               for the model's lifetime (a read-only attribute)
    kv_cache : the KV cache of the states new_state makes: "f32" (default),
               exact; "f16" stores keys and values as IEEE halves, half the
               bytes (a decode reads less), not exact: each is rounded to
               about 3 significant digits (see fa_state_init_kv); may be
               changed later by setting the attribute (checked then)
    """

    ACTIVATIONS = {"f32": 0, "q8": 1}
    KV_CACHES = {"f32": 0, "f16": 1}   # the engine's kv_type

    def __init__(self, config: ModelConfig, weights: dict, n_threads=None,
                 activations="f32", kv_cache="f32"):
        from . import _engine  # the compiled core; imported here so that
                               # loaders and the reference work without it
        if not isinstance(activations, str) or activations not in self.ACTIVATIONS:
            raise ArgumentError(f"activations must be one of {sorted(self.ACTIVATIONS)}, "
                             f"got {activations!r}")
        check_kv_cache(kv_cache)
        config.validate()
        check_weights(config, weights)
        self._activations = activations
        self.kv_cache = kv_cache
        self.config = config
        self.n_threads = n_threads if n_threads is not None else available_cpus()

        matrices, vectors = {}, {}
        for name, t in weights.items():
            if len(t.shape) == 1:
                vectors[name] = np.ascontiguousarray(t.to_float(), dtype=np.float32)
            else:
                matrices[name] = t
        self._engine = _engine.Model(config, matrices, vectors,
                                     self.ACTIVATIONS[activations])
        log.debug("model: %s", ", ".join(f"{k} = {v}" for k, v in config.describe()))

    # ------------------------------------------------------- modes and threads

    @property
    def activations(self) -> str:
        """"f32" or "q8", fixed when the model is built (a q8 model keeps a
        packed copy of its weights made at load)."""
        return self._activations

    @property
    def kv_cache(self) -> str:
        """The KV cache type of the states new_state makes; may be changed."""
        return self._kv_cache

    @kv_cache.setter
    def kv_cache(self, value):
        self._kv_cache = check_kv_cache(value)


    @property
    def n_threads(self) -> int:
        return self._n_threads

    @n_threads.setter
    def n_threads(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ArgumentError(f"n_threads must be a positive integer, got {value!r}")
        if value > MAX_THREADS:
            raise ArgumentError(f"n_threads must be at most {MAX_THREADS}, got {value}")
        cpus = available_cpus()
        if value > cpus:
            log.warning("n_threads = %d is more than the %d CPUs this process can use; "
                        "every step of a forward call waits for every thread, so it "
                        "will run far slower", value, cpus)
        self._n_threads = int(value)

    # ------------------------------------------------------------------- states

    def new_state(self, n_ctx=None, kv_cache=None) -> State:
        """A fresh state with room for n_ctx positions (default: config.n_ctx),
        its KV cache "f32" or "f16" (default: the model's kv_cache)."""
        from . import _engine
        kv_cache = self.kv_cache if kv_cache is None else check_kv_cache(kv_cache)
        if n_ctx is None:
            n_ctx = self.config.n_ctx
        n_ctx = operator.index(n_ctx)
        if not 1 <= n_ctx <= self.config.n_ctx:
            raise ContextOverflowError(f"n_ctx {n_ctx} must be in [1, {self.config.n_ctx}] "
                                       f"(the model's n_ctx)")
        return State(_engine.State(self._engine, n_ctx, MAX_CHUNK,
                                   self.KV_CACHES[kv_cache]))

    # ------------------------------------------------------------------ forward

    def _check_ids(self, state: State, ids) -> np.ndarray:
        """ids as a contiguous int32 array, after every check that can name the
        culprit: type, emptiness, range, and room in the state."""
        if not isinstance(state, State) or state._state.model is not self._engine:
            raise FastAttnError("state was not made by this model's new_state()")
        array = np.asarray(ids)
        if array.ndim != 1:
            raise TokenizerError(f"ids must be a 1-D sequence of token ids, got shape "
                                 f"{array.shape}")
        if array.size == 0:
            raise TokenizerError("ids is empty: give at least one token id")
        if array.dtype.kind not in "iu":
            raise TokenizerError(f"ids must be integers, got dtype {array.dtype}")
        n_vocab = self.config.n_vocab
        bad = (array < 0) | (array >= n_vocab)
        if bad.any():
            i = int(np.argmax(bad))
            raise TokenizerError(f"token id {int(array[i])} at index {i} is outside the "
                                 f"vocabulary [0, {n_vocab})")
        if state.n_past + array.size > state.n_ctx:
            raise ContextOverflowError(
                f"context overflow: n_past {state.n_past} + requested {array.size} tokens "
                f"> n_ctx {state.n_ctx}")
        return np.ascontiguousarray(array, dtype=np.int32)

    def prefill(self, state: State, ids, all_logits: bool = False) -> np.ndarray:
        """Append ids to the state; logits [n_vocab] of the last position, or
        [n_seq, n_vocab] of every new position when all_logits."""
        ids = self._check_ids(state, ids)
        return self._engine.forward(state._state, ids, bool(all_logits), self._n_threads)

    def decode(self, state: State, token: int) -> np.ndarray:
        """Append one token; its logits [n_vocab]."""
        try:
            token = operator.index(token)
        except TypeError:
            raise TokenizerError(f"token must be an integer id, got {token!r}") from None
        if not 0 <= token < self.config.n_vocab:
            raise TokenizerError(f"token id {token} is outside the vocabulary "
                                 f"[0, {self.config.n_vocab})")
        if not isinstance(state, State) or state._state.model is not self._engine:
            raise FastAttnError("state was not made by this model's new_state()")
        if state.n_past >= state.n_ctx:
            raise ContextOverflowError(f"context overflow: n_past {state.n_past} + "
                                       f"requested 1 tokens > n_ctx {state.n_ctx}")
        return self._engine.decode(state._state, token, self._n_threads)

    def forward(self, ids) -> np.ndarray:
        """Logits [n_seq, n_vocab] of ids from a fresh state."""
        n_seq = len(ids)
        if n_seq > self.config.n_ctx:
            raise ContextOverflowError(f"context overflow: n_past 0 + requested {n_seq} "
                                       f"tokens > n_ctx {self.config.n_ctx}")
        state = self.new_state(max(n_seq, 1))
        return self.prefill(state, ids, all_logits=True)
