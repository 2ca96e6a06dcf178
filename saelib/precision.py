"""Which precision the TopK encoder's selection matmul runs in.

A TopK training step's one dense product, ``(x - b_dec) @ W_enc`` over every latent, only
*chooses* the k latents of each row; their values and every gradient are then computed in
fp32 from the chosen entries alone. That choice can run in bfloat16 where the hardware has
fast bf16 matmuls (GPUs from Ampere on, CPUs with AMX), at the cost of latents within bf16
rounding of a row's cut-off trading places.

``auto`` decides from the hardware and the SAE's shape alone, never from a timing, so the
same command trains the same SAE on every run on one machine and a resumed run takes the
same path as the run it resumes. (Deciding by timing, as saelib did before, flipped
between two runs of one command on a 2-core Xeon with AMX at small shapes, where one noisy
measurement can read 5x for a product that is 0.9x.) The rule follows measurements on that
Xeon (``bf16_speedup``, printed by benchmarks/bench_train.py): bf16 selection was 0.2-0.9x
fp32's speed below 64 x 256 (d_in x d_sae), 1.3-1.9x at 64 x 256-512, 2.5-6x from 64 x 1024
to 256 x 4096 and 8.5x at 512 x 16384. Where bf16 has no hardware path it is emulated and
far slower (a [4096, 256] x [256, 4096] product took 28.6 s in bf16 against 0.08 s in fp32
on a 2-core AVX2 EPYC), so ``auto`` keeps fp32 there. CPUs with AVX512-BF16 but no AMX
were not measured, and keep fp32.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

ENCODER_DTYPES = ("float32", "bfloat16", "auto")
BF16_MIN_D_IN, BF16_MIN_D_SAE = 64, 256
"""``auto`` picks bf16 only for SAEs at least this wide (d_in, d_sae) on fast-bf16 hardware."""


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: not Linux,
    so no bf16 guesses)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_has_bf16_matmul() -> bool:
    """True when the CPU advertises bf16 matrix instructions (AMX or AVX512-BF16)."""
    return bool(cpu_flags() & {"amx_bf16", "avx512_bf16"})


@functools.lru_cache(maxsize=None)
def bf16_speedup(device: str, d_in: int, d_sae: int, rows: int = 512) -> float:
    """fp32 time / bf16 time of one [rows, d_in] x [d_in, d_sae] product on ``device``,
    best of 3 (0.0 where bf16 has no hardware path, without trying it). For benchmarks:
    ``auto`` does not time anything."""
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


def has_fast_bf16_matmul(device: str | torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls in hardware well ahead of fp32: a CPU with AMX
    (``amx_bf16``), a CUDA GPU of compute capability 8.0 or above (Ampere on)."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return "amx_bf16" in cpu_flags()
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported() and torch.cuda.get_device_capability(dev) >= (8, 0)
    return False


def resolve_encoder_dtype(name: str, device: str | torch.device, d_in: int, d_sae: int) -> torch.dtype:
    """``TrainConfig.encoder_dtype`` as a torch dtype for this device and shape: ``auto`` is
    bf16 on fast-bf16 hardware for SAEs of at least ``BF16_MIN_D_IN`` x ``BF16_MIN_D_SAE``,
    else fp32 (a fixed rule: see the module docstring)."""
    if name not in ENCODER_DTYPES:
        raise ValueError(f"encoder_dtype {name!r}: choose one of {', '.join(ENCODER_DTYPES)}")
    if name == "auto":
        wide = d_in >= BF16_MIN_D_IN and d_sae >= BF16_MIN_D_SAE
        return torch.bfloat16 if wide and has_fast_bf16_matmul(device) else torch.float32
    return getattr(torch, name)
