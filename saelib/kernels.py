"""Sparse or dense kernels for a TopK training step, chosen per device.

Only k of d_sae latents fire per row, so saelib's TopK step decodes and back-propagates
through the chosen entries alone (``saelib.sparse_ops``): 2·B·D·F for the encoder's
selection matmul plus about 8·B·k·D, against 6·B·D·F for plain dense autograd. On a CPU
the sparse step is several times faster (2-core EPYC, batch 4096: 3.4x at 256/4096/32,
3.8x at 512/16384/64; ``benchmarks/bench_train.py``), so ``auto`` always takes it there.
On a GPU dense matmuls run near peak while scatters and sparse products do not, so
``auto`` times one forward and backward pass each way at the SAE's shape, once per
process, and keeps the faster.
"""

from __future__ import annotations

import functools
import time

import torch

KERNELS = ("sparse", "dense", "auto")


def _timed_steps(sae, x_BD: torch.Tensor, repeats: int = 3) -> float:
    """Best of ``repeats`` seconds for one training forward + backward of ``sae`` on ``x_BD``."""
    device = x_BD.device
    best = float("inf")
    for attempt in range(repeats + 1):  # the first is a warm-up
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        out = sae.train_forward(x_BD)
        (x_BD - out.recon_BD).pow(2).sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if attempt:
            best = min(best, time.perf_counter() - started)
        sae.zero_grad(set_to_none=True)
    return best


@functools.lru_cache(maxsize=None)
def dense_over_sparse_time(device: str, d_in: int, d_sae: int, k: int, rows: int = 4096) -> float:
    """Seconds of a dense TopK step over a sparse one at this shape on ``device`` (below 1:
    dense is faster), measured on random weights and inputs."""
    from .sae import SAEConfig, make_sae

    sae = make_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k)).to(device)
    x_BD = torch.randn(rows, d_in, device=device)
    seconds = {}
    for dense in (False, True):
        sae.dense_kernels = dense
        seconds[dense] = _timed_steps(sae, x_BD)
    return seconds[True] / max(seconds[False], 1e-12)


def resolve_kernels(choice: str, device: str | torch.device, d_in: int, d_sae: int, k: int, rows: int = 4096) -> str:
    """``TrainConfig.kernels`` as ``"sparse"`` or ``"dense"`` for this device and shape."""
    if choice not in KERNELS:
        raise ValueError(f"kernels {choice!r}: choose one of {', '.join(KERNELS)}")
    if choice != "auto":
        return choice
    dev = torch.device(device)
    if dev.type == "cpu":
        return "sparse"
    return "dense" if dense_over_sparse_time(str(dev), d_in, d_sae, k, rows) < 1 else "sparse"
