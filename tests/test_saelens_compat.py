"""Our SAE folders load in SAELens completely (metadata included, usable by its evaluation)
and SAELens's folders, 6.x and pre-6.0, load in saelib with the same outputs.

``sae-lens`` is installed by ``run.sh`` (with ``--no-deps``, so it cannot replace torch);
where it is missing these tests fail rather than skip, unless SAELIB_ALLOW_NO_SAELENS=1.
"""

import json
import os

import pytest
import torch

from saelib.metrics import downstream_losses
from saelib.sae import SAEConfig, make_sae
from saelib.sae_io import load_sae

if os.environ.get("SAELIB_ALLOW_NO_SAELENS") == "1":
    sae_lens = pytest.importorskip("sae_lens")
else:
    import sae_lens

HOOK = "blocks.0.hook_resid_post"


def randomised(architecture: str):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=16, d_sae=40, architecture=architecture, k=5, hook_name=HOOK,
                             model_name="tiny", metadata={"trained_tokens": 7}))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        if architecture == "batchtopk":
            sae.threshold.fill_(0.5)
    return sae.eval()


def tiny_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(1)
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=12, d_head=4, n_heads=4, d_mlp=32, d_vocab=50,
                                  act_fn="relu", normalization_type="LN", seed=1)
    return HookedTransformer(cfg).eval()


@pytest.mark.parametrize("architecture", ["relu", "topk", "batchtopk"])
def test_saelens_loads_our_folders(tmp_path, architecture):
    ours = randomised(architecture)
    ours.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = torch.randn(12, 16)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours(x).recon_BD, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture", ["relu", "topk"])
def test_saelens_reads_our_metadata_and_evaluates_with_it(tmp_path, architecture):
    """SAELens 6 rebuilds ``metadata`` from top-level keys when it finds no
    ``sae_lens_version``: the hook and model were lost and its evaluation crashed."""
    from sae_lens.evals import get_recons_loss
    from sae_lens.training.activation_scaler import ActivationScaler

    ours = randomised(architecture)
    ours.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    assert theirs.cfg.metadata.hook_name == HOOK
    assert theirs.cfg.metadata.model_name == "tiny"
    assert theirs.cfg.metadata.hook_head_index is None
    assert theirs.cfg.metadata["saelib"] == {"trained_tokens": 7}
    assert theirs.cfg.dtype == "float32" and theirs.cfg.normalize_activations == "none"

    model = tiny_model()
    tokens = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        # No hook_name argument: SAELens must take it from the loaded metadata.
        reference = get_recons_loss(theirs, model, ActivationScaler(), tokens, compute_kl=True, compute_ce_loss=True)
        mine = downstream_losses(model, tokens, ours, skip_bos=False)  # SAELens splices every position
    assert mine.ce_clean == pytest.approx(reference["ce_loss_without_sae"].mean().item(), abs=1e-5)
    assert mine.ce_spliced == pytest.approx(reference["ce_loss_with_sae"].mean().item(), abs=1e-5)
    assert mine.ce_zero == pytest.approx(reference["ce_loss_with_ablation"].mean().item(), abs=1e-5)
    assert mine.kl_spliced == pytest.approx(reference["kl_div_with_sae"][:, :-1].mean().item(), abs=1e-5)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_we_load_saelens_folders(tmp_path, architecture):
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    metadata = sae_lens.saes.sae.SAEMetadata(hook_name=HOOK, model_name="tiny")
    theirs = {
        "standard": lambda: StandardSAE(StandardSAEConfig(d_in=16, d_sae=40, metadata=metadata)),
        "topk": lambda: TopKSAE(TopKSAEConfig(d_in=16, d_sae=40, k=5, metadata=metadata)),
        "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=40, metadata=metadata)),
    }[architecture]()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
    theirs.save_model(str(tmp_path))
    ours = load_sae(tmp_path)
    assert (ours.cfg.hook_name, ours.cfg.model_name) == (HOOK, "tiny")
    x = torch.randn(12, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x).recon_BD, theirs.decode(theirs.encode(x)), rtol=1e-5, atol=1e-5)


def test_we_load_saelens_batchtopk_as_it_saves_it(tmp_path):
    """SAELens saves a trained BatchTopK SAE as a JumpReLU with one threshold per latent."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=16, d_sae=40, k=5))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
        theirs.topk_threshold.fill_(0.8)
    theirs.save_inference_model(str(tmp_path))
    assert json.loads((tmp_path / "cfg.json").read_text())["architecture"] == "jumprelu"
    inference = sae_lens.SAE.load_from_disk(str(tmp_path))
    ours = load_sae(tmp_path)
    x = torch.randn(12, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), inference.encode(x), rtol=1e-5, atol=1e-5)


def test_pre_6_topk_folder_loads_as_topk_in_both_libraries(tmp_path):
    """A pre-6.0 TopK config is "standard" with a topk activation; it used to load as ReLU
    here (L0 of 6-9 for k=2)."""
    torch.manual_seed(2)
    d_in, d_sae, k = 16, 40, 2
    weights = {"W_enc": torch.randn(d_in, d_sae), "b_enc": torch.randn(d_sae) + 1.0,
               "W_dec": torch.randn(d_sae, d_in), "b_dec": torch.randn(d_in)}
    from safetensors.torch import save_file

    save_file(weights, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({
        "architecture": "standard", "d_in": d_in, "d_sae": d_sae, "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": k}, "hook_point": HOOK, "hook_point_head_index": None, "model_name": "tiny",
        "normalize_activations": False, "apply_b_dec_to_input": True, "dtype": "float32", "device": "cpu",
    }))
    ours = load_sae(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = torch.randn(30, d_in)
    with torch.no_grad():
        latents = ours.encode(x)
        torch.testing.assert_close(latents, theirs.encode(x), rtol=1e-5, atol=1e-5)
    assert ours.architecture == "topk" and ours.cfg.k == k and ours.cfg.hook_name == HOOK
    assert (latents > 0).sum(-1).max() <= k
