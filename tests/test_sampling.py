import numpy as np
import pytest

from fastattn.errors import FastAttnError
from fastattn.sampling import Sampler, SamplingError


def random_logits(n=49152, seed=0):
    return np.random.default_rng(seed).normal(0, 3, n).astype(np.float32)


def frequencies(sampler, logits, n_draws):
    counts = np.bincount([sampler.sample(logits) for _ in range(n_draws)],
                         minlength=logits.size)
    return counts / n_draws


def truncated_distribution(logits, keep_ids, temperature=1.0):
    p = np.zeros(logits.size)
    z = np.exp(logits[keep_ids].astype(np.float64) / temperature)
    p[keep_ids] = z / z.sum()
    return p


# ----------------------------------------------------------------- greedy

@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_greedy_is_argmax(temperature):
    sampler = Sampler(temperature=temperature)
    for seed in range(5):
        logits = random_logits(seed=seed)
        assert sampler.sample(logits) == int(np.argmax(logits))


def test_greedy_ties_go_to_lowest_id():
    logits = np.array([0.0, 5.0, 1.0, 5.0, 5.0], dtype=np.float32)
    assert Sampler(temperature=0).sample(logits) == 1


def test_top_k_1_is_greedy():
    sampler = Sampler(temperature=1.5, top_k=1, top_p=1.0, seed=3)
    for seed in range(20):
        logits = random_logits(n=1000, seed=seed)
        assert sampler.sample(logits) == int(np.argmax(logits))


def test_top_k_1_with_ties_is_repeatable():
    logits = np.array([0.0, 2.0, 2.0, 2.0], dtype=np.float32)
    draws = [Sampler(temperature=1.0, top_k=1, seed=s).sample(logits) for s in range(20)]
    assert len(set(draws)) == 1 and draws[0] in (1, 2, 3)


# ----------------------------------------------------------- seeded draws

def test_same_seed_same_sequence():
    logits = random_logits(seed=1) / 3.0
    a = Sampler(temperature=1.0, top_k=0, top_p=1.0, seed=1234)
    b = Sampler(temperature=1.0, top_k=0, top_p=1.0, seed=1234)
    draws_a = [a.sample(logits) for _ in range(200)]
    draws_b = [b.sample(logits) for _ in range(200)]
    assert draws_a == draws_b
    assert len(set(draws_a)) > 20          # a flat distribution: many distinct ids


def test_different_seeds_differ():
    logits = random_logits(seed=1) / 3.0
    firsts = {Sampler(temperature=1.0, top_k=0, top_p=1.0, seed=s).sample(logits)
              for s in range(30)}
    assert len(firsts) > 10


def test_seed_none_is_random():
    logits = np.zeros(1000, dtype=np.float32)
    first = [Sampler(temperature=1.0, top_k=0, top_p=1.0).sample(logits) for _ in range(20)]
    assert len(set(first)) > 5


# ---------------------------------------------------------- distributions
# 20k draws; a frequency's standard error is sqrt(p(1-p)/n) <= 0.0036, so a
# tolerance of 0.015 (> 4 sigma) fails only when the sampler is wrong.
N_DRAWS = 20000
TOL = 0.015
SMALL = np.log(np.array([0.30, 0.05, 0.20, 0.10, 0.15, 0.02, 0.18], dtype=np.float64))
SMALL = SMALL.astype(np.float32)            # probabilities sorted: 0,6,2,4,3,1,5


def test_full_distribution():
    sampler = Sampler(temperature=1.0, top_k=0, top_p=1.0, seed=11)
    got = frequencies(sampler, SMALL, N_DRAWS)
    want = truncated_distribution(SMALL, np.arange(7))
    assert np.abs(got - want).max() < TOL, (got, want)


def test_top_k_distribution():
    sampler = Sampler(temperature=1.0, top_k=3, top_p=1.0, seed=12)
    got = frequencies(sampler, SMALL, N_DRAWS)
    want = truncated_distribution(SMALL, np.array([0, 6, 2]))
    assert got[[1, 3, 4, 5]].sum() == 0
    assert np.abs(got - want).max() < TOL, (got, want)


def test_top_p_distribution():
    # cumulative mass, best first: 0.30, 0.48, 0.68, 0.83 -> top_p 0.7 keeps four
    sampler = Sampler(temperature=1.0, top_k=0, top_p=0.7, seed=13)
    got = frequencies(sampler, SMALL, N_DRAWS)
    want = truncated_distribution(SMALL, np.array([0, 6, 2, 4]))
    assert got[[1, 3, 5]].sum() == 0
    assert np.abs(got - want).max() < TOL, (got, want)


def test_top_k_then_top_p_distribution():
    # top-k 5 renormalizes to 0.30/0.93 ...; cumulative 0.323, 0.516, 0.731 -> top_p 0.6
    # keeps three
    sampler = Sampler(temperature=1.0, top_k=5, top_p=0.6, seed=14)
    got = frequencies(sampler, SMALL, N_DRAWS)
    want = truncated_distribution(SMALL, np.array([0, 6, 2]))
    assert np.abs(got - want).max() < TOL, (got, want)


def test_temperature_distribution():
    sampler = Sampler(temperature=0.5, top_k=4, top_p=1.0, seed=15)
    got = frequencies(sampler, SMALL, N_DRAWS)
    want = truncated_distribution(SMALL, np.array([0, 6, 2, 4]), temperature=0.5)
    assert np.abs(got - want).max() < TOL, (got, want)


def test_min_p_distribution():
    # min_p 0.4 of the top 0.30 = 0.12: keeps 0.30, 0.20, 0.15, 0.18
    sampler = Sampler(temperature=1.0, top_k=0, top_p=1.0, min_p=0.4, seed=16)
    got = frequencies(sampler, SMALL, N_DRAWS)
    want = truncated_distribution(SMALL, np.array([0, 6, 2, 4]))
    assert np.abs(got - want).max() < TOL, (got, want)


def test_top_k_over_a_large_vocabulary():
    logits = random_logits(seed=5)
    best = set(np.argsort(-logits)[:10].tolist())
    sampler = Sampler(temperature=2.0, top_k=10, top_p=1.0, seed=5)
    drawn = {sampler.sample(logits) for _ in range(500)}
    assert drawn <= best and len(drawn) >= 5


def test_minus_inf_is_never_drawn():
    logits = np.array([-np.inf, 0.0, -np.inf, 0.0], dtype=np.float32)
    sampler = Sampler(temperature=1.0, top_k=0, top_p=1.0, seed=0)
    assert {sampler.sample(logits) for _ in range(200)} == {1, 3}


# --------------------------------------------------------- repeat penalty

def test_repeat_penalty_changes_the_greedy_choice():
    logits = np.array([1.0, 3.0, 2.5, -1.0], dtype=np.float32)
    assert Sampler(temperature=0).sample(logits, history=[1]) == 1
    penalized = Sampler(temperature=0, repeat_penalty=1.5)
    assert penalized.sample(logits, history=[1]) == 2       # 3.0 / 1.5 = 2.0 < 2.5
    # outside the window of the last repeat_last_n ids, no penalty
    windowed = Sampler(temperature=0, repeat_penalty=1.5, repeat_last_n=2)
    assert windowed.sample(logits, history=[1, 0, 3]) == 1
    # the caller's logits are not changed
    assert logits[1] == 3.0


def test_repeat_penalty_multiplies_negative_logits():
    logits = np.array([-1.0, -1.2], dtype=np.float32)
    assert Sampler(temperature=0, repeat_penalty=1.5).sample(logits, history=[0]) == 1


# ------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs, exc, words", [
    ({"temperature": float("nan")}, SamplingError, "temperature"),
    ({"temperature": float("inf")}, SamplingError, "temperature"),
    ({"temperature": "hot"}, TypeError, "temperature"),
    ({"top_k": -1}, SamplingError, "top_k"),
    ({"top_k": 2.5}, TypeError, "top_k"),
    ({"top_k": True}, TypeError, "top_k"),
    ({"top_p": 0.0}, SamplingError, "top_p"),
    ({"top_p": 1.5}, SamplingError, "top_p"),
    ({"top_p": -0.1}, SamplingError, "top_p"),
    ({"min_p": 1.1}, SamplingError, "min_p"),
    ({"repeat_penalty": 0.0}, SamplingError, "repeat_penalty"),
    ({"repeat_last_n": -2}, SamplingError, "repeat_last_n"),
    ({"seed": -5}, SamplingError, "seed"),
    ({"seed": 1.5}, TypeError, "seed"),
])
def test_bad_parameters(kwargs, exc, words):
    with pytest.raises(exc) as info:
        Sampler(**kwargs)
    message = str(info.value)
    assert words in message
    assert repr(next(iter(kwargs.values()))) in message or "nan" in message


def test_sampling_error_is_a_fastattn_error():
    assert issubclass(SamplingError, FastAttnError)
    assert issubclass(SamplingError, ValueError)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_raise(bad, temperature):
    logits = random_logits(n=100)
    logits[37] = bad
    with pytest.raises(SamplingError, match="id 37"):
        Sampler(temperature=temperature).sample(logits)


def test_all_minus_inf_raises():
    with pytest.raises(SamplingError, match="-inf"):
        Sampler().sample(np.full(10, -np.inf, dtype=np.float32))


@pytest.mark.parametrize("logits", [np.zeros((2, 3), np.float32), np.zeros(0, np.float32)])
def test_bad_logit_shapes_raise(logits):
    with pytest.raises(SamplingError, match="shape"):
        Sampler().sample(logits)


def test_integer_logits_raise():
    with pytest.raises(TypeError, match="dtype"):
        Sampler().sample(np.arange(5))


def test_default_parameters_on_a_real_sized_vocabulary_are_fast():
    import time
    logits = random_logits()
    sampler = Sampler(seed=0)               # top_k 40, top_p 0.95, temperature 0.8
    # CPU time, not wall time: other processes on the machine do not count
    start = time.process_time()
    for _ in range(200):
        sampler.sample(logits, history=list(range(100)))
    per_call = (time.process_time() - start) / 200
    # ~0.25 ms with the subsampled top-k; a full sort of the vocabulary is ~5 ms
    assert per_call < 0.003, f"{per_call * 1e3:.2f} ms per sample"


@pytest.mark.parametrize("k", [1, 2, 40, 1000, 5000, 49151])
def test_top_k_ids_are_exact(k):
    from fastattn.sampling import _top_k_ids
    for seed in range(3):
        logits = random_logits(seed=seed)
        logits[:: 97] = logits.max()          # many ties at the top
        got = _top_k_ids(logits, k)
        assert len(got) == k == len(set(got.tolist()))
        # exactly the k largest values (as a multiset), whichever tied ids
        assert np.array_equal(np.sort(logits[got]), np.sort(logits)[-k:])
