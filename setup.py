"""Build the compiled core: C kernels in csrc/ and the Cython modules over them.

Flags are portable on purpose: no -march=native.  SIMD paths are compiled per
target with function attributes in csrc/ and chosen at run time from CPUID.
Set FASTATTN_SANITIZE=1 to build with AddressSanitizer and UBSan.
"""
import glob
import os
import sys

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup

c_sources = sorted(glob.glob("csrc/*.c"))
c_headers = sorted(glob.glob("csrc/*.h"))
compile_args = ["-O3", "-std=gnu11", "-fopenmp", "-fno-strict-aliasing", "-Wall",
                "-Wno-unused-function", "-Wno-unknown-pragmas"]
link_args = ["-fopenmp"]
if os.environ.get("FASTATTN_SANITIZE"):
    san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1", "-g"]
    compile_args += san
    link_args += san
if sys.platform == "darwin":
    compile_args.remove("-fopenmp")
    link_args.remove("-fopenmp")


def extension(name, pyx, with_c=True):
    return Extension(
        name,
        sources=[pyx] + (c_sources if with_c else []),
        depends=c_headers if with_c else [],  # a header edit rebuilds the module
        include_dirs=["csrc", np.get_include()],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


extensions = [
    extension("fastattn._kernels", "fastattn/_kernels.pyx"),
    extension("fastattn._engine", "fastattn/_engine.pyx"),
    extension("fastattn._bpe", "fastattn/_bpe.pyx", with_c=False),
]
# For development: FASTATTN_EXTENSIONS=_bpe,_engine builds only those modules.
only = os.environ.get("FASTATTN_EXTENSIONS")
if only:
    wanted = {"fastattn." + name.strip() for name in only.split(",")}
    extensions = [ext for ext in extensions if ext.name in wanted]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
