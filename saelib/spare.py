"""Big CPU tensors kept from one training step for the next, instead of freed and allocated again.

glibc serves blocks of 32 MiB and more (``saelib.allocator``: the most its mmap threshold
may be) straight from the kernel, and every page of such a block is faulted in when first
written, on every allocation. At d_in 512 x d_sae 16384 each weight gradient is exactly such
a block: on issue 20's 2-core Xeon, writing one into fresh memory took 18 ms against 9 ms
into memory used before, and ``torch.sparse.mm`` also zero-fills and copies its output.

So a trainer hands its gradients back here instead of dropping them (``recycle_grads_``,
in place of ``zero_grad(set_to_none=True)``), and the sparse backward passes write the next
gradients into them (``empty``). A tensor is kept only when nothing else can see it: no
other Python reference, and no other tensor, array or storage object on its memory. Contents
are garbage: whoever takes one writes every element. At most ``PER_SHAPE`` per shape,
layout, dtype and device, CPU only (a GPU's caching allocator does this already); ``drop()``
frees them (the trainer does at the end of a run).
"""

from __future__ import annotations

import sys
import threading

import torch

PER_SHAPE = 2
"""Tensors kept per (shape, layout, dtype, device): a step takes two of a kind at most."""

_kept: dict[tuple, list[torch.Tensor]] = {}
_lock = threading.Lock()


def _key(shape, stride, dtype: torch.dtype, device: torch.device) -> tuple:
    return tuple(shape), tuple(stride), dtype, torch.device(device)


def _contiguous_stride(shape) -> tuple:
    stride, step = [], 1
    for size in reversed(tuple(shape)):
        stride.append(step)
        step *= max(size, 1)
    return tuple(reversed(stride))


def empty(shape, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
          stride=None) -> torch.Tensor:
    """A tensor of ``shape`` laid out by ``stride`` (contiguous if None; any layout that
    fills its memory, such as a transposed matrix) with garbage contents: one kept here,
    else ``torch.empty_strided``."""
    stride = _contiguous_stride(shape) if stride is None else tuple(stride)
    with _lock:
        kept = _kept.get(_key(shape, stride, dtype, device))
        if kept:
            return kept.pop()
    return torch.empty_strided(tuple(shape), stride, dtype=dtype, device=device)


def _only_reference(tensor: torch.Tensor, python_refs: int) -> bool:
    """Whether ``tensor`` is held by ``python_refs`` Python references (the caller's) and
    nothing else: no view, detached alias, NumPy array or storage object on its memory.
    The memory's owners are counted without making a Python storage object for it: once one
    exists it holds the memory for good, and autograd then no longer sums a second gradient
    into it in place (it allocates a fresh one)."""
    address = getattr(torch._C, "_storage_address", None)
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return (address is not None and use_count is not None and sys.getrefcount(tensor) <= python_refs
            and use_count(address(tensor)) == 1)


def keep(tensor: torch.Tensor | None) -> bool:
    """Keep ``tensor`` for a later ``empty`` of its shape and layout, if it is a strided CPU
    tensor without broadcast dimensions, nothing else refers to it or its memory, and fewer
    than ``PER_SHAPE`` of its kind are kept; returns whether it was kept. The caller must drop
    its own reference after."""
    # getrefcount: the caller's variable, this frame's argument, getrefcount's argument
    if (tensor is None or tensor.device.type != "cpu" or tensor.requires_grad or tensor.layout != torch.strided
            or 0 in tensor.stride() or not _only_reference(tensor, 4)):
        return False
    with _lock:
        kept = _kept.setdefault(_key(tensor.shape, tensor.stride(), tensor.dtype, tensor.device), [])
        if len(kept) >= PER_SHAPE or any(t is tensor for t in kept):
            return False
        kept.append(tensor)
    return True


def recycle_grads_(params) -> None:
    """``zero_grad(set_to_none=True)`` for ``params``, keeping each gradient (``keep``) for
    the next backward pass to write into."""
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        param.grad = None
        keep(grad)
        del grad


def drop() -> None:
    """Free every kept tensor (the end of a training run)."""
    with _lock:
        _kept.clear()
