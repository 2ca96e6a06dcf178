"""glibc's allocator set to keep freed memory for reuse instead of returning it at once.

PyTorch on a CPU allocates every intermediate tensor with ``malloc`` and frees it when the
op is done. glibc gives the top of its heap back to the kernel whenever more than its trim
threshold is free there (by default twice its mmap threshold, which itself rises from 128
KiB to at most 32 MiB as large blocks are freed). A forward pass frees more than that at
its end, so the next one page-faults all its activations in again, 4 KiB at a time: on
issue 20's 2-core Xeon the embedded model's forward pass spent 30% of its CPU time in the
kernel for this, and ran 1.31x faster without it (``benchmarks/README.md``). PyTorch's CPU
tuning guide suggests swapping in jemalloc or tcmalloc for this reason; ``mallopt`` gets
the effect from glibc itself:

- ``M_TRIM_THRESHOLD`` = 1 GiB: up to that much freed memory at the heap's top is kept;
- ``M_MMAP_THRESHOLD`` = 32 MiB: blocks below it come from the heap (the most glibc's own
  rule would reach; setting one threshold stops glibc moving the other, so both are set).

Blocks above 32 MiB keep glibc's behaviour (mapped, then unmapped on free): in the heap,
blocks of hundreds of MiB allocated and freed in turn leave holes that the next, slightly
larger aligned request does not fit, and the heap grew by several blocks in a test.
The price is that up to 1 GiB of freed memory stays in the process (its RSS does not fall
after a big step) to be reused by the next one; peak memory is unchanged.

**On by default; ``SAELIB_MALLOC=system`` keeps glibc's own behaviour.** ``import saelib``
applies it once (``keep_freed_blocks``), except where the user set glibc's own ``MALLOC_*``
variables or ``GLIBC_TUNABLES``, and on other C libraries. It was opt-in for a while
(127eb3b): with it on, one fresh-clone CI run under TransformerLens 4 gave the embedded
model's logits 0.0116 away from transformers'. The cause was not the allocator but MKL's
vector-math kernels chosen by two threads at once (``saelib.vml``), which happens without
this setting too; the setting only changed the timing that decides the race.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import warnings

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 1 << 30  # mallopt takes a C int: 2 GiB would not fit
CHOICES = ("keep", "system")
"""Values of ``SAELIB_MALLOC``."""
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
"""Environment variables through which a user tunes glibc's allocator: saelib leaves it alone then."""

_applied: bool | None = None


def keep_freed_blocks() -> bool:
    """Set glibc's mmap and trim thresholds (module docstring) once per process; returns
    whether they are set. Does nothing under ``SAELIB_MALLOC=system``, on other C libraries,
    or when the user set one of ``USER_SETTINGS``."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    choice = os.environ.get("SAELIB_MALLOC", "keep").strip().lower() or "keep"
    if choice not in CHOICES:  # at import time: a warning, and glibc left as it is, not a traceback
        warnings.warn(f"SAELIB_MALLOC={os.environ['SAELIB_MALLOC']!r} is not one of {', '.join(CHOICES)}; leaving "
                      "glibc's allocator as it is. Set 'keep' (the default: freed memory kept for reuse) or 'system'.",
                      stacklevel=2)
        return False
    if choice == "system" or any(name in os.environ for name in USER_SETTINGS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl has no mallopt thresholds
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    return _applied
