"""The exceptions fastattn raises.  Every one derives from FastAttnError.

Messages name the file, the field and the value at fault, so that a user who
downloaded a broken model can tell what is wrong without a debugger.
"""


class FastAttnError(Exception):
    """Base class of every error fastattn raises on purpose."""


class ArgumentError(FastAttnError, ValueError):
    """An argument has a value or type the call cannot take (n_threads,
    kv_cache, activations, a rewind position)."""


class ModelFileError(FastAttnError, ValueError):
    """A model file is missing, truncated, malformed or inconsistent."""


class UnsupportedError(FastAttnError, NotImplementedError):
    """A well-formed file uses something fastattn does not implement
    (an architecture, a tensor type, a tokenizer kind)."""


class ContextOverflowError(FastAttnError, ValueError):
    """Tokens would run past the model's context length (n_ctx)."""


class TokenizerError(FastAttnError, ValueError):
    """Text or ids the tokenizer cannot take: invalid UTF-8, a special token
    in user text that the caller did not allow, an id outside the vocabulary."""


class DownloadError(FastAttnError, RuntimeError):
    """The default model could not be fetched or failed its checksum."""


class OutOfMemoryError(FastAttnError, MemoryError):
    """An allocation failed (a KV cache for a long context, say); the message
    says how many bytes were asked for."""
