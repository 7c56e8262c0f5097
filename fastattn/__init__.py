"""fastattn: fast, exact transformer inference on the CPU.

    >>> import fastattn
    >>> model = fastattn.load()                      # the default SmolLM2-135M
    >>> model.generate("The capital of France is", max_new_tokens=8, temperature=0)
"""
import os


def _load_core_with_passive_openmp():
    """Load the compiled core with libgomp's OMP_WAIT_POLICY=PASSIVE, unless
    the user chose a policy.

    The core opens one OpenMP region per forward call.  Between calls (while
    Python samples the next token) libgomp's idle threads spin by default,
    which on a machine with other work steals the core the next call needs: a
    2-thread decode on a busy 2-core machine ran at 58 tok/s with the default
    policy and 75 with passive.  libgomp reads the variable once, when it is
    loaded, so it is set only around that load and then removed: child
    processes (another OpenMP program, say llama.cpp, which needs spinning
    threads) still see the environment as the user left it."""
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        from . import _engine, _kernels  # noqa: F401
    except ImportError:  # a source tree without the build: loaded (or not) later
        pass
    finally:
        del os.environ["OMP_WAIT_POLICY"]


_load_core_with_passive_openmp()

from .config import ModelConfig  # noqa: E402
from .errors import (ArgumentError, ContextOverflowError, DownloadError, FastAttnError,
                     ModelFileError, TokenizerError, UnsupportedError)

__version__ = "0.1.0"

__all__ = [
    "ModelConfig", "FastAttnError", "ModelFileError", "UnsupportedError",
    "ContextOverflowError", "TokenizerError", "DownloadError", "ArgumentError", "load",
    "__version__",
]


def load(model=None, n_threads=None, **kwargs):
    """Load a model by path (GGUF file or Hugging Face folder); None means the
    default model, fetched on first use.  See fastattn.generation.Model."""
    from .generation import Model
    return Model.load(model, n_threads=n_threads, **kwargs)
