"""Random-weight controls: is an SAE's interpretability a property of the model, or of the
data and the SAE alone?

Anthropic's "Towards Monosemanticity" and Heap et al. (2025) train the same SAEs on models
whose weights are random. Such a model still sees real text, so its activations carry the
current token's identity, and SAEs on it were reported to find many features that fire on
one token. Whether that happens depends on how much of the activation is the current
token and how much is context mixed in by random attention: ``token_variance_share``
measures it, ``token_specificity`` summarises single-token features and token entropy.

The controls here follow Heap et al.: the same architecture re-initialised as at step 0,
re-randomised with the trained embeddings kept, and Gaussian noise in place of activations.
Two classes of features a trained model may have and a random one may not are measured per
latent:
``context_dependence`` (does the activation change when the text before the token does?)
and ``induction_scores`` (is it stronger on the second copy of a repeated sequence than on
the same tokens after other text?); ``feature_classes`` turns them into shares.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from .harvest import model_label
from .metrics import variance_per_vector
from .models import randomize_weights
from .threads import follow_load

TRAINED = "trained"
REINITIALISED = "re-initialised"
RANDOM_REAL_EMBEDDINGS = "re-randomised, trained embeddings"
NOISE = "Gaussian noise"
VARIANTS = (TRAINED, REINITIALISED, RANDOM_REAL_EMBEDDINGS, NOISE)
"""The controls in the order notebook 08 shows them; the first three are models, the last a
store of noise (``gaussian_noise_store``)."""


def control_models(model, name: str, seed: int = 0) -> dict:
    """``{variant: model}`` for the three model variants: the trained ``model`` itself; the
    same architecture **re-initialised** with its own initialisation, as a step-0 checkpoint
    (``initialised_model``, loaded from ``name``, the name ``model`` was loaded by); and every
    weight **re-randomised** from the trained tensor's mean and spread except the token
    embeddings and unembedding, which stay trained (``randomize_weights``). Each variant has
    its own ``cfg.model_name``, so activation stores of different variants never share a
    folder."""
    from .models import initialised_model, is_bridge

    fresh = initialised_model(name, seed=seed, device=str(model.cfg.device),
                              backend="bridge" if is_bridge(model) else "hooked")
    shape = lambda m: (m.cfg.n_layers, m.cfg.d_model, m.cfg.d_vocab)  # noqa: E731
    if shape(fresh) != shape(model):
        raise ValueError(f"model name {name!r} is another architecture (layers, d_model, vocabulary {shape(fresh)}) "
                         f"than the model given {shape(model)}: pass the name the model was loaded by")
    kept = randomize_weights(model, keep_embeddings=True, seed=seed)
    kept.cfg.model_name = f"{model_label(model)}-random{seed}-trained-embeddings"
    return {TRAINED: model, REINITIALISED: fresh, RANDOM_REAL_EMBEDDINGS: kept}


def token_variance_share(x_ND: torch.Tensor, tokens_N: np.ndarray, adjusted: bool = True) -> float:
    """Share of the variance of activations ``x_ND`` explained by the identity of the
    current token (``tokens_N``): 1 − (variance around each token's mean) / (total
    variance). 1 when the activation is a function of the token alone; near 0 when the
    token says nothing about it.

    ``adjusted`` (default) corrects for chance, as an adjusted R²: with G distinct tokens
    among N rows, group means fitted to pure noise already "explain" (G − 1) / (N − 1) of
    its variance (tokens seen once explain their row entirely), so the sums of squares are
    divided by their degrees of freedom, N − G and N − 1. Unrelated activations then score
    0 whatever G/N is, and two samples with different token counts compare fairly."""
    x = x_ND.double()
    _, group_N = np.unique(np.asarray(tokens_N), return_inverse=True)
    group_N = torch.from_numpy(group_N.reshape(-1))
    n_rows, n_groups = len(group_N), int(group_N.max()) + 1
    sums_TD = torch.zeros(n_groups, x.shape[1], dtype=torch.float64).index_add_(0, group_N, x)
    means_TD = sums_TD / torch.bincount(group_N).double()[:, None]
    within = (x - means_TD[group_N]).pow(2).sum(-1).mean()
    total = variance_per_vector(x)
    if not adjusted:
        return float(1 - within / total)
    if n_rows <= n_groups:
        raise ValueError(f"every one of the {n_rows} rows has its own token: the adjusted share is undefined; "
                         "use more rows")
    return float(1 - (within * n_rows / (n_rows - n_groups)) / (total * n_rows / (n_rows - 1)))


def token_specificity(table: pd.DataFrame, single_token_share: float = 0.9) -> dict[str, float]:
    """How token-bound an SAE's live features are, from its ``FeatureActivations.feature_table``:
    the share of them that are single-token (``top_token_share`` at least
    ``single_token_share``), their mean top-token share, and the mean and median token
    entropy (nats) of their activations."""
    return {
        "single_token_features": float((table.top_token_share >= single_token_share).mean()),
        "mean_top_token_share": float(table.top_token_share.mean()),
        "mean_token_entropy": float(table.token_entropy.mean()),
        "median_token_entropy": float(table.token_entropy.median()),
    }


def noise_store_folder(store, seed: int = 0) -> Path:
    """Where the noise twin of ``store`` goes: beside the stores of ``<model>-noise<seed>``,
    in a run folder and hook folder of the same names as ``store``'s (so train and held-out
    noise of one hook never share a folder)."""
    from .paths import artifacts_dir

    return artifacts_dir() / "stores" / f"{store.manifest.model}-noise{seed}" / store.folder.parent.name / store.folder.name


@torch.no_grad()
def gaussian_noise_store(store, folder=None, seed: int = 0, statistics_from=None, sample_rows: int = 200_000,
                         chunk_rows: int = 8192):
    """A store of Gaussian noise with the mean and covariance of ``store``'s rows (or of
    ``statistics_from``'s, another store at the same hook: held-out noise with the training
    store's statistics), estimated on up to ``sample_rows`` rows, row for row beside
    ``store``'s token windows: the control for which no model computed anything, so whatever
    an SAE or a token metric finds there comes from the second-order statistics alone.
    Written through the same store writer (checksums, resume) into ``folder`` (default:
    ``noise_store_folder``); its model name is ``<model>-noise``."""
    from .store import StoreManifest
    from .store_writer import StoreWriter

    m = store.manifest
    source = store if statistics_from is None else statistics_from
    if source.manifest.hook != m.hook or source.d_in != m.d_in:
        raise ValueError(f"statistics_from {source.folder} holds {source.manifest.hook} [{source.d_in}], not "
                         f"{m.hook} [{m.d_in}]: give a store of the same hook")
    folder = noise_store_folder(store, seed) if folder is None else folder
    sample_ND = source.rows(0, min(sample_rows, source.manifest.n_rows)).double()
    mean_D = sample_ND.mean(0)
    centred = sample_ND - mean_D
    cov_DD = centred.T @ centred / max(len(sample_ND) - 1, 1)
    # eigen-decomposition, not Cholesky: residual covariances are often rank-deficient
    eigenvalues, eigenvectors = torch.linalg.eigh(cov_DD)
    factor_DD = eigenvectors * eigenvalues.clamp_min(0).sqrt()
    generator = torch.Generator().manual_seed(seed)
    manifest = StoreManifest(
        model=f"{m.model}-noise", model_fingerprint=f"noise-{seed}-{m.model_fingerprint}", hook=m.hook, d_in=m.d_in,
        dtype=m.dtype, shard_rows=m.shard_rows, context_len=m.context_len, n_contexts=m.n_contexts,
        first_position=m.first_position, contexts_sha256="", special_token_ids=list(m.special_token_ids))
    writer = StoreWriter(folder, manifest, np.asarray(store.contexts()))
    try:
        # every row is drawn again from the seed, so a resumed run appends exactly the rows a
        # finished one would have; from row 0, the writer drops those it already holds
        writer.seek(0)
        for start in range(0, m.n_rows, chunk_rows):
            rows = min(chunk_rows, m.n_rows - start)
            noise_ND = torch.randn(rows, m.d_in, generator=generator, dtype=torch.float64) @ factor_DD.T + mean_D
            writer.append(noise_ND.float())
    except BaseException:
        writer.abort()
        raise
    return writer.close()


@torch.no_grad()
def latents_on(model, saes, tokens_BL: torch.Tensor, stop: int | None | str = "auto"):
    """Every SAE of ``saes`` ({key: sae}, or one SAE) run on its hook's activations of
    ``tokens_BL``, one forward pass for all: {key: latents [batch, pos, d_sae]} (or the one
    tensor), float64 on the CPU. ``stop``: blocks to run (default: as far as the hooks need)."""
    from .harvest import _capture

    saes, single = _per_sae(saes)
    if stop == "auto":
        stop = _stop_for(model, saes)
    hooks = list(dict.fromkeys(sae.cfg.hook_name for sae in saes.values()))
    captured = _capture(model, tokens_BL.to(model.cfg.device), hooks, stop)
    out = {key: sae.encode(captured[sae.cfg.hook_name].flatten(2).to(sae.W_enc.dtype)).double().cpu()
           for key, sae in saes.items()}
    return out[None] if single else out


def _per_sae(saes) -> tuple[dict, bool]:
    """``saes`` as {key: sae}, and whether one bare SAE was given."""
    return (saes, False) if isinstance(saes, dict) else ({None: saes}, True)


def _stop_for(model, saes: dict) -> int | None:
    """Blocks to run for every SAE's hook (each checked against the model)."""
    from .harvest import stop_layer
    from .models import check_hook_name

    hooks = [check_hook_name(model, sae.cfg.hook_name) for sae in saes.values()]
    return stop_layer(model, hooks)


@torch.no_grad()
def context_dependence(model, saes, tokens_NL: torch.Tensor, seed: int = 0, batch_size: int = 32):
    """How much each SAE latent depends on the tokens *before* the current one: [d_sae],
    or {key: [d_sae]} for a dict of SAEs (read in the same forward passes, any hooks).

    At the last position of every window the latents are read twice: on the window as it
    is, and with the tokens between BOS and the last one replaced by random text (the same
    windows' tokens, shuffled across windows and positions), the current token kept. A
    latent's dependence is Σ|a − a′| / Σ(a + a′) over the windows: 0 when it is a function
    of the current token alone (as any latent at ``hook_embed`` is), near 1 when the context
    decides it. NaN for a latent that fires in neither reading. *Context features* are the
    latents with a dependence of at least ``CONTEXT_FEATURE`` (see ``feature_classes``)."""
    saes, single = _per_sae(saes)
    stop = _stop_for(model, saes)
    tokens_NL = torch.as_tensor(tokens_NL).long()
    if tokens_NL.shape[1] < 3:
        raise ValueError("windows need BOS, some context and a current token (context_len >= 3)")
    generator = torch.Generator().manual_seed(seed)
    middle = tokens_NL[:, 1:-1].reshape(-1)
    shuffled = tokens_NL.clone()
    shuffled[:, 1:-1] = middle[torch.randperm(len(middle), generator=generator)].reshape(len(tokens_NL), -1)
    differences = {key: torch.zeros(sae.cfg.d_sae, dtype=torch.float64) for key, sae in saes.items()}
    totals = {key: torch.zeros(sae.cfg.d_sae, dtype=torch.float64) for key, sae in saes.items()}
    with follow_load(device=model.cfg.device) as load:
        for start in range(0, len(tokens_NL), batch_size):
            original = latents_on(model, saes, tokens_NL[start : start + batch_size], stop)
            counterfactual = latents_on(model, saes, shuffled[start : start + batch_size], stop)
            for key in saes:
                a_BF, b_BF = original[key][:, -1], counterfactual[key][:, -1]
                differences[key] += (a_BF - b_BF).abs().sum(0)
                totals[key] += (a_BF + b_BF).abs().sum(0)
            load.lap()
    out = {}
    for key in saes:
        dependence = differences[key] / totals[key]
        dependence[totals[key] == 0] = float("nan")
        out[key] = dependence.numpy()
    return out[None] if single else out


def repeated_windows(token_pool: np.ndarray, n_windows: int, half: int, bos: int, seed: int = 0):
    """Windows for the induction test, [n_windows, 1 + 2·half] each: ``repeated`` is BOS, a
    random sequence A, then A again; ``control`` is BOS, another random sequence B, then the
    same A. The second halves are identical token for token and position for position, so a
    latent that is stronger there in ``repeated`` responds to the repetition itself, not to
    the tokens or their positions. Tokens are drawn uniformly from ``token_pool``."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(token_pool, dtype=np.int64)
    first, other = rng.choice(pool, (n_windows, half)), rng.choice(pool, (n_windows, half))
    column = np.full((n_windows, 1), bos, dtype=np.int64)
    return (torch.from_numpy(np.concatenate([column, first, first], 1)),
            torch.from_numpy(np.concatenate([column, other, first], 1)))


class InductionScores(NamedTuple):
    score_F: np.ndarray
    """(m_rep − m_ctl) / (m_rep + m_ctl): m the latent's mean activation over the second
    halves of the repeated and the control windows; 1 when it fires only on a repetition,
    0 when the repetition makes no difference, NaN when it fires on neither."""
    repeat_rate_F: np.ndarray
    """Share of the repeated windows' second-half tokens the latent fires on."""


@torch.no_grad()
def induction_scores(model, saes, repeated_NL: torch.Tensor, control_NL: torch.Tensor, batch_size: int = 32):
    """``InductionScores`` of every latent (or {key: InductionScores} for a dict of SAEs)
    on ``repeated_windows``: how much more a latent fires on the second copy of a repeated
    sequence than on the same tokens after unrelated ones. A model needs learned induction
    heads (a previous-token head and a head that attends to the token after the earlier
    copy) for any activation to tell the two apart beyond chance; *induction features* are
    the latents with a high score that fire on a good share of second copies."""
    saes, single = _per_sae(saes)
    stop = _stop_for(model, saes)
    half = (repeated_NL.shape[1] - 1) // 2
    sums = {key: [torch.zeros(sae.cfg.d_sae, dtype=torch.float64) for _ in range(3)] for key, sae in saes.items()}
    with follow_load(device=model.cfg.device) as load:
        for start in range(0, len(repeated_NL), batch_size):
            on_repeat = latents_on(model, saes, repeated_NL[start : start + batch_size], stop)
            on_control = latents_on(model, saes, control_NL[start : start + batch_size], stop)
            for key in saes:
                repeat_BHF, control_BHF = on_repeat[key][:, -half:], on_control[key][:, -half:]
                sums[key][0] += repeat_BHF.sum((0, 1))
                sums[key][1] += control_BHF.sum((0, 1))
                sums[key][2] += (repeat_BHF > 0).double().sum((0, 1))
            load.lap()
    n_tokens = len(repeated_NL) * half
    out = {}
    for key, (repeat_F, control_F, fired_F) in sums.items():
        with np.errstate(invalid="ignore", divide="ignore"):
            score = ((repeat_F - control_F) / (repeat_F + control_F)).numpy()
        out[key] = InductionScores(score, (fired_F / n_tokens).numpy())
    return out[None] if single else out


CONTEXT_FEATURE = 0.5
"""A latent is a *context feature* when its ``context_dependence`` is at least this: replacing
the text before the current token changes its activation by half its size or more."""
INDUCTION_SCORE, INDUCTION_RATE = 0.5, 0.05
"""A latent is an *induction feature* when its ``InductionScores.score_F`` is at least
``INDUCTION_SCORE`` (three times as strong on a repeated sequence's second copy as on the
same tokens after unrelated ones) and it fires on at least ``INDUCTION_RATE`` of the second
copies' tokens (a latent that fires on a handful of tokens is no induction feature)."""


def feature_classes(live_F: np.ndarray, dependence_F: np.ndarray | None = None,
                    induction: InductionScores | None = None) -> dict[str, float]:
    """Shares of an SAE's live latents (``live_F``: bool [d_sae], those that fired on the
    held-out rows) in each class that needs learned weights: ``context_features`` among the
    live latents whose dependence could be read (they fired in one of its readings), and
    ``induction_features`` among all live latents. NaN for a measure not given (the noise
    control has no model to run), plus ``median_context_dependence``."""
    live_F = np.asarray(live_F, dtype=bool)
    out = {"context_features": np.nan, "median_context_dependence": np.nan, "induction_features": np.nan}
    if dependence_F is not None:
        read = live_F & np.isfinite(dependence_F)
        if read.any():
            out["context_features"] = float(np.mean(dependence_F[read] >= CONTEXT_FEATURE))
            out["median_context_dependence"] = float(np.median(dependence_F[read]))
    if induction is not None and live_F.any():
        out["induction_features"] = float(np.mean(induction_features(induction)[live_F]))
    return out


def induction_features(induction: InductionScores) -> np.ndarray:
    """bool [d_sae]: the latents that are induction features (``INDUCTION_SCORE``, ``INDUCTION_RATE``)."""
    with np.errstate(invalid="ignore"):
        return (induction.score_F >= INDUCTION_SCORE) & (induction.repeat_rate_F >= INDUCTION_RATE)
