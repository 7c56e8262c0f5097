"""The byte-level BPE tokenizer against Hugging Face on real vocabularies.

References:
  SmolLM2   fields read from the GGUF file with the `gguf` package; the
            reference is transformers' AutoTokenizer(gguf_file=...) with its
            pre-tokenizer set to the one SmolLM2's own tokenizer.json has
            (Digits(individual_digits) + ByteLevel): transformers' GGUF
            conversion leaves the digit split out, which
            test_smollm2_gguf_conversion_without_digit_split shows.
  GPT-2     encoder.json + vocab.bpe fetched by tests/assets.py; the
            reference is transformers' GPT2TokenizerFast over the same files.
  synthetic a vocabulary with random merges built here, against the
            `tokenizers` BPE model: no file needed.
"""
import json
import os
import random
import re
import threading
import time

import numpy as np
import pytest

from fastattn import _bpe
from fastattn.errors import ModelFileError, TokenizerError, UnsupportedError
from fastattn.tokenizer import (BYTE_TO_CHAR, PRE_TOKENIZER_MODES, PRE_TOKENIZER_PATTERNS,
                                Tokenizer, bytes_to_unicode)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------
# test strings: a hand-written list and a seeded generator

HAND_WRITTEN = [
    "", " ", "  ", "\n", "\t", "\r\n", "a", "Hello world", "Hello, World!",
    " leading space", "  two leading", "trailing space ", "trailing spaces   ",
    "   both   ", "\n\nparagraph\n\n", "tabs\tand\ttabs\t\t", "\r\n\r\nwindows\r\n",
    "mixed \t \n \r\n whitespace", "a  1", "x   \n  y", "end\n", "\n \n \n",
    "I'm here, you're there, we've been, they'll go, she'd say, it's fine, don't",
    "I'M HERE, YOU'RE THERE, WE'VE BEEN, THEY'LL GO, SHE'D SAY, IT'S FINE, DON'T",
    "'S 'LL 'Re 'rE 'Ve 'M 'D 's 't 're 've 'm 'll 'd", "''s ''' 'x' '", "rock'n'roll",
    "café naïve résumé façade Ångström", "e\u0301 a\u0308 o\u0302\u0323 n\u0303",
    "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319a\u0324l\u0354go",
    "Tiếng Việt có dấu", "Ελληνικά γράμματα", "Русский текст, Україна", "ქართული",
    "日本語のテキストとカタカナ", "中文：你好，世界！", "한국어 텍스트입니다", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ１２３",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "สวัสดีชาวโลก", "ሰላም ዓለም", "தமிழ் ௧௨௩",
    "Arabic digits ٠١٢٣٤٥٦٧٨٩ and Devanagari ०१२३", "mixed: hello世界мир",
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷🇯🇵🇺🇸", "🏳️‍🌈", "❤️", "🧑🏿‍💻 codes", "emoji😀in👍🏽text",
    "🙂🙃🙂🙃🙂🙃", "skin 👋🏻👋🏼👋🏽👋🏾👋🏿", "keycap 1️⃣ #️⃣",
    "0", "7", "42", "123", "1234", "12345678901234567890", "3.14159", "1,000,000",
    "-17", "+3e-10", "0x1F", "v2.0.1", "2024-01-15T10:30:00Z", "phone: 555-0123",
    "①②③ ½ ¾ ² ³ Ⅻ", "  12  34  ", "a1b2c3", "1 2 3", " 1", "\n1", "x\t9",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; i++) {\n\tsum += a[i];\n}\n",
    '{"key": "value", "list": [1, 2, 3], "nested": {"a": null}}',
    "<html><body><p class=\"x\">Hi &amp; bye</p></body></html>",
    "SELECT * FROM users WHERE id = 42;", "$ ls -la | grep '.py' > out.txt 2>&1",
    "https://example.com/path?query=1&x=y#frag", "mailto:someone@example.org",
    "C:\\Users\\name\\file.txt", "~/.config/app/settings.toml",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "text<|endoftext|>more", "<|im_start|><|im_end|>",
    "<|im_start", "im_start|>", "<|<|im_end|>|>", "<jupyter_code>print(1)<jupyter_output>",
    "a" * 300, "ab" * 200, "x" * 2000, "supercalifragilisticexpialidocious" * 5,
    "Pneumonoultramicroscopicsilicovolcanoconiosis", "ΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ" * 3,
    "!!!???...---", "(((nested)))", "***bold***", "~~~", "@#$%^&*", "¿Qué? ¡Sí!",
    "\u00a0nbsp\u00a0", "zero\u200bwidth", "\ufeffbom", "\u3000ideographic space",
    "line\u2028sep\u2029par", "\x0bvt\x0cff", "\x1c\x1d\x1e\x1f", "\x85next line",
    "control \x01\x02\x03\x04\x05\x06\x07 chars", "del\x7f", "\u180emongolian",
    "\U0001d400\U0001d401 math bold", "\U00010000 linear b", "\U000e0001 tag",
    "private \ue000\uf8ff", "\ufffd replacement", "\U00040000 plane 4",
]

FRAGMENTS = {
    "word": ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "Hello",
             "WORLD", "Tokenizer", "model", "attention", "is", "all", "you", "need"],
    "contraction": ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'T", "'RE",
                    "'Ve", "'M", "'LL", "'D", "n't", "N'T", "'"],
    "accent": ["é", "ñ", "ü", "ø", "ç", "e\u0301", "a\u0308", "Å", "ß", "œ", "ı", "İ"],
    "script": ["日本", "中文", "한국어", "カタカナ", "مرحبا", "שלום", "नमस्ते", "สวัสดี",
               "Привет", "Ελλάδα", "ქართ", "தமிழ்", "বাংলা", "ગુજરાતી", "ᓀᐦᐃᔭᐍᐏᐣ"],
    "emoji": ["😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🇩🇪", "🏳️‍🌈", "❤️", "🧑🏿‍💻", "🤌", "🫠",
              "👋🏻", "✨", "🐍", "🍕", "🔥🔥"],
    "space": [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n", "\t\t", "\u3000",
              "\xa0", "    ", "\n    "],
    "number": None,                                          # generated
    "code": ["def ", "return ", "x = 1", "if (a == b) {", "}", "();", "[0]", "=>", "->",
             "==", "!=", "<=", "&&", "||", "#include <stdio.h>", "import numpy as np",
             "</div>", "<br/>", '{"a": 1}', "null", "self.x", "__init__", "i++"],
    "url": ["https://example.com", "http://a.b/c?d=e&f=g", "www.test.org/x_y-z",
            "user@mail.com", "/usr/local/bin", "C:\\tmp\\x"],
    "special": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start", "|>",
                "<repo_name>", "<file_sep>", "<jupyter_code>", "<|", "<|endoftext"],
    "punct": [".", ",", "!", "?", ";", ":", "...", "--", "—", "“", "”", "«", "»", "¿",
              "(", ")", "'", '"', "`", "*", "_", "~", "%", "$", "€", "£", "¥"],
    "long": None,                                            # generated
    "random": None,                                          # generated
}
JOINERS = ["", "", " ", " ", " ", "\n", "  ", "\t"]


def generate_strings(count, seed):
    """count varied strings, the same ones for the same seed."""
    rng = random.Random(seed)
    kinds = list(FRAGMENTS)
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randrange(1, 9)):
            kind = rng.choice(kinds)
            if kind == "number":
                digits = rng.choice([1, 1, 2, 3, 4, 6, 10, 25])
                part = "".join(rng.choice("0123456789") for _ in range(digits))
                if rng.random() < 0.2:
                    part += "." + str(rng.randrange(1000))
            elif kind == "long":
                alphabet = rng.choice(["abcdefghij", "xyz", "aeiou", "ab", "éàü", "αβγ"])
                part = "".join(rng.choice(alphabet) for _ in range(rng.randrange(20, 400)))
            elif kind == "random":
                part = "".join(chr(rng.choice([rng.randrange(0x20, 0x3000),
                                               rng.randrange(0x1F300, 0x1FAFF)]))
                               for _ in range(rng.randrange(1, 6)))
            else:
                part = rng.choice(FRAGMENTS[kind])
            if kind == "word" and rng.random() < 0.3:
                part = rng.choice([part.upper(), part.title(), part.lower()])
            parts.append(part)
            parts.append(rng.choice(JOINERS))
        text = "".join(parts)
        if rng.random() < 0.15:
            text = rng.choice([" ", "  ", "\n", "\t"]) + text
        out.append(text)
    return out


STRINGS = HAND_WRITTEN + generate_strings(1200, seed=20250611)


def random_code_point_strings(count, seed):
    """Short strings of unusual whitespace, digits of many scripts, ASCII
    around contractions, punctuation, and random code points of every plane
    (where Unicode tables of different versions would disagree)."""
    rng = random.Random(seed)
    pools = [" \t\n\r\x0b\x0c\x85\xa0\u1680\u2000\u2028\u2029\u202f\u205f\u3000"
             "\x1c\x1d\x1e\x1f\u200b\ufeff\u180e",
             "abcXYZ'sSltdmrve", "0123456789٠١٢३४५௧൧①²¼Ⅻ〇",
             ".,;!?-_()[]{}<>|/\\\"'`~@#$%^&*+="]

    def code_point():
        while True:
            c = rng.randrange(0x110000) if rng.random() < 0.5 else rng.randrange(0x3400)
            if not 0xD800 <= c < 0xE000:
                return chr(c)

    return ["".join(rng.choice(rng.choice(pools)) if rng.random() < 0.75 else code_point()
                    for _ in range(rng.randrange(1, 12))) for _ in range(count)]


RANDOM_STRINGS = random_code_point_strings(4000, seed=5)
SPECIAL_NAMES = ("<|im_start|>", "<|endoftext|>")


def test_string_set_covers_the_brief():
    """>= 1000 strings, with the kinds of text the tests are meant to cover."""
    joined = "".join(STRINGS)
    assert len(STRINGS) >= 1000
    assert len(set(STRINGS)) > 1000
    for needle in ("\u0301", "日本", "مرحبا", "שלום", "नमस्ते", "สวัสดี", "\u200d", "🇫🇷",
                   "🏽", "\r\n", "\t", "'LL", "'Re", "def ", "https://", "<|im_start|>",
                   "<|endoftext|>", "<html>", '{"'):
        assert needle in joined, needle
    assert any(len(s) >= 1000 for s in STRINGS)
    assert any(s.startswith(" ") for s in STRINGS) and any(s.endswith(" ") for s in STRINGS)
    assert generate_strings(50, seed=1) == generate_strings(50, seed=1)


# ----------------------------------------------------------------------------
# shared checks

def assert_same_ids(tok, reference, strings, allowed, split_special):
    """tok.encode == reference.encode for every string; reports the first few
    differences."""
    failures = []
    for s in strings:
        ours = tok.encode(s, allowed_special=allowed)
        theirs = reference.encode(s, add_special_tokens=False,
                                  split_special_tokens=split_special)
        if ours != theirs:
            failures.append((s, ours, theirs))
    assert not failures, (f"{len(failures)} of {len(strings)} differ, e.g.\n" +
                          "\n".join(f"{s!r}\n  ours {o}\n  hf   {t}"
                                    for s, o, t in failures[:5]))


def representable(tok, s):
    """The UTF-8 bytes of s that have a one-byte symbol in tok's vocabulary
    (Hugging Face and fastattn both leave the others out)."""
    have = tok._bpe_byte_ids if hasattr(tok, "_bpe_byte_ids") else None
    if have is None:
        have = {b for b, c in BYTE_TO_CHAR.items()
                if c in tok._token_to_id and tok._token_to_id[c] not in tok._special_ids}
        tok._bpe_byte_ids = have
    return bytes(b for b in s.encode("utf-8") if b in have)


def assert_round_trip(tok, strings):
    """decode(encode(s)) == s whenever every byte of s has a symbol; otherwise
    the bytes are those of s without the bytes that have none."""
    n_exact = 0
    for s in strings:
        for allowed in (frozenset(), "all"):
            ids = tok.encode(s, allowed_special=allowed)
            kept = representable(tok, s)
            if kept == s.encode("utf-8"):
                assert tok.decode(ids) == s, (s, ids)
                n_exact += 1
            else:
                assert tok.decode_bytes(ids) == kept, (s, ids)
    assert n_exact >= len(strings)


def assert_streaming(tok, strings):
    """Feeding ids one by one gives decode(ids); some ids end mid-character."""
    n_split_chars = 0
    for s in strings:
        ids = tok.encode(s, allowed_special="all")
        stream = tok.stream_decoder()
        pieces = [stream.feed(i) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == tok.decode(ids), (s, ids)
        for i in ids:
            try:
                tok.token_bytes(i).decode("utf-8")
            except UnicodeDecodeError:
                n_split_chars += 1
    assert n_split_chars > 100                   # emoji and CJK over several tokens


def assert_cut_character_flushes_to_replacement(tok):
    """A sequence that ends inside a character: no exception, U+FFFD."""
    ids = tok.encode("ok 😀")
    assert len(ids) >= 3
    cut = ids[:-1]
    stream = tok.stream_decoder()
    text = "".join(stream.feed(i) for i in cut)
    assert "\ufffd" not in text
    tail = stream.flush()
    assert tail.endswith("\ufffd")
    assert text + tail == tok.decode(cut)
    assert stream.flush() == ""


def assert_decode_matches(tok, reference, seed):
    """Random id sequences (often invalid UTF-8) decode as Hugging Face does."""
    rng = random.Random(seed)
    for _ in range(2000):
        ids = [rng.randrange(tok.n_vocab) if rng.random() < 0.6 else rng.randrange(300)
               for _ in range(rng.randrange(1, 12))]
        assert tok.decode(ids) == reference.decode(
            ids, skip_special_tokens=False, clean_up_tokenization_spaces=False), ids


def assert_scanner_matches_regex(tok, strings):
    """The compiled pre-tokenizer cuts text exactly where the regex does."""
    mode = PRE_TOKENIZER_MODES[tok.pre]
    for s in strings:
        pieces = [p.decode("utf-8") for p in _bpe.split_utf8(s.encode("utf-8"), mode)]
        assert pieces == tok.pre_tokenize(s), s


# ----------------------------------------------------------------------------
# SmolLM2 (GGUF vocabulary)

def smollm2_path():
    from conftest import find_test_model
    path = find_test_model()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found: run `fastattn download` or set FASTATTN_TEST_MODEL")
    return path


def read_gguf_tokenizer_fields(path):
    """tokenizer.ggml.* fields of a GGUF file, prefix removed, as the loader
    passes them (plus "kind" and "path")."""
    from gguf import GGUFReader
    reader = GGUFReader(path)
    fields = {"kind": "gguf", "path": path}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            fields[key[len("tokenizer.ggml."):]] = field.contents()
    return fields


@pytest.fixture(scope="module")
def smol_fields():
    return read_gguf_tokenizer_fields(smollm2_path())


@pytest.fixture(scope="module")
def smol_tok(smol_fields):
    return Tokenizer.from_loaded(smol_fields)


def hf_from_gguf(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path))


class RawReference:
    """A `tokenizers.Tokenizer` with the encode() signature used above
    (special tokens always recognised)."""

    def __init__(self, backend):
        self.backend = backend

    def encode(self, text, add_special_tokens=False, split_special_tokens=False):
        assert not split_special_tokens
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids


@pytest.fixture(scope="module")
def smol_hf_both():
    """(transformers' GGUF conversion with SmolLM2's real pre-tokenizer,
    the conversion untouched as a raw `tokenizers` copy).  One conversion:
    it takes several seconds."""
    import tokenizers
    from tokenizers import pre_tokenizers
    reference = hf_from_gguf(smollm2_path())
    converted = tokenizers.Tokenizer.from_str(reference.backend_tokenizer.to_str())
    reference.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return reference, RawReference(converted)


@pytest.fixture(scope="module")
def smol_hf(smol_hf_both):
    return smol_hf_both[0]


@pytest.fixture(scope="module")
def smol_hf_converted(smol_hf_both):
    return smol_hf_both[1]


@pytest.mark.model
def test_smollm2_fields(smol_tok, smol_fields):
    assert smol_fields["model"] == "gpt2" and smol_fields["pre"] == "smollm"
    assert smol_tok.n_vocab == 49152 and smol_tok.n_merge == 48900
    assert smol_tok.pre == "smollm"
    assert smol_tok.bos_id == 1 and smol_tok.eos_id == 2 and smol_tok.add_bos is False
    assert smol_tok.eos_ids == {0, 2}              # <|endoftext|>, <|im_end|>
    assert len(smol_tok.special_tokens) == 17
    assert smol_tok.special_tokens["<|im_start|>"] == 1
    assert smol_tok.token_bytes(1) == b"<|im_start|>"
    assert smol_tok.token_bytes(19556) == b"Hello"


@pytest.mark.model
def test_smollm2_ids_match_hf_specials_allowed(smol_tok, smol_hf):
    assert_same_ids(smol_tok, smol_hf, STRINGS, "all", split_special=False)


@pytest.mark.model
def test_smollm2_ids_match_hf_specials_as_text(smol_tok, smol_hf):
    assert_same_ids(smol_tok, smol_hf, STRINGS, frozenset(), split_special=True)


@pytest.mark.model
def test_smollm2_random_code_points_match_hf(smol_tok, smol_hf):
    assert_same_ids(smol_tok, smol_hf, RANDOM_STRINGS, "all", split_special=False)
    assert_scanner_matches_regex(smol_tok, RANDOM_STRINGS)


@pytest.mark.model
def test_smollm2_some_specials_allowed(smol_tok, smol_hf):
    """Allowing only <|im_start|>: it becomes one id, <|im_end|> stays text."""
    text = "<|im_start|>user\nhi<|im_end|>\n"
    ids = smol_tok.encode(text, allowed_special={"<|im_start|>"})
    tail = smol_hf.encode("user\nhi<|im_end|>\n", add_special_tokens=False,
                          split_special_tokens=True)
    assert ids == [1] + tail
    assert 2 not in ids
    assert smol_tok.decode(ids) == text


@pytest.mark.model
def test_smollm2_gguf_conversion_without_digit_split(smol_fields, smol_hf_converted,
                                                     smol_tok):
    """transformers' GGUF conversion of pre 'smollm' keeps only ByteLevel; our
    'gpt2' pre-tokenizer over the same vocabulary reproduces it exactly, and
    the digit split does change ids (so the reference above must add it).
    Should a later transformers convert the digit split too, our 'smollm'
    must match the conversion as it is."""
    pre = json.loads(smol_hf_converted.backend.to_str())["pre_tokenizer"]
    if pre["type"] == "ByteLevel":
        ours = Tokenizer.from_gguf(dict(smol_fields, pre="gpt2"))
    else:
        ours = smol_tok
    assert_same_ids(ours, smol_hf_converted, STRINGS[::2], "all", split_special=False)
    plain = Tokenizer.from_gguf(dict(smol_fields, pre="gpt2"))
    assert smol_tok.encode("a  1") == [81, 256, 33]              # "a", "  ", "1"
    assert plain.encode("a  1") != smol_tok.encode("a  1")


@pytest.mark.model
def test_smollm2_round_trip(smol_tok):
    assert_round_trip(smol_tok, STRINGS)
    # bytes the vocabulary has no symbol for are left out, as HF does
    assert smol_tok.decode(smol_tok.encode("a\x04b")) == "ab"


@pytest.mark.model
def test_smollm2_streaming(smol_tok):
    assert_streaming(smol_tok, STRINGS)
    assert_cut_character_flushes_to_replacement(smol_tok)


@pytest.mark.model
def test_smollm2_decode_matches_hf(smol_tok, smol_hf):
    assert_decode_matches(smol_tok, smol_hf, seed=3)


@pytest.mark.model
def test_smollm2_scanner_matches_regex(smol_tok):
    assert_scanner_matches_regex(smol_tok, STRINGS)


@pytest.mark.model
def test_smollm2_from_hf_folder(smol_hf, smol_tok, tmp_path):
    """The same vocabulary saved as a Hugging Face folder (tokenizer.json with
    Digits + ByteLevel) loads to the same tokenizer."""
    smol_hf.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_folder(tmp_path)
    assert tok.pre == "smollm"
    assert tok.n_vocab == smol_tok.n_vocab
    assert tok.special_tokens == smol_tok.special_tokens
    assert (tok.bos_id, tok.eos_id, tok.eos_ids) == (1, 2, {0, 2})
    for s in STRINGS[::4]:
        assert tok.encode(s, allowed_special="all") == smol_tok.encode(
            s, allowed_special="all"), s
    loaded = Tokenizer.from_loaded({"kind": "hf", "path": str(tmp_path)})
    assert loaded.encode("x 12 <|im_end|>", "all") == tok.encode("x 12 <|im_end|>", "all")


# ----------------------------------------------------------------------------
# GPT-2 (OpenAI files)

@pytest.fixture(scope="module")
def gpt2_paths():
    from assets import AssetUnavailable, gpt2_files
    try:
        return gpt2_files()
    except AssetUnavailable as e:
        pytest.skip(f"GPT-2 vocabulary unavailable: {e}")


@pytest.fixture(scope="module")
def gpt2_tok(gpt2_paths):
    return Tokenizer.from_openai_files(*gpt2_paths)


@pytest.fixture(scope="module")
def gpt2_hf(gpt2_paths):
    """transformers' GPT2TokenizerFast over the same two files."""
    import inspect
    transformers = pytest.importorskip("transformers")
    cls = transformers.GPT2TokenizerFast
    encoder_json, vocab_bpe = gpt2_paths
    if "vocab" in inspect.signature(cls.__init__).parameters:      # transformers 5
        reference = cls(vocab=encoder_json, merges=vocab_bpe)
    else:
        reference = cls(vocab_file=encoder_json, merges_file=vocab_bpe)
    assert len(reference) == 50257
    return reference


def test_gpt2_fields(gpt2_tok):
    assert gpt2_tok.n_vocab == 50257 and gpt2_tok.n_merge == 50000
    assert gpt2_tok.pre == "gpt2"
    assert gpt2_tok.bos_id == gpt2_tok.eos_id == 50256
    assert gpt2_tok.eos_ids == {50256}
    assert gpt2_tok.special_tokens == {"<|endoftext|>": 50256}
    assert gpt2_tok.encode("Hello world") == [15496, 995]
    assert gpt2_tok.encode(" Hello world") == [18435, 995]


def test_gpt2_ids_match_hf_specials_allowed(gpt2_tok, gpt2_hf):
    assert_same_ids(gpt2_tok, gpt2_hf, STRINGS, "all", split_special=False)


def test_gpt2_ids_match_hf_specials_as_text(gpt2_tok, gpt2_hf):
    assert_same_ids(gpt2_tok, gpt2_hf, STRINGS, frozenset(), split_special=True)


def test_gpt2_random_code_points_match_hf(gpt2_tok, gpt2_hf):
    assert_same_ids(gpt2_tok, gpt2_hf, RANDOM_STRINGS, "all", split_special=False)
    assert_scanner_matches_regex(gpt2_tok, RANDOM_STRINGS)
    assert_round_trip(gpt2_tok, RANDOM_STRINGS)


def test_gpt2_round_trip(gpt2_tok):
    assert representable(gpt2_tok, "\x00\xff") == "\x00\xff".encode()   # all 256
    assert_round_trip(gpt2_tok, STRINGS)


def test_gpt2_streaming(gpt2_tok):
    assert_streaming(gpt2_tok, STRINGS)
    assert_cut_character_flushes_to_replacement(gpt2_tok)


def test_gpt2_decode_matches_hf(gpt2_tok, gpt2_hf):
    assert_decode_matches(gpt2_tok, gpt2_hf, seed=4)


def test_gpt2_scanner_matches_regex(gpt2_tok):
    assert_scanner_matches_regex(gpt2_tok, STRINGS)


def test_gpt2_from_hf_folder(gpt2_tok, gpt2_hf, gpt2_paths, tmp_path):
    """tokenizer.json (saved by transformers) and vocab.json + merges.txt."""
    gpt2_hf.save_pretrained(tmp_path / "json")
    from_json = Tokenizer.from_hf_folder(tmp_path / "json")
    files = tmp_path / "files"
    files.mkdir()
    for src, name in zip(gpt2_paths, ("vocab.json", "merges.txt")):
        (files / name).write_bytes(open(src, "rb").read())
    from_files = Tokenizer.from_hf_folder(files)
    for tok in (from_json, from_files):
        assert tok.n_vocab == 50257 and tok.pre == "gpt2"
        for s in STRINGS[::5]:
            assert tok.encode(s) == gpt2_tok.encode(s), s
    assert from_json.special_tokens == {"<|endoftext|>": 50256}
    assert from_json.eos_id == 50256
    assert from_files.special_tokens == {"<|endoftext|>": 50256}
    assert (from_files.bos_id, from_files.eos_id) == (50256, 50256)

    # generation_config.json may list more ids that end generation
    (files / "generation_config.json").write_text('{"eos_token_id": [50256, 13]}')
    assert Tokenizer.from_hf_folder(files).eos_ids == {50256, 13}
    (files / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')
    with pytest.raises(ModelFileError, match="eos_token '<\\|nope\\|>'"):
        Tokenizer.from_hf_folder(files)


def test_gpt2_threads_agree(gpt2_tok):
    """Four threads encoding at once get the same ids: the encode runs without
    the GIL, a thread that finds the word cache busy merges without it."""
    texts = STRINGS[:600] + [english_corpus(20_000, seed=k) for k in range(4)]
    expected = [gpt2_tok.encode(s) for s in texts]
    results = [None] * 4

    def work(k):
        rng = random.Random(k)
        order = list(range(len(texts)))
        rng.shuffle(order)
        got = {}
        for _ in range(3):
            gpt2_tok._bpe.clear_cache()
            for i in order:
                got[i] = gpt2_tok.encode(texts[i])
        results[k] = [got[i] for i in range(len(texts))]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r == expected for r in results)


# ----------------------------------------------------------------------------
# synthetic vocabulary with random merges, against the `tokenizers` BPE model

def random_vocab(seed, n_merge):
    """256 byte symbols + random merges over short ASCII pieces: ranks that
    disagree with creation order, several merges making the same token."""
    rng = random.Random(seed)
    tokens = [BYTE_TO_CHAR[b] for b in range(256)]
    index = {t: i for i, t in enumerate(tokens)}
    merges = []
    seen = set()
    pool = [BYTE_TO_CHAR[b] for b in b"abc de'1"]
    while len(merges) < n_merge:
        left, right = rng.choice(pool), rng.choice(pool)
        if (left, right) in seen or len(left + right) > 8:
            continue
        seen.add((left, right))
        merges.append((left, right))
        if left + right not in index:
            index[left + right] = len(tokens)
            tokens.append(left + right)
            pool.append(left + right)
    rng.shuffle(merges)                            # ranks unrelated to creation
    # a merge may only name tokens that exist: all do, the shuffle keeps them
    return tokens, merges


@pytest.fixture(scope="module")
def synthetic():
    tokenizers = pytest.importorskip("tokenizers")
    tokens, merges = random_vocab(seed=7, n_merge=400)
    tokens.append("<|end|>")
    types = [1] * (len(tokens) - 1) + [3]
    tok = Tokenizer(tokens, merges, pre="gpt2", token_types=types, eos_id=len(tokens) - 1)
    reference = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    reference.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=True)
    reference.decoder = tokenizers.decoders.ByteLevel()
    reference.add_special_tokens(["<|end|>"])
    return tok, reference


def synthetic_strings(seed, count):
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.choice([1, 3, 8, 20, 60, 300, 1500])
        out.append("".join(rng.choice("aaabbcd e'1\n") for _ in range(n)))
    return out + ["a" * 5000, "ab" * 3000, "<|end|>aa<|end|>"]


def test_synthetic_merges_match_tokenizers(synthetic):
    """Heap order (rank, then leftmost), stale pairs, long words."""
    tok, reference = synthetic
    for s in synthetic_strings(seed=8, count=1500):
        assert tok.encode(s, "all") == reference.encode(s).ids, s
        assert tok.decode(tok.encode(s)) == s
        uncached = [i for p in tok.pre_tokenize(s) for i in tok._bpe.encode_word(p.encode())]
        assert uncached == tok.encode(s), s


def test_synthetic_ignore_merges_matches_tokenizers():
    """ignore_merges: a word that is itself a token skips the merges."""
    tokenizers = pytest.importorskip("tokenizers")
    tokens, merges = random_vocab(seed=11, n_merge=300)
    tokens += [t for t in ("aaaa", "abcab", "ddd", "Ġdd") if t not in tokens]
    tok = Tokenizer(tokens, merges, ignore_merges=True)
    reference = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=True))
    reference.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
        add_prefix_space=False, use_regex=True)
    strings = synthetic_strings(seed=12, count=800) + ["aaaa", "abcab ddd", "aaaa aaaa"]
    for s in strings:
        assert tok.encode(s) == reference.encode(s).ids, s
    assert tok.encode("aaaa") == [tokens.index("aaaa")]
    merging = Tokenizer(tokens, merges)
    assert sum(merging.encode(s) != tok.encode(s) for s in strings) > 10


def test_scanner_on_malformed_utf8(synthetic):
    """Arbitrary bytes (never produced by encode(), which takes str) are cut
    into pieces that cover them exactly and round-trip through the merges."""
    tok, _ = synthetic
    rng = random.Random(13)
    for _ in range(3000):
        data = bytes(rng.choice([rng.randrange(256), 0x80, 0xE2, 0x20, 0x27, 0x31, 0x61])
                     for _ in range(rng.randrange(1, 40)))
        for mode in (0, 1):
            pieces = _bpe.split_utf8(data, mode)
            assert b"".join(pieces) == data and all(pieces)
            assert tok.decode_bytes(tok._bpe.encode_utf8(data, mode)) == data


def test_bytes_to_unicode():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord("!")] == "!" and table[0xFF] == "ÿ"
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == "Ā"
    assert table[0xAD] == "Ń"
    assert all(c.isprintable() and not c.isspace() for c in table.values())


def test_word_cache_is_bounded():
    tokens, merges = random_vocab(seed=9, n_merge=100)
    tok = Tokenizer(tokens, merges)
    small = _bpe.BytePairEncoder(tok._byte_ids, tok._merge_ids, cache_size=8)
    words = [f"{w} " * 3 for w in ("ab", "cd", "a'", "dd", "bad", "cab", "ace", "deb",
                                    "bed", "add", "cee", "dab")]
    for w in words * 3:
        got = small.encode_utf8(w.encode(), 0)
        assert got == tok.encode(w)
        assert small.n_cached <= 8
    assert small.n_cached > 0


# ----------------------------------------------------------------------------
# bad input and malformed vocabularies

def tiny_tokenizer(**kwargs):
    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + ["ab", "abc", "<|x|>"]
    merges = [("a", "b"), ("ab", "c")]
    types = [1] * 258 + [3]
    return Tokenizer(tokens, merges, token_types=types, **kwargs)


def test_tiny_tokenizer():
    tok = tiny_tokenizer()
    assert tok.encode("abc ab") == [257, 32, 256]       # " ab": Ġ then a+b
    assert tok.encode("abcabc") == [257, 257]
    assert tok.encode("x<|x|>", "all") == [120, 258]
    assert tok.encode("x<|x|>") == tok.encode("x") + tok.encode("<|x|>")
    assert tok.decode([258, 257]) == "<|x|>abc"


def test_longest_special_wins():
    tokens = [BYTE_TO_CHAR[b] for b in range(256)] + ["<|x|>", "<|x|>y", "|>"]
    tok = Tokenizer(tokens, [], token_types=[1] * 256 + [3, 4, 3])
    assert tok.special_tokens == {"<|x|>": 256, "<|x|>y": 257, "|>": 258}
    assert tok.encode("a<|x|>y<|x|>", "all") == [97, 257, 256]
    assert tok.encode("a<|x|>y", {"<|x|>"}) == [97, 256, 121]
    assert tok.encode("<|x|>|>", {"|>"}) == tok.encode("<|x") + [258, 258]


def test_bad_ids_raise():
    tok = tiny_tokenizer()
    for ids in ([-1], [259], [2 ** 40], [1, 2, 999], ["a"], [1.0], [None], [True]):
        with pytest.raises(TokenizerError):
            tok.decode(ids)
    with pytest.raises(TokenizerError):
        tok.decode(5)
    with pytest.raises(TokenizerError):
        tok.token_bytes(259)
    with pytest.raises(TokenizerError):
        tok.stream_decoder().feed(-1)
    assert tok.decode(np.array([97, 98], dtype=np.int64)) == "ab"


def test_invalid_utf8_decodes_to_replacement():
    tok = tiny_tokenizer()
    assert tok.decode([0xE6]) == "\ufffd"                           # lone lead byte
    assert tok.decode([0xE6, 0x97]) == "\ufffd"                     # cut 3-byte char
    assert tok.decode([0xE6, 0x97, 0xA5]) == "日"
    assert tok.decode([0x80, 97]) == "\ufffda"                      # stray continuation
    assert tok.decode([0xFF, 0xC0, 0xAF]) == "\ufffd\ufffd\ufffd"
    assert tok.decode_bytes([0xE6, 0x97]) == b"\xe6\x97"
    stream = tok.stream_decoder()
    assert stream.feed(0xE6) == "" and stream.feed(0x97) == ""
    assert stream.feed(97) == "\ufffda"
    assert stream.feed(0xF0) == "" and stream.flush() == "\ufffd"


def test_bad_text_raises():
    tok = tiny_tokenizer()
    for text in ("a\ud800b", "\udfff", "x\ud83d"):
        with pytest.raises(TokenizerError, match="surrogate"):
            tok.encode(text)
        with pytest.raises(TokenizerError, match="surrogate"):
            tok.encode(text + "<|x|>", allowed_special="all")
    for text in (b"bytes", None, 5, ["a"]):
        with pytest.raises(TokenizerError):
            tok.encode(text)
    with pytest.raises(TokenizerError):
        tok.encode("x", allowed_special={"<|nope|>"})
    with pytest.raises(TokenizerError):
        tok.encode("x", allowed_special="<|x|>")
    assert tok.encode("\U0001F600") == [0xF0, 0x9F, 0x98, 0x80]    # non-BMP is fine


def test_malformed_vocabularies_raise():
    base = [BYTE_TO_CHAR[b] for b in range(256)] + ["ab"]
    with pytest.raises(ModelFileError, match="duplicates token 97"):
        Tokenizer(base + ["a"], [("a", "b")])
    with pytest.raises(ModelFileError, match="merge 1 'a zz'.*'zz'"):
        Tokenizer(base, [("a", "b"), ("a", "zz")])
    with pytest.raises(ModelFileError, match="'bc', which is not in"):
        Tokenizer(base, [("b", "c")])
    with pytest.raises(ModelFileError, match="repeats merge 0"):
        Tokenizer(base, [("a", "b"), ("a", "b")])
    with pytest.raises(ModelFileError, match="token_type has 3 entries"):
        Tokenizer(base, [], token_types=[1, 1, 1])
    with pytest.raises(ModelFileError, match="eos_id 999"):
        Tokenizer(base, [], eos_id=999)
    with pytest.raises(ModelFileError, match="empty"):
        Tokenizer([], [])
    with pytest.raises(UnsupportedError, match="'qwen2'"):
        Tokenizer(base, [], pre="qwen2")


def gguf_fields(**changes):
    fields = {"kind": "gguf", "model": "gpt2", "pre": "gpt2",
              "tokens": [BYTE_TO_CHAR[b] for b in range(256)] + ["ab"],
              "token_type": [1] * 257, "merges": ["a b"], "bos_token_id": 0,
              "eos_token_id": 1}
    fields.update(changes)
    return fields


def test_from_gguf_fields():
    tok = Tokenizer.from_gguf(gguf_fields())
    assert tok.encode("ab") == [256] and tok.bos_id == 0 and tok.eos_id == 1
    short = Tokenizer.from_gguf(gguf_fields(bos_token_id=None, eos_token_id=None,
                                            bos_id=2, eos_id=3, eot_id=4, add_bos=True))
    assert (short.bos_id, short.eos_id, short.eos_ids, short.add_bos) == (2, 3, {3, 4}, True)
    with pytest.raises(UnsupportedError, match="'llama'"):
        Tokenizer.from_gguf(gguf_fields(model="llama"))
    with pytest.raises(UnsupportedError, match="'deepseek-llm'"):
        Tokenizer.from_gguf(gguf_fields(pre="deepseek-llm"))
    with pytest.raises(ModelFileError, match="merges\\[0\\] 'ab'"):
        Tokenizer.from_gguf(gguf_fields(merges=["ab"]))
    with pytest.raises(ModelFileError, match="merges\\[0\\] 'a  b'"):
        Tokenizer.from_gguf(gguf_fields(merges=["a  b"]))
    with pytest.raises(ModelFileError, match="tokens is missing"):
        Tokenizer.from_gguf(gguf_fields(tokens=None))
    with pytest.raises(ModelFileError, match="not UTF-8"):
        Tokenizer.from_gguf(gguf_fields(tokens=[b"\xff"]))
    with pytest.raises(UnsupportedError, match="kind 'sentencepiece'"):
        Tokenizer.from_loaded({"kind": "sentencepiece"})


def test_from_hf_folder_errors(tmp_path):
    with pytest.raises(ModelFileError, match="no tokenizer.json nor vocab.json"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        Tokenizer.from_hf_folder(tmp_path)
    vocab = {BYTE_TO_CHAR[b]: b for b in range(256)}
    good = {"model": {"type": "BPE", "vocab": vocab, "merges": []},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                              "use_regex": True},
            "normalizer": None, "added_tokens": []}
    for change, match in (
            ({"model": {"type": "WordPiece", "vocab": vocab}}, "'WordPiece'"),
            ({"normalizer": {"type": "NFC"}}, "normalizer"),
            ({"pre_tokenizer": {"type": "Metaspace"}}, "Metaspace"),
            ({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}},
             "add_prefix_space")):
        (tmp_path / "tokenizer.json").write_text(json.dumps(dict(good, **change)))
        with pytest.raises(UnsupportedError, match=match):
            Tokenizer.from_hf_folder(tmp_path)
    bad_merges = dict(good, model={"type": "BPE", "vocab": vocab, "merges": ["a q"]})
    (tmp_path / "tokenizer.json").write_text(json.dumps(bad_merges))
    with pytest.raises(ModelFileError, match="'aq'"):
        Tokenizer.from_hf_folder(tmp_path)
    gap = dict(good, model={"type": "BPE", "vocab": dict(vocab, x=300), "merges": []})
    (tmp_path / "tokenizer.json").write_text(json.dumps(gap))
    with pytest.raises(ModelFileError, match="id 300"):
        Tokenizer.from_hf_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps(good))
    assert Tokenizer.from_hf_folder(tmp_path).encode("hi") == [104, 105]


def test_hostile_tokenizer_json(tmp_path):
    """Wrong kinds of values, deep nesting and far-away ids: a ModelFileError
    naming the file.  The far-away id is refused by its own message, before
    a list of 10**8 entries is grown to reach it."""
    vocab = {BYTE_TO_CHAR[b]: b for b in range(256)}
    good = {"model": {"type": "BPE", "vocab": vocab, "merges": []},
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                              "use_regex": True},
            "normalizer": None, "added_tokens": []}
    path = tmp_path / "tokenizer.json"
    seq = {"type": "Sequence", "pretokenizers": 5}
    cases = [
        ([], "holds a JSON list, not an object"),
        (dict(good, model=[1]), "model is a JSON list, not an object"),
        (dict(good, added_tokens={"a": 1}), "added_tokens is a JSON dict, not a list"),
        (dict(good, added_tokens=[5]), "added token 5 is not an object"),
        (dict(good, added_tokens=[{"id": True, "content": "x"}]), "no valid id"),
        (dict(good, model=dict(good["model"], merges=7)), "model.merges is a JSON int"),
        (dict(good, added_tokens=[{"id": 10**8, "content": "<big>"}]),
         "added token '<big>' has id 100000000, but the vocabulary and the 1 added "
         "tokens fill only ids 0 .. 256"),
    ]
    for value, match in cases:
        path.write_text(json.dumps(value))
        with pytest.raises(ModelFileError, match=re.escape(match)) as info:
            Tokenizer.from_hf_folder(tmp_path)
        assert str(path) in str(info.value)
    # pre_tokenizer shapes that are not supported, whatever their types
    for pre in (seq, {"type": "Sequence", "pretokenizers": [1, 2]}, [1]):
        path.write_text(json.dumps(dict(good, pre_tokenizer=pre)))
        with pytest.raises(UnsupportedError, match="pre_tokenizer"):
            Tokenizer.from_hf_folder(tmp_path)
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ModelFileError, match="nested too deeply"):
        Tokenizer.from_hf_folder(tmp_path)


def test_bytes_without_a_token_are_dropped_with_one_warning(caplog):
    """A vocabulary without the token of some byte (SmolLM2 has none for
    0x04, say) drops that byte, as Hugging Face's tokenizer does, and says so
    once."""
    tokens = [BYTE_TO_CHAR[b] for b in range(256) if b != 0x04]
    tok = Tokenizer(tokens, [], source="no-0x04")
    with caplog.at_level("WARNING", logger="fastattn"):
        ids = tok.encode("a\x04b")
        again = tok.encode("c\x04")
    assert tok.decode(ids) == "ab" and tok.decode(again) == "c"
    warned = [r.getMessage() for r in caplog.records if "no token for" in r.getMessage()]
    assert len(warned) == 1 and "no-0x04" in warned[0] and "0x04" in warned[0]


def test_openai_files_errors(tmp_path):
    encoder = tmp_path / "encoder.json"
    merges = tmp_path / "vocab.bpe"
    encoder.write_text(json.dumps({BYTE_TO_CHAR[b]: b for b in range(256)}))
    merges.write_text("#version: 0.2\na b\n")
    with pytest.raises(ModelFileError, match="'ab', which is not in"):
        Tokenizer.from_openai_files(encoder, merges)
    merges.write_text("#version: 0.2\na b c\n")
    with pytest.raises(ModelFileError, match="line 2 'a b c'"):
        Tokenizer.from_openai_files(encoder, merges)
    encoder.write_text(json.dumps({"a": 0, "b": 0}))
    with pytest.raises(ModelFileError, match="share id 0"):
        Tokenizer.from_openai_files(encoder, merges)
    with pytest.raises(ModelFileError, match="no such file"):
        Tokenizer.from_openai_files(tmp_path / "missing.json", merges)


# ----------------------------------------------------------------------------
# speed report (no timed assertion)

def english_corpus(n_bytes, seed=0):
    """~n_bytes of English from tests/data/english.txt, sentences shuffled."""
    with open(os.path.join(HERE, "data", "english.txt"), encoding="utf-8") as f:
        paragraphs = [p.strip() for p in f.read().split("\n\n") if p.strip()]
    sentences = [s.strip() + "." for p in paragraphs for s in p.split(". ") if s.strip()]
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_bytes:
        paragraph = " ".join(rng.choice(sentences) for _ in range(rng.randrange(3, 9)))
        out.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(out)


def throughput(fn, text, clock, repeat=5):
    """MB/s of fn(text), best of repeat runs timed by clock."""
    fn(text)
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        fn(text)
        best = min(best, clock() - start)
    return len(text.encode("utf-8")) / max(best, 1e-9) / 1e6


def test_encode_throughput_report(gpt2_tok, gpt2_hf, capsys):
    """Prints MB/s by wall clock and by this process's CPU time (steadier on a
    shared machine; HF's worker threads, if any, count in its CPU time)."""
    text = english_corpus(300_000)
    backend = gpt2_hf.backend_tokenizer
    assert gpt2_tok.encode(text) == backend.encode(text, add_special_tokens=False).ids

    def cold(t):
        gpt2_tok._bpe.clear_cache()
        return gpt2_tok.encode(t)

    def hf(t):
        return backend.encode(t, add_special_tokens=False)

    lines = []
    for clock_name, clock in (("wall", time.perf_counter), ("cpu", time.process_time)):
        lines.append(f"  {clock_name:4s}: fastattn {throughput(gpt2_tok.encode, text, clock):6.1f}"
                     f"  (word cache cleared each run {throughput(cold, text, clock):6.1f})"
                     f"  HF tokenizers {throughput(hf, text, clock):5.2f} MB/s")
    with capsys.disabled():
        print(f"\nencode {len(text.encode()) / 1e3:.0f} KB of English, GPT-2 vocabulary:")
        print("\n".join(lines))
