import dataclasses

import pytest
import torch

from saelib import models
from saelib.zoo.lm import LeanGPT

# Every TransformerLens backend this environment has: the bridge always (TransformerLens 3.9
# and 4.x), HookedTransformer only on 3.x.
BACKENDS = ["bridge"] + (["hooked"] if models.has_hooked_transformer() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions", ["standard", "rotary"])
def test_lean_twin_logits_match_transformer_lens(tiny_lean, tiny_cfg, backend, positions):
    cfg = dataclasses.replace(tiny_cfg, positional_embedding_type=positions)
    torch.manual_seed(0)
    lean = LeanGPT(cfg)
    with torch.no_grad():  # non-zero biases, so a wrong mapping of any of them shows
        for name, p in lean.named_parameters():
            if p.ndim == 1 or name.endswith(("b_Q", "b_K", "b_V")):
                p.add_(torch.randn_like(p) * 0.1)
    assert any(name.startswith("pos_embed") for name in lean.state_dict()) == (positions == "standard")
    model = models.to_transformer_lens(lean.state_dict(), cfg, backend=backend)
    assert models.is_bridge(model) == (backend == "bridge")
    tokens = torch.randint(0, cfg.d_vocab, (3, cfg.n_ctx))
    with torch.no_grad():
        assert torch.allclose(lean(tokens), model(tokens), atol=1e-5)


def test_rotary_scores_depend_on_offset_only(tiny_cfg):
    from saelib.zoo.lm import rotary_cos_sin, rotate

    cfg = dataclasses.replace(tiny_cfg, positional_embedding_type="rotary")
    cos, sin = rotary_cos_sin(cfg.n_ctx, cfg.d_head, cfg.rotary_base)
    q, k = torch.randn(2, cfg.d_head)
    q_SE, k_SE = rotate(q.expand(cfg.n_ctx, -1), cos, sin), rotate(k.expand(cfg.n_ctx, -1), cos, sin)
    scores = q_SE @ k_SE.T
    assert torch.allclose(scores[7, 3], scores[20, 16], atol=1e-5) and torch.allclose(scores[5, 5], q @ k, atol=1e-5)
    assert not torch.allclose(scores[7, 3], scores[7, 4], atol=1e-3)
    with pytest.raises(ValueError, match="positional_embedding_type"):
        dataclasses.replace(tiny_cfg, positional_embedding_type="alibi")


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_for_another_shape_are_refused(tiny_lean, tiny_cfg, backend):
    with pytest.raises(ValueError, match="do not match"):
        models.to_transformer_lens(tiny_lean.state_dict(), dataclasses.replace(tiny_cfg, d_mlp=32), backend=backend)


# The hooks saelib reads or writes; both backends must give them the same values.
ADAPTER_HOOKS = ["hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_mid", "blocks.1.hook_attn_out",
                 "blocks.1.hook_mlp_out", "blocks.1.mlp.hook_post", "blocks.2.hook_resid_post",
                 "blocks.3.attn.hook_z", "blocks.3.attn.hook_pattern", "ln_final.hook_normalized"]


@pytest.mark.skipif("hooked" not in BACKENDS, reason="TransformerLens 4 has no HookedTransformer to compare with")
def test_embedded_model_is_the_same_through_both_backends(embedded):
    bridge = models.load_model("embedded", device="cpu", backend="bridge")
    assert models.is_bridge(bridge) and not models.is_bridge(embedded)
    text = "The cat sat on the mat, and then the cat went to sleep on the mat."
    tokens = embedded.to_tokens(text)
    assert torch.equal(bridge.to_tokens(text), tokens)
    with torch.no_grad():
        hooked_logits, hooked_cache = embedded.run_with_cache(tokens, names_filter=ADAPTER_HOOKS)
        bridge_logits, bridge_cache = bridge.run_with_cache(tokens, names_filter=ADAPTER_HOOKS)
        assert torch.allclose(bridge_logits, hooked_logits, atol=1e-4)
        for hook in ADAPTER_HOOKS:
            assert torch.allclose(bridge_cache[hook], hooked_cache[hook], atol=1e-4), hook
        # the loss and a run cut short by stop_at_layer agree too
        assert torch.allclose(bridge(tokens, return_type="loss"), embedded(tokens, return_type="loss"), atol=1e-5)
        assert torch.allclose(bridge(tokens, stop_at_layer=2), embedded(tokens, stop_at_layer=2), atol=1e-4)
    assert bridge.cfg.d_model == embedded.cfg.d_model and bridge.cfg.n_layers == embedded.cfg.n_layers
    assert models.signatures_match(models.model_signature(bridge), models.model_signature(embedded))
    assert models.model_fingerprint(bridge) != models.model_fingerprint(embedded)  # why signatures exist


def test_signature_tells_models_apart(tiny_model):
    signature = models.model_signature(tiny_model)
    assert models.signatures_match(models.model_signature(tiny_model), signature)
    assert models.same_model(tiny_model, models.model_fingerprint(tiny_model))
    other = models.randomize_weights(tiny_model, seed=3)
    assert not models.signatures_match(models.model_signature(other), signature)
    assert not models.same_model(other, models.model_fingerprint(tiny_model), signature)
    assert not models.signatures_match(None, signature)


def test_backend_choice(monkeypatch):
    monkeypatch.delenv(models.BACKEND_ENV, raising=False)
    assert models.tl_backend() == ("hooked" if models.has_hooked_transformer() else "bridge")
    monkeypatch.setenv(models.BACKEND_ENV, "bridge")
    assert models.tl_backend() == "bridge"
    monkeypatch.setenv(models.BACKEND_ENV, "hooket")
    with pytest.raises(ValueError, match="'hooket'.*SAELIB_TL_BACKEND.*hooked, bridge"):
        models.tl_backend()
    if not models.has_hooked_transformer():
        with pytest.raises(ImportError, match="no HookedTransformer.*bridge"):
            models.tl_backend("hooked")


def test_check_hook_name_accepts_and_suggests(tiny_model):
    assert models.check_hook_name(tiny_model, "blocks.1.hook_resid_post") == "blocks.1.hook_resid_post"
    with pytest.raises(models.UnknownHookError) as info:
        models.check_hook_name(tiny_model, "blocks.1.hook_resid_pots")
    message = str(info.value)
    assert "Did you mean 'blocks.1.hook_resid_post'" in message
    assert "layer 0..1" in message and "mlp.hook_post" in message
    with pytest.raises(models.UnknownHookError, match="blocks.1.hook_mlp_out"):
        models.check_hook_name(tiny_model, "blocks.7.hook_mlp_out")


def test_hook_layer():
    assert models.hook_layer("blocks.3.mlp.hook_post") == 3
    assert models.hook_layer("hook_embed") is None


def test_randomize_weights_keeps_scale_not_values(tiny_model):
    control = models.randomize_weights(tiny_model, seed=1)
    for (name, trained), (_, fresh) in zip(tiny_model.named_parameters(), control.named_parameters()):
        assert trained.shape == fresh.shape
        if trained.numel() > 100:
            assert not torch.allclose(trained, fresh), name
            assert torch.isclose(fresh.std(), trained.std(), rtol=0.2), name
    # the original is untouched and the result is reproducible
    again = models.randomize_weights(tiny_model, seed=1)
    assert torch.equal(control.blocks[0].attn.W_Q, again.blocks[0].attn.W_Q)


def test_randomize_weights_can_keep_embeddings(tiny_model):
    control = models.randomize_weights(tiny_model, keep_embeddings=True)
    assert torch.equal(control.embed.W_E, tiny_model.embed.W_E)
    assert torch.equal(control.unembed.W_U, tiny_model.unembed.W_U)
    assert not torch.allclose(control.blocks[0].mlp.W_in, tiny_model.blocks[0].mlp.W_in)


def test_unknown_model_name_suggests():
    with pytest.raises(models.UnknownModelError, match="pythia-70m-deduped"):
        models.load_model("pythia-70m-dedupd")


def test_pretrained_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    with pytest.raises(models.ModelNeedsNetworkError, match="needs network access.*MODEL='embedded'"):
        models.load_model("gpt2", device="cpu")


def test_missing_embedded_files_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELIB_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.safetensors.*git checkout -- data/"):
        models.load_model("embedded")
