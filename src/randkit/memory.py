"""Process-wide memory setting for tensor-heavy CPU work."""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters of glibc's malloc.h


def keep_freed_memory() -> None:
    """Tell glibc's malloc to keep freed memory instead of returning it to the kernel.

    By default glibc hands large freed blocks back to the kernel, so the next tensor of the
    same size pages its memory in again: page faults on every server forward and every
    augmentation batch (figures in docs/benchmarks.md). The process then keeps its peak
    memory, as PyTorch's CUDA caching allocator does on the GPU. The ``randkit`` commands
    call it at start; call it yourself when you use the library from your own script.
    No-op where glibc is not the C library.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)  # the largest C int: about 2 GB
    except (OSError, AttributeError, ctypes.ArgumentError):
        pass
