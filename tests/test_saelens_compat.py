"""Our SAE folders load in SAELens and SAELens's load in saelib.

Runs only where ``sae_lens`` is importable (it is not a dependency of saelib), e.g.
``pip install --no-deps --target build/saelens-site sae-lens`` plus its small extras, then
``PYTHONPATH=build/saelens-site pytest tests/test_saelens_compat.py``.
"""

import pytest
import torch

from saelib.sae import SAEConfig, load_sae, make_sae

sae_lens = pytest.importorskip("sae_lens")


def randomised(architecture: str):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=16, d_sae=40, architecture=architecture, k=5, hook_name="blocks.0.hook_resid_post"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        if architecture == "batchtopk":
            sae.threshold.fill_(0.5)
    return sae.eval()


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk"])
def test_saelens_loads_our_folders(tmp_path, architecture):
    ours = randomised(architecture)
    ours.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = torch.randn(12, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x).recon_BD, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_we_load_saelens_folders(tmp_path, architecture):
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    if architecture == "standard":
        theirs = StandardSAE(StandardSAEConfig(d_in=16, d_sae=40))
    else:
        theirs = TopKSAE(TopKSAEConfig(d_in=16, d_sae=40, k=5))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    theirs.save_model(str(tmp_path))
    ours = load_sae(tmp_path)
    x = torch.randn(12, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
