"""The C allocator's settings for ckptscope's own processes (the ``ckptscope`` program).

A forward pass allocates and frees activations of the same sizes at every alpha. With glibc's
default malloc, blocks above a moving threshold are ``mmap``-ed and given back on free, and the
heap top is trimmed when enough of it is free, so the same activations are faulted in again and
again, more or less often depending on what the process freed before. Keeping freed memory in
the heap made CPU evaluation steadier and faster here (benchmarks in ``docs/performance.md``:
the spiral MLP's 51-alpha path 37 ms against 37-57 ms; a ResNet-18 path about 8% faster).

The ``ckptscope`` program applies :func:`keep_freed_memory` at start; a library user's process
is left as it is (call it, or set the ``MALLOC_*`` variables, to get the same).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD = 32 << 20  # blocks below this come from the heap (glibc's largest setting)
TRIM_THRESHOLD = 256 << 20  # the heap top goes back to the system beyond this much free
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
OPT_OUT = "CKPTSCOPE_MALLOC"  # =default leaves the allocator alone


def user_settings() -> list[str]:
    """The allocator settings the environment makes (``NAME=value``): ours give way to them."""
    found = [f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")]
    if os.environ.get(OPT_OUT, "") == "default":
        found.append(f"{OPT_OUT}=default")
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        found.append(f"GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}")
    return found


def keep_freed_memory() -> bool:
    """Set glibc's mmap threshold to 32 MiB and its trim threshold to 256 MiB.

    Does nothing, and returns False, when the environment sets the allocator
    (:func:`user_settings`: ``CKPTSCOPE_MALLOC=default``, any ``MALLOC_*`` variable or a
    ``glibc.malloc.*`` tunable — the user's choice wins), or when the C library has no
    ``mallopt`` (not glibc). Returns True when both settings were applied.
    """
    if user_settings():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
