"""Only randkit's compiled kernels live here; everything else is in pyproject.toml.

All three extensions are optional. Without a C compiler the Gaussian noise comes from the same
generator written in torch operations (same bits, about 35x slower), and the vectorized
runner keeps oneDNN's grouped convolution for a CNN's first layer and torch.bmm for its dense
layers (same values up to float rounding, slower).
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
        Extension(
            "randkit._native._patchpool",
            sources=["src/randkit/_native/patchpool.c"],
            # gnu11 (not c11) lets gcc contract multiply-adds into FMA instructions.
            extra_compile_args=["-O3", "-fno-math-errno", "-std=gnu11", *OPENMP],
            extra_link_args=OPENMP,
            optional=True,
        ),
        Extension(
            "randkit._native._densemm",
            sources=["src/randkit/_native/densemm.c"],
            libraries=["m"],
            extra_compile_args=["-O3", "-fno-math-errno", "-std=gnu11", *OPENMP],
            extra_link_args=OPENMP,
            optional=True,
        ),
    ]
)
