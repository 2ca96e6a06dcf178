"""Reconstruction and sparsity metrics of an SAE on activation vectors.

Shapes: ``x_ND`` inputs, ``recon_ND`` reconstructions, ``latents_NF`` latent activations.
"""

from __future__ import annotations

import torch


def fvu(x_ND: torch.Tensor, recon_ND: torch.Tensor) -> float:
    """Fraction of variance unexplained: squared error over the inputs' total variance
    around their mean (0: perfect; 1: no better than predicting the mean)."""
    x = x_ND.double()
    return float((recon_ND.double() - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-30))


def l0(latents_NF: torch.Tensor) -> float:
    """Mean number of active (nonzero) latents per vector."""
    return float((latents_NF != 0).sum(-1).float().mean())
