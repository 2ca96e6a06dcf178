"""Toy data with known ground-truth features (Sharkey, Braun, Millidge 2022) and MMCS.

Each sample is a sparse, non-negative combination of ``n_features`` fixed unit vectors in
``d`` dimensions, more features than dimensions, so they sit in superposition. Feature
``i`` is active with a probability that decays exponentially with ``i`` (a few common
features, many rare ones), optionally with correlated activations (a Gaussian copula),
and takes a coefficient uniform on [0, 1] when active.

An SAE recovers the ground truth when every true feature has a learned dictionary atom
pointing the same way: the mean max cosine similarity (MMCS) is then 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class ToyConfig:
    """Shape and statistics of the toy data."""

    d: int = 64
    """Dimension of the data vectors."""
    n_features: int = 128
    """Number of ground-truth features (larger than ``d``: superposition)."""
    avg_active: float = 5.0
    """Expected number of active features per sample."""
    decay: float = 0.99
    """Feature ``i``'s probability is proportional to ``decay ** i``."""
    correlated: bool = False
    """Draw activations through a Gaussian copula with a random correlation matrix."""
    seed: int = 0
    """Seeds the features, probabilities and correlations (not the samples)."""


class ToyData:
    """A fixed ground truth and a sampler. ``features_GD`` are unit rows: [n_features, d]."""

    def __init__(self, cfg: ToyConfig):
        self.cfg = cfg
        generator = torch.Generator().manual_seed(cfg.seed)
        self.features_GD = torch.nn.functional.normalize(torch.randn(cfg.n_features, cfg.d, generator=generator), dim=1)
        weights_G = cfg.decay ** torch.arange(cfg.n_features, dtype=torch.float64)
        self.probs_G = (weights_G * cfg.avg_active / weights_G.sum()).clamp(max=1.0).float()
        self._cholesky_GG = None
        if cfg.correlated:
            # A random correlation matrix: a low-rank part plus identity, rescaled to unit diagonal.
            loadings = torch.randn(cfg.n_features, max(2, cfg.n_features // 16), generator=generator)
            cov = loadings @ loadings.T / loadings.shape[1] + torch.eye(cfg.n_features)
            std = cov.diagonal().sqrt()
            self._cholesky_GG = torch.linalg.cholesky(cov / std[:, None] / std[None, :])
            self._thresholds_G = torch.distributions.Normal(0.0, 1.0).icdf(1 - self.probs_G.clamp(1e-6, 1 - 1e-6))

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_ND, coefficients_NG): data and the true feature activations behind it."""
        G = self.cfg.n_features
        if self._cholesky_GG is None:
            active_NG = torch.rand(n, G, generator=generator) < self.probs_G
        else:
            gauss_NG = torch.randn(n, G, generator=generator) @ self._cholesky_GG.T
            active_NG = gauss_NG > self._thresholds_G
        coefficients_NG = torch.rand(n, G, generator=generator) * active_NG
        return coefficients_NG @ self.features_GD, coefficients_NG

    def batches(self, batch_size: int, n_batches: int, seed: int = 0) -> Iterator[torch.Tensor]:
        """``n_batches`` batches [batch_size, d]; the same sequence for the same ``seed``."""
        generator = torch.Generator().manual_seed(seed)
        for _ in range(n_batches):
            yield self.sample(batch_size, generator)[0]


def max_cosines(dictionary_FD: torch.Tensor, features_GD: torch.Tensor) -> torch.Tensor:
    """For each true feature, the largest cosine with any dictionary atom: [G]."""
    atoms = torch.nn.functional.normalize(dictionary_FD.detach().float(), dim=1)
    truth = torch.nn.functional.normalize(features_GD.float(), dim=1)
    return (truth @ atoms.T).max(dim=1).values


def mmcs(dictionary_FD: torch.Tensor, features_GD: torch.Tensor) -> float:
    """Mean max cosine similarity of the true features to the dictionary (1: all recovered)."""
    return float(max_cosines(dictionary_FD, features_GD).mean())
