"""Random-weight controls: is an SAE's interpretability a property of the model, or of the
data and the SAE alone?

Anthropic's "Towards Monosemanticity" and Heap et al. (2025) train the same SAEs on models
whose weights are random. Such a model still sees real text, so its activations carry the
current token's identity, and SAEs on it were reported to find many features that fire on
one token. Whether that happens depends on how much of the activation is the current
token and how much is context mixed in by random attention: ``token_variance_share``
measures it, ``token_specificity`` summarises single-token features and token entropy.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .harvest import model_label
from .metrics import variance_per_vector
from .models import randomize_weights

TRAINED, RANDOM, RANDOM_REAL_EMBEDDINGS = "trained", "re-randomised", "re-randomised, trained embeddings"


def control_models(model, seed: int = 0) -> dict:
    """``{variant: model}``: the trained model, every weight re-randomised, and every weight
    but the embeddings and unembedding re-randomised. Each variant gets its own
    ``cfg.model_name``, so activation stores of different variants never share a folder."""
    variants = {TRAINED: model}
    for name, keep in ((RANDOM, False), (RANDOM_REAL_EMBEDDINGS, True)):
        clone = randomize_weights(model, keep_embeddings=keep, seed=seed)
        clone.cfg.model_name = f"{model_label(model)}-{'random-embeddings' if keep else 'random'}"
        variants[name] = clone
    return variants


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


def token_specificity(tables: dict[str, pd.DataFrame], single_token_share: float = 0.9) -> pd.DataFrame:
    """One row per variant from its ``FeatureActivations.feature_table``: live features, the
    share of them that are single-token (``top_token_share`` at least ``single_token_share``),
    and the mean and median token entropy (nats) of its features."""
    return pd.DataFrame(
        {
            name: {
                "live_features": len(table),
                "single_token_features": float((table.top_token_share >= single_token_share).mean()),
                "mean_token_entropy": float(table.token_entropy.mean()),
                "median_token_entropy": float(table.token_entropy.median()),
            }
            for name, table in tables.items()
        }
    ).T


NOISE = "Gaussian noise"


@torch.no_grad()
def gaussian_noise_store(store, folder, seed: int = 0, sample_rows: int = 200_000, chunk_rows: int = 8192):
    """A store of Gaussian noise with the mean and covariance of ``store``'s rows (estimated
    on up to ``sample_rows`` of them), row for row beside the same token windows: the
    control for which no model computed anything, so whatever an SAE or a token metric
    finds there comes from the second-order statistics alone. Written through the same
    store writer (checksums, resume); its model name is ``<model>-noise``."""
    from .store import StoreManifest
    from .store_writer import StoreWriter

    m = store.manifest
    sample_ND = store.rows(0, min(sample_rows, m.n_rows)).double()
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
def context_dependence(model, sae, tokens_NL: torch.Tensor, seed: int = 0, batch_size: int = 32) -> np.ndarray:
    """How much each SAE latent depends on the tokens *before* the current one: [d_sae].

    At the last position of every window the latents are read twice: on the window as it
    is, and with the tokens between BOS and the last one replaced by random text (the same
    windows' tokens, shuffled across windows and positions), the current token kept. A
    latent's dependence is Σ|a − a′| / Σ(a + a′) over the windows: 0 when it is a function
    of the current token alone (as any latent at ``hook_embed`` is), near 1 when the context
    decides it. NaN for a latent that fires in neither reading. Features that need learned
    weights to exist (issue 19's "context features") are those with a high dependence."""
    from .harvest import _capture, stop_layer
    from .models import check_hook_name

    hook = check_hook_name(model, sae.cfg.hook_name)
    tokens_NL = torch.as_tensor(tokens_NL).long()
    if tokens_NL.shape[1] < 3:
        raise ValueError("windows need BOS, some context and a current token (context_len >= 3)")
    generator = torch.Generator().manual_seed(seed)
    middle = tokens_NL[:, 1:-1].reshape(-1)
    shuffled = tokens_NL.clone()
    shuffled[:, 1:-1] = middle[torch.randperm(len(middle), generator=generator)].reshape(len(tokens_NL), -1)
    stop, device = stop_layer(model, [hook]), model.cfg.device
    differences = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    totals = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for start in range(0, len(tokens_NL), batch_size):
        readings = []
        for windows in (tokens_NL[start : start + batch_size], shuffled[start : start + batch_size]):
            act = _capture(model, windows.to(device), [hook], stop)[hook][:, -1]
            readings.append(sae.encode(act.flatten(1).to(sae.W_enc.dtype)).double().cpu())
        original_BF, counterfactual_BF = readings
        differences += (original_BF - counterfactual_BF).abs().sum(0)
        totals += (original_BF + counterfactual_BF).abs().sum(0)
    dependence = differences / totals
    dependence[totals == 0] = float("nan")
    return dependence.numpy()
