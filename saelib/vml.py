"""MKL's vector math functions resolved on one thread, before PyTorch calls them from several.

PyTorch's CPU kernels for contiguous float32 and float64 ``cos``, ``sin``, ``exp``, ``sqrt``,
``log`` and a dozen more hand each intra-op thread's chunk to Intel MKL's vector math
library (VML), asking for its high-accuracy kernels. MKL chooses a function's kernel lazily,
at the first call in the process; when that first call comes from two threads at once, one
thread can run a low-accuracy kernel over its whole chunk (pytorch/pytorch#188792; oneMKL
2024.2, as linked into the torch 2.13 CPU wheel). Nothing fails: the numbers are just wrong
by thousands of ulp in one half of the tensor, in some processes and not others.

Measured on issue 20's 2-core Xeon: in fresh processes whose first such op was an 8192-element
float32 call, 5 to 17 of 40 (four runs of 40) got one thread's half wrong by a relative 1e-5 to 3e-4. The
embedded model under TransformerLens 4 builds its rotary ``cos`` table (256 positions x 16
frequencies) as its first such op; in about one process in ten, positions 128-255 were off
by up to 1.5e-4, which moved its logits by 0.0116 against transformers' (``test_hf_export``).

``resolve_dispatch()`` (called by ``import saelib``) calls each of those functions once, in
float32 and float64, on a tensor too small for PyTorch to split over threads, so MKL makes
its choice on one thread before any parallel call. It costs well under a millisecond.
"""

from __future__ import annotations

import torch

VML_OPS = ("acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp", "log", "log10", "log2",
           "sin", "sqrt", "tan", "tanh", "trunc")
"""The torch functions whose float kernels call MKL VML (the ``vms*``/``vmd*`` functions that
``libtorch_cpu`` links: Acos, Asin, Atan, Cos, Erf, Erfc, ErfInv, Exp, Ln, Log10, Log2, Sin,
Sqrt, Tan, Tanh, Trunc)."""

_resolved = False


def resolve_dispatch() -> bool:
    """Call every ``VML_OPS`` function once per float dtype on 16 elements (one thread: far
    below PyTorch's 2048-element grain), once per process; returns whether it did so (False
    on builds without MKL, whose kernels choose nothing lazily)."""
    global _resolved
    if _resolved or not torch.backends.mkl.is_available():
        return _resolved
    with torch.inference_mode():
        for dtype in (torch.float32, torch.float64):
            half = torch.full((16,), 0.5, dtype=dtype)  # inside every function's domain
            for name in VML_OPS:
                getattr(torch, name)(half)
    _resolved = True
    return True
