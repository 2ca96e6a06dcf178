"""Baseline dictionaries at an SAE's hook: the neuron basis, PCA, ICA, random directions.

Each baseline is an orthonormal basis ``V`` [d_in, d_in] turned into an ordinary TopK SAE
with the ``2·d_in`` atoms ``+v`` and ``−v`` and a tied encoder. Its latents are then the
positive parts of the coordinates ``(x − centre) · v``, and TopK keeps the ``k`` coordinates
of largest magnitude: the best ``k``-sparse reconstruction in that basis. So a baseline is
compared with an SAE at exactly the same L0, and every tool that takes an SAE (metrics,
splicing, dashboards, IOI patching) takes a baseline unchanged. With
``k = d_in`` the reconstruction is exact. ICA's directions are not orthogonal: its encoder
reads the independent components (the unmixing rows) and its decoder writes the mixing
columns, still exact at ``k = d_in``, though TopK is then no longer the best k-sparse choice.
"""

from __future__ import annotations

import torch

from .sae import SAEConfig, make_sae


def signed_basis_sae(basis_KD: torch.Tensor, k: int, centre_D: torch.Tensor | None = None,
                     hook_name: str = "", model_name: str = "", kind: str = "basis", atoms_KD: torch.Tensor | None = None):
    """A TopK SAE whose atoms are the rows of ``basis_KD`` (orthonormal, K ≤ d_in) and their
    negatives: latent ``i`` is ``relu((x − centre) · v_i)``, latent ``K + i`` is
    ``relu(−(x − centre) · v_i)``; ``k`` of them are kept per vector. With ``atoms_KD`` the
    decoder writes those rows instead (they must be biorthogonal to ``basis_KD``: ICA)."""
    n_directions, d_in = basis_KD.shape
    atoms = basis_KD if atoms_KD is None else atoms_KD
    gram = basis_KD.double() @ atoms.double().T
    if not torch.allclose(gram, torch.eye(n_directions, dtype=torch.float64), atol=1e-4):
        raise ValueError("basis_KD must have orthonormal rows" if atoms_KD is None
                         else "basis_KD and atoms_KD must be biorthogonal (basis @ atoms.T = I)")
    if not 0 < k <= n_directions:
        raise ValueError(f"k must be in 1..{n_directions} (one signed latent per direction can fire), got {k}")
    cfg = SAEConfig(d_in=d_in, d_sae=2 * n_directions, architecture="topk", k=k, model_name=model_name,
                    hook_name=hook_name, metadata={"baseline": kind})
    sae = make_sae(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([atoms, -atoms]).float())
        sae.W_enc.copy_(torch.cat([basis_KD, -basis_KD]).float().T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.zeros(d_in) if centre_D is None else centre_D.float())
    return sae.eval()


def pca_basis(x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal directions of ``x_ND`` by decreasing variance: (basis_DD rows = directions,
    variance_D along each)."""
    x = x_ND.double()
    centred = x - x.mean(0)
    covariance = centred.T @ centred / max(1, len(x) - 1)
    variance, vectors = torch.linalg.eigh(covariance)
    order = variance.argsort(descending=True)
    return vectors[:, order].T.float(), variance[order].float()


def ica_basis(x_ND: torch.Tensor, seed: int = 0, max_iter: int = 200, tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent components of ``x_ND`` by FastICA (symmetric, log-cosh contrast, on the
    PCA-whitened data): (unmixing_DD, mixing_DD), rows per component, with
    ``sources = (x − mean) @ unmixing.T`` of unit variance and ``x − mean = sources @ mixing``."""
    x = x_ND.double()
    centred = x - x.mean(0)
    basis_DD, variance_D = pca_basis(x)
    scale_D = variance_D.double().clamp_min(variance_D.max().double() * 1e-9).sqrt()
    white_ND = (centred @ basis_DD.double().T / scale_D).float()  # the big products in float32; W in float64
    generator = torch.Generator().manual_seed(seed)
    w_DD = _symmetric_orthogonalise(torch.randn(x.shape[1], x.shape[1], generator=generator, dtype=torch.float64))
    for _ in range(max_iter):
        g_ND = torch.tanh(white_ND @ w_DD.float().T)
        step = (g_ND.T @ white_ND).double() / len(x) - torch.diag((1 - g_ND**2).double().mean(0)) @ w_DD
        updated = _symmetric_orthogonalise(step)
        converged = (torch.diagonal(updated @ w_DD.T).abs() - 1).abs().max() < tol
        w_DD = updated
        if converged:
            break
    unmixing = w_DD @ (basis_DD.double() / scale_D[:, None])
    mixing = w_DD @ (basis_DD.double() * scale_D[:, None])
    return unmixing.float(), mixing.float()


def _symmetric_orthogonalise(w_DD: torch.Tensor) -> torch.Tensor:
    """(W Wᵀ)^(-1/2) W: the orthogonal matrix nearest to W."""
    values, vectors = torch.linalg.eigh(w_DD @ w_DD.T)
    return vectors @ torch.diag(values.clamp_min(1e-12).rsqrt()) @ vectors.T @ w_DD


def random_basis(d_in: int, seed: int = 0) -> torch.Tensor:
    """A uniformly random orthonormal basis: [d_in, d_in]."""
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).T.float()  # sign fix: Haar-distributed


def pca_sae(store, k: int, n_rows: int = 100_000):
    """PCA of a store's first ``n_rows`` vectors as a k-sparse signed-basis SAE."""
    x_ND = store.rows(0, min(n_rows, len(store)))
    basis_DD, _ = pca_basis(x_ND)
    return signed_basis_sae(basis_DD, k, x_ND.mean(0), store.hook, store.manifest.model, "pca")


def ica_sae(store, k: int, n_rows: int = 50_000, seed: int = 0):
    """ICA of a store's first ``n_rows`` vectors (``ica_basis``) as a k-sparse signed dictionary."""
    x_ND = store.rows(0, min(n_rows, len(store)))
    unmixing_DD, mixing_DD = ica_basis(x_ND, seed=seed)
    return signed_basis_sae(unmixing_DD, k, x_ND.mean(0), store.hook, store.manifest.model, "ica", atoms_KD=mixing_DD)


def neuron_sae(store, k: int):
    """The standard basis (each dimension a latent: neurons at an MLP's hidden hook),
    centred on the store's mean, as a k-sparse signed-basis SAE."""
    return signed_basis_sae(torch.eye(store.d_in), k, store.mean, store.hook, store.manifest.model, "neurons")


def random_sae(store, k: int, seed: int = 0):
    """A random orthonormal basis, centred on the store's mean, as a k-sparse signed-basis SAE."""
    return signed_basis_sae(random_basis(store.d_in, seed), k, store.mean, store.hook, store.manifest.model, "random")
