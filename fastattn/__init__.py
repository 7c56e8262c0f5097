"""fastattn: fast, exact transformer inference on the CPU.

    >>> import fastattn
    >>> model = fastattn.load()                      # the default SmolLM2-135M
    >>> model.generate("The capital of France is", max_new_tokens=8, temperature=0)
"""
import os

# The compiled core opens one OpenMP region per forward call.  Between calls
# (while Python samples the next token) libgomp's idle threads spin by
# default, which on a machine with other work steals the core the next call
# needs: a 2-thread decode on a busy 2-core machine ran at 58 tok/s with the
# default policy and 75 tok/s with passive.  Set before the core is loaded,
# and only if the user has not chosen.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import ModelConfig  # noqa: E402
from .errors import (ContextOverflowError, DownloadError, FastAttnError, ModelFileError,
                     TokenizerError, UnsupportedError)

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "FastAttnError", "ModelFileError", "UnsupportedError",
    "ContextOverflowError", "TokenizerError", "DownloadError", "load", "__version__",
]


def load(model=None, n_threads=None, **kwargs):
    """Load a model by path (GGUF file or Hugging Face folder); None means the
    default model, fetched on first use.  See fastattn.generation.Model."""
    from .generation import Model
    return Model.load(model, n_threads=n_threads, **kwargs)
