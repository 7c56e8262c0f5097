"""Choosing the next token from the model's logits.

The steps, in llama.cpp's order:

    repeat penalty   logit / penalty if > 0 else logit * penalty, for the ids
                     among the last `repeat_last_n` tokens of the history
    greedy           temperature <= 0: argmax (ties go to the lowest id)
    top-k            keep the k largest logits (k = 0: keep all)
    top-p            keep the smallest set of those, most likely first, whose
                     probability (at temperature 1) sums to at least top_p
    min-p            drop what is less likely than min_p * the top probability
    temperature      softmax(logit / temperature) over what is left, and draw

    >>> sampler = Sampler(temperature=0.7, top_k=40, seed=1)
    >>> token = sampler.sample(logits, history=[1, 2, 3])

A Sampler holds its own random generator, so one seed gives one sequence of
draws, and samplers used from different threads never share state.
"""
import math
import numbers

import numpy as np

from .errors import FastAttnError


class SamplingError(FastAttnError, ValueError):
    """A sampling parameter out of range, or logits the sampler cannot use."""


def _check_number(name, value, low=None, high=None, low_open=False, high_open=False):
    """Raise TypeError / SamplingError unless value is a real number in range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise SamplingError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        span = f"{left}{lo}, {hi}{right}"
        raise SamplingError(f"{name} must be in {span}, got {value!r}")
    return value


def _check_int(name, value, low=0):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise SamplingError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


class Sampler:
    """Turns logits [n_vocab] into one token id; see the module docstring.

    temperature     <= 0 means greedy (then the other filters do not matter)
    top_k           0 keeps the whole vocabulary
    top_p           in (0, 1]; 1 keeps everything top-k kept
    min_p           in [0, 1]; 0 keeps everything
    repeat_penalty  > 0; 1 is off.  Applies to the last repeat_last_n ids of
                    the history (repeat_last_n = 0: none, -1: the whole history)
    seed            an int >= 0 for repeatable draws, None for fresh entropy
    """

    def __init__(self, temperature=0.8, top_k=40, top_p=0.95, min_p=0.0,
                 repeat_penalty=1.0, repeat_last_n=64, seed=None):
        self.temperature = _check_number("temperature", temperature)
        self.top_k = _check_int("top_k", top_k)
        self.top_p = _check_number("top_p", top_p, 0.0, 1.0, low_open=True)
        self.min_p = _check_number("min_p", min_p, 0.0, 1.0)
        self.repeat_penalty = _check_number("repeat_penalty", repeat_penalty, 0.0,
                                            low_open=True)
        self.repeat_last_n = _check_int("repeat_last_n", repeat_last_n, low=-1)
        if seed is not None:
            seed = _check_int("seed", seed)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def sample(self, logits, history=()) -> int:
        """logits [n_vocab] (float), history: the ids so far -> the next id."""
        logits = self._checked(logits)
        logits = self._apply_repeat_penalty(logits, history)
        if self.greedy:
            return int(np.argmax(logits))

        ids, values = self._top_k(logits)
        probs = _softmax(values)                  # at temperature 1, for top-p / min-p
        keep = len(ids)
        if self.top_p < 1.0:
            # smallest prefix whose mass reaches top_p (at least one token)
            cumulative = np.cumsum(probs)
            keep = min(keep, int(np.searchsorted(cumulative, self.top_p)) + 1)
        if self.min_p > 0.0:
            keep = min(keep, int(np.count_nonzero(probs >= self.min_p * probs[0])))
        ids, values = ids[:keep], values[:keep]

        # draw from softmax(values / temperature), the maximum subtracted first:
        # a tiny temperature then sends the others to -inf (greedy, its limit),
        # not every value to +-inf and the probabilities to NaN
        with np.errstate(over="ignore"):
            probs = _softmax((values - values.max()) / self.temperature)
        cumulative = np.cumsum(probs)
        u = self.rng.random() * cumulative[-1]
        index = min(int(np.searchsorted(cumulative, u, side="right")), keep - 1)
        return int(ids[index])

    # ------------------------------------------------------------ steps

    def _checked(self, logits) -> np.ndarray:
        logits = np.asarray(logits)
        if logits.ndim != 1 or logits.size == 0:
            raise SamplingError(f"logits must be a non-empty vector [n_vocab], "
                                f"got shape {logits.shape}")
        if not np.issubdtype(logits.dtype, np.floating):
            raise TypeError(f"logits must be floating point, got dtype {logits.dtype}")
        # -inf is a banned token (a logit bias may set it); NaN and +inf are
        # what a broken model produces, and must not become a silent token.
        bad = np.isnan(logits) | (logits == np.inf)
        if bad.any():
            where = np.flatnonzero(bad)
            raise SamplingError(f"logits contain {len(where)} NaN/+inf values "
                                f"(first at id {int(where[0])}: {logits[where[0]]})")
        if not np.isfinite(logits).any():
            raise SamplingError("every logit is -inf: no token can be chosen")
        return logits

    def _apply_repeat_penalty(self, logits, history) -> np.ndarray:
        if self.repeat_penalty == 1.0 or self.repeat_last_n == 0 or len(history) == 0:
            return logits
        recent = history if self.repeat_last_n < 0 else history[-self.repeat_last_n:]
        try:
            ids = np.unique(np.asarray(recent, dtype=np.int64))
        except (TypeError, ValueError, OverflowError):
            raise SamplingError(f"history must be a sequence of token ids, got "
                                f"{str(recent)[:80]}") from None
        ids = ids[(ids >= 0) & (ids < logits.size)]
        dtype = np.result_type(logits.dtype, np.float32)     # float32 at least
        logits = logits.astype(dtype, copy=True)
        seen = logits[ids]
        # in float64, where any valid penalty is a finite nonzero number (as a
        # float32, 1e-300 would be 0 and 1e200 inf); then a finite logit stays
        # finite (+inf would be refused as a broken model's, -inf is banned)
        wide = seen.astype(np.float64)
        with np.errstate(all="ignore"):
            penalized = np.where(wide > 0, wide / self.repeat_penalty,
                                 wide * self.repeat_penalty)
        limit = np.finfo(dtype).max
        logits[ids] = np.where(np.isfinite(seen), np.clip(penalized, -limit, limit), seen)
        return logits

    def _top_k(self, logits):
        """The k best (ids, logits as float64), best first; ties keep lower ids first.

        With no top-k, top-p or min-p to apply, the whole vocabulary is kept in
        id order: sorting 49k logits would cost more than the draw itself."""
        n_vocab = logits.size
        if 0 < self.top_k < n_vocab:
            ids = np.sort(_top_k_ids(logits, self.top_k))
        else:
            ids = np.arange(n_vocab)
        values = logits[ids].astype(np.float64)
        if ids.size < n_vocab or self.top_p < 1.0 or self.min_p > 0.0:
            order = np.argsort(-values, kind="stable")     # ids ascend: ties by id
            ids, values = ids[order], values[order]
        finite = np.isfinite(values)
        if not finite.all():
            ids, values = ids[finite], values[finite]   # -inf: banned
        return ids, values


def _top_k_ids(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits [n_vocab], in no order.

    A full argpartition over 49k logits is most of a sampling step, so first
    take every 16th logit: its k-th largest value t is a logit of the full
    vector with k logits >= t, so the (usually ~16k) logits >= t hold the top k.
    The result is exact; only the work shrinks."""
    stride = 16
    if logits.size // stride > 4 * k:
        sample = logits[::stride]
        t = np.partition(sample, sample.size - k)[sample.size - k]
        candidates = np.flatnonzero(logits >= t)
        n = candidates.size
        return candidates[np.argpartition(logits[candidates], n - k)[n - k:]]
    return np.argpartition(logits, logits.size - k)[logits.size - k:]


def _softmax(values: np.ndarray) -> np.ndarray:
    """[n] float64 -> probabilities [n]."""
    e = np.exp(values - values.max())
    return e / e.sum()
