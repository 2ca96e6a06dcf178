"""ICA: known independent sources mixed by a known matrix are recovered; the signed ICA
dictionary reconstructs exactly when every direction may fire, and PCA does not separate them."""

import torch

from saelib.baselines import ica_basis, pca_basis, signed_basis_sae


def mixed_sources(n=20_000, d=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sources_ND = torch.distributions.Laplace(0.0, 1.0).sample((n, d))  # heavy-tailed, independent
    mixing_DD = torch.randn(d, d, generator=generator) + 2 * torch.eye(d)
    return sources_ND @ mixing_DD + torch.arange(d).float(), mixing_DD  # x = s · A + offset


def best_abs_cosines(found_KD, true_KD):
    found = torch.nn.functional.normalize(found_KD.double(), dim=1)
    true = torch.nn.functional.normalize(true_KD.double(), dim=1)
    return (true @ found.T).abs().max(1).values


def test_ica_recovers_the_mixing_directions_and_pca_does_not():
    x_ND, mixing_DD = mixed_sources()
    unmixing, mixing = ica_basis(x_ND, seed=1)
    assert best_abs_cosines(mixing, mixing_DD).min() > 0.99
    pca, _ = pca_basis(x_ND)
    assert best_abs_cosines(pca, mixing_DD).min() < 0.95  # the baseline ICA must beat
    torch.testing.assert_close(unmixing.double() @ mixing.double().T, torch.eye(6, dtype=torch.float64), atol=1e-4, rtol=0)


def test_signed_ica_dictionary_is_exact_with_every_direction():
    x_ND, _ = mixed_sources(n=5_000, seed=2)
    unmixing, mixing = ica_basis(x_ND, seed=0)
    sae = signed_basis_sae(unmixing, k=6, centre_D=x_ND.mean(0), atoms_KD=mixing, kind="ica")
    with torch.no_grad():
        torch.testing.assert_close(sae(x_ND[:100]).recon_BD, x_ND[:100], atol=1e-3, rtol=1e-4)
    try:
        signed_basis_sae(unmixing, k=6, atoms_KD=unmixing)
    except ValueError as error:
        assert "biorthogonal" in str(error)
    else:
        raise AssertionError("non-biorthogonal atoms accepted")
