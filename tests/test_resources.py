"""Resource limits: the context window, and memory.

  context   as fastattn/generation.py documents it: a generation that fills
            n_ctx stops with "context" and returns its text (the same tokens
            a longer context gives); a prompt that leaves no room for one new
            token, or a text to score longer than n_ctx, raises
            ContextOverflowError; a refused forward call leaves its state as
            it was.
  memory    in a child process whose address space is capped (RLIMIT_AS) a
            little above what it uses after the imports:
            - a state whose KV cache does not fit raises OutOfMemoryError with
              the bytes it needs; smaller states still work afterwards;
            - a GGUF declaring a context of 2^31 tokens loads (its file is
              small: nothing is allocated from declared sizes), generates, and
              refuses the full-context state and `fastattn generate -n -1`
              with the size;
            - a model file bigger than the address space left fails with the
              file's size.
  The memory tests cannot run under AddressSanitizer (its shadow memory needs
  terabytes of address space) and skip there.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastattn import _engine
from fastattn.errors import ContextOverflowError, TokenizerError
from fastattn.generation import Model
from fastattn.model import Transformer
from fastattn.testing import random_config, random_ids, random_weights
from fastattn.weights import Q4_1

from test_concurrency import write_endless_llama

import fastattn  # noqa: E402

# The folder holding the fastattn being tested (site-packages once installed):
# child processes import that one, never the uncompiled source tree.
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__)))
UNDER_ASAN = "libasan" in os.environ.get("LD_PRELOAD", "")
needs_rlimit = pytest.mark.skipif(UNDER_ASAN, reason="RLIMIT_AS and AddressSanitizer "
                                                     "do not mix")


# ------------------------------------------------------------------- context

@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """A tiny GGUF of n_ctx 64 that never produces an end-of-turn token."""
    folder = tmp_path_factory.mktemp("ctx")
    return write_endless_llama(folder / "endless.gguf", n_ctx=64)


def test_generation_stops_at_the_context_with_the_text_so_far(endless):
    full = Model.load(endless, n_threads=1)
    prompt = full.encode("hello world")
    longest = full.generate_ids(prompt, max_new_tokens=64 - len(prompt), temperature=0)
    assert len(longest) == 64 - len(prompt)

    for n_ctx in (len(prompt) + 1, len(prompt) + 2, 24, 64):
        model = Model.load(endless, n_threads=1, n_ctx=n_ctx)
        ids = model.generate_ids(prompt, max_new_tokens=1000, temperature=0)
        assert model.last_stats["stopped"] == "context"
        assert ids == longest[:n_ctx - len(prompt)]          # the same tokens
        text = model.generate(prompt, max_new_tokens=1000, temperature=0)
        assert model.last_stats["stopped"] == "context"
        assert text == model.tokenizer.decode(ids)


def test_a_prompt_that_leaves_no_room_is_refused(endless):
    model = Model.load(endless, n_threads=1, n_ctx=16)
    for n in (16, 17, 100):
        ids = [5] * n
        with pytest.raises(ContextOverflowError, match=f"{n} tokens.*16"):
            model.generate(ids, max_new_tokens=1)
        with pytest.raises(ContextOverflowError):
            model.stream(ids, max_new_tokens=1)             # at the call, not later
    assert len(model.generate_ids([5] * 15, max_new_tokens=9, temperature=0)) == 1


def test_score_longer_than_the_context_is_refused(endless):
    model = Model.load(endless, n_threads=1, n_ctx=16)
    assert len(model.score([5] * 16).tokens) == 16
    with pytest.raises(ContextOverflowError, match="17 tokens"):
        model.score([5] * 17)


def test_a_refused_call_leaves_the_state_as_it_was():
    config = random_config("llama", n_ctx=32, n_kv_head=2)
    model = Transformer(config, random_weights(config, qtype=Q4_1), n_threads=2)
    ids = random_ids(config, 16, seed=4)
    want = model.forward(ids)

    state = model.new_state(16)
    model.prefill(state, ids[:10])
    with pytest.raises(ContextOverflowError, match="n_past 10 \\+ requested 7"):
        model.prefill(state, random_ids(config, 7))
    with pytest.raises(TokenizerError):
        model.prefill(state, [1, config.n_vocab])
    assert state.n_past == 10
    rows = model.prefill(state, ids[10:], all_logits=True)
    np.testing.assert_array_equal(rows, want[10:])
    with pytest.raises(ContextOverflowError):
        model.decode(state, 1)
    assert state.n_past == 16
    with pytest.raises(ContextOverflowError):
        model.new_state(33)


# -------------------------------------------------------------------- memory

# The child imports everything, then caps its address space at what it uses
# plus HEADROOM bytes, runs the code in argv[2] (which fills `out` through
# attempt()) and prints `out` as JSON.
CHILD = r"""
import json, os, resource, sys
import numpy as np
import unicodedata, jinja2.sandbox, regex, gguf
import fastattn._engine, fastattn._bpe, fastattn.cli, fastattn.generation
import fastattn.loaders.gguf, fastattn.loaders.hf, fastattn.tokenizer
from fastattn.generation import Model
from fastattn.model import Transformer
from fastattn.testing import random_config, random_weights

def vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

limit = vm_size() + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
out = {}

def attempt(name, fn):
    try:
        out[name] = {"ok": repr(fn())[:300]}
    except BaseException as e:
        out[name] = {"error": type(e).__name__, "message": str(e),
                     "classes": [c.__name__ for c in type(e).__mro__]}

exec(sys.argv[2])
# VmHWM, this process's own peak: ru_maxrss would start from the parent's
# resident size at fork (Linux carries it over fork and exec).
with open("/proc/self/status") as f:
    out["max_rss"] = next(int(line.split()[1]) * 1024 for line in f
                          if line.startswith("VmHWM:"))
print(json.dumps(out))
"""


def run_capped(code, headroom, timeout=180):
    env = dict(os.environ, OMP_NUM_THREADS="2",
               PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(headroom), code],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=PACKAGE_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def out_of_memory(result, *words):
    """result is an OutOfMemoryError (a FastAttnError and a MemoryError) whose
    message holds every word."""
    assert result.get("error") == "OutOfMemoryError", result
    assert {"FastAttnError", "MemoryError"} <= set(result["classes"])
    for w in words:
        assert str(w) in result["message"], (w, result["message"])


@needs_rlimit
def test_a_kv_cache_that_does_not_fit():
    config = random_config("llama", n_ctx=1 << 31, n_kv_head=2)
    code = """
config = random_config("llama", n_ctx=1 << 31, n_kv_head=2)
model = Transformer(config, random_weights(config), n_threads=2)
ids = list(range(20))
want = model.forward(ids)
attempt("absurd", lambda: model.new_state())
attempt("too_big", lambda: model.new_state(1 << 22))
def after():
    state = model.new_state(1 << 14)
    got = model.prefill(state, ids, all_logits=True)
    return bool(np.array_equal(got, want))
attempt("after", after)
"""
    result = run_capped(code, headroom=768 << 20)
    kv, scratch = _engine.state_bytes(config, 1 << 31, 256)
    out_of_memory(result["absurd"], kv + scratch, "GiB", "n_ctx 2147483648")
    kv, scratch = _engine.state_bytes(config, 1 << 22, 256)
    assert kv + scratch > 768 << 20 > 0
    out_of_memory(result["too_big"], kv + scratch, "n_ctx 4194304")
    assert result["after"] == {"ok": "True"}                # and the process goes on


@needs_rlimit
def test_a_declared_context_of_2_31_tokens(tmp_path):
    path = write_endless_llama(tmp_path / "long.gguf", n_ctx=1 << 31)
    size = os.path.getsize(path)
    code = f"""
model = Model.load({str(path)!r}, n_threads=1)
attempt("generate", lambda: model.generate("hello", max_new_tokens=5, temperature=0))
attempt("full_state", lambda: model.transformer.new_state())
attempt("until_full", lambda: model.generate("hello", max_new_tokens=model.n_ctx))
"""
    result = run_capped(code, headroom=512 << 20)
    assert "ok" in result["generate"], result
    loaded = Model.load(path, n_threads=1)
    kv, scratch = _engine.state_bytes(loaded.config, 1 << 31, 256)
    out_of_memory(result["full_state"], kv + scratch)
    assert result["until_full"]["error"] == "OutOfMemoryError", result
    # nothing was allocated from the declared context: the process stayed small
    assert result["max_rss"] < 400 << 20, result["max_rss"]
    assert size < 1 << 20

    # the command line says so too, and exits 1 without a traceback
    preexec = _cap_child(512 << 20)
    proc = subprocess.run([sys.executable, "-m", "fastattn", "generate", "-m",
                           str(path), "-p", "hello", "-n", "-1", "-t", "1", "-q"],
                          capture_output=True, text=True, timeout=180, cwd=PACKAGE_ROOT,
                          env=dict(os.environ, PYTHONPATH=PACKAGE_ROOT),
                          preexec_fn=preexec)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and str(kv + scratch) in proc.stderr, proc.stderr


def _cap_child(headroom):
    """A preexec_fn capping a child's address space at a typical fastattn
    process's size (measured here) plus headroom."""
    import resource
    probe = subprocess.run(
        [sys.executable, "-c", "import fastattn.generation, fastattn._engine, "
         "fastattn._bpe, fastattn.cli\nfor line in open('/proc/self/status'):\n"
         "    print(line.split()[1]) if line.startswith('VmSize:') else None"],
        capture_output=True, text=True, cwd=PACKAGE_ROOT, timeout=120,
        env=dict(os.environ, PYTHONPATH=PACKAGE_ROOT))
    limit = int(probe.stdout.split()[-1]) * 1024 + headroom

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    return cap


@needs_rlimit
def test_a_model_file_bigger_than_the_memory_left(tmp_path):
    path = write_endless_llama(tmp_path / "big.gguf", n_embd=256, n_layer=4, n_head=4,
                               n_kv_head=2, n_ff=512, n_ctx=256)
    size = os.path.getsize(path)
    assert size > 8 << 20
    code = f"attempt('load', lambda: Model.load({str(path)!r}, n_threads=1))"
    result = run_capped(code, headroom=size // 2)
    out_of_memory(result["load"], size, path.name)


@needs_rlimit
@pytest.mark.model
def test_smollm2_in_too_little_memory(smollm2_path):
    size = os.path.getsize(smollm2_path)
    code = f"attempt('load', lambda: Model.load({smollm2_path!r}, n_threads=1))"
    # the file does not map: the message gives the file's size
    for headroom in (size // 2, size + (8 << 20)):
        result = run_capped(code, headroom=headroom)
        out_of_memory(result["load"], size)
    # the file maps, but not the repacked copy of its matrices (about as big)
    result = run_capped(code, headroom=size + (128 << 20))
    out_of_memory(result["load"], smollm2_path, "repacked")
    result = run_capped(code, headroom=2 * size + (128 << 20))
    assert "ok" in result["load"], result


# ------------------------------------------------------ a hostile chat template

# The chat template comes from the model file: untrusted code.  jinja2's
# sandbox alone bounds each range() but not a product of them, nor the size of
# "x" * n; render_chat_template adds both bounds.
HOSTILE_TEMPLATES = {
    "huge_string": "{{ 'x' * 10**10 }}",
    "str_method_width": "{{ ('x'.center(10**10))|length }}",
    "format_width": "{{ '{:>9999999999}'.format(1)|length }}",
    "format_map_width": "{{ '{x:{w}}'.format_map({'x': 1, 'w': 10**10})|length }}",
    "join": "{{ ','.join(['x' * 10**7] * 1000)|length }}",
    "nested_loops": "{% for a in range(99999) %}{% for b in range(99999) %}"
                    "{% endfor %}{% endfor %}",
}


@pytest.mark.parametrize("template", ["{{ 1/0 }}", "{{ 'abc'[::0] }}",
                                      "{{ '{0}{1}'.format(1) }}", "{{ 'abc'|truncate(-5) }}",
                                      "{{ range(1, 2, 0)|list }}", "{{ none.x() }}"])
def test_a_chat_template_that_fails_raises_chat_template_error(template):
    """Python errors inside a model's template (a division by zero, a bad
    slice or format, a failed assertion in a filter) are the template's bug:
    ChatTemplateError names them, never a raw traceback."""
    from fastattn.generation import ChatTemplateError, render_chat_template
    with pytest.raises(ChatTemplateError, match="chat template"):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("template", ["{{ ('x'.center(10**8))|length }}",
                                      "{{ 'x'.zfill(10**8)|length }}",
                                      "{{ '{:>100000000}'.format(1)|length }}",
                                      "{{ '{:{}}'.format(1, 10**8)|length }}",
                                      "{{ ('\t' * 100).expandtabs(10**6)|length }}"])
def test_str_methods_are_bounded_before_they_run(template):
    """A str method whose output size an argument sets is refused before it
    allocates (these would build 100 MB strings and print only a length)."""
    from fastattn.generation import ChatTemplateError, render_chat_template
    with pytest.raises(ChatTemplateError, match="would make more than"):
        render_chat_template(template, [{"role": "user", "content": "hi"}])


@needs_rlimit
@pytest.mark.parametrize("name", sorted(HOSTILE_TEMPLATES))
def test_a_hostile_chat_template_is_stopped(name):
    code = f"""
from fastattn.generation import render_chat_template
attempt("render", lambda: len(render_chat_template({HOSTILE_TEMPLATES[name]!r},
                                                   [{{"role": "user", "content": "hi"}}])))
"""
    try:
        result = run_capped(code, headroom=512 << 20, timeout=5)
    except subprocess.TimeoutExpired:
        raise AssertionError("the template ran for more than 5 s") from None
    assert result["render"].get("error") == "ChatTemplateError", result
