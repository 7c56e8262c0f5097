"""fastattn: fast, exact transformer inference on the CPU.

    >>> import fastattn
    >>> model = fastattn.load()                      # the default SmolLM2-135M
    >>> model.generate("The capital of France is", max_new_tokens=8, temperature=0)
"""
from .config import ModelConfig
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
