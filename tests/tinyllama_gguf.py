"""Write a tiny random llama model as a GGUF file, with a real byte-level BPE
vocabulary and a ChatML chat template, for the generation and CLI tests.

    path = write_tiny_llama(tmp_path / "tiny.gguf")

Layout of the vocabulary (like SmolLM2's): ids 0-2 the specials
<|endoftext|>, <|im_start|> (bos), <|im_end|> (eos); then the 256 byte
tokens in GPT-2's printable spelling; then merges learned from CORPUS.
"""
from collections import Counter

import numpy as np

CORPUS = (
    "the quick brown fox jumps over the lazy dog. once upon a time there was a "
    "little model that wanted to talk. it read the whole text and then it wrote "
    "stories about the sea, the sky and the city. def main(): return 42\n"
    "hello world, hello there, the end of the story is near. "
) * 3

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_symbols() -> list:
    """GPT-2's map from the 256 bytes to printable characters, as a list by byte."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
                 + list(range(0xAE, 0x100)))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def learn_merges(n_merges: int) -> list:
    """A few BPE merges from CORPUS: words split GPT-2 style (space kept in front)."""
    sym = byte_symbols()
    words = Counter()
    for i, word in enumerate(CORPUS.split(" ")):
        text = (" " if i else "") + word
        words[tuple(sym[b] for b in text.encode())] += 1
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                if "\n" not in a + b and sym[10] not in a + b:
                    pairs[(a, b)] += count
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def write_tiny_llama(path, n_embd=64, n_layer=2, n_head=4, n_kv_head=2, n_ff=128,
                     n_ctx=64, n_merges=61, seed=0, eos_token_id=2, scale=0.5,
                     chat_template=CHAT_TEMPLATE):
    """Write the model to path and return path.  Weights are F32, drawn from a
    seeded normal distribution; `scale` sets how peaked the logits are."""
    import gguf

    rng = np.random.default_rng(seed)
    merges = learn_merges(n_merges)
    tokens = SPECIALS + byte_symbols() + [a + b for a, b in merges]
    n_vocab = len(tokens)
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + \
        [gguf.TokenType.NORMAL] * (n_vocab - len(SPECIALS))
    head_dim = n_embd // n_head

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv_head)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(n_vocab)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos_token_id)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)

    def matrix(n_out, n_in):
        return (rng.standard_normal((n_out, n_in)) * scale / np.sqrt(n_in)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w.add_tensor("token_embd.weight",
                 (rng.standard_normal((n_vocab, n_embd)) * scale * 0.6).astype(np.float32))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm(n_embd))
        w.add_tensor(f"blk.{i}.attn_q.weight", matrix(n_embd, n_embd) * 4)
        w.add_tensor(f"blk.{i}.attn_k.weight", matrix(n_kv_head * head_dim, n_embd) * 4)
        w.add_tensor(f"blk.{i}.attn_v.weight", matrix(n_kv_head * head_dim, n_embd))
        w.add_tensor(f"blk.{i}.attn_output.weight", matrix(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm(n_embd))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", matrix(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", matrix(n_embd, n_ff))
    w.add_tensor("output_norm.weight", norm(n_embd))
    # an output head of its own: with a tied one, a random model mostly
    # repeats its last input token
    w.add_tensor("output.weight", matrix(n_vocab, n_embd) * 6)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
