"""The attention lab: every rewrite meant to be exact is judged exact, every
rewrite broken on purpose is judged different at the layer where it breaks,
overflow is reported rather than crashed on, and the command line works.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import fastattn
from fastattn import lab, lab_variants, reference
from fastattn.errors import FastAttnError
from fastattn.testing import random_config, random_ids, random_weights

FAMILIES = {
    "gpt2": dict(family="gpt2", n_embd=64, n_head=4, n_layer=3),
    "llama-gqa": dict(family="llama", n_embd=64, n_head=4, n_kv_head=2, n_layer=3),
    # head_dim 12: 1/sqrt(12) is not a power of two, so scale_in_query rounds
    "llama-hd12": dict(family="llama", n_embd=48, n_head=4, n_kv_head=2, n_layer=3),
}
# the folder fastattn was imported from (source tree or site-packages), for
# the subprocess to import the same one
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
EXACT = list(lab.DEFAULT_VARIANTS)           # engine included: it must be built
BIT_IDENTICAL = {"reference"}                # the control: same code path
ROUNDING = {"kv_cache_decode", "online_softmax:block=1", "online_softmax:block=16",
            "float64", "engine"}             # must differ, if only by rounding


def random_lab(name, seed=0, **overrides):
    kw = dict(FAMILIES[name])
    family = kw.pop("family")
    kw.update(overrides)
    config = random_config(family, **kw)
    return lab.Lab(config, random_weights(config, seed=seed), engine_threads=1)


# --------------------------------------------------------- the loop itself


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_lab_loop_reproduces_reference_forward_bit_for_bit(name):
    L = random_lab(name)
    ids = random_ids(L.config, 17, seed=1)
    logits, hidden = reference.forward(L.config, L.w, ids, return_hidden=True)
    trace = lab.forward_layers(L.config, L.w, ids,
                               lab.per_head(L.config, reference.attention_softmax))
    assert len(trace.hidden) == L.config.n_layer
    for h, h_ref in zip(trace.hidden, hidden):
        np.testing.assert_array_equal(h, h_ref)
    np.testing.assert_array_equal(trace.logits, logits)


@pytest.mark.parametrize("neox", [False, True])
def test_rope_at_matches_reference_rope_bit_for_bit(neox):
    x = np.random.default_rng(0).standard_normal((23, 3, 16)).astype(np.float32)
    full = reference.rope(x, 10000.0, neox)
    np.testing.assert_array_equal(lab.rope_at(x, np.arange(23), 10000.0, neox), full)
    for t in (0, 7, 22):                              # one decode step at position t
        np.testing.assert_array_equal(lab.rope_at(x[t:t + 1], [t], 10000.0, neox),
                                      full[t:t + 1])


def test_float64_shadow_is_close_to_the_float32_reference_and_not_equal():
    L = random_lab("llama-gqa")
    ids = random_ids(L.config, 20, seed=2)
    base, (shadow, peaks) = L.baseline(ids), L.shadow(ids)
    assert shadow.logits.dtype == np.float64
    tol = lab.Tolerance.measure(base, shadow)
    # float32 rounding, no more: the shadow computes the same model
    assert all(0 < err < 1e-5 for err in tol.ref_error), tol.ref_error
    assert 0 < tol.ref_logit_error < 1e-4
    # the tolerance never shrinks with depth and is K times the running max
    assert tol.layers == sorted(tol.layers)
    assert tol.layers[-1] == pytest.approx(lab.DEFAULT_TOL * max(tol.ref_error))

    # the score peaks are the largest q.k/sqrt(head_dim) of each layer
    seen = [-np.inf] * L.config.n_layer

    def spy(q, k, v, mask, layer):
        s = q @ k.T / np.sqrt(np.float32(q.shape[-1])) + mask
        seen[layer] = max(seen[layer], float(s.max()))
        return reference.attention_softmax(q, k, v, mask)

    lab.forward_layers(L.config, L.w, ids, lab.per_head(L.config, spy))
    np.testing.assert_allclose(peaks, seen, rtol=1e-5)


# --------------------------------------------------------------- verdicts


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_builtin_exact_variant_is_judged_exact(name):
    L = random_lab(name)
    report = L.run(random_ids(L.config, 40, seed=3), EXACT)
    n = len(report.ids)
    for r in report.results:
        assert r.verdict == "exact", (r.name, r.reason, r.layer_max_rel, r.logit_max_abs)
        assert r.greedy_agree == n and r.kl_max < 1e-8, r.name
        assert r.first_departing_layer is None
        assert not r.broken
    assert report.ok
    assert report["engine"].compared_on == "logits only"
    assert report["engine"].layer_max_rel is None
    for name_ in BIT_IDENTICAL:
        assert report[name_].max_rel == 0 and report[name_].logit_max_abs == 0
    # the rewrites are real: their rounding differs from the reference's
    for name_ in ROUNDING:
        assert report[name_].logit_max_abs > 0, name_
        if report[name_].layer_max_rel is not None:
            assert report[name_].max_rel > 0, name_
    if L.config.head_dim == 12:
        assert report["scale_in_query"].max_rel > 0
    else:                                  # 1/4: a power of two, exact to the bit
        assert report["scale_in_query"].max_rel == 0
    with pytest.raises(KeyError, match="no variant 'nosuch'.*it has: .*engine"):
        report["nosuch"]


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa"])
def test_broken_variants_are_judged_different_from_layer_0(name):
    L = random_lab(name)
    report = L.run(random_ids(L.config, 32, seed=4), lab.BROKEN_VARIANTS)
    assert [r.name for r in report.results] == list(lab.BROKEN_VARIANTS)
    assert len(lab.BROKEN_VARIANTS) == 4
    for r in report.results:
        assert r.broken
        assert r.verdict == "different", (r.name, r.reason)
        assert r.first_departing_layer == 0, r.name
        assert r.layer_max_rel[0] > 1e3 * report.tolerance.layers[0], r.name
        assert "departs at layer 0" in r.reason
    assert report.ok                                 # broken on purpose: not counted
    assert "[broken]" in report.table()


def test_first_departing_layer_is_found_when_a_rewrite_breaks_late():
    L = random_lab("llama-gqa", n_layer=5)
    ids = random_ids(L.config, 24, seed=5)

    def breaks_from_layer_3(q, k, v, mask, layer):
        if layer >= 3:
            return lab_variants.wrong_scale_missing(q, k, v, mask)
        return reference.attention_softmax(q, k, v, mask)

    class BreaksAfterNCalls:                          # stateful: no layer argument
        def __init__(self, n_calls):
            self.calls, self.n_calls = 0, n_calls

        def __call__(self, q, k, v, mask):
            self.calls += 1
            if self.calls > self.n_calls:
                return lab_variants.wrong_mask_shifted(q, k, v, mask)
            return reference.attention_softmax(q, k, v, mask)

    stateful = BreaksAfterNCalls(2 * L.config.n_head)  # layers 0 and 1 are right
    report = L.run(ids, [breaks_from_layer_3, stateful])
    late, stateful_r = report.results
    assert late.first_departing_layer == 3 and late.verdict == "different"
    assert late.layer_max_rel[:3] == [0.0, 0.0, 0.0]
    assert late.layer_max_rel[3] > 1e-2
    assert stateful_r.first_departing_layer == 2
    assert stateful_r.layer_max_rel[:2] == [0.0, 0.0]
    assert "departs at layer 3" in late.reason
    assert "*" in report.layer_table()


def test_approx_verdict_for_a_small_real_change():
    """Rounding the attention weights to bfloat16-like 8 bits of mantissa keeps
    every greedy token on a small model but is far above float32 rounding."""
    L = random_lab("llama-gqa")

    def coarse(q, k, v, mask):
        p = reference.softmax(q @ k.T / np.sqrt(np.float32(q.shape[-1])) + mask)
        p = (p.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
        return p @ v

    report = L.run(random_ids(L.config, 24, seed=6), [coarse], kl_tol=1e-2)
    r = report.results[0]
    assert r.first_departing_layer == 0
    assert r.verdict == "approx", r.reason
    assert 0 < r.kl_max <= 1e-2 and r.greedy_agree == 24


def test_no_max_subtraction_fails_on_large_logits_without_crashing():
    L = random_lab("llama-gqa")
    ids = random_ids(L.config, 24, seed=7)

    # ordinary weights: exact
    report = L.run(ids, ["no_max_subtraction"])
    assert report["no_max_subtraction"].verdict == "exact"

    # scores ~ 40 x 40 = 1600 times larger: exp overflows float32
    weights = dict(random_weights(L.config, seed=0))
    for i in range(L.config.n_layer):
        for name in (f"blk.{i}.attn_q.weight", f"blk.{i}.attn_k.weight"):
            weights[name] = weights[name].to_float() * 40.0
    big = lab.Lab(L.config, weights)
    report = big.run(ids, ["no_max_subtraction", "online_softmax:block=4", "reference"])
    r = report["no_max_subtraction"]
    assert r.verdict == "failed"
    assert r.nonfinite == {"layer": 0, "where": "attention output"}
    assert "inf/nan first in layer 0 (attention output)" in r.reason
    assert r.logit_max_abs is None and r.greedy_agree is None
    assert "failed" in report.table() and "nan@0" in report.table()
    assert max(report.score_peaks) > 88.8 > max(L.run(ids, []).score_peaks)
    assert "float32 exp overflows above 88.7" in report.header()
    assert not report.ok
    # the stable rewrites survive the same scores
    assert report["online_softmax:block=4"].verdict == "exact"
    assert report["reference"].verdict == "exact"
    json.dumps(report.to_dict(), allow_nan=False)    # still valid JSON


def test_a_variant_that_raises_or_returns_a_bad_shape_is_failed_not_a_crash():
    L = random_lab("gpt2")
    ids = random_ids(L.config, 10)

    def raises(q, k, v, mask, layer):
        if layer == 1:
            raise RuntimeError("boom")
        return reference.attention_softmax(q, k, v, mask)

    def bad_shape(q, k, v, mask):
        return q[:, :-1]

    report = L.run(ids, [raises, bad_shape])
    assert report.results[0].verdict == "failed"
    assert "RuntimeError: boom (layer 1)" in report.results[0].reason
    assert report.results[1].verdict == "failed"
    assert "returned shape" in report.results[1].reason


def test_a_reference_that_is_not_finite_is_refused_with_the_layer():
    config = random_config("llama", n_layer=3)
    weights = dict(random_weights(config))
    weights["blk.1.ffn_norm.weight"] = np.full(config.n_embd, np.inf, np.float32)
    with pytest.raises(lab.LabError, match="inf/nan in layer 1"):
        lab.Lab(config, weights).run(random_ids(config, 6), ["reference"])


def test_kv_heads_swapped_needs_two_kv_heads():
    L = random_lab("llama-gqa", n_kv_head=1)
    r = L.run(random_ids(L.config, 8), ["wrong_kv_heads_swapped"]).results[0]
    assert r.verdict == "failed" and "n_kv_head >= 2" in r.reason


# ------------------------------------------------------------ user variants


USER_MODULE = '''
import numpy as np

def attention(q, k, v, mask):
    """Softmax by hand, in float32."""
    s = q @ k.T / np.float32(np.sqrt(q.shape[-1])) + mask
    p = np.exp(s - s.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)) @ v

NOT_CALLABLE = 3
'''


def test_user_variant_by_callable_and_by_dotted_path(tmp_path, monkeypatch):
    (tmp_path / "my_lab_attention.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_lab_attention", None)

    L = random_lab("llama-gqa")
    ids = random_ids(L.config, 20, seed=8)
    specs = ["my_lab_attention:attention", "my_lab_attention.attention",
             f"{tmp_path / 'my_lab_attention.py'}:attention",
             lab_variants.float64_attention]
    report = L.run(ids, specs)
    for r in report.results:
        assert r.verdict == "exact", (r.name, r.reason)
    assert report.results[0].name == "my_lab_attention:attention"
    assert report.results[3].name == "fastattn.lab_variants:float64_attention"


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_zz:attention", "cannot import module 'no_such_module_zz'"),
    ("fastattn.lab_variants:no_such_fn", "has no attribute 'no_such_fn'"),
    ("fastattn.lab:DEFAULT_TOL", "not a callable"),
    ("/nonexistent/dir/file.py:fn", "no such file"),
    ("nonsense", "is not a built-in"),
    ("online_softmax:block=0", "block must be >= 1"),
    ("online_softmax:block=x", "block must be an int"),
    ("online_softmax:size=4", "online_softmax takes block=<int>"),
    ("reference:block=4", "takes no parameters"),
])
def test_bad_variant_specs_raise_a_clear_error(spec, message):
    with pytest.raises(lab.VariantError) as info:
        lab.resolve_variant(spec)
    assert message in str(info.value)
    assert spec.split(":")[0] in str(info.value)
    assert isinstance(info.value, FastAttnError)


def test_bad_ids_and_tolerances_raise_clear_errors():
    L = random_lab("gpt2")
    with pytest.raises(FastAttnError, match="outside the vocabulary"):
        L.run([1, 2, L.config.n_vocab], ["reference"])
    with pytest.raises(FastAttnError, match="at least one token"):
        L.run([], ["reference"])
    with pytest.raises(FastAttnError, match="tol must be a finite number > 0"):
        L.run([1, 2], ["reference"], tol=0)
    with pytest.raises(FastAttnError, match="tol must be a finite number > 0"):
        L.run([1, 2], ["reference"], tol=float("inf"))   # would call anything exact
    with pytest.raises(FastAttnError, match="tol must be a finite number > 0, got '1'"):
        L.run([1, 2], ["reference"], tol="1")
    with pytest.raises(FastAttnError, match="kl_tol must be a finite number >= 0, got None"):
        L.run([1, 2], ["reference"], kl_tol=None)
    # ids that are not a flat sequence of integers are refused, not coerced
    for bad, match in (([1.7, 2.2], "must be integers, got float64"),
                       (["a"], "must be integers"), ([[1, 2], [3, 4]], "flat sequence"),
                       ([True, False], "must be integers, got bool"),
                       ([2**63], "token id 9223372036854775808 is outside"),
                       ([2**70], "token id 1180591620717411303424 is outside"),
                       (np.array([2**64 - 1], dtype=np.uint64), "token id 18446744073709551615")):
        with pytest.raises(FastAttnError, match=match):
            L.run(bad, ["reference"])
    # one variant given as a string is that variant, not its characters
    assert [r.name for r in L.run([1, 2, 3], "reference").results] == ["reference"]


# ------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from tinyllama_gguf import write_tiny_llama
    return str(write_tiny_llama(tmp_path_factory.mktemp("lab") / "tiny.gguf"))


def test_run_verify_prints_the_table_and_writes_json(tiny_gguf, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. once upon a time "
                    "there was a little model that wanted to talk.")
    out = tmp_path / "report.json"
    parser = argparse.ArgumentParser(prog="fastattn")
    lab.add_verify_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["verify", "-m", tiny_gguf, "--text", str(text),
                              "--variant", "reference",
                              "--variant", "online_softmax:block=4",
                              "--variant", "kv_cache_decode", "--variant", "engine",
                              "--variant", "wrong_mask_shifted", "--max-tokens", "30",
                              "--json", str(out), "--per-layer"])
    assert args.run is lab.run_verify
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    for needle in ("variant", "verdict", "reference.forward", "online_softmax:block=4",
                   "kv_cache_decode", "engine (logits only)",
                   "wrong_mask_shifted [broken]",
                   "tolerance", "max rel |dh| per layer", "tokens     = 30"):
        assert needle in printed, needle

    data = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(c))
    assert data["n_tokens"] == 30 and data["config"]["n_layer"] == 2
    verdicts = {v["name"]: v["verdict"] for v in data["variants"]}
    assert verdicts == {"reference": "exact", "online_softmax:block=4": "exact",
                        "kv_cache_decode": "exact", "engine": "exact",
                        "wrong_mask_shifted": "different"}
    shifted = data["variants"][-1]
    assert shifted["first_departing_layer"] == 0 and shifted["broken"] is True
    assert len(shifted["layer_max_rel"]) == 2 and len(data["tolerance"]["per_layer"]) == 2
    assert 0 <= shifted["greedy_fraction"] < 1


def test_python_m_fastattn_lab_and_exit_codes(tiny_gguf, tmp_path, capsys, monkeypatch):
    assert lab.main(["-m", tiny_gguf, "--text", "hello world, hello there",
                     "--variant", "wrong_scale_missing",
                     "--variant", "scale_in_query"]) == 0
    # a user variant that is wrong (not flagged broken) makes the exit status 1
    (tmp_path / "wrong_user_attn.py").write_text(
        "from fastattn.lab_variants import wrong_softmax_axis as attention\n")
    assert lab.main(["-m", tiny_gguf, "--text", "hello world, hello there",
                     "--variant", f"{tmp_path / 'wrong_user_attn.py'}:attention"]) == 1
    # a module in the current folder, as `fastattn verify` is run from a shell;
    # sys.path is left as it was
    (tmp_path / "cwd_user_attn.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    assert lab.main(["-m", tiny_gguf, "--text", "hello world, hello there",
                     "--variant", "cwd_user_attn:attention"]) == 0
    assert sys.path == path_before
    assert "cwd_user_attn:attention" in capsys.readouterr().out
    # bad input: exit 2 and a message naming the culprit
    assert lab.main(["-m", tiny_gguf, "--variant", "no_such_module_zz:fn"]) == 2
    assert "no_such_module_zz" in capsys.readouterr().err
    assert lab.main(["-m", str(tmp_path / "missing.gguf"), "--variant", "reference"]) == 2
    assert "missing.gguf" in capsys.readouterr().err
    assert lab.main(["--list-variants"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in lab.BUILTINS)


def test_bad_outputs_are_refused_before_the_model_loads(tmp_path, capsys):
    """--json / --plot / -t / --tol mistakes are exit status 2 at once: the
    model path given does not exist, and it is not the error reported."""
    missing_model = str(tmp_path / "not-read.gguf")
    cases = [
        (["--json", str(tmp_path / "no" / "dir" / "r.json")], "does not exist"),
        (["--json", str(tmp_path)], "is a directory"),
        (["--plot", str(tmp_path / "no" / "p.png")], "does not exist"),
        (["-t", "1000"], "--threads must be in [1, 256], got 1000"),
        (["-t", "0"], "--threads must be in [1, 256], got 0"),
        (["--tol", "inf"], "--tol must be a finite number > 0"),
        (["--kl-tol", "nan"], "--kl-tol must be a finite number >= 0"),
    ]
    for extra, message in cases:
        assert lab.main(["-m", missing_model, "--variant", "reference", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and "not-read.gguf" not in err, (extra, err)
    # the text: a folder or a device is not a text file
    assert lab.main(["-m", missing_model, "--variant", "reference", "--text",
                     str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_plot_format_is_checked_before_the_run(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert lab.main(["-m", str(tmp_path / "not-read.gguf"), "--variant", "reference",
                     "--plot", str(tmp_path / "p.xyz")]) == 2
    assert "matplotlib cannot write .xyz files" in capsys.readouterr().err


def test_plot_without_matplotlib_says_so(tiny_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import fails
    png = tmp_path / "layers.png"
    status = lab.main(["-m", tiny_gguf, "--text", "hello world", "--variant", "reference",
                       "--plot", str(png)])
    assert status == 2 and not png.exists()
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_plot_is_written(tiny_gguf, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "layers.png"
    assert lab.main(["-m", tiny_gguf, "--text", "hello world, hello there",
                     "--variant", "reference", "--variant", "online_softmax:block=2",
                     "--variant", "wrong_scale_missing", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------- real model


REAL_TEXT = (                                        # 44 tokens for SmolLM2
    "Honey bees dance to tell each other where flowers are. The angle of the dance, "
    "measured from straight up, points to the food relative to the sun. A longer "
    "dance means the flowers are farther away from the hive."
)


def _smollm2_path():
    from conftest import find_test_model
    path = find_test_model()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found: run `fastattn download` or set FASTATTN_TEST_MODEL")
    return path


@pytest.mark.model
def test_real_model_exact_variants_and_broken_ones(tmp_path):
    """`python -m fastattn.lab` on SmolLM2 and a real paragraph: every
    built-in exact rewrite is exact, the broken ones depart at layer 0.

    In a subprocess with one BLAS and one engine thread: the numbers are the
    same, and on a busy machine two spinning threads per product make this
    run ten times slower."""
    text = tmp_path / "bees.txt"
    text.write_text(REAL_TEXT)
    out = tmp_path / "report.json"
    args = ["-m", _smollm2_path(), "--text", str(text), "--json", str(out),
            "--threads", "1", "--variant", "defaults",
            "--variant", "wrong_mask_shifted", "--variant", "wrong_kv_heads_swapped"]
    env = dict(os.environ, PYTHONPATH=PACKAGE_ROOT, OPENBLAS_NUM_THREADS="1",
               OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastattn.lab", *args], env=env,
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "engine (logits only)" in r.stdout and "[broken]" in r.stdout

    data = json.loads(out.read_text())
    n = data["n_tokens"]
    assert 40 <= n <= 60 and data["config"]["n_layer"] == 30
    results = {v["name"]: v for v in data["variants"]}
    assert set(lab.DEFAULT_VARIANTS) <= set(results)          # engine included
    for name, v in results.items():
        if v["broken"]:
            assert v["verdict"] == "different", (name, v["reason"])
            assert v["first_departing_layer"] == 0, name
        else:
            assert v["verdict"] == "exact", (name, v["reason"])
            assert v["greedy_agree"] == n, name
            if v["layer_max_rel"] is not None:
                assert all(d <= t for d, t in zip(v["layer_max_rel"],
                                                  data["tolerance"]["per_layer"]))
    assert max(results["reference"]["layer_max_rel"]) == 0
    # SmolLM2's head_dim is 64: the folded scale is 1/8, exact to the bit
    assert max(results["scale_in_query"]["layer_max_rel"]) == 0
    assert max(results["kv_cache_decode"]["layer_max_rel"]) > 0
    assert max(data["score_peak_per_layer"]) < 88.7     # why no_max_subtraction holds
