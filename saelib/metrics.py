"""How good is an SAE: reconstruction, sparsity, and the model's own loss with the SAE spliced in.

Shapes: ``x_ND`` inputs, ``recon_ND`` reconstructions, ``latents_NF`` latent activations,
``tokens_NL`` token windows, ``logits_NLV`` model outputs.

- Per-batch metrics (``fvu``, ``cosine_similarity``, ...) are plain functions of tensors.
- ``reconstruction_metrics`` streams an SAE over a store's held-out vectors.
- ``downstream_losses`` runs the model clean, with the SAE spliced in, and with the hook
  zero- and mean-ablated: CE loss recovered and KL divergence to the clean model.
- ``evaluate`` does both and returns one tidy pandas row, so tables are one ``pd.concat``.
- ``pareto_frontier`` and ``interpolate_at`` compare SAEs along the L0–FVU trade-off.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .splice import ablation_hook, sae_hook
from .threads import follow_load

# -- per-batch metrics --------------------------------------------------------------------


def mse(x_ND: torch.Tensor, recon_ND: torch.Tensor) -> float:
    """Mean squared error per vector (summed over dimensions, averaged over rows)."""
    return float((recon_ND.double() - x_ND.double()).pow(2).sum(-1).mean())


def variance_per_vector(x_ND: torch.Tensor) -> torch.Tensor:
    """Mean squared distance of the rows from their mean (a 0-dim tensor, keeps dtype and
    autograd): the denominator of every FVU in saelib, so all of them mean the same."""
    return (x_ND - x_ND.mean(0)).pow(2).sum(-1).mean()


def fvu(x_ND: torch.Tensor, recon_ND: torch.Tensor) -> float:
    """Fraction of variance unexplained: squared error over the inputs' total variance
    around their mean (0: perfect; 1: no better than predicting the mean)."""
    x = x_ND.double()
    return float((recon_ND.double() - x).pow(2).sum(-1).mean() / variance_per_vector(x).clamp_min(1e-30))


def cosine_similarity(x_ND: torch.Tensor, recon_ND: torch.Tensor) -> float:
    """Mean cosine between each input and its reconstruction."""
    return float(torch.nn.functional.cosine_similarity(x_ND.double(), recon_ND.double(), dim=-1).mean())


def l2_ratio(x_ND: torch.Tensor, recon_ND: torch.Tensor) -> float:
    """Mean ‖x̂‖ / ‖x‖: below 1 means the SAE shrinks its outputs (the L1 penalty's bias)."""
    return float((recon_ND.double().norm(dim=-1) / x_ND.double().norm(dim=-1).clamp_min(1e-30)).mean())


def l0(latents_NF: torch.Tensor) -> float:
    """Mean number of active (nonzero) latents per vector."""
    return float((latents_NF != 0).sum(-1).float().mean())


def l1(latents_NF: torch.Tensor) -> float:
    """Mean sum of absolute latent activations per vector."""
    return float(latents_NF.double().abs().sum(-1).mean())


def firing_frequency(latents_NF: torch.Tensor) -> torch.Tensor:
    """Share of vectors on which each latent is active: [F] float64."""
    return (latents_NF != 0).double().mean(0)


def dead_fraction(frequency_F: torch.Tensor) -> float:
    """Share of latents that never fired."""
    return float((frequency_F == 0).double().mean())


def dense_fraction(frequency_F: torch.Tensor, threshold: float = 0.1) -> float:
    """Share of latents firing on more than ``threshold`` of vectors (too dense to be a feature)."""
    return float((frequency_F > threshold).double().mean())


def log10_density(frequency_F: torch.Tensor, floor: float = 1e-10) -> torch.Tensor:
    """log10 of the firing frequency, with never-firing latents at log10(``floor``): [F]."""
    return frequency_F.double().clamp_min(floor).log10()


# -- streaming over held-out vectors ------------------------------------------------------


class ReconstructionMetrics(NamedTuple):
    """Reconstruction and sparsity of an SAE over a set of vectors."""

    mse: float
    fvu: float
    cosine: float
    l2_ratio: float
    l0: float
    l1: float
    dead_fraction: float
    """Share of latents that never fired on these vectors."""
    dense_fraction: float
    """Share of latents firing on more than ``dense_threshold`` of them."""
    n_rows: int
    frequency_F: torch.Tensor
    """Firing frequency per latent [d_sae] (float64): for density histograms."""


@torch.no_grad()
def reconstruction_metrics(sae, store, n_rows: int | None = None, batch_size: int = 8192,
                           dense_threshold: float = 0.1, skip_special: bool = True) -> ReconstructionMetrics:
    """Run ``sae`` over the first ``n_rows`` rows (all by default) of an ``ActivationStore``
    (or any [N, d_in] tensor), in order, accumulating every metric exactly as if computed
    on all rows at once. ``skip_special``: leave out store rows at special tokens
    (``ActivationStore.special_rows``), the convention of training; ``n_rows`` counts the
    rows read, ``ReconstructionMetrics.n_rows`` those evaluated."""
    read = len(store) if n_rows is None else min(n_rows, len(store))
    if read == 0:
        raise ValueError("no rows to evaluate on: the store is empty")
    device = sae.W_enc.device
    total = 0
    sums = dict(sse=0.0, cos=0.0, ratio=0.0, l0=0.0, l1=0.0, sq=0.0)
    sum_D = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=device)
    fired_F = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=device)
    for start in range(0, read, batch_size):
        stop = min(read, start + batch_size)
        x_ND = _rows(store, start, stop)
        if skip_special and hasattr(store, "special_rows"):
            x_ND = x_ND[torch.from_numpy(~store.special_rows(start, stop))]
        x_ND = x_ND.to(device)
        recon_ND, latents_NF = sae(x_ND)
        n = len(x_ND)
        total += n
        sums["sse"] += mse(x_ND, recon_ND) * n
        sums["cos"] += cosine_similarity(x_ND, recon_ND) * n
        sums["ratio"] += l2_ratio(x_ND, recon_ND) * n
        sums["l0"] += l0(latents_NF) * n
        sums["l1"] += l1(latents_NF) * n
        sums["sq"] += float(x_ND.double().pow(2).sum())
        sum_D += x_ND.double().sum(0)
        fired_F += (latents_NF != 0).double().sum(0)
    variance_total = sums["sq"] - float(sum_D.pow(2).sum()) / total
    frequency_F = (fired_F / total).cpu()
    return ReconstructionMetrics(
        mse=sums["sse"] / total,
        fvu=sums["sse"] / max(variance_total, 1e-30),
        cosine=sums["cos"] / total,
        l2_ratio=sums["ratio"] / total,
        l0=sums["l0"] / total,
        l1=sums["l1"] / total,
        dead_fraction=dead_fraction(frequency_F),
        dense_fraction=dense_fraction(frequency_F, dense_threshold),
        n_rows=total,
        frequency_F=frequency_F,
    )


def _rows(source, start: int, stop: int) -> torch.Tensor:
    return source.rows(start, stop) if hasattr(source, "rows") else source[start:stop].float()


# -- the model's loss with the SAE spliced in ----------------------------------------------


def token_losses(logits_NLV: torch.Tensor, tokens_NL: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at every position but the last: [N, L-1] (nats)."""
    log_probs = logits_NLV[:, :-1].float().log_softmax(-1)
    return -log_probs.gather(-1, tokens_NL[:, 1:, None]).squeeze(-1)


def kl_divergence(clean_logits_NLV: torch.Tensor, logits_NLV: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ other) of the next-token distributions at every position: [N, L] (nats)."""
    clean = clean_logits_NLV.float().log_softmax(-1)
    other = logits_NLV.float().log_softmax(-1)
    return (clean.exp() * (clean - other)).sum(-1)


class DownstreamLoss(NamedTuple):
    """The model's next-token loss on the same tokens under each intervention at one hook."""

    ce_clean: float
    ce_spliced: float
    """With the SAE's reconstruction in place of the activation (no error term)."""
    ce_zero: float
    """With the activation set to zero."""
    ce_mean: float
    """With the activation set to its mean."""
    ce_recovered: float
    """(ce_zero − ce_spliced) / (ce_zero − ce_clean): 1 when splicing costs nothing, 0 when
    it is as bad as zero-ablation."""
    ce_recovered_vs_mean: float
    """The same against mean-ablation, a stricter baseline."""
    kl_spliced: float
    """Mean KL(clean ‖ spliced) of the next-token distributions, over the same predictions."""
    kl_zero: float
    """Mean KL(clean ‖ zero-ablated), likewise."""
    n_tokens: int
    """Predictions averaged over (every position but the last)."""


def recovered(ce_ablated: float, ce_spliced: float, ce_clean: float) -> float:
    """Share of the ablation's loss increase that the spliced model avoids."""
    gap = ce_ablated - ce_clean
    return float("nan") if abs(gap) < 1e-12 else (ce_ablated - ce_spliced) / gap


@torch.no_grad()
def downstream_losses(model, tokens_NL: torch.Tensor, sae, hook_name: str | None = None,
                      mean_D: torch.Tensor | None = None, batch_size: int = 32, skip_bos: bool = True,
                      skip_special: bool = True) -> DownstreamLoss:
    """CE loss and KL of ``model`` on ``tokens_NL`` clean, with ``sae`` spliced in at
    ``hook_name`` (default ``sae.cfg.hook_name``) and with the hook zero- or mean-ablated.
    ``mean_D``: the hook's mean activation (default: measured on these tokens).

    Conventions: the SAE and the ablations replace every position except BOS
    (``skip_bos``) and special tokens (``skip_special``: mid-sequence ``<|endoftext|>``,
    which training leaves out; SAELens's ``ignore_tokens`` does the same); CE and KL are
    averaged over every prediction (all positions but the last), special ones included."""
    from .data import special_token_ids
    from .models import check_hook_name
    from .splice import Untouched

    hook_name = check_hook_name(model, hook_name or sae.cfg.hook_name)
    device = next(model.parameters()).device
    if mean_D is None:
        mean_D = hook_mean(model, tokens_NL, hook_name, batch_size)
    special = torch.tensor(special_token_ids(model) if skip_special else [], dtype=torch.long)
    untouched = Untouched()
    interventions = {
        "spliced": sae_hook(sae, skip_bos=skip_bos, untouched=untouched),
        "zero": ablation_hook("zero", skip_bos=skip_bos, untouched=untouched),
        "mean": ablation_hook("mean", mean_D, skip_bos=skip_bos, untouched=untouched),
    }
    ce = dict.fromkeys(["clean", *interventions], 0.0)
    kl = {"spliced": 0.0, "zero": 0.0}
    n_predictions = 0
    with follow_load(device=device) as load:
        for start in range(0, len(tokens_NL), batch_size):
            batch = tokens_NL[start : start + batch_size].to(device)
            untouched.BL = torch.isin(batch, special.to(device)) if len(special) else None
            clean = model(batch)
            ce["clean"] += float(token_losses(clean, batch).double().sum())
            for name, hook_fn in interventions.items():
                logits = model.run_with_hooks(batch, fwd_hooks=[(hook_name, hook_fn)])
                ce[name] += float(token_losses(logits, batch).double().sum())
                if name in kl:
                    kl[name] += float(kl_divergence(clean[:, :-1], logits[:, :-1]).double().sum())
            n_predictions += batch.shape[0] * (batch.shape[1] - 1)
            load.lap()
    ce = {name: total / n_predictions for name, total in ce.items()}
    return DownstreamLoss(
        ce_clean=ce["clean"], ce_spliced=ce["spliced"], ce_zero=ce["zero"], ce_mean=ce["mean"],
        ce_recovered=recovered(ce["zero"], ce["spliced"], ce["clean"]),
        ce_recovered_vs_mean=recovered(ce["mean"], ce["spliced"], ce["clean"]),
        kl_spliced=kl["spliced"] / n_predictions, kl_zero=kl["zero"] / n_predictions, n_tokens=n_predictions,
    )


@torch.no_grad()
def hook_mean(model, tokens_NL: torch.Tensor, hook_name: str, batch_size: int = 32) -> torch.Tensor:
    """Mean activation of ``hook_name`` over every position of ``tokens_NL`` but BOS: [d_in]."""
    from .harvest import stop_layer

    total, count = None, 0
    device = next(model.parameters()).device
    with follow_load(device=device) as load:
        for start in range(0, len(tokens_NL), batch_size):
            _, cache = model.run_with_cache(tokens_NL[start : start + batch_size].to(device), names_filter=hook_name,
                                            stop_at_layer=stop_layer(model, [hook_name]))
            x = cache[hook_name][:, 1:].reshape(-1, cache[hook_name][0, 0].numel()).double()
            total = x.sum(0) if total is None else total + x.sum(0)
            count += len(x)
            load.lap()
    return (total / count).float()


# -- one call -------------------------------------------------------------------------------


CONVENTIONS = ("BOS never replaced or counted (harvested without it); special tokens (mid-sequence "
               "<|endoftext|>) left out of reconstruction metrics and not replaced when spliced; CE and KL "
               "averaged over every prediction")
"""What every number of ``evaluate`` assumes, written beside it (column ``conventions``)."""
CONVENTIONS_SPECIAL_KEPT = ("BOS never replaced or counted (harvested without it); special tokens kept like any "
                            "other token; CE and KL averaged over every prediction")
"""The same with ``skip_special=False``."""


def evaluate(sae, model, store, name: str | None = None, n_rows: int | None = 200_000,
             n_ce_contexts: int = 64, mean_D: torch.Tensor | None = None, batch_size: int = 32,
             skip_special: bool = True):
    """One tidy row (a pandas DataFrame) describing ``sae`` on held-out data.

    ``store``: an ``ActivationStore`` of held-out activations at the SAE's hook; its first
    ``n_rows`` rows give the reconstruction metrics and its first ``n_ce_contexts`` token
    windows (``store.contexts()``) the downstream losses. ``mean_D`` for mean-ablation
    defaults to the store's mean. ``skip_special=False`` keeps special-token positions
    everywhere; the row's ``conventions`` column says which was used.
    """
    import pandas as pd

    hook_name = sae.cfg.hook_name or store.hook
    store.require(d_in=sae.cfg.d_in, hook=hook_name, model=model)  # the store must come from this model
    recon = reconstruction_metrics(sae, store, n_rows, skip_special=skip_special)
    tokens_NL = torch.from_numpy(np.asarray(store.contexts()[:n_ce_contexts]).astype(np.int64))
    loss = downstream_losses(model, tokens_NL, sae, hook_name, store.mean if mean_D is None else mean_D, batch_size,
                             skip_bos=store.manifest.first_position == 1, skip_special=skip_special)
    cfg = sae.cfg
    row = {
        "name": name or cfg.metadata.get("name", cfg.architecture),
        "architecture": cfg.architecture,
        "hook": hook_name,
        "d_sae": cfg.d_sae,
        "k": cfg.k if cfg.architecture in ("topk", "batchtopk") else math.nan,
        **{f: getattr(recon, f) for f in ReconstructionMetrics._fields if f != "frequency_F"},
        **loss._asdict(),
        "conventions": CONVENTIONS if skip_special else CONVENTIONS_SPECIAL_KEPT,
    }
    return pd.DataFrame([row])


# -- comparing along a trade-off -----------------------------------------------------------


def pareto_frontier(table, x: str = "l0", y: str = "fvu"):
    """Rows of ``table`` not beaten on both ``x`` and ``y`` (lower is better on each) by
    another row, sorted by ``x``."""
    ordered = table.sort_values([x, y])
    best_y, keep = math.inf, []
    for index, value in zip(ordered.index, ordered[y]):
        if value < best_y:
            keep.append(index)
            best_y = value
    return ordered.loc[keep]


def interpolate_at(table, at: float, x: str = "l0", y: str = "fvu", log_x: bool = True) -> float:
    """``y`` of the curve through ``table``'s rows (sorted by ``x``; linear in log ``x`` when
    ``log_x``) at ``x = at``; NaN outside the rows' ``x`` range."""
    ordered = table.sort_values(x)
    xs = np.asarray(ordered[x], dtype=float)
    ys = np.asarray(ordered[y], dtype=float)
    if len(xs) == 0 or not xs[0] <= at <= xs[-1]:
        return math.nan
    if log_x:
        xs, at = np.log(xs), math.log(at)
    return float(np.interp(at, xs, ys))
