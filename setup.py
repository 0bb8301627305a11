"""Only randkit's compiled kernel lives here; everything else is in pyproject.toml.

The extension is optional. Without a C compiler the Gaussian noise comes from the same
generator written in torch operations (same bits, much slower; docs/benchmarks.md).
"""

import sys

from setuptools import Extension, setup

# Torch's CPU ops run on libgomp; the kernel joins the same thread pool (see philox.c).
OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") else []

setup(
    ext_modules=[
        Extension(
            "randkit._native._philox",
            sources=["src/randkit/_native/philox.c"],
            # No FMA contraction and no fast-math: every build gives the same bits.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c11", *OPENMP],
            extra_link_args=OPENMP,
            optional=True,
        ),
    ]
)
