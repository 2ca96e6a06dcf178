"""Sparse autoencoders: the modules, their initialisation, and SAELens-compatible folders.

Every architecture shares the same parameters and the same encoder/decoder algebra::

    pre_BF     = (x_BD - b_dec) @ W_enc + b_enc          W_enc [d_in, d_sae]
    latents_BF = activation(pre_BF)                       ReLU | TopK | BatchTopK | JumpReLU
    recon_BD   = latents_BF @ W_dec + b_dec               W_dec [d_sae, d_in]

and differs only in the activation. A new variant is one subclass with ``@register``.
Training goes through ``train_forward``, which the sparse architectures implement with
``saelib.sparse_ops`` so that only the k active latents of each row cost anything past the
encoder's matmul.

Saving and loading SAELens folders lives in ``saelib.sae_io``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .sparse_ops import SparseCode, SparseDecode, SparseEncode, gather_dot, held_transposed

ARCHITECTURES: dict[str, type["SparseAutoencoder"]] = {}


def register(name: str):
    """Class decorator: make an architecture loadable and trainable under ``name``."""

    def add(cls):
        cls.architecture = name
        ARCHITECTURES[name] = cls
        return cls

    return add


@dataclass
class SAEConfig:
    """Shape and kind of an SAE; saved into ``cfg.json`` with SAELens's field names."""

    d_in: int
    """Length of the activation vectors (the hook's width)."""
    d_sae: int
    """Number of latents (dictionary size)."""
    architecture: str = "topk"
    """``relu`` (L1-penalised, SAELens "standard"), ``topk``, ``batchtopk`` or ``jumprelu``."""
    k: int = 32
    """Active latents per row for ``topk``; the average per row for ``batchtopk``."""
    model_name: str = ""
    """Model the activations came from (metadata)."""
    hook_name: str = ""
    """TransformerLens hook the activations came from (metadata)."""
    metadata: dict = field(default_factory=dict)
    """Free-form extras kept in ``cfg.json`` (training tokens, store fingerprint...)."""

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in}, {self.d_sae}")
        if self.architecture in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must be in 1..d_sae={self.d_sae}, got {self.k}")


class SAEOutput(NamedTuple):
    """Result of ``sae(x_BD)``."""

    recon_BD: torch.Tensor
    """Reconstruction of the input."""
    latents_BF: torch.Tensor
    """Latent activations (dense, mostly zeros)."""


class TrainOutput(NamedTuple):
    """What the trainer needs from one forward pass."""

    recon_BD: torch.Tensor
    """Reconstruction, with autograd."""
    dead_BK: tuple[torch.Tensor, torch.Tensor] | None
    """(pre-activations, latents) [B, K] of each row's ``aux_k`` largest dead latents, without
    autograd, for the AuxK loss; None when no latent is dead or none was asked for."""
    fired_F: torch.Tensor
    """bool [d_sae]: latents active on at least one row of the batch."""
    l0: torch.Tensor
    """Mean number of active latents per row (a float tensor, no autograd)."""
    l1_BF_sum: torch.Tensor
    """Sum of latent activations per row, averaged (with autograd for L1-penalised kinds)."""


def top_k_rows(pre_BF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pre_BF.topk(k, dim=-1)``: (values_BK, indices_BK), values descending, on a CPU in two
    smaller rankings. The latents are dealt into ``F / g`` strided groups (latent j joins
    j mod F/g) and the k groups with the largest maxima keep their g latents as candidates:
    every one of the k largest values lies in one of them (fewer than k other values exceed
    it, so fewer than k groups have a larger maximum than its group), so the top k of the
    candidates are the top k of the row, as a set of values; among equal values at the k-th
    place another index may be chosen. ``torch.topk`` copies each row into (value, index)
    pairs before partitioning it: at 512 x 4096 (k 32) it took 2.9 ms against 2.1 ms this
    way, at 512 x 16384 (k 64) 9.2 against 5.3 (issue 20's Xeon). Elsewhere it is
    ``torch.topk``: on a GPU and for rows too narrow for groups to pay.
    In float32 ties are rare, so the latents are ``torch.topk``'s. In bf16 (8 bits of
    mantissa) equal values at the k-th place are common and the two may choose different
    latents among them; either choice is as good (equal FVU after training), but the SAE
    differs in detail, as it does with any change to training."""
    F = pre_BF.shape[-1]
    g = next((g for g in (16, 8) if F % g == 0 and F // g >= 4 * k), None)
    if g is None or pre_BF.device.type != "cpu" or pre_BF.ndim != 2 or not pre_BF.dtype.is_floating_point:
        return pre_BF.topk(k, dim=-1)
    B, G = pre_BF.shape[0], F // g
    strided_BgG = pre_BF.reshape(B, g, G)  # [b, t, j] is latent t * G + j
    groups_BK = strided_BgG.amax(1).topk(k, dim=-1, sorted=False).indices
    candidates_BgK = strided_BgG.gather(2, groups_BK.unsqueeze(1).expand(B, g, k))
    values_BK, at_BK = candidates_BgK.reshape(B, g * k).topk(k, dim=-1)
    return values_BK, groups_BK.gather(1, at_BK % k) + (at_BK // k) * G


def top_dead(pre_BF: torch.Tensor, dead_F: torch.Tensor | None, aux_k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values, latents) [B, min(aux_k, dead)] of each row's largest pre-activations among the
    latents ``dead_F`` marks; None when there are none to pick (no AuxK this step)."""
    pick = dead_picker(dead_F, aux_k)
    return None if pick is None else pick(pre_BF)


def dead_picker(dead_F: torch.Tensor | None, aux_k: int):
    """A function ``pre_BF -> top_dead(pre_BF, dead_F, aux_k)`` for many blocks of rows with one
    set of dead latents; None when there are none to pick. It ranks a copy of the dead
    latents' columns only ([B, n_dead]), not a masked copy of every column: at 512 x 4096
    with 1-45% dead that is 2-10x faster, as fast as the main top-k or faster."""
    n_dead = 0 if dead_F is None else int(dead_F.sum())
    if n_dead == 0 or aux_k == 0:
        return None
    n, dead_latents = min(aux_k, n_dead), dead_F.nonzero().squeeze(1)

    def pick(pre_BF):
        values_BK, where_BK = pre_BF.index_select(1, dead_latents).topk(n, dim=-1)
        return values_BK, dead_latents[where_BK]
    return pick


class SparseAutoencoder(nn.Module):
    """Base class: parameters, encoder/decoder algebra, decoder-norm helpers, save.

    ``W_enc`` is [d_in, d_sae] (SAELens's layout) but its memory holds d_sae rows of d_in,
    so it is not contiguous: indexing, products, ``.reshape``, ``.detach().numpy()`` and
    ``state_dict()`` work as usual, ``W_enc.view(...)`` raises, and so does
    ``torch.nn.utils.parameters_to_vector(sae.parameters())`` (it views each parameter);
    use ``torch.cat([p.reshape(-1) for p in sae.parameters()])`` or ``W_enc.contiguous()``
    there. ``W_enc.T`` is contiguous."""

    architecture = "base"
    trains = True  # False for inference-only kinds (JumpReLU loaded from SAELens)

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        D, F = cfg.d_in, cfg.d_sae
        # [d_in, d_sae] as everywhere (SAELens's layout, x @ W_enc), held in memory as d_sae rows
        # of d_in (nn.Linear's layout): a TopK step reads W_enc by latent (the selected entries'
        # values) and makes its gradient by latent, and at 512 x 16384 each of those two
        # transposes took 21 ms of a 255 ms step. ``W_enc.T`` is that memory, contiguous.
        self.W_enc = nn.Parameter(torch.zeros(F, D).T)
        self.b_enc = nn.Parameter(torch.zeros(F))
        self.W_dec = nn.Parameter(torch.zeros(F, D))
        self.b_dec = nn.Parameter(torch.zeros(D))
        init_tied_(self)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # state_dict() gives W_enc laid out as it reads, [d_in, d_sae] row by row, as before
        # it was held as d_sae rows: checkpoints keep their bytes, and safetensors takes it.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars and prefix + "W_enc" in destination:
            destination[prefix + "W_enc"] = destination[prefix + "W_enc"].contiguous()

    # -- the algebra ----------------------------------------------------------------------
    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations: [..., d_in] -> [..., d_sae]."""
        self._check_width(x_BD)
        if x_BD.ndim == 2:  # the bias add fused into the matmul: a full pass over [B, d_sae] saved
            return torch.addmm(self.b_enc, x_BD - self.b_dec, self.W_enc)
        return (x_BD - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre_BF: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Latent activations: [..., d_in] -> [..., d_sae]."""
        return self.activation(self.pre_acts(x_BD))

    def decode(self, latents_BF: torch.Tensor) -> torch.Tensor:
        """Reconstruction: [..., d_sae] -> [..., d_in]."""
        return latents_BF @ self.W_dec + self.b_dec

    def forward(self, x_BD: torch.Tensor) -> SAEOutput:
        latents_BF = self.encode(x_BD)
        return SAEOutput(self.decode(latents_BF), latents_BF)

    def train_forward(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None = None, aux_k: int = 0) -> TrainOutput:
        """Dense default: plain autograd through ``encode`` and ``decode``. ``dead_F`` (bool
        [d_sae]) and ``aux_k``: also pick each row's ``aux_k`` largest dead latents for AuxK."""
        pre_BF = self.pre_acts(x_BD)
        latents_BF = self.activation(pre_BF)
        active_BF = latents_BF > 0
        return TrainOutput(
            recon_BD=self.decode(latents_BF),
            dead_BK=top_dead(pre_BF.detach(), dead_F, aux_k),
            fired_F=active_BF.any(0),
            l0=active_BF.sum(-1).float().mean(),
            l1_BF_sum=latents_BF.sum(-1).mean(),
        )

    def _sparse_train_forward(self, x_BD, pre_N, code: SparseCode, dead_BK) -> TrainOutput:
        """Training forward pass through the entries of ``code`` alone (``pre_N`` their
        detached pre-activations; an entry at 0 neither fires nor learns). Gradients equal
        the dense pass's whenever every other latent is inactive."""
        values_N = torch.relu(SparseEncode.apply(pre_N, code, x_BD, self.b_dec, self.W_enc, self.b_enc))
        recon_BD = SparseDecode.apply(values_N, code, self.W_dec) + self.b_dec
        active_N = values_N.detach() > 0
        B = x_BD.shape[0]
        return TrainOutput(recon_BD, dead_BK, code.fired(active_N), active_N.sum().float() / B, values_N.sum() / B)

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"d_in mismatch: this SAE takes vectors of length {self.cfg.d_in} "
                f"({self.cfg.hook_name or 'its hook'}), got length {x.shape[-1]}"
            )

    # -- decoder norms -------------------------------------------------------------------
    @torch.no_grad()
    def unit_norm_decoder_(self) -> None:
        """Scale every decoder row (dictionary atom) to unit L2 norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the part of each decoder row's gradient along the row, so an optimiser step
        moves atoms along the unit sphere (to first order) instead of growing them."""
        if self.W_dec.grad is None:
            return
        # g -= (g . w / |w|^2) w, a block of rows at a time: the temporaries stay about 1 MiB,
        # in the cache and reused, where whole [d_sae, d_in] ones (32 MiB at 16384 x 512)
        # were page-faulted in afresh on every step (saelib.allocator) and took 20 ms of 260.
        W_FD, grad_FD = self.W_dec, self.W_dec.grad
        rows = max(1, (1 << 18) // W_FD.shape[1])
        for lo in range(0, W_FD.shape[0], rows):
            w, g = W_FD[lo : lo + rows], grad_FD[lo : lo + rows]
            along = (g * w).sum(dim=1) / w.norm(dim=1).clamp_min(1e-8).square()
            g.addcmul_(w, along.unsqueeze(1), value=-1)

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Turn an SAE trained on ``x * scale`` into one that takes raw ``x`` and returns
        raw reconstructions (encoder scaled up, decoder and b_dec scaled down)."""
        self.W_enc *= scale
        self.W_dec /= scale
        self.b_dec /= scale

    # -- save -------------------------------------------------------------------------------
    def saved_architecture(self) -> str:
        """Architecture written to ``cfg.json`` (BatchTopK is saved as its JumpReLU form)."""
        return self.architecture

    def save(self, folder: str | Path) -> Path:
        """Write a SAELens folder (``saelib.sae_io.save_sae``) and return its path."""
        from .sae_io import save_sae

        return save_sae(self, folder)

    def weights_to_save(self) -> dict[str, torch.Tensor]:
        return {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}

    def extra_repr(self) -> str:
        return f"{self.architecture}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}" + (
            f", k={self.cfg.k}" if self.architecture in ("topk", "batchtopk") else ""
        )


@register("relu")
class ReluSAE(SparseAutoencoder):
    """ReLU latents, trained with an L1 penalty (Cunningham et al. 2023). Decoder atoms
    are kept at unit norm during training, so the penalty cannot be dodged by shrinking
    latents and growing atoms."""

    sparse_density_limit = 1 / 8
    """Above this share of active (row, latent) entries in a batch, the dense pass is faster
    (measured at 256 x 4096, batch 4096, 2-core CPU: the two cost the same near 0.14)."""

    def activation(self, pre_BF):
        return torch.relu(pre_BF)

    def train_forward(self, x_BD, dead_F=None, aux_k=0):
        # Once trained, ReLU codes are sparse too: then only the active entries are touched,
        # however unevenly they spread over rows (a few rows often fire a third of all latents).
        with torch.no_grad():
            pre_BF = self.pre_acts(x_BD)
            active_BF = pre_BF > 0
            n_active = int(active_BF.sum())
        if n_active > self.sparse_density_limit * pre_BF.numel() or n_active == 0:
            return super().train_forward(x_BD, dead_F, aux_k)
        with torch.no_grad():
            code, pre_N = SparseCode.from_mask(active_BF, pre_BF)
            dead_BK = top_dead(pre_BF, dead_F, aux_k)
        return self._sparse_train_forward(x_BD, pre_N, code, dead_BK)


@register("topk")
class TopKSAE(SparseAutoencoder):
    """The k largest pre-activations of each row pass (through a ReLU); the rest are zero
    (Gao et al. 2024). Sparsity is set by ``k``, no penalty needed."""

    def activation(self, pre_BF):
        values_BK, indices_BK = pre_BF.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre_BF).scatter_(-1, indices_BK, torch.relu(values_BK))

    block_rows = 512
    """Rows per block of the training encoder: the [B, d_sae] pre-activations are never held
    whole (64 MB at 4096 x 4096, 256 MB at 16384), and a block is still in cache when the
    top-k reads it (matmul + top-k at 4096 x 256 x 4096 on a 2-core CPU: 105 ms by blocks,
    114 ms whole)."""
    select_dtype = torch.float32
    """Precision of the selection matmul in training (``TrainConfig.encoder_dtype``, set by
    the trainer); the selected entries' values are recomputed in fp32 whatever it is."""
    dense_kernels = False
    """Train through plain dense autograd instead of the sparse kernels (``TrainConfig.kernels``,
    set by the trainer: faster on some GPUs, never on a CPU; ``saelib.kernels``)."""

    def select(self, pre_BF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values_BK, indices_BK) of the latents that may fire, from detached pre-activations."""
        return pre_BF.topk(self.cfg.k, dim=-1)

    @torch.no_grad()
    def select_by_blocks(self, x_BD: torch.Tensor, dead_F: torch.Tensor | None = None, aux_k: int = 0):
        """``select(pre_acts(x_BD))`` and ``top_dead`` of the same pre-activations, computed
        ``block_rows`` rows at a time without ever holding all [B, d_sae] of them:
        ((values_BK, indices_BK), dead_BK or None). With a ``select_dtype`` below fp32 the
        matmul runs in it to choose the entries, and their values are then computed in fp32."""
        B, F = x_BD.shape[0], self.cfg.d_sae
        pick_dead = dead_picker(dead_F, aux_k)
        n_aux = 0 if pick_dead is None else min(aux_k, int(dead_F.sum()))
        dtype = self.select_dtype
        centred_BD = x_BD - self.b_dec
        values_BK = torch.empty(B, self.cfg.k, dtype=dtype, device=x_BD.device)
        indices_BK = torch.empty(B, self.cfg.k, dtype=torch.int64, device=x_BD.device)
        if n_aux:
            dead_values_BK = torch.empty(B, n_aux, dtype=dtype, device=x_BD.device)
            dead_indices_BK = torch.empty(B, n_aux, dtype=torch.int64, device=x_BD.device)
        inputs_BD, W_enc_DF, b_enc_F = (t.to(dtype) for t in (centred_BD, self.W_enc, self.b_enc))
        block = torch.empty(min(B, self.block_rows), F, dtype=dtype, device=x_BD.device)
        for start in range(0, B, self.block_rows):
            rows = slice(start, min(start + self.block_rows, B))
            pre = torch.addmm(b_enc_F, inputs_BD[rows], W_enc_DF, out=block[: rows.stop - start])
            values_BK[rows], indices_BK[rows] = top_k_rows(pre, self.cfg.k)
            if n_aux:
                dead_values_BK[rows], dead_indices_BK[rows] = pick_dead(pre)
        if dtype != torch.float32:
            W_enc_FD = self._encoder_rows()
            values_BK, indices_BK = self._fp32_pre_acts(centred_BD, indices_BK, W_enc_FD)
            if n_aux:
                dead_values_BK, dead_indices_BK = self._fp32_pre_acts(centred_BD, dead_indices_BK, W_enc_FD)
        return (values_BK, indices_BK), ((dead_values_BK, dead_indices_BK) if n_aux else None)

    def _encoder_rows(self) -> torch.Tensor:
        """W_enc as [d_sae, d_in] rows (``gather_dot`` needs that layout): the parameter's
        own memory, as ``SparseAutoencoder`` lays it out, else (a parameter replaced by one
        laid out otherwise) a copy into a buffer this SAE keeps between steps
        (12 ms into fresh memory, 7 ms into the kept buffer, at 512 x 16384)."""
        W_enc = self.W_enc.detach()
        if held_transposed(W_enc):
            return W_enc.T
        buffer = self.__dict__.get("_W_enc_FD")
        if buffer is None or (buffer.shape, buffer.dtype, buffer.device) != (W_enc.T.shape, W_enc.dtype, W_enc.device):
            buffer = torch.empty(W_enc.T.shape, dtype=W_enc.dtype, device=W_enc.device)
            self.__dict__["_W_enc_FD"] = buffer  # a plain attribute: not a parameter, not saved
        return buffer.copy_(W_enc.T)

    def _fp32_pre_acts(self, centred_BD: torch.Tensor, indices_BK: torch.Tensor,
                       W_enc_FD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries ``indices_BK`` chose, each row's sorted by latent, with their values
        ``(centred_BD @ W_enc + b_enc)[b, latent]`` computed in fp32 at those entries only:
        (values_BK, latents_BK); ``W_enc_FD``: ``_encoder_rows()``. Sorted, they are the
        order ``SparseCode.from_rows`` keeps, so the step's code is built without sorting
        them a second time."""
        latent_BK = indices_BK.sort(dim=1).values
        code = SparseCode.of_sorted_rows(latent_BK, self.cfg.d_sae)
        dots_N = gather_dot(centred_BD, W_enc_FD, code) + self.b_enc[code.latent_N]
        return dots_N.view(latent_BK.shape), latent_BK

    def train_forward(self, x_BD, dead_F=None, aux_k=0):
        self._check_width(x_BD)
        if x_BD.ndim != 2:
            raise ValueError(f"train_forward takes a [batch, d_in] batch, got shape {tuple(x_BD.shape)}")
        if self.dense_kernels:
            return super().train_forward(x_BD, dead_F, aux_k)
        selected, dead_BK = self.select_by_blocks(x_BD, dead_F, aux_k)
        with torch.no_grad():
            code, pre_N = SparseCode.from_rows(*selected, self.cfg.d_sae)
        return self._sparse_train_forward(x_BD, pre_N, code, dead_BK)


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """The ``k * batch`` largest pre-activations of the whole batch pass, so rows may use
    more or fewer than k latents (Bussmann et al. 2024). Inference sees one row at a time,
    so training also learns one threshold: an exponential moving average (rate
    ``threshold_lr``) of the smallest positive activation let through per batch, started
    at the first batch's value, as in SAELens and dictionary_learning. Eval-mode
    ``encode`` is then a JumpReLU with that threshold, and the SAE is saved as one."""

    threshold_lr = 0.01
    """EMA rate of the threshold (SAELens's default; dictionary_learning uses 0.001)."""
    batch_group = None
    """The ranks sharing each batch (``saelib.distributed.Group``) when several processes
    train it: the cut-off and the threshold are then the global batch's. None: this process."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_started", torch.zeros((), dtype=torch.bool))

    def activation(self, pre_BF):
        return pre_BF * (pre_BF > self.threshold)

    def select(self, pre_BF):
        """(values_BK, indices_BK) of the batch's k * B largest pre-activations, laid out per
        row (``width`` = the most any row has); slots a row does not use hold 0. Pure:
        the threshold is updated by ``train_forward``."""
        flat = pre_BF.reshape(-1)
        group = self.batch_group
        if group is None or group.world == 1:
            n_keep = min(self.cfg.k * pre_BF.shape[0], flat.numel())
            cutoff = flat.kthvalue(flat.numel() - n_keep + 1).values
        else:
            # The global top k * B lie within the union of every rank's own top k * B.
            n_keep = min(self.cfg.k * pre_BF.shape[0] * group.world, flat.numel() * group.world)
            candidates = group.gather_cat(flat.topk(min(n_keep, flat.numel())).values)
            cutoff = candidates.kthvalue(candidates.numel() - n_keep + 1).values
        width = max(1, int((pre_BF >= cutoff).sum(-1).max()))
        values_BK, indices_BK = pre_BF.topk(width, dim=-1)
        # ReLU passes no gradient at 0, so zeroed slots neither fire nor learn.
        return values_BK * (values_BK >= cutoff), indices_BK

    @torch.no_grad()
    def update_threshold_(self, kept_BK: torch.Tensor) -> None:
        """Move the threshold towards the smallest positive value in ``kept_BK``."""
        positive = kept_BK[kept_BK > 0]
        if self.batch_group is not None and self.batch_group.world > 1:
            local = positive.min() if positive.numel() else kept_BK.new_tensor(float("inf"))
            smallest = self.batch_group.min_(local.reshape(1).float())[0]
            if not torch.isfinite(smallest):
                return
            smallest = smallest.to(self.threshold.dtype)
        elif positive.numel() == 0:
            return
        else:
            smallest = positive.min().to(self.threshold.dtype)
        if bool(self.threshold_started):
            self.threshold.lerp_(smallest, self.threshold_lr)
        else:
            self.threshold.copy_(smallest)
            self.threshold_started.fill_(True)

    def train_forward(self, x_BD, dead_F=None, aux_k=0):
        # The batch-wide cutoff needs every pre-activation at once: no blocks here.
        self._check_width(x_BD)
        with torch.no_grad():
            pre_BF = self.pre_acts(x_BD)
            pre_BK, indices_BK = self.select(pre_BF)
            code, pre_N = SparseCode.from_rows(pre_BK, indices_BK, self.cfg.d_sae)
            dead_BK = top_dead(pre_BF, dead_F, aux_k)
        if self.training:
            self.update_threshold_(pre_BK)
        return self._sparse_train_forward(x_BD, pre_N, code, dead_BK)

    def saved_architecture(self) -> str:
        return "jumprelu"

    def weights_to_save(self):
        return {**super().weights_to_save(), "threshold": self.threshold.expand(self.cfg.d_sae)}


@register("jumprelu")
class JumpReluSAE(SparseAutoencoder):
    """Latents pass where the pre-activation exceeds a per-latent threshold. Loaded from
    SAELens folders and from saved BatchTopK SAEs; not trained here."""

    trains = False

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae), requires_grad=False)

    def activation(self, pre_BF):
        return torch.relu(pre_BF) * (pre_BF > self.threshold)

    def weights_to_save(self):
        return {**super().weights_to_save(), "threshold": self.threshold}


# -- initialisation --------------------------------------------------------------------------
_INIT_SEED_OFFSET = 0x5AE_1B
@torch.no_grad()
def init_tied_(sae: SparseAutoencoder, seed: int = 0) -> None:
    """Random unit-norm atoms, encoder = decoderᵀ (Gao et al.), zero biases."""
    # Offset so the atoms never replay another draw made with the same small seed (toy
    # features seeded 0 would otherwise *be* the first atoms).
    generator = torch.Generator().manual_seed(_INIT_SEED_OFFSET + seed)
    atoms_FD = torch.randn(sae.cfg.d_sae, sae.cfg.d_in, generator=generator)
    _set_tied_(sae, atoms_FD)


@torch.no_grad()
def init_from_data_(sae: SparseAutoencoder, sample_ND: torch.Tensor, seed: int = 0) -> None:
    """Atoms drawn from data vectors (centred on b_dec), encoder tied: each latent starts
    out as a direction the data really takes. ``sample_ND`` needs at least one row; rows
    are reused (with a little noise) when it has fewer than d_sae."""
    sae._check_width(sample_ND)
    generator = torch.Generator().manual_seed(_INIT_SEED_OFFSET + seed)
    picks = torch.randint(len(sample_ND), (sae.cfg.d_sae,), generator=generator)
    if len(sample_ND) >= sae.cfg.d_sae:
        picks = torch.randperm(len(sample_ND), generator=generator)[: sae.cfg.d_sae]
    atoms_FD = sample_ND[picks].float() - sae.b_dec.detach().cpu()
    atoms_FD += 1e-3 * atoms_FD.norm(dim=1, keepdim=True) * torch.randn(atoms_FD.shape, generator=generator)
    _set_tied_(sae, atoms_FD)


def _set_tied_(sae: SparseAutoencoder, atoms_FD: torch.Tensor) -> None:
    atoms_FD = atoms_FD / atoms_FD.norm(dim=1, keepdim=True).clamp_min(1e-8)
    sae.W_dec.copy_(atoms_FD)
    sae.W_enc.copy_(atoms_FD.T)
    sae.b_enc.zero_()


def geometric_median(points_ND: torch.Tensor, iterations: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """The point minimising the sum of distances to ``points_ND`` (Weiszfeld): [D].
    Less pulled by outliers than the mean, the usual starting b_dec."""
    points = points_ND.double()
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-12)
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        moved = (updated - median).norm() / median.norm().clamp_min(1e-12)
        median = updated
        if moved < tol:
            break
    return median.to(points_ND.dtype)


@torch.no_grad()
def init_b_dec_(sae: SparseAutoencoder, sample_ND: torch.Tensor, method: str = "geometric_median") -> None:
    """Set b_dec from data: ``geometric_median``, ``mean`` or ``zeros``."""
    sae._check_width(sample_ND)
    if method == "geometric_median":
        sae.b_dec.copy_(geometric_median(sample_ND.float()))
    elif method == "mean":
        sae.b_dec.copy_(sample_ND.float().mean(0))
    elif method == "zeros":
        sae.b_dec.zero_()
    else:
        raise ValueError(f"b_dec init must be 'geometric_median', 'mean' or 'zeros', not {method!r}")


# -- construction -------------------------------------------------------------
def make_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """A freshly initialised SAE of ``cfg.architecture``."""
    return ARCHITECTURES[cfg.architecture](cfg)
