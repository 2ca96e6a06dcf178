"""Several processes training one SAE: the collectives the trainer needs, and nothing more.

Under ``torchrun --nproc-per-node N python -m saelib train ...`` (or any program that has
called ``torch.distributed.init_process_group``) every rank works out the same global
batch of ``batch_size`` store rows (from row numbers alone), reads only its own contiguous
slice of ``batch_size / N`` of them and trains on it. Every normaliser of the loss (the
inputs' variance, their mean norm, the AuxK error's variance) is computed over the
*global* batch, each rank's loss is
its share of the global loss, and gradients are summed across ranks: a step is the step
one process would take on the whole batch, up to float summation order. Dead-latent
counters, BatchTopK's batch-wide cut-off and the logged metrics are reduced likewise.

``Group.single()`` stands for one process and communicates nothing, so the trainer has
one code path. Collectives that fail (a rank died, a timeout passed) raise
``DistributedError`` with one line saying which rank saw it and what to do.
"""

from __future__ import annotations

import datetime
import json
import os

import torch
import torch.distributed as dist

from .metrics import variance_per_vector
from .sparse_ops import held_transposed

TIMEOUT_ENV = "SAELIB_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0
"""Seconds a collective (or the start-up rendezvous) waits for the other ranks."""

joined = False
"""Whether this process joined a distributed job (``init_from_env``)."""


class DistributedError(RuntimeError):
    """The ranks of a distributed run could not work together (a rank stopped, timed out,
    or was started with other settings)."""


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: must be a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: must be a positive number of seconds")
    return value


def launched_world_size() -> int:
    """Processes a launcher (torchrun) started for this job: ``WORLD_SIZE``, 1 without one."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"WORLD_SIZE={raw!r} is not a number: start the job with torchrun") from None


def local_device(device: str) -> str:
    """``cuda`` becomes this rank's own GPU (``cuda:$LOCAL_RANK``) under a launcher."""
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def init_from_env(device: str = "cpu") -> "Group":
    """Join the job torchrun launched (gloo on CPU, NCCL on CUDA) and return its group;
    ``Group.single()`` when this process was started alone."""
    if dist.is_available() and dist.is_initialized():
        return Group.current()
    world = launched_world_size()
    if world <= 1:
        return Group.single()
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed: train with one process")
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(torch.device(local_device(device)))
    seconds = timeout_s()
    rank = os.environ.get("RANK", "?")
    global joined
    joined = True  # even if the rendezvous fails: torch.distributed state may exist
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    except Exception as err:
        raise DistributedError(
            f"rank {rank} of {world}: the ranks did not all join within {seconds:g} s ({_first_line(err)}); start every "
            f"rank with the same MASTER_ADDR/MASTER_PORT, or raise {TIMEOUT_ENV}") from None
    return Group.current()


def _leaves(tree, prefix: str = "") -> dict:
    """{"a.b": value} for every non-dict value of a nested dict."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200]}" if text else type(err).__name__


class Group:
    """The ranks of one training run; ``rank``/``world`` 0/1 for a single process."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @classmethod
    def single(cls) -> "Group":
        return cls(0, 1)

    @classmethod
    def current(cls) -> "Group":
        """The default process group when ``torch.distributed`` is initialised, else one process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls.single()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics and the trained SAE."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, world={self.world})"

    # -- the one place collectives are called, so a failure always reads the same --------------
    def _collective(self, what: str, call):
        try:
            return call()
        except Exception as err:
            raise DistributedError(
                f"rank {self.rank} of {self.world}: {what} failed ({_first_line(err)}): another rank stopped or did not "
                f"answer within {timeout_s():g} s; see its error, then rerun the same command to resume from the "
                "last checkpoint") from None

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.world > 1:
            self._collective("summing across ranks", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self._collective("a maximum across ranks", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MAX))
        return tensor

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            self._collective("a minimum across ranks", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MIN))
        return tensor

    def gather_cat(self, values_N: torch.Tensor) -> torch.Tensor:
        """Every rank's ``values_N`` (same length on each), concatenated in rank order: [world * N]."""
        if self.world == 1:
            return values_N
        out = values_N.new_empty(self.world * len(values_N))
        self._collective("gathering across ranks", lambda: dist.all_gather_into_tensor(out, values_N.contiguous()))
        return out

    def barrier(self) -> None:
        if self.world > 1:
            self._collective("waiting for the other ranks", dist.barrier)

    def broadcast_object(self, value):
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if self.world == 1:
            return value
        box = [value]
        self._collective("receiving rank 0's decision", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def gather_objects(self, value) -> list:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if self.world == 1:
            return [value]
        every: list = [None] * self.world
        self._collective("exchanging with the other ranks", lambda: dist.all_gather_object(every, value))
        return every

    def require_same(self, what: str, description: dict) -> None:
        """Raise on every rank unless ``description`` (JSON-able) is equal on all of them.
        ``what`` names it in the error, e.g. "training settings"."""
        if self.world == 1:
            return
        mine = json.dumps(description, sort_keys=True, default=str)
        every = self.gather_objects(mine)
        if all(other == mine for other in every):
            return
        reference = _leaves(json.loads(every[0]))
        for rank, text in enumerate(every):
            other = _leaves(json.loads(text))
            keys = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
            if keys:
                shown = ", ".join(f"{k}={reference.get(k)!r} vs {other.get(k)!r}" for k in keys[:6])
                raise DistributedError(
                    f"rank {self.rank} of {self.world}: ranks 0 and {rank} were started with different {what} ({shown}); "
                    "start every rank with the same command and data")

    # -- the batch ---------------------------------------------------------------------------
    def local_rows(self, batch_BD):
        """This rank's contiguous share of a global batch (a tensor [B, D] or the batch's row
        numbers [B]): its rows B/world * rank ... B/world * (rank + 1)."""
        if self.world == 1:
            return batch_BD
        if len(batch_BD) % self.world:
            raise ValueError(f"batch of {len(batch_BD)} rows does not split evenly over {self.world} ranks: "
                             f"use a batch_size that is a multiple of {self.world}")
        share = len(batch_BD) // self.world
        return batch_BD[self.rank * share : (self.rank + 1) * share]

    def mean(self, local_value: torch.Tensor) -> torch.Tensor:
        """The global batch's mean of a quantity each rank averaged over its equal share."""
        if self.world == 1:
            return local_value
        return self.sum_(local_value.detach().clone()) / self.world

    @torch.no_grad()
    def variance_per_vector(self, x_ND: torch.Tensor) -> torch.Tensor:
        """``metrics.variance_per_vector`` of the global batch (ranks hold equal shares),
        computed in two passes (mean, then squared distances) as one process would."""
        if self.world == 1:
            return variance_per_vector(x_ND)
        n_global = len(x_ND) * self.world
        mean_D = self.sum_(x_ND.sum(0)) / n_global
        return self.sum_((x_ND - mean_D).pow(2).sum()) / n_global

    def sum_grads_(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the parameters' gradients over the ranks in one flat buffer. A parameter
        with a gradient on some rank but not here joins with zeros; one with a gradient on
        no rank keeps none (so Adam skips it, as it would in one process)."""
        if self.world == 1:
            return
        has_grad = self.max_(torch.tensor([p.grad is not None for p in params], dtype=torch.uint8,
                                          device=params[0].device)).tolist()
        taking = [p for p, flag in zip(params, has_grad) if flag]
        if not taking:
            return
        # Each gradient travels in its parameter's memory order and comes back laid out as the
        # parameter (W_enc is held transposed): a fused Adam step needs the two alike.
        flat = self.sum_(torch.cat([_memory_order(p.grad if p.grad is not None else torch.zeros_like(p), p).reshape(-1)
                                    for p in taking]))
        offset = 0
        for p in taking:
            p.grad = _from_memory_order(flat[offset : offset + p.numel()], p)
            offset += p.numel()


def _memory_order(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` (shaped as ``param``) in the order ``param`` lies in memory: its transpose
    for a matrix held transposed, a view when ``tensor`` is laid out alike."""
    return tensor.T if held_transposed(param) else tensor


def _from_memory_order(flat: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The inverse of ``_memory_order(...).reshape(-1)``: a view of ``flat`` laid out as ``param``."""
    return flat.view(param.T.shape).T if held_transposed(param) else flat.view_as(param)
