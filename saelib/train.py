"""Train SAEs: one config, one loop, for every architecture and every data source.

    sae = make_sae(SAEConfig(d_in=256, d_sae=4096, architecture="topk", k=32))
    result = train_sae(sae, store, TrainConfig(total_tokens=2_000_000, out_dir="runs/topk"))
    result.sae.save("saes/topk")          # input scaling folded back: takes raw activations

Data comes from an ``ActivationStore`` (shuffled across shards, bounded memory) or from
any iterable of [batch, d_in] tensors (toy data, in-memory arrays). Inputs are rescaled
so their mean squared norm is ``d_in``; the scale is folded into the weights of the SAE
handed back, so it takes and returns raw activations.

The loss is the batch's fraction of variance unexplained (FVU), plus, for ReLU SAEs, an
L1 penalty ``l1_coefficient * E|z|_1 / E|x|_2`` (scale-free, so one coefficient means the
same at every hook), plus, when latents have died, the AuxK loss of Gao et al.: the
``aux_k`` largest dead latents reconstruct the main reconstruction's error.

With ``out_dir`` set, checkpoints (SAE, optimiser, step, dead-latent counters) are written
atomically every few minutes and at the end, metrics go to ``metrics.jsonl``, and calling
``train_sae`` again with the same arguments resumes where the last checkpoint stopped and
takes exactly the steps an uninterrupted run would have taken.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple

import torch
from tqdm.auto import tqdm

from .sae import SAEConfig, SparseAutoencoder, init_b_dec_, init_from_data_, init_tied_, make_sae
from .distributed import Group
from .sparse_ops import SparseCode, SparseDecode, SparseEncode, held_transposed
from .spare import drop as drop_spares, recycle_grads_
from .files import content_digest, remove_orphan_tmp, write_atomic
from .kernels import KERNELS, resolve_kernels
from .precision import ENCODER_DTYPES, resolve_encoder_dtype
from .store import ActivationStore, CorruptShardError, StoreError
from .threads import follow_load

STATE_FILE = "trainer_state.pt"
# TrainConfig fields a resumed run may change: they do not alter the steps taken.
_RESUME_FREE = {"out_dir", "progress", "log_every", "checkpoint_minutes", "restart_stale", "adapt_threads"}
STALE_SUFFIX = ".stale"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    """How to train; saved with every checkpoint. Field docstrings are the documentation."""

    total_tokens: int = 2_000_000
    """Activation vectors to train on (the schedule's length)."""
    batch_size: int = 4096
    """Vectors per optimiser step."""
    lr: float = 1e-3
    """Peak Adam learning rate."""
    lr_warmup_steps: int = 20
    """Linear warm-up from 0."""
    lr_decay_fraction: float = 0.2
    """The last fraction of steps decays the learning rate linearly to 0."""
    l1_coefficient: float = 0.0
    """Weight of the L1 penalty (ReLU SAEs); scale-free, see the module docstring."""
    l1_warmup_steps: int = 0
    """Ramp the L1 coefficient linearly from 0 over these steps (fewer latents die early)."""
    aux_k: int | None = None
    """Dead latents that reconstruct the error in the AuxK loss; None: d_in // 2 (Gao et al.)
    for TopK and BatchTopK, no AuxK for ReLU SAEs (as Cunningham et al. and Anthropic train
    them); 0: no AuxK."""
    aux_coefficient: float = 1 / 32
    """Weight of the AuxK loss (Gao et al.)."""
    aux_relu: bool = False
    """Pass the dead latents' AuxK pre-activations through a ReLU. True follows OpenAI's
    sparse_autoencoder, EleutherAI's sparsify and dictionary_learning; False (default)
    follows SAELens, which uses them unclipped: a latent negative on every token then still
    gets a gradient back towards the data."""
    dead_tokens: int | None = None
    """A latent that has not fired on this many consecutive tokens counts as dead (and
    joins AuxK). None: a tenth of ``total_tokens``, at most 10M (Gao et al.'s window, meant
    for runs of billions of tokens; a short run with it would never see a dead latent)."""
    skip_special_tokens: bool = True
    """Leave out store rows at special tokens (mid-sequence ``<|endoftext|>`` document
    boundaries): like BOS (never harvested by default) their activations are several times
    the typical norm, and SAELens leaves them out too. Only for ActivationStore sources."""
    normalize_inputs: bool = True
    """Rescale inputs to mean squared norm d_in during training (folded back on export)."""
    b_dec_init: str = "geometric_median"
    """``geometric_median``, ``mean`` or ``zeros`` from the first batch, or ``keep`` the SAE's."""
    dictionary_init: str = "tied"
    """``tied`` (random atoms, encoder = decoderᵀ), ``data`` (atoms from first-batch vectors),
    or ``keep`` the SAE's weights (to continue training a loaded SAE)."""
    seed: int = 0
    """Seeds the initialisation and the shuffling of store batches."""
    log_every: int = 10
    """Steps between metric rows."""
    checkpoint_minutes: float = 5.0
    """Wall-clock minutes between checkpoints (only with ``out_dir``)."""
    out_dir: str = ""
    """Folder for checkpoints and ``metrics.jsonl``; empty: keep nothing on disk."""
    progress: bool = True
    """Show a tqdm bar."""
    adapt_threads: bool = True
    """On a CPU, follow the machine's load: when other processes take a share of a core
    (read from /proc/stat on Linux; elsewhere, when steps slow down and fewer threads
    prove faster), run fewer intra-op threads until they leave
    (``saelib.threads.ThreadGovernor``). TopK training gives the same weights bit for bit
    on any thread count (tests/test_threads.py); dense paths (ReLU) may differ in the last
    bits."""
    encoder_dtype: str = "auto"
    """Precision of the TopK encoder matmul that chooses each row's k latents: ``float32``,
    ``bfloat16``, or ``auto``: bfloat16 on hardware with fast bf16 matmuls (a CPU with AMX,
    a GPU from Ampere on) for SAEs of d_in >= 64 and d_sae >= 256, where it measured 1.3-8x
    faster, else float32. A fixed rule, not a timing: the same run picks the same precision
    every time (``saelib.precision``). The chosen latents' values, the decoder and every
    gradient stay fp32, so bf16 only lets latents within its rounding of a row's cut-off
    trade places. Other architectures always use fp32."""
    kernels: str = "auto"
    """TopK training kernels: ``sparse`` (decode and back-propagate through the k chosen
    latents of each row alone), ``dense`` (plain autograd over all latents), or ``auto``:
    sparse on a CPU (several times faster there), on a GPU whichever a one-off timing at this
    SAE's shape finds faster (``saelib.kernels``). Both give the same gradients up to float
    rounding. BatchTopK always uses sparse kernels, ReLU picks by its batch's density."""
    restart_stale: bool = False
    """A checkpoint in ``out_dir`` from another SAE config, other training settings or
    other data (``ActivationStore.fingerprint``): False refuses it, naming what differs;
    True sets it aside (``trainer_state.pt.stale``, ``metrics.jsonl.stale``) and trains
    afresh. Never resumed either way."""

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"batch_size {self.batch_size}: must be a positive number of vectors per step")
        if self.total_tokens < self.batch_size:
            raise ValueError(f"total_tokens {self.total_tokens} is less than one batch ({self.batch_size}): nothing "
                             "would be trained; ask for at least one batch of tokens or a smaller batch_size")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr {self.lr}: the learning rate must be a positive finite number (e.g. 1e-3)")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels {self.kernels!r}: choose one of {', '.join(KERNELS)}")
        if self.encoder_dtype not in ENCODER_DTYPES:
            raise ValueError(f"encoder_dtype {self.encoder_dtype!r}: choose one of {', '.join(ENCODER_DTYPES)}")
        if self.log_every <= 0 or self.checkpoint_minutes <= 0:
            raise ValueError(f"log_every ({self.log_every}) and checkpoint_minutes ({self.checkpoint_minutes}) must be positive")

    def steps(self) -> int:
        return max(1, self.total_tokens // self.batch_size)

    def resolved_aux_k(self, d_in: int, architecture: str = "topk") -> int:
        if self.aux_k is not None:
            return self.aux_k
        return 0 if architecture == "relu" else d_in // 2

    def resolved_dead_tokens(self) -> int:
        if self.dead_tokens is not None:
            return self.dead_tokens
        return max(self.batch_size, min(10_000_000, self.total_tokens // 10))


class TrainResult(NamedTuple):
    """What ``train_sae`` hands back."""

    sae: SparseAutoencoder
    """The trained SAE for raw activations (input scale folded in), in eval mode."""
    metrics: "object"
    """pandas DataFrame of the logged rows (step, tokens, loss, fvu, l0, dead_fraction...)."""
    dead_fraction: float
    """Share of latents that had not fired within the last ``dead_tokens`` tokens at the end."""
    tokens_per_s: float
    """Training throughput of this call (resumed steps excluded)."""
    input_scale: float
    """Factor the inputs were multiplied by during training."""
    step: int = 0
    """Optimiser steps trained in all, resumed ones included: the step the final checkpoint holds."""


class IncompleteStoreWarning(UserWarning):
    """Training starts on a store whose harvest has not finished."""


class CorruptCheckpointError(RuntimeError):
    """A trainer checkpoint cannot be read or fails its checksum."""


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became NaN or infinite. The run stops before anything is saved
    over good state: an earlier checkpoint stays as it was, and no SAE is written."""


class StaleCheckpointError(ValueError):
    """A checkpoint in ``out_dir`` belongs to another SAE, other settings or other data."""


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Warm-up, constant, then linear decay to 0 over the last ``lr_decay_fraction``."""
    total = cfg.steps()
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
    decay_start = total * (1 - cfg.lr_decay_fraction)
    if step >= decay_start and cfg.lr_decay_fraction > 0:
        return cfg.lr * max(0.0, (total - step) / (total - decay_start))
    return cfg.lr


def l1_coefficient(cfg: TrainConfig, step: int) -> float:
    if cfg.l1_warmup_steps <= 0:
        return cfg.l1_coefficient
    return cfg.l1_coefficient * min(1.0, (step + 1) / cfg.l1_warmup_steps)


def aux_loss(sae: SparseAutoencoder, x_BD: torch.Tensor, dead_BK: tuple[torch.Tensor, torch.Tensor] | None,
             error_BD: torch.Tensor, dead_F: torch.Tensor, aux_k: int, relu: bool = False,
             group: Group | None = None) -> torch.Tensor:
    """AuxK: the ``aux_k`` largest pre-activations among dead latents (``dead_BK``, as
    ``sae.train_forward(x_BD, dead_F, aux_k)`` picked them), decoded without b_dec, should
    reconstruct the main reconstruction's ``error_BD`` (detached). Only dead latents'
    encoder columns, biases and decoder rows receive gradient.

    ``relu=False`` passes the pre-activations unclipped (as SAELens does): a dead latent is
    usually negative on every token, and a ReLU leaves it no gradient to come back with.
    ``relu=True`` clips them (as OpenAI's sparse_autoencoder, sparsify and
    dictionary_learning do), so only dead latents that are positive somewhere learn.
    Returns the normalised MSE, scaled down by ``n_dead / aux_k`` when fewer latents than
    ``aux_k`` are dead (0 when none is). Under several ranks (``group``) the error's variance
    is the global batch's and the mean is over this rank's rows."""
    n_dead = int(dead_F.sum())
    if n_dead == 0 or aux_k == 0 or dead_BK is None:
        return x_BD.new_zeros(())
    with torch.no_grad():
        code, pre_N = SparseCode.from_rows(*dead_BK, sae.cfg.d_sae)
    values_N = SparseEncode.apply(pre_N, code, x_BD, sae.b_dec.detach(), sae.W_enc, sae.b_enc)
    if relu:
        values_N = torch.relu(values_N)
    aux_recon_BD = SparseDecode.apply(values_N, code, sae.W_dec)
    target_BD = error_BD.detach()
    spread = (group or Group.single()).variance_per_vector(target_BD).clamp_min(1e-12)
    scale = min(1.0, n_dead / aux_k)
    return scale * (aux_recon_BD - target_BD).pow(2).sum(-1).mean() / spread


def data_fingerprint(source) -> dict | None:
    """The identity of a data source: ``ActivationStore.fingerprint()`` for a store, None for
    other sources (in-memory batches carry no identity to check)."""
    return source.fingerprint() if isinstance(source, ActivationStore) else None


class _Batch(NamedTuple):
    """One global batch as one rank sees it."""
    local_BD: torch.Tensor
    """This rank's contiguous share of the rows: [batch_size / world, d_in] (all of them in one process)."""
    whole: Callable[[], torch.Tensor]
    """The whole global batch [batch_size, d_in]; read only for a fresh run's set-up from its first batch."""


def _batches(sources: list, cfg: TrainConfig, group: Group) -> Iterator[tuple[_Batch, ...]]:
    """The batch stream of ``cfg``: per step, one ``_Batch`` for each of ``sources`` (stores
    laid out alike, see ``_require_one_stream``, or a single source of any kind). From
    stores every rank works out the same global batches (row numbers only, from the first
    store) and reads just its own rows of each, from every store: N ranks read the stores
    once between them, not N times, and SAEs at several hooks share one shuffle."""
    if isinstance(sources[0], ActivationStore):
        epochs = math.ceil(cfg.total_tokens / max(1, len(sources[0]))) + 1
        for rows in sources[0].iter_batch_rows(cfg.batch_size, shuffle=True, seed=cfg.seed, epochs=epochs,
                                               skip_special=cfg.skip_special_tokens):
            mine = group.local_rows(rows)
            yield tuple(_Batch(store.gather(mine), lambda store=store, rows=rows: store.gather(rows)) for store in sources)
        return
    (source,) = sources
    for raw_BD in (source() if callable(source) else source):
        yield (_Batch(group.local_rows(raw_BD), lambda raw_BD=raw_BD: raw_BD),)


def _stream_layout(store: ActivationStore) -> dict:
    """What decides a store's batch stream besides the training settings: row count and shard
    sizes (the shuffle's chunks), token windows and special tokens (rows left out)."""
    m = store.manifest
    return {"shard_rows": [info.rows for info in m.shards], "contexts_sha256": m.contexts_sha256,
            "first_position": m.first_position, "special_token_ids": sorted(m.special_token_ids)}


def _require_one_stream(sources: list) -> None:
    """Several sources are read as one stream only when they are stores of one harvest, laid
    out alike (e.g. the residual stream and MLP output of each layer): row r is then the
    same token in each, and each store's batches are those it gives alone."""
    if len(sources) == 1:
        return
    if not all(isinstance(s, ActivationStore) for s in sources):
        raise ValueError("SAEs at several hooks train together only from activation stores ({hook: store})")
    reference = _stream_layout(sources[0])
    for other in sources[1:]:
        layout = _stream_layout(other)
        fields = [f for f in reference if layout[f] != reference[f]]
        if fields:
            shown = "shard sizes" if fields == ["shard_rows"] else ", ".join(fields)
            raise ValueError(f"stores {sources[0].folder} and {other.folder} cannot be read as one stream: their "
                             f"{shown} differ (other token windows, or other widths and so other shard sizes); "
                             "train them in separate calls")


def _source_of(sae: SparseAutoencoder, source):
    """An SAE's data: ``source`` itself, or from a ``{hook: store}`` mapping the store at the
    hook the SAE is for (``SAEConfig.hook_name``)."""
    if not isinstance(source, Mapping):
        return source
    hook = sae.cfg.hook_name
    if hook not in source:
        raise ValueError(f"no store for hook {hook!r} (SAEConfig.hook_name) among {sorted(source)}: set each "
                         "SAE's hook_name to one of them")
    return source[hook]


def _verify_store_shares(source, group: Group) -> None:
    """Under several ranks each checks the sha256 of its share of the store's shards before
    training, and a failure found by any rank stops every rank with its message, so the
    checksum read is split as well, and nobody hangs on a rank that stopped. One process
    keeps the lazy check (each shard when first read)."""
    if group.world == 1 or not isinstance(source, ActivationStore):
        return
    n = len(source.manifest.shards)
    problem = None
    try:
        source.verify(range(group.rank * n // group.world, (group.rank + 1) * n // group.world))
    except StoreError as err:
        problem = str(err)
    found = next((p for p in group.gather_objects(problem) if p), None)
    if found:
        raise CorruptShardError(found)
    source.trust_verified(range(n))


def _check_finite(batch: _Batch, source, index: int, group: Group, device: torch.device) -> None:
    """Refuse a batch holding NaN or inf on any rank, on every rank (one flag is reduced, on
    ``device``: NCCL reduces only GPU tensors)."""
    bad = not bool(torch.isfinite(batch.local_BD).all())
    if group.world > 1:
        bad = bool(group.max_(torch.tensor([int(bad)], device=device)).item())
    if not bad:
        return
    if isinstance(source, ActivationStore):
        where = source.locate_non_finite()
        detail = f"store {source.folder}, {where}" if where else f"store {source.folder}"
        remedy = "harvest that store again (--overwrite) or into a new folder"
    else:
        detail, remedy = "the data source (not a store)", "check what it yields"
    raise ValueError(f"batch {index} holds NaN or inf activations: {detail}; {remedy}")


class MetricsLog:
    """Logged rows of one ``fit`` call, appended to ``<out_dir>/metrics.jsonl`` when there is
    one (flushed per row, so a killed run keeps its log)."""

    def __init__(self, out_dir: Path | None):
        self.path = out_dir / METRICS_FILE if out_dir is not None else None
        self.rows: list[dict] = []
        self._handle = None
        if self.path is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("a")

    def write(self, record: dict) -> None:
        self.rows.append(record)
        if self._handle is not None:
            self._handle.write(json.dumps(record) + "\n")
            self._handle.flush()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def table(self):
        """Every logged row of the run, resumed parts included: a pandas DataFrame."""
        import pandas as pd

        if self.path is not None and self.path.exists():
            return pd.read_json(self.path, lines=True)
        return pd.DataFrame(self.rows)


def run_identity(sae_cfg: SAEConfig, cfg: TrainConfig, data: dict | None) -> dict:
    """What every rank of one run must agree on: the SAE, the settings that change the steps,
    the data."""
    train = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUME_FREE}
    return {"sae": dataclasses.asdict(sae_cfg), **train, "data": data}


def adam(params, lr: float) -> "RowsAdam":
    """Adam, fused where torch has the kernel for the parameters' device (CUDA; CPU from
    torch 2.4): one pass over each tensor instead of a dozen ops per parameter. Training
    at 512 x 16384 on a 2-core Xeon, Adam took 10 ms of a step against 55 ms
    (benchmarks/README.md). The formula is the same; one step agrees with the per-op
    version to 1 ulp, 20 steps of training to 1e-4 (tests/test_train.py)."""
    params = list(params)
    try:
        return RowsAdam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # older torch, or a device without the fused kernel
        return RowsAdam(params, lr=lr)


class RowsAdam(torch.optim.Adam):
    """Adam that works on a matrix held transposed in memory (``W_enc``, [d_in, d_sae] held as
    d_sae rows) through its contiguous transpose, the same memory. torch's fused CPU kernel
    took 4x as long on the transposed matrix itself (25 against 6 ms at 512 x 16384), and
    where a gradient is laid out otherwise than its parameter it computes wrong values. At
    each step the parameter's gradient is handed over the same way (copied only if it is
    laid out otherwise); ``state_dict`` gives (contiguous) and takes the moments in the
    parameters' own shapes, as ``torch.optim.Adam`` does, so checkpoints are as before."""

    def __init__(self, params, **options):
        params = list(params)
        self._rows = [param.detach().T if held_transposed(param) else None for param in params]
        self._params = params
        super().__init__([rows if rows is not None else param for param, rows in zip(params, self._rows)], **options)

    def _pairs(self):
        return [(param, rows) for param, rows in zip(self._params, self._rows) if rows is not None]

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for param, rows in self._pairs():
            grad = param.grad
            rows.grad = None if grad is None else grad.T.contiguous()  # a view when laid out alike
        try:
            super().step()
        finally:
            for _, rows in self._pairs():
                rows.grad = None  # nothing else holds the gradients (saelib.spare reuses them)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for param, _ in self._pairs():
            if param.grad is not None:
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.zero_()

    def _moments(self, state: dict, convert) -> dict:
        """``state`` (a state_dict's) with each transposed parameter's moment tensors converted."""
        state = dict(state)
        for index, rows in enumerate(self._rows):
            if rows is not None and index in state:
                state[index] = {key: convert(value) if isinstance(value, torch.Tensor) and value.ndim == 2 else value
                                for key, value in state[index].items()}
        return state

    def state_dict(self):
        saved = super().state_dict()
        return {**saved, "state": self._moments(saved["state"], lambda moment: moment.T.contiguous())}

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict({**state_dict, "state": self._moments(state_dict["state"],
                                                                      lambda moment: moment.T.contiguous())})


class SAETrainer:
    """Owns one run: the SAE (in normalised-input space), optimiser, step, dead counters.

    Under ``torch.distributed`` (``group``, default: the initialised default group) every
    rank holds the same SAE and optimiser and trains on its share of each global batch of
    ``cfg.batch_size`` rows (``saelib.distributed``); rank 0 alone writes checkpoints and
    metrics."""

    def __init__(self, sae: SparseAutoencoder, cfg: TrainConfig, device: str | torch.device = "cpu",
                 data: dict | None = None, group: Group | None = None):
        """``data``: the identity of the data it trains on (``data_fingerprint(source)``),
        recorded in checkpoints and the exported SAE; a checkpoint of other data is stale."""
        self.group = group or Group.current()
        if cfg.batch_size % self.group.world:
            raise ValueError(f"batch_size {cfg.batch_size} does not split evenly over {self.group.world} ranks: "
                             f"use a multiple of {self.group.world} (the global batch is shared out)")
        if not sae.trains:
            raise ValueError(f"{sae.architecture} SAEs are inference-only here; train topk, batchtopk or relu")
        # before any other collective: ranks that disagree must not wait on different calls
        self.group.require_same("settings or data", run_identity(sae.cfg, cfg, data))
        self.sae = sae.to(device)
        self.cfg = cfg
        self.device = torch.device(device)
        if hasattr(type(self.sae), "select_dtype"):  # TopK kinds: the selection matmul's precision
            dtype = resolve_encoder_dtype(cfg.encoder_dtype, self.device, sae.cfg.d_in, sae.cfg.d_sae)
            self.sae.select_dtype = getattr(torch, self.group.broadcast_object(str(dtype).removeprefix("torch.")))
        if hasattr(type(self.sae), "dense_kernels"):  # timed choices: every rank takes rank 0's
            choice = resolve_kernels(cfg.kernels, self.device, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k,
                                     cfg.batch_size // self.group.world)
            self.sae.dense_kernels = self.group.broadcast_object(choice) == "dense"
        if self.group.world > 1 and hasattr(type(self.sae), "batch_group"):  # BatchTopK's cut-off is batch-wide
            self.sae.batch_group = self.group
        self.optimizer = adam(self.sae.parameters(), cfg.lr)
        self.step = 0
        self.tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64, device=self.device)
        self.input_scale: float | None = None
        self.data = data
        self._last_save = time.perf_counter()
        self.saved_step: int | None = None
        """Step of the newest checkpoint on disk (None: none yet)."""
        self.out_dir = Path(cfg.out_dir) if cfg.out_dir else None
        if self.out_dir is not None:
            if self.group.is_main:
                remove_orphan_tmp(self.out_dir)
            self.group.barrier()
            state = self._read_state() if (self.out_dir / STATE_FILE).exists() else None
            self.group.barrier()  # every rank has read the checkpoint before rank 0 changes files
            if state is not None:
                self._apply_state(state)
            elif (self.out_dir / METRICS_FILE).exists() and self.group.is_main:
                # killed before its first checkpoint: the run starts over, so do its rows
                (self.out_dir / METRICS_FILE).unlink()
            self.group.require_same("checkpoints (is out_dir one shared folder?)", {"resumed_step": self.step})


    # -- checkpoints -------------------------------------------------------------------------
    def _state(self) -> dict:
        return {
            "sae": self.sae.state_dict(),
            "sae_cfg": dataclasses.asdict(self.sae.cfg),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "tokens_since_fired": self.tokens_since_fired.cpu(),
            "input_scale": self.input_scale,
            "train_cfg": dataclasses.asdict(self.cfg),
            "data": json.dumps(self.data, sort_keys=True),
        }

    def save_checkpoint(self) -> None:
        if self.out_dir is None or not self.group.is_main:
            return
        self.check_finite_()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = self._state()
        state["digest"] = content_digest(state)  # checked on resume: flipped bytes are never trained on
        write_atomic(self.out_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))
        self.saved_step = self.step

    @torch.no_grad()
    def check_finite_(self) -> None:
        """Raise ``TrainingDivergedError`` if any SAE weight is NaN or infinite."""
        bad = [name for name, p in self.sae.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise TrainingDivergedError(self._diverged(f"weights {', '.join(bad)} hold NaN or inf"))

    def _diverged(self, what: str) -> str:
        if self.saved_step is not None:
            kept = f"the checkpoint {self.out_dir / STATE_FILE} (step {self.saved_step}) is kept as it was"
        else:
            kept = "nothing was saved"
        lr = learning_rate(self.cfg, max(self.step - 1, 0))
        return (f"training diverged at step {self.step}: {what} (learning rate {lr:g}); a learning rate too high "
                f"for these activations is the usual cause: lower --lr and train again; {kept}")

    def _read_state(self) -> dict:
        """The checkpoint in ``out_dir``, read and verified against its checksum."""
        path = self.out_dir / STATE_FILE
        remedy = (f"move it away (or delete it) to train this run from the start; nothing else in {self.out_dir} "
                  "depends on it")
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:  # torch raises several types for truncated or garbled zip files
            raise CorruptCheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: "
                                         f"{str(err).splitlines()[0][:160]}): {remedy}") from None
        recorded = state.pop("digest", None)
        if recorded is not None and content_digest(state) != recorded:
            raise CorruptCheckpointError(f"checkpoint {path} fails its checksum (bytes altered or damaged since it "
                                         f"was saved): {remedy}")
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}

    def _apply_state(self, state: dict) -> None:
        """Resume from ``state`` (or set a stale one aside, or refuse it)."""
        path = self.out_dir / STATE_FILE
        stale = self._stale_reasons(state)
        if stale and self.cfg.restart_stale:
            for name in (STATE_FILE, METRICS_FILE):
                if (self.out_dir / name).exists() and self.group.is_main:
                    (self.out_dir / name).replace(self.out_dir / (name + STALE_SUFFIX))
            return
        if stale:
            raise StaleCheckpointError(
                f"checkpoint {path} was trained {'; '.join(stale)}: use another out_dir, the same settings "
                "and data to resume, or restart_stale=True to set it aside and train afresh"
            )
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.saved_step = self.step
        self.tokens_since_fired = state["tokens_since_fired"].to(self.device)
        self.input_scale = state["input_scale"]
        log = self.out_dir / METRICS_FILE
        if log.exists() and self.group.is_main:  # rows past the checkpoint will be logged again
            rows = [r for r in log.read_text().splitlines() if r and json.loads(r)["step"] <= self.step]
            log.write_text("".join(r + "\n" for r in rows))

    def _stale_reasons(self, state: dict) -> list[str]:
        """What differs between a checkpoint and this run (empty: it may be resumed)."""
        reasons = []
        if state["sae_cfg"] != dataclasses.asdict(self.sae.cfg):
            reasons.append(f"for SAE {state['sae_cfg']}, not {dataclasses.asdict(self.sae.cfg)}")
        saved, now = state["train_cfg"], dataclasses.asdict(self.cfg)
        differing = sorted(k for k in now if k not in _RESUME_FREE and saved.get(k) != now[k])
        if differing:
            reasons.append(f"with other settings ({', '.join(f'{k}={saved.get(k)!r}' for k in differing)}; "
                           f"now {', '.join(f'{k}={now[k]!r}' for k in differing)})")
        saved_data = json.loads(state.get("data") or "null")
        if saved_data != self.data:
            fields = sorted(k for k in set(saved_data or {}) | set(self.data or {})
                            if (saved_data or {}).get(k) != (self.data or {}).get(k))
            reasons.append(f"on other data (differs in {', '.join(fields) or 'its source'}: "
                           f"{ {k: (saved_data or {}).get(k) for k in fields} } now { {k: (self.data or {}).get(k) for k in fields} })")
        return reasons

    # -- set-up from the first batch ---------------------------------------------------------------
    @torch.no_grad()
    def _initialise(self, first_BD: torch.Tensor, source) -> None:
        """Input scale, b_dec and dictionary from data; only for a fresh run."""
        if isinstance(source, ActivationStore):
            scale = source.norm_scale
        else:
            scale = float((self.sae.cfg.d_in / first_BD.pow(2).sum(-1).mean().clamp_min(1e-12)).sqrt())
        self.input_scale = scale if self.cfg.normalize_inputs else 1.0
        sample = first_BD[:4096] * self.input_scale
        if self.cfg.b_dec_init != "keep":
            init_b_dec_(self.sae, sample, self.cfg.b_dec_init)
        if self.cfg.dictionary_init == "data":
            init_from_data_(self.sae, sample, seed=self.cfg.seed)
        elif self.cfg.dictionary_init == "tied":
            init_tied_(self.sae, seed=self.cfg.seed)
        elif self.cfg.dictionary_init != "keep":
            raise ValueError(f"dictionary_init must be 'tied', 'data' or 'keep', not {self.cfg.dictionary_init!r}")

    # -- one step ----------------------------------------------------------------------------------
    def train_step(self, x_BD: torch.Tensor) -> dict:
        """One optimiser step on a batch already scaled (this rank's share of the global
        batch under several ranks); returns the global batch's metrics."""
        cfg, sae, group = self.cfg, self.sae, self.group
        for g in self.optimizer.param_groups:
            g["lr"] = learning_rate(cfg, self.step)
        dead_F = self.tokens_since_fired >= cfg.resolved_dead_tokens()
        aux_k = cfg.resolved_aux_k(sae.cfg.d_in, sae.architecture)
        with torch.enable_grad():
            out = sae.train_forward(x_BD, dead_F, aux_k)
            error_BD = x_BD - out.recon_BD
            # Normalisers come from the global batch; each rank's loss is its share of the
            # global loss (means over its rows / world), so summed gradients are one process's.
            spread = group.variance_per_vector(x_BD).clamp_min(1e-12)
            fvu = error_BD.pow(2).sum(-1).mean() / spread
            loss = fvu
            l1_now = l1_coefficient(cfg, self.step)
            if l1_now > 0:
                loss = loss + l1_now * out.l1_BF_sum / group.mean(x_BD.norm(dim=-1).mean()).clamp_min(1e-12)
            aux = aux_loss(sae, x_BD, out.dead_BK, error_BD, dead_F, aux_k, relu=cfg.aux_relu, group=group)
            if aux.requires_grad:
                loss = loss + cfg.aux_coefficient * aux
            loss = loss / group.world
            # loss (summed) and the means of fvu, l0, l1, aux over the global batch
            totals = group.sum_(torch.stack([loss, fvu, out.l0, out.l1_BF_sum, aux]).detach().float())
            loss_all = totals[0]
            fvu_all, l0_all, l1_all, aux_all = (totals[1:] / group.world).tolist()
            if not torch.isfinite(loss_all):  # before the step: the weights stay as they were
                self.step += 1
                raise TrainingDivergedError(self._diverged(f"the loss is {loss_all.item()} (FVU {fvu_all})"))
            recycle_grads_(sae.parameters())  # zero_grad(set_to_none=True), the memory kept for backward
            loss.backward()
        group.sum_grads_(list(sae.parameters()))
        sae.remove_parallel_grad_()
        self.optimizer.step()
        sae.unit_norm_decoder_()
        fired_F = out.fired_F if group.world == 1 else group.max_(out.fired_F.to(torch.uint8)).bool()
        self.tokens_since_fired += len(x_BD) * group.world
        self.tokens_since_fired[fired_F] = 0
        self.step += 1
        return {
            "loss": loss_all.item(),
            "fvu": fvu_all,
            "l0": l0_all,
            "l1": l1_all,
            "aux_loss": aux_all,
            "dead_fraction": (self.tokens_since_fired >= cfg.resolved_dead_tokens()).float().mean().item(),
            "lr": learning_rate(cfg, self.step - 1),
            "l1_coefficient": l1_now,
        }

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self, source, max_steps: int | None = None, max_minutes: float | None = None,
            extra_metrics: Callable[["SAETrainer"], dict] | None = None) -> TrainResult:
        """Train on ``source`` (ActivationStore, ``{hook: store}`` picked by the SAE's
        ``hook_name``, iterable of [B, d_in] tensors, or a callable returning one; the
        iterable must give the same batches on every call for an exact resume) until the
        schedule ends, ``max_steps`` more steps or ``max_minutes``.

        ``extra_metrics(trainer)`` adds its dict to every logged row, and to a first row at
        step 0 right after initialisation (e.g. MMCS to known features over training)."""
        return fit_together([self], source, max_steps=max_steps, max_minutes=max_minutes,
                            extra_metrics=extra_metrics)[0]

    # -- the loop's named steps ------------------------------------------------------------------
    def _time_is_up(self, here: bool) -> bool:
        """Whether any rank's clock says stop: every rank stops after the same step."""
        if self.group.world == 1:
            return here
        return bool(self.group.max_(torch.tensor([int(here)], device=self.device)).item())

    def _check_source(self, source) -> None:
        """The store fits this SAE (width, hook); warn once when its harvest is unfinished."""
        if isinstance(source, ActivationStore):
            source.require(d_in=self.sae.cfg.d_in, hook=self.sae.cfg.hook_name or None)
            m = source.manifest
            if not m.complete and self.step == 0:
                warnings.warn(f"store {source.folder} is incomplete ({m.n_rows} of {m.expected_rows} rows: its harvest "
                              "stopped early); training on the rows there. Rerun the harvest to finish it first if "
                              "you meant all of them (a finished store is other data: this run would not resume on it)",
                              IncompleteStoreWarning, stacklevel=4)

    def _prepared(self, batch: _Batch, source, log: "MetricsLog", extra_metrics) -> torch.Tensor:
        """This rank's rows of a batch (already checked finite), width-checked, on the device
        and scaled; the first batch of a fresh run also sets input scale, b_dec and dictionary
        from the whole global batch, the same on every rank."""
        self.sae._check_width(batch.local_BD)
        if self.input_scale is None:
            self._initialise(batch.whole().to(self.device, torch.float32), source)
            if extra_metrics is not None and self.group.is_main:
                log.write({"step": 0, "tokens": 0, **extra_metrics(self)})
        return batch.local_BD.to(self.device, torch.float32) * self.input_scale

    def _log_step(self, record: dict, log: "MetricsLog", bar, extra_metrics) -> None:
        if (self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps()) and self.group.is_main:
            record = {"step": self.step, "tokens": self.step * self.cfg.batch_size, **record}
            if extra_metrics is not None:
                record.update(extra_metrics(self))
            log.write(record)
            if bar is not None:
                bar.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}", dead=f"{record['dead_fraction']:.2f}")
        if bar is not None:
            bar.update(1)

    def _checkpoint_if_due(self) -> None:
        now = time.perf_counter()
        if self.out_dir is not None and now - self._last_save > 60 * self.cfg.checkpoint_minutes:
            self.save_checkpoint()
            self._last_save = now

    def _finish(self, log: "MetricsLog", first_step: int, seconds: float, source=None) -> TrainResult:
        if self.step == 0:
            where = (f"store {source.folder} holds {source.n_rows} rows" if isinstance(source, ActivationStore)
                     else "the data source gave no batch")
            raise ValueError(f"nothing was trained: {where}, fewer than one batch of {self.cfg.batch_size}; "
                             "harvest more tokens or use a smaller batch_size")
        self.save_checkpoint()
        self.sae.eval()
        return TrainResult(
            sae=self.export(),
            metrics=log.table(),
            dead_fraction=float((self.tokens_since_fired >= self.cfg.resolved_dead_tokens()).float().mean()),
            tokens_per_s=(self.step - first_step) * self.cfg.batch_size / max(seconds, 1e-9),
            input_scale=self.input_scale or 1.0,
            step=self.step,
        )

    def export(self) -> SparseAutoencoder:
        """A copy of the SAE for raw activations (input scale folded in), in eval mode."""
        self.check_finite_()
        sae = copy.deepcopy(self.sae).eval()
        if hasattr(sae, "batch_group"):
            sae.batch_group = None  # the copy stands alone
        sae.fold_input_scale_(self.input_scale or 1.0)
        sae.cfg = dataclasses.replace(
            sae.cfg, metadata={**sae.cfg.metadata, "trained_tokens": self.step * self.cfg.batch_size,
                               "input_scale": self.input_scale or 1.0,
                               **({"data": self.data, "exclude_special_tokens": self.cfg.skip_special_tokens}
                                  if self.data is not None else {})}
        )
        return sae


# Settings that decide the batch stream: SAEs trained together must share them.
_STREAM_FIELDS = ("batch_size", "seed", "skip_special_tokens")


def fit_together(trainers: list[SAETrainer], source, max_steps: int | None = None, max_minutes: float | None = None,
                 extra_metrics: Callable[[SAETrainer], dict] | None = None) -> list[TrainResult]:
    """Train several SAEs on one read of ``source``: each batch is read (and shuffled) once
    and every trainer takes its step on it, so each SAE gets exactly the batches it would
    get trained alone (same results), while the data is read once for all. Trainers may
    differ in anything but the batch stream (``batch_size``, ``seed``,
    ``skip_special_tokens``); each keeps its own schedule length, checkpoints and log, and
    resumes from its own step. The arguments are those of ``SAETrainer.fit``, per trainer;
    a ``TrainResult`` per trainer, in order, whose ``tokens_per_s`` counts the shared time.

    ``source`` may also be ``{hook: store}`` for SAEs at several hooks (each SAE's
    ``hook_name`` picks its store): stores of one harvest laid out alike (same token
    windows and shard sizes, e.g. residual stream and MLP output at every layer) share
    one shuffle, each SAE reading its own store's rows of every batch, the batches it
    would get trained alone."""
    first = trainers[0]
    for other in trainers[1:]:
        differing = [f for f in _STREAM_FIELDS if getattr(other.cfg, f) != getattr(first.cfg, f)]
        if differing:
            raise ValueError("SAEs trained from one read of the data must share " + ", ".join(
                f"{f} (here {getattr(first.cfg, f)!r} and {getattr(other.cfg, f)!r})" for f in differing))
    lasts = [t.cfg.steps() if max_steps is None else min(t.cfg.steps(), t.step + max_steps) for t in trainers]
    own = [_source_of(t.sae, source) for t in trainers]
    for trainer, data in zip(trainers, own):
        trainer._check_source(data)
    sources = list({id(data): data for data in own}.values())
    _require_one_stream(sources)
    slots = [next(i for i, data in enumerate(sources) if data is mine) for mine in own]
    start = min(t.step for t in trainers)
    longest = max(trainers, key=lambda t: t.cfg.total_tokens).cfg  # every run's batches are a prefix of its stream
    for data in sources:
        _verify_store_shares(data, first.group)
    batches = itertools.islice(_batches(sources, longest, first.group), start, None)
    main, single = first.group.is_main, len(trainers) == 1
    logs = [MetricsLog(t.out_dir if main else None) for t in trainers]
    first_steps, started = [t.step for t in trainers], time.perf_counter()
    bar = tqdm(total=max(lasts), initial=start, unit="step", disable=not (main and any(t.cfg.progress for t in trainers)),
               desc=f"train {first.sae.architecture} SAE" if single else f"train {len(trainers)} SAEs")
    for trainer in trainers:
        trainer.sae.train()
    load = follow_load(any(t.cfg.adapt_threads for t in trainers), first.device)
    try:
        with load:
            index = start
            while any(t.step < last for t, last in zip(trainers, lasts)) and (batch := next(batches, None)) is not None:
                for part, data in zip(batch, sources):
                    _check_finite(part, data, index, first.group, first.device)
                for trainer, log, last, slot in zip(trainers, logs, lasts, slots):
                    if trainer.step == index and trainer.step < last:  # one resumed further waits for the stream
                        record = trainer.train_step(trainer._prepared(batch[slot], sources[slot], log, extra_metrics))
                        trainer._log_step(record, log, bar if single else None, extra_metrics)
                        trainer._checkpoint_if_due()
                index += 1
                if not single:
                    bar.update(1)
                load.lap()
                if max_minutes is not None and first._time_is_up(time.perf_counter() - started > 60 * max_minutes):
                    break
    finally:
        drop_spares()
        bar.close()
        for log in logs:
            log.close()
    seconds = time.perf_counter() - started
    return [t._finish(log, first_step, seconds, data) for t, log, first_step, data in zip(trainers, logs, first_steps, own)]


def train_many(runs: dict[str, tuple[SparseAutoencoder | SAEConfig, TrainConfig]], source,
               device: str | torch.device = "cpu", max_steps: int | None = None,
               max_minutes: float | None = None) -> dict[str, TrainResult]:
    """Train several SAEs (several widths or k at one hook, or with ``source`` = ``{hook:
    store}`` at several hooks) from one read of the data (``fit_together``):
    ``{name: (SAE or SAEConfig, TrainConfig)}`` -> ``{name: TrainResult}``.
    Give each run its own ``out_dir`` to checkpoint and resume them."""
    trainers = []
    for sae, cfg in runs.values():
        sae = make_sae(sae) if isinstance(sae, SAEConfig) else sae
        data = _source_of(sae, source)
        trainers.append(SAETrainer(sae, cfg, device, data=data_fingerprint(data)))
    results = fit_together(trainers, source, max_steps=max_steps, max_minutes=max_minutes)
    return dict(zip(runs, results))


def train_sae(sae: SparseAutoencoder | SAEConfig, source, cfg: TrainConfig, device: str | torch.device = "cpu",
              max_steps: int | None = None, max_minutes: float | None = None,
              extra_metrics: Callable[[SAETrainer], dict] | None = None) -> TrainResult:
    """Train (or resume, when ``cfg.out_dir`` holds a checkpoint) and return a ``TrainResult``;
    the keyword arguments are those of ``SAETrainer.fit``."""
    if isinstance(sae, SAEConfig):
        sae = make_sae(sae)
    return SAETrainer(sae, cfg, device, data=data_fingerprint(_source_of(sae, source))).fit(source, max_steps=max_steps, max_minutes=max_minutes,
                                            extra_metrics=extra_metrics)


def sweep(sae_cfg: SAEConfig, train_cfg: TrainConfig, source, grid: dict[str, Iterable],
          evaluate: Callable[[SparseAutoencoder], dict] | None = None, device: str | torch.device = "cpu"):
    """Train one SAE per point of ``grid`` (keys: fields of SAEConfig or TrainConfig, e.g.
    ``{"architecture": [...], "k": [...], "l1_coefficient": [...]}``) and return a pandas
    table: the grid values, final fvu / l0 / dead fraction / tokens per s, anything
    ``evaluate(sae)`` returns, and the SAE itself in column ``sae``. ``source`` is a store or
    a callable giving a fresh iterable of batches for each run."""
    import pandas as pd

    sae_fields = {f.name for f in dataclasses.fields(SAEConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(grid) - sae_fields - train_fields
    if unknown:
        raise ValueError(f"sweep grid keys {sorted(unknown)} are fields of neither SAEConfig nor TrainConfig")
    names = list(grid)
    points = [dict(zip(names, values)) for values in itertools.product(*(list(grid[n]) for n in names))]
    runs = {}
    for number, point in enumerate(points):
        changes = {k: v for k, v in point.items() if k in train_fields}
        if train_cfg.out_dir:  # one checkpoint folder per point
            changes["out_dir"] = str(Path(train_cfg.out_dir) / "_".join(f"{k}={v}" for k, v in point.items()))
        runs[number] = (dataclasses.replace(sae_cfg, **{k: v for k, v in point.items() if k in sae_fields}),
                        dataclasses.replace(train_cfg, progress=False, **changes))
    shared = {f: getattr(train_cfg, f) for f in _STREAM_FIELDS}
    if all(all(getattr(cfg, f) == shared[f] for f in _STREAM_FIELDS) for _, cfg in runs.values()):
        results = train_many(runs, source, device=device)  # one read of the data for every point
    else:  # points that change the batch stream: one read each
        results = {number: train_sae(sae, source, cfg, device=device) for number, (sae, cfg) in runs.items()}
    rows = []
    for number, point in enumerate(points):
        result = results[number]
        last = result.metrics.dropna(subset=["fvu"]).iloc[-1]
        row = {**point, "fvu": float(last.fvu), "l0": float(last.l0), "dead_fraction": result.dead_fraction,
               "tokens_per_s": result.tokens_per_s}
        if evaluate is not None:
            row.update(evaluate(result.sae))
        rows.append({**row, "sae": result.sae})
    return pd.DataFrame(rows)
