"""Byte-level BPE: text <-> token ids for GPT-2 and SmolLM2 style vocabularies.

    >>> tok = Tokenizer.from_loaded(loaded.tokenizer)
    >>> ids = tok.encode("Hello world")
    >>> tok.decode(ids)
    'Hello world'

Encoding runs in four steps:

  1. allowed special tokens are cut out of the text (longest match first);
  2. each stretch between them is split into pre-tokens by the pre-tokenizer
     regex (`gpt2`, or `smollm` which also isolates every digit), which the
     compiled scanner in _bpe.pyx implements on a table of character classes
     taken from the `regex` package;
  3. each pre-token's UTF-8 bytes go through the merge loop (_bpe.pyx), which
     keeps a bounded word -> ids cache;
  4. the ids are concatenated.

Special tokens (GGUF token types 3 "control" and 4 "user-defined"; Hugging Face
added tokens) are recognised in text only when the caller allows them:
`encode(text, allowed_special="all")` gives the ids a Hugging Face tokenizer
gives by default, while the default `encode(text)` encodes "<|im_start|>" and
friends as ordinary text, as Hugging Face does with split_special_tokens=True.
That keeps user text from injecting control tokens; chat templates pass "all".
encode() never adds BOS: a caller that wants it prepends bos_id when add_bos.

Decoding maps each id back to its bytes (control tokens to their text) and
reads the result as UTF-8, invalid sequences becoming U+FFFD.
"""
import codecs
import json
import logging
import os

import numpy as np
import regex

from .errors import ModelFileError, TokenizerError, UnsupportedError
from .files import read_json, read_json_object, read_text

log = logging.getLogger(__name__)

# GGUF tokenizer.ggml.token_type values
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4
TOKEN_UNUSED, TOKEN_BYTE = 5, 6

# Specials that end a turn, besides the vocabulary's eos, wherever present.
END_OF_TURN_TEXTS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>",
                     "<|end|>", "<end_of_turn>")

# Pre-tokenizers.  gpt2 is GPT-2's regex as Hugging Face's ByteLevel applies it.
# smollm isolates every \p{N} char first (HF: Digits(individual_digits) then
# ByteLevel; llama.cpp: "\p{N}" then the gpt2 regex), and the gpt2 regex then
# runs on each stretch between digits.  One regex does both: digits match alone,
# " ?\p{N}+" is gone, and whitespace before a digit ends its stretch, so
# "\s+(?!\S)" becomes "\s+(?![^\s\p{N}])".
# Known shortcoming: \p{L}, \p{N} and \s come from the `regex` package's
# Unicode tables; HF's Oniguruma and Rust's char::is_numeric (its Digits) may
# follow another Unicode version, so a character assigned in one version and
# not the other can be cut differently.  No such character has shown up in the
# tests (which include random code points from every plane).
PRE_TOKENIZER_PATTERNS = {
    "gpt2": (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
             r"|\s+(?!\S)|\s+"),
    "smollm": (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"|\s+(?![^\s\p{N}])|\s+"),
}

# The compiled scanner's mode for each pre-tokenizer (_bpe.piece_end).
PRE_TOKENIZER_MODES = {"gpt2": 0, "smollm": 1}

# Bounded word -> ids cache of the merge loop (entries; cleared when full).
WORD_CACHE_SIZE = 1 << 16


def bytes_to_unicode():
    """The byte-level alphabet: byte value -> one printable character.

    Bytes that print as themselves in Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ')
    keep their code point; the other 68 (controls, space, DEL, NBSP, soft
    hyphen) take U+0100, U+0101, ... in byte order, so no token text holds a
    space or a control character."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table = {}
    n_shifted = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(0x100 + n_shifted)
            n_shifted += 1
    return table


BYTE_TO_CHAR = bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def char_class_table():
    """[0x110000] uint8: 1 for \\p{L}, 2 for \\p{N}, 3 for \\s, 0 for the rest,
    as the `regex` package classifies each code point (surrogates: 0)."""
    code_points = np.concatenate([np.arange(0xD800), np.arange(0xE000, 0x110000)])
    every_char = code_points.astype("<u4").tobytes().decode("utf-32-le")
    table = np.zeros(0x110000, dtype=np.uint8)
    for cls, pattern in ((1, r"\p{L}+"), (2, r"\p{N}+"), (3, r"\s+")):
        for m in regex.finditer(pattern, every_char):
            table[code_points[m.start():m.end()]] = cls
    return table


_char_classes_ready = False


def install_char_classes():
    """Give the compiled scanner its class table, once per process."""
    global _char_classes_ready
    if not _char_classes_ready:
        from . import _bpe
        _bpe.set_char_classes(char_class_table())
        _char_classes_ready = True


# str.translate table: byte-level char -> the char of its byte value; Latin-1
# chars outside the alphabet (space, controls) -> a char Latin-1 cannot encode
_TO_LATIN1 = {ord(c): chr(b) for b, c in BYTE_TO_CHAR.items()}
_TO_LATIN1.update({i: "\U0010FFFF" for i in range(256) if chr(i) not in CHAR_TO_BYTE})


def token_text_to_bytes(text):
    """A byte-level token's text -> its bytes; None if a char is outside the
    byte-level alphabet."""
    try:
        return text.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        return None


class Tokenizer:
    """Byte-level BPE over one vocabulary.

    n_vocab          number of ids; ids are 0 .. n_vocab-1
    bos_id, eos_id   None when the vocabulary has none
    add_bos          whether the model expects bos_id before the prompt
    eos_ids          ids that end generation (eos and end-of-turn tokens)
    special_tokens   text -> id of the tokens matched only when allowed
    """

    def __init__(self, tokens, merges, pre="gpt2", token_types=None, bos_id=None,
                 eos_id=None, extra_eos_ids=(), add_bos=False, ignore_merges=False,
                 source="tokenizer"):
        """tokens      [n_vocab] token texts (byte-level alphabet for normal ones)
        merges      [n_merge] (left, right) token texts, best rank first
        pre         pre-tokenizer name: "gpt2" or "smollm"
        token_types [n_vocab] GGUF token types; None means all normal
        source      file or field named in error messages"""
        from . import _bpe

        self.source = source
        if pre not in PRE_TOKENIZER_PATTERNS:
            raise UnsupportedError(
                f"{source}: pre-tokenizer {pre!r} is not supported "
                f"(supported: {', '.join(sorted(PRE_TOKENIZER_PATTERNS))})")
        self.pre = pre
        self._pre_mode = PRE_TOKENIZER_MODES[pre]
        self._pre_re = regex.compile(PRE_TOKENIZER_PATTERNS[pre])
        install_char_classes()
        tokens = list(tokens)
        n_vocab = len(tokens)
        if n_vocab == 0:
            raise ModelFileError(f"{source}: the vocabulary is empty")
        if token_types is None:
            token_types = [TOKEN_NORMAL] * n_vocab
        token_types = [int(t) for t in token_types]
        if len(token_types) != n_vocab:
            raise ModelFileError(f"{source}: token_type has {len(token_types)} entries "
                                 f"but tokens has {n_vocab}")
        self.n_vocab = n_vocab

        # token text -> id, refusing duplicates
        token_to_id = {}
        for i, text in enumerate(tokens):
            if not isinstance(text, str):
                raise ModelFileError(f"{source}: token {i} is {type(text).__name__} "
                                     f"{text!r}, not text")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:    # tokenizer.json may hold "\udc80"
                raise ModelFileError(f"{source}: token {i} {text!r} has a lone "
                                     f"surrogate at index {e.start}; it has no UTF-8 "
                                     f"form") from None
            if text in token_to_id:
                raise ModelFileError(f"{source}: token {i} {text!r} duplicates "
                                     f"token {token_to_id[text]}")
            token_to_id[text] = i
        self._token_to_id = token_to_id

        # specials: control and user-defined tokens.
        # Known shortcoming: Hugging Face always recognises its non-special
        # added tokens (GGUF user-defined, type 4) in text; here they are
        # specials like the control tokens, recognised only when allowed, so
        # such a vocabulary gives HF's ids only with allowed_special="all".
        self.special_tokens = {
            text: i for i, text in enumerate(tokens)
            if token_types[i] in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and text}
        self._special_ids = frozenset(self.special_tokens.values())

        # bytes of every id: byte-level text mapped back, specials as UTF-8 text.
        # A normal token with a char outside the byte-level alphabet decodes to
        # its UTF-8 text, as Hugging Face's ByteLevel decoder does.
        table = []
        for i, text in enumerate(tokens):
            raw = None
            if i not in self._special_ids:
                raw = token_text_to_bytes(text)
            table.append(raw if raw is not None else text.encode("utf-8"))
        self._bytes_table = table

        # one-byte symbols: the merge loop's starting alphabet
        byte_ids = np.full(256, -1, dtype=np.int32)
        for b, c in BYTE_TO_CHAR.items():
            i = token_to_id.get(c)
            if i is not None and i not in self._special_ids:
                byte_ids[b] = i

        # merges -> [n_merge, 3] (left_id, right_id, new_id), refusing unknowns
        merge_ids = np.empty((len(merges), 3), dtype=np.int32)
        seen = {}
        for rank, pair in enumerate(merges):
            left, right = pair
            row = (token_to_id.get(left), token_to_id.get(right),
                   token_to_id.get(left + right))
            if None in row:
                missing = (left, right, left + right)[row.index(None)]
                raise ModelFileError(f"{source}: merge {rank} {left + ' ' + right!r} "
                                     f"names {missing!r}, which is not in the vocabulary")
            if row[:2] in seen:
                raise ModelFileError(f"{source}: merge {rank} {left + ' ' + right!r} "
                                     f"repeats merge {seen[row[:2]]}")
            seen[row[:2]] = rank
            merge_ids[rank] = row

        whole_words = None
        if ignore_merges:
            whole_words = {table[i]: i for i in range(n_vocab)
                           if i not in self._special_ids}
        self._byte_ids = byte_ids
        # bytes the vocabulary has a token for: any other byte of a text is
        # dropped by the merge loop, as Hugging Face's tokenizer drops it
        self._known_bytes = bytes(int(b) for b in np.flatnonzero(byte_ids >= 0))
        self._warned_dropped = len(self._known_bytes) == 256
        self._merge_ids = merge_ids
        self._bpe = _bpe.BytePairEncoder(byte_ids, merge_ids, whole_words,
                                         cache_size=WORD_CACHE_SIZE)
        self.n_merge = len(merges)

        # bos / eos / end of turn
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if value is not None and not 0 <= value < n_vocab:
                raise ModelFileError(f"{source}: {name} {value} is outside the "
                                     f"vocabulary [0, {n_vocab})")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = bool(add_bos)
        eos_ids = {i for i in extra_eos_ids if i is not None and 0 <= i < n_vocab}
        if eos_id is not None:
            eos_ids.add(eos_id)
        eos_ids.update(self.special_tokens[t] for t in END_OF_TURN_TEXTS
                       if t in self.special_tokens)
        self.eos_ids = frozenset(eos_ids)

        self._special_res = {}

    def __repr__(self):
        return (f"Tokenizer(n_vocab={self.n_vocab}, n_merge={self.n_merge}, "
                f"pre={self.pre!r}, specials={len(self.special_tokens)}, "
                f"source={self.source!r})")

    # ------------------------------------------------------------------------
    # encoding

    def encode(self, text, allowed_special=frozenset()):
        """text -> ids.

        allowed_special: "all", or a set of special-token texts to recognise;
        special-token texts not allowed are encoded as ordinary text.
        Raises TokenizerError for non-str text, lone surrogates, or an
        allowed_special entry that is not a special token here.

            >>> tok.encode("<|im_start|>user", allowed_special="all")
            [1, 4093]
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes str, got {type(text).__name__}")
        special_re = self._special_regex(allowed_special)
        if special_re is None:
            return self.encode_ordinary(text)
        return self._encode_specials(text, special_re, ())

    def special_texts_in(self, text):
        """The special-token texts in text, in order (as encode with
        allowed_special="all" would read them)."""
        special_re = self._special_regex("all")
        return [] if special_re is None else special_re.findall(text)

    def _encode_specials(self, text, special_re, plain_spans):
        """Cut the specials special_re finds out of text (those overlapping a
        span of plain_spans excepted), encode the stretches between them."""
        utf8_of(text)                               # lone surrogates, whole text
        ids = []
        start = 0
        for m in special_re.finditer(text):
            if any(a < m.end() and m.start() < b for a, b in plain_spans):
                continue
            if m.start() > start:
                ids += self.encode_ordinary(text[start:m.start()])
            ids.append(self.special_tokens[m.group()])
            start = m.end()
        if start < len(text):
            ids += self.encode_ordinary(text[start:])
        return ids

    def encode_chat(self, text, plain_spans):
        """encode(text, allowed_special="all"), except that a special-token
        text overlapping one of plain_spans [(start, end), ...] is encoded as
        ordinary text: for a rendered chat, whose template writes the specials
        and whose messages' contents (the spans) are the users' text."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes str, got {type(text).__name__}")
        special_re = self._special_regex("all")
        if special_re is None:
            return self.encode_ordinary(text)
        return self._encode_specials(text, special_re, plain_spans)

    def encode_ordinary(self, text):
        """text -> ids with no special tokens recognised.  Bytes the
        vocabulary has no token for are dropped (a warning says so, once per
        tokenizer)."""
        data = utf8_of(text)
        if not self._warned_dropped:
            dropped = data.translate(None, self._known_bytes)
            if dropped:
                self._warned_dropped = True
                log.warning("%s: the text holds bytes the vocabulary has no token for "
                            "(%s); they are dropped, as the model's own tokenizer "
                            "does (said once)", self.source,
                            ", ".join(f"0x{b:02x}" for b in sorted(set(dropped))))
        return self._bpe.encode_utf8(data, self._pre_mode)

    def pre_tokenize(self, text):
        """text -> its pre-tokens, by the pre-tokenizer regex itself (the
        reference for the compiled scanner that encode() uses)."""
        return self._pre_re.findall(text)

    def _special_regex(self, allowed_special):
        """The compiled alternation of allowed specials, longest first; None if
        nothing is allowed."""
        if allowed_special is None:
            return None
        if allowed_special == "all":
            key = "all"
        elif isinstance(allowed_special, str):
            raise TokenizerError(f"allowed_special must be 'all' or a set of "
                                 f"special-token texts, got {allowed_special!r}")
        else:
            try:
                key = frozenset(allowed_special)
            except TypeError:
                raise TokenizerError(f"allowed_special must be 'all' or a set of "
                                     f"special-token texts, got {allowed_special!r}") \
                    from None
            unknown = key - self.special_tokens.keys()
            if unknown:
                raise TokenizerError(f"{self.source}: {sorted(unknown)!r} "
                                     f"are not special tokens of this vocabulary")
        if not key:
            return None
        special_re = self._special_res.get(key)
        if special_re is None:
            texts = self.special_tokens.keys() if key == "all" else key
            if not texts:
                return None
            texts = sorted(texts, key=lambda t: (-len(t), t))
            special_re = regex.compile("|".join(regex.escape(t) for t in texts))
            self._special_res[key] = special_re
        return special_re

    # ------------------------------------------------------------------------
    # decoding

    def decode_bytes(self, ids):
        """ids -> the bytes they stand for; TokenizerError for an id outside
        [0, n_vocab)."""
        from . import _bpe
        try:
            return _bpe.join_token_bytes(self._bytes_table, ids)
        except IndexError as e:
            raise TokenizerError(f"{self.source}: {e.args[0]}") from None
        except TypeError:
            raise TokenizerError(f"decode takes a sequence of ids, got "
                                 f"{type(ids).__name__}") from None

    def decode(self, ids):
        """ids -> text; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, id):
        """One id -> its bytes."""
        return self.decode_bytes((id,))

    def stream_decoder(self):
        """A StreamDecoder that turns ids into text as they are generated."""
        return StreamDecoder(self)

    # ------------------------------------------------------------------------
    # construction from files

    @classmethod
    def from_loaded(cls, desc):
        """From the tokenizer description of a LoadedModel:
        {"kind": "gguf", ...GGUF fields...} or {"kind": "hf", "path": folder}."""
        kind = desc.get("kind")
        if kind == "gguf":
            return cls.from_gguf(desc)
        if kind == "hf":
            return cls.from_hf_folder(desc["path"])
        raise UnsupportedError(f"tokenizer description kind {kind!r} is not supported "
                               f"(supported: 'gguf', 'hf')")

    @classmethod
    def from_gguf(cls, fields):
        """From the GGUF tokenizer.ggml.* fields with the prefix removed:
        model, pre, tokens, token_type, merges, bos_token_id, eos_token_id,
        eot_token_id, eom_token_id, add_bos_token (the shorter bos_id, eos_id,
        eot_id, eom_id, add_bos are accepted too).  An optional "path" names
        the file in errors."""
        source = fields.get("path") or fields.get("source") or "GGUF tokenizer"

        def field(*names, default=None):
            for name in names:
                if name in fields and fields[name] is not None:
                    return fields[name]
            return default

        model = field("model")
        if model != "gpt2":
            raise UnsupportedError(f"{source}: tokenizer.ggml.model {model!r} is not "
                                   f"supported (supported: 'gpt2', byte-level BPE)")
        pre = field("pre")
        if pre is None:
            # a GGUF without tokenizer.ggml.pre predates the field; GPT-2's
            # regex is what such files meant for model gpt2
            log.warning("%s: no tokenizer.ggml.pre; using the gpt2 pre-tokenizer",
                        source)
            pre = "gpt2"
        if pre not in PRE_TOKENIZER_PATTERNS:
            raise UnsupportedError(f"{source}: tokenizer.ggml.pre {pre!r} is not "
                                   f"supported (supported: "
                                   f"{', '.join(sorted(PRE_TOKENIZER_PATTERNS))})")
        tokens = field("tokens")
        if tokens is None:
            raise ModelFileError(f"{source}: tokenizer.ggml.tokens is missing")
        tokens = [as_text(t, source, "tokenizer.ggml.tokens", i)
                  for i, t in enumerate(tokens)]
        merges = []
        for rank, line in enumerate(field("merges", default=())):
            line = as_text(line, source, "tokenizer.ggml.merges", rank)
            merges.append(split_merge(line, source, f"tokenizer.ggml.merges[{rank}]"))

        def token_id(*names):
            value = field(*names)
            return None if value is None else int(value)

        return cls(
            tokens, merges, pre=pre, token_types=field("token_type"),
            bos_id=token_id("bos_token_id", "bos_id"),
            eos_id=token_id("eos_token_id", "eos_id"),
            extra_eos_ids=(token_id("eot_token_id", "eot_id"),
                           token_id("eom_token_id", "eom_id")),
            add_bos=bool(field("add_bos_token", "add_bos", default=False)),
            source=source)

    @classmethod
    def from_openai_files(cls, encoder_json, vocab_bpe):
        """From GPT-2's original encoder.json (text -> id) and vocab.bpe (merges)."""
        tokens = read_vocab_json(encoder_json)
        merges = read_merges_txt(vocab_bpe)
        token_types = [TOKEN_NORMAL] * len(tokens)
        eot = None
        if "<|endoftext|>" in tokens:
            eot = tokens.index("<|endoftext|>")
            token_types[eot] = TOKEN_CONTROL
        return cls(tokens, merges, pre="gpt2", token_types=token_types, bos_id=eot,
                   eos_id=eot, add_bos=False, source=os.fspath(encoder_json))

    @classmethod
    def from_hf_folder(cls, path):
        """From a Hugging Face folder: tokenizer.json (a byte-level BPE model),
        or vocab.json + merges.txt.  bos and eos come from tokenizer_config.json
        or special_tokens_map.json, else the ids in generation_config.json or
        config.json; a folder of vocab.json + merges.txt alone takes GPT-2's
        "<|endoftext|>" for both, as transformers' GPT2Tokenizer does."""
        path = os.fspath(path)
        config = read_json_if_present(os.path.join(path, "tokenizer_config.json"))
        special_map = read_json_if_present(os.path.join(path, "special_tokens_map.json"))
        tokenizer_json = os.path.join(path, "tokenizer.json")
        gpt2_default = None
        if os.path.exists(tokenizer_json):
            spec = parse_tokenizer_json(tokenizer_json)
        elif os.path.exists(os.path.join(path, "vocab.json")):
            tokens = read_vocab_json(os.path.join(path, "vocab.json"))
            spec = dict(tokens=tokens, merges=read_merges_txt(
                os.path.join(path, "merges.txt")), pre="gpt2",
                token_types=[TOKEN_NORMAL] * len(tokens), ignore_merges=False)
            gpt2_default = "<|endoftext|>"
        else:
            raise ModelFileError(f"{path}: no tokenizer.json nor vocab.json")
        tokens = spec["tokens"]
        lookup = {t: i for i, t in enumerate(tokens)}

        # a folder without tokenizer.json declares its specials in the config
        if gpt2_default is not None:
            declared = hf_added_token_texts(config) + [
                token_content(source.get(f"{name}_token"))
                for source in (config, special_map) for name in ("bos", "eos", "unk")]
            declared.append(gpt2_default)
            for text in declared:
                if text in lookup:
                    spec["token_types"][lookup[text]] = TOKEN_CONTROL

        def special_id(name):
            for file, source in (("tokenizer_config.json", config),
                                 ("special_tokens_map.json", special_map)):
                text = token_content(source.get(f"{name}_token"))
                if text is None:
                    continue
                if text not in lookup:
                    raise ModelFileError(f"{path}: {file} {name}_token {text!r} is "
                                         f"not in the vocabulary")
                return lookup[text]
            for file in ("generation_config.json", "config.json"):
                value = read_json_if_present(os.path.join(path, file)).get(
                    f"{name}_token_id")
                if isinstance(value, list):
                    value = value[0] if value else None
                if isinstance(value, int) and 0 <= value < len(tokens):
                    return value
            return lookup.get(gpt2_default)

        # generation_config.json may list several ids that end generation
        extra_eos = []
        for file in ("generation_config.json", "config.json"):
            value = read_json_if_present(os.path.join(path, file)).get("eos_token_id")
            extra_eos += [v for v in (value if isinstance(value, list) else [value])
                          if isinstance(v, int)]

        return cls(tokens, spec["merges"], pre=spec["pre"],
                   token_types=spec["token_types"], bos_id=special_id("bos"),
                   eos_id=special_id("eos"), extra_eos_ids=extra_eos,
                   add_bos=bool(config.get("add_bos_token", False)),
                   ignore_merges=spec["ignore_merges"], source=path)


class StreamDecoder:
    """Ids in, text out, one id at a time, for streaming generation.

    feed(id) returns the characters that id completes; bytes of a character
    still incomplete are held until a later id completes it.  flush() returns
    what is held, an incomplete character becoming U+FFFD.  Concatenating
    every feed() and the flush() gives tokenizer.decode(ids)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, id):
        return self._utf8.decode(self.tokenizer.token_bytes(id))

    def flush(self):
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# ----------------------------------------------------------------------------
# helpers: checks and file readers

def utf8_of(text):
    """text -> UTF-8 bytes; TokenizerError for a lone surrogate (no UTF-8 form)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"text has a lone surrogate U+{ord(text[e.start]):04X} "
                             f"at index {e.start}; it has no UTF-8 form") from None


def as_text(value, source, field, index):
    """A GGUF string array entry as str (the gguf package may give bytes)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFileError(f"{source}: {field}[{index}] is not UTF-8: "
                                 f"{bytes(value)!r}") from None
    raise ModelFileError(f"{source}: {field}[{index}] is {type(value).__name__}, "
                         f"not a string")


def split_merge(line, source, where):
    """"left right" -> (left, right); byte-level token texts hold no space."""
    parts = line.split(" ")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise ModelFileError(f"{source}: {where} {line!r} is not two tokens "
                             f"separated by one space")
    return parts[0], parts[1]


def read_json_if_present(path):
    """The file's JSON object, or {} if there is no such file."""
    return read_json_object(path) if os.path.lexists(path) else {}


def dense_tokens(vocab, source):
    """{text: id} -> [n_vocab] texts; every id in 0..n_vocab-1 exactly once."""
    if not isinstance(vocab, dict):
        raise ModelFileError(f"{source}: the vocabulary is {type(vocab).__name__}, "
                             f"not an object of token -> id")
    tokens = [None] * len(vocab)
    for text, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(vocab):
            raise ModelFileError(f"{source}: token {text!r} has id {i!r}, outside "
                                 f"[0, {len(vocab)})")
        if tokens[i] is not None:
            raise ModelFileError(f"{source}: tokens {tokens[i]!r} and {text!r} "
                                 f"share id {i}")
        tokens[i] = text
    return tokens


def read_vocab_json(path):
    """encoder.json / vocab.json -> [n_vocab] token texts."""
    path = os.fspath(path)
    return dense_tokens(read_json(path), path)


def read_merges_txt(path):
    """vocab.bpe / merges.txt -> [(left, right)], skipping a "#version" line."""
    path = os.fspath(path)
    lines = read_text(path).split("\n")
    merges = []
    for number, line in enumerate(lines, 1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        merges.append(split_merge(line, path, f"line {number}"))
    return merges


def token_content(value):
    """A special token as tokenizer_config.json gives it (text, or an
    AddedToken dict with "content") -> its text, or None."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def hf_added_token_texts(config):
    """Texts of the added tokens a tokenizer_config.json declares."""
    texts = []
    for entry in (config.get("added_tokens_decoder") or {}).values():
        if isinstance(entry, dict) and entry.get("content"):
            texts.append(entry["content"])
    return texts


def parse_tokenizer_json(path):
    """tokenizer.json -> tokens, merges, pre, token_types, ignore_merges.

    Takes what fastattn implements (a BPE model with byte-level pre-tokenizer
    and decoder, no normalizer) and raises UnsupportedError naming anything
    else."""
    data = read_json_object(path)
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise ModelFileError(f"{path}: model is a JSON {type(model).__name__}, not an "
                             f"object")
    if model.get("type") != "BPE":
        raise UnsupportedError(f"{path}: model.type {model.get('type')!r} is not "
                               f"supported (supported: 'BPE')")
    for key, ok in (("dropout", (None,)), ("continuing_subword_prefix", (None, "")),
                    ("end_of_word_suffix", (None, "")), ("byte_fallback", (None, False))):
        if model.get(key) not in ok:
            raise UnsupportedError(f"{path}: model.{key} {model.get(key)!r} is not "
                                   f"supported")
    if data.get("normalizer") is not None:
        raise UnsupportedError(f"{path}: normalizer {json.dumps(data['normalizer'])} "
                               f"is not supported")
    pre = hf_pre_tokenizer_name(data.get("pre_tokenizer"), path)

    tokens = dense_tokens(model.get("vocab"), f"{path} model.vocab")
    token_types = [TOKEN_NORMAL] * len(tokens)

    # added tokens: specials or user-defined, possibly past the model's vocab,
    # where together with it they must fill every id (checked before any list
    # grows to an id a hostile file names)
    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        raise ModelFileError(f"{path}: added_tokens is a JSON {type(added).__name__}, "
                             f"not a list")
    n_ids = len(tokens) + len(added)
    for entry in added:
        if not isinstance(entry, dict):
            raise ModelFileError(f"{path}: added token {entry!r} is not an object")
        i, text = entry.get("id"), entry.get("content")
        if (not isinstance(i, int) or isinstance(i, bool) or i < 0
                or not isinstance(text, str) or not text):
            raise ModelFileError(f"{path}: added token {entry!r} has no valid id "
                                 f"and content")
        if i >= n_ids:
            raise ModelFileError(f"{path}: added token {text!r} has id {i}, but the "
                                 f"vocabulary and the {len(added)} added tokens fill "
                                 f"only ids 0 .. {n_ids - 1}")
        if i >= len(tokens):
            tokens.extend([None] * (i + 1 - len(tokens)))
        if tokens[i] is not None and tokens[i] != text:
            raise ModelFileError(f"{path}: added token {text!r} takes id {i}, which "
                                 f"the vocabulary gives to {tokens[i]!r}")
        tokens[i] = text
        token_types.extend([TOKEN_NORMAL] * (len(tokens) - len(token_types)))
        token_types[i] = TOKEN_CONTROL if entry.get("special") else TOKEN_USER_DEFINED
        # Known shortcoming: lstrip / rstrip / single_word on added tokens are
        # not implemented; text around such a token may tokenize differently.
        if any(entry.get(flag) for flag in ("lstrip", "rstrip", "single_word")):
            log.warning("%s: added token %r has lstrip/rstrip/single_word, which "
                        "fastattn ignores", path, text)
    if None in tokens:
        raise ModelFileError(f"{path}: no token has id {tokens.index(None)}")

    merges = []
    listed = model.get("merges") or []
    if not isinstance(listed, list):
        raise ModelFileError(f"{path}: model.merges is a JSON {type(listed).__name__}, "
                             f"not a list")
    for rank, entry in enumerate(listed):
        if isinstance(entry, str):
            merges.append(split_merge(entry, path, f"model.merges[{rank}]"))
        elif isinstance(entry, list) and len(entry) == 2 and all(
                isinstance(t, str) for t in entry):
            merges.append((entry[0], entry[1]))
        else:
            raise ModelFileError(f"{path}: model.merges[{rank}] {entry!r} is not "
                                 f"a pair of tokens")
    return dict(tokens=tokens, merges=merges, pre=pre, token_types=token_types,
                ignore_merges=bool(model.get("ignore_merges", False)))


def hf_pre_tokenizer_name(pre, path):
    """An HF pre_tokenizer object -> "gpt2" or "smollm"; UnsupportedError else.

    gpt2:   ByteLevel(add_prefix_space=false, use_regex=true)
    smollm: Sequence[Digits(individual_digits=true), ByteLevel(as above)]"""
    def is_byte_level(p):
        return (isinstance(p, dict) and p.get("type") == "ByteLevel"
                and not p.get("add_prefix_space", False) and p.get("use_regex", True))

    if is_byte_level(pre):
        return "gpt2"
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (isinstance(steps, list) and len(steps) == 2 and isinstance(steps[0], dict)
                and steps[0].get("type") == "Digits"
                and steps[0].get("individual_digits") and is_byte_level(steps[1])):
            return "smollm"
    raise UnsupportedError(f"{path}: pre_tokenizer {json.dumps(pre)} is not supported "
                           f"(supported: ByteLevel, or Digits(individual) + ByteLevel)")
