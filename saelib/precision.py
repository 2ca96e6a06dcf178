"""Which precision the TopK encoder's selection matmul runs in.

A TopK training step's one dense product, ``(x - b_dec) @ W_enc`` over every latent, only
*chooses* the k latents of each row; their values and every gradient are then computed in
fp32 from the chosen entries alone. That choice can run in bfloat16 where the hardware has
fast bf16 matmuls (GPUs from Ampere on, CPUs with AMX or AVX512-BF16), at the cost of
latents within bf16 rounding of a row's cut-off trading places.

Where bf16 has no hardware path it is emulated and far slower: on a 2-core AVX2 EPYC a
[4096, 256] x [256, 4096] product took 28.6 s in bf16 against 0.08 s in fp32. So ``auto``
never tries bf16 on such a CPU, and elsewhere keeps it only when a measurement at the
SAE's own shape finds it faster.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

ENCODER_DTYPES = ("float32", "bfloat16", "auto")
BF16_SPEEDUP = 1.25
"""``auto`` picks bf16 only when its selection matmul is at least this much faster."""


def cpu_has_bf16_matmul() -> bool:
    """True when the CPU advertises bf16 matrix instructions (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to know, so no bf16 guesses
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


@functools.lru_cache(maxsize=None)
def bf16_speedup(device: str, d_in: int, d_sae: int, rows: int = 512) -> float:
    """fp32 time / bf16 time of one [rows, d_in] x [d_in, d_sae] product on ``device``,
    best of 3 (0.0 where bf16 has no hardware path, without trying it)."""
    dev = torch.device(device)
    if dev.type == "cpu" and not cpu_has_bf16_matmul():
        return 0.0
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        return 0.0

    def timed(a, w) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        started = time.perf_counter()
        a @ w
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - started

    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(rows, d_in, device=dev, dtype=dtype)
        w = torch.randn(d_in, d_sae, device=dev, dtype=dtype)
        timed(a, w)  # warm-up
        seconds[dtype] = min(timed(a, w) for _ in range(3))
    return seconds[torch.float32] / max(seconds[torch.bfloat16], 1e-12)


def resolve_encoder_dtype(name: str, device: str | torch.device, d_in: int, d_sae: int) -> torch.dtype:
    """``TrainConfig.encoder_dtype`` as a torch dtype for this device and shape."""
    if name not in ENCODER_DTYPES:
        raise ValueError(f"encoder_dtype {name!r}: choose one of {', '.join(ENCODER_DTYPES)}")
    if name == "auto":
        fast = bf16_speedup(str(torch.device(device)), d_in, d_sae) >= BF16_SPEEDUP
        return torch.bfloat16 if fast else torch.float32
    return getattr(torch, name)
