"""Shared fixtures.

Tests that need the real SmolLM2-135M-Instruct file are marked `model`.  They
find it at $FASTATTN_TEST_MODEL, else in fastattn's cache (put there by
`fastattn download`), and skip with the reason when it is in neither place.
"""
import os

import pytest

import fastattn

# Tests start child Pythons (`python -m fastattn ...`, `python -c ...`).  Those
# put the current folder first on sys.path, and when pytest runs from the
# checkout that folder holds the uncompiled sources: PYTHONSAFEPATH (3.11+)
# keeps the children on the fastattn being tested, the installed one.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.dirname(os.path.dirname(os.path.abspath(fastattn.__file__))) != _CHECKOUT:
    os.environ["PYTHONSAFEPATH"] = "1"


def find_test_model():
    path = os.environ.get("FASTATTN_TEST_MODEL")
    if path:
        return path if os.path.exists(path) else None
    try:
        from fastattn.download import default_model_path
        return str(default_model_path(download=False))
    except Exception:
        return None


@pytest.fixture(scope="session")
def smollm2_path():
    path = find_test_model()
    if path is None:
        pytest.skip("SmolLM2 GGUF not found: run `fastattn download` or set FASTATTN_TEST_MODEL")
    return path


try:
    from fastattn import _kernels as _K
    SIMD_LEVELS = _K.available_simd_levels()
except ImportError:  # no compiled core: test_import.py says so
    _K, SIMD_LEVELS = None, []


@pytest.fixture(params=SIMD_LEVELS)
def level(request):
    """Run the test at each SIMD level this CPU has, then restore the level in use."""
    before = _K.simd_level()
    got = _K.set_simd_level(request.param)
    assert _K.simd_name(got) == request.param
    from fastattn import _engine  # the model's copy of the level moves with it
    assert _engine._simd_level() == got
    yield request.param
    _K.set_simd_level(before)
