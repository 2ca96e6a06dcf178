"""Baseline dictionaries at an SAE's hook: the neuron basis, PCA, random directions.

Each baseline is an orthonormal basis ``V`` [d_in, d_in] turned into an ordinary TopK SAE
with the ``2·d_in`` atoms ``+v`` and ``−v`` and a tied encoder. Its latents are then the
positive parts of the coordinates ``(x − centre) · v``, and TopK keeps the ``k`` coordinates
of largest magnitude: the best ``k``-sparse reconstruction in that basis. So a baseline is
compared with an SAE at exactly the same L0, and every tool that takes an SAE (metrics,
splicing, dashboards, IOI patching) takes a baseline unchanged. With
``k = d_in`` the reconstruction is exact.
"""

from __future__ import annotations

import torch

from .sae import SAEConfig, make_sae


def signed_basis_sae(basis_KD: torch.Tensor, k: int, centre_D: torch.Tensor | None = None,
                     hook_name: str = "", model_name: str = "", kind: str = "basis"):
    """A TopK SAE whose atoms are the rows of ``basis_KD`` (orthonormal, K ≤ d_in) and their
    negatives: latent ``i`` is ``relu((x − centre) · v_i)``, latent ``K + i`` is
    ``relu(−(x − centre) · v_i)``; ``k`` of them are kept per vector."""
    n_directions, d_in = basis_KD.shape
    gram = basis_KD.double() @ basis_KD.double().T
    if not torch.allclose(gram, torch.eye(n_directions, dtype=torch.float64), atol=1e-4):
        raise ValueError("basis_KD must have orthonormal rows")
    if not 0 < k <= n_directions:
        raise ValueError(f"k must be in 1..{n_directions} (one signed latent per direction can fire), got {k}")
    cfg = SAEConfig(d_in=d_in, d_sae=2 * n_directions, architecture="topk", k=k, model_name=model_name,
                    hook_name=hook_name, metadata={"baseline": kind})
    sae = make_sae(cfg)
    atoms_FD = torch.cat([basis_KD, -basis_KD]).float()
    with torch.no_grad():
        sae.W_dec.copy_(atoms_FD)
        sae.W_enc.copy_(atoms_FD.T)
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


def neuron_sae(store, k: int):
    """The standard basis (each dimension a latent: neurons at an MLP's hidden hook),
    centred on the store's mean, as a k-sparse signed-basis SAE."""
    return signed_basis_sae(torch.eye(store.d_in), k, store.mean, store.hook, store.manifest.model, "neurons")


def random_sae(store, k: int, seed: int = 0):
    """A random orthonormal basis, centred on the store's mean, as a k-sparse signed-basis SAE."""
    return signed_basis_sae(random_basis(store.d_in, seed), k, store.mean, store.hook, store.manifest.model, "random")
