import pytest
import torch

from saelib import models
from saelib.zoo.lm import to_hooked_transformer


def test_lean_twin_logits_match_hooked_transformer(tiny_lean, tiny_model, tiny_cfg):
    tokens = torch.randint(0, tiny_cfg.d_vocab, (3, tiny_cfg.n_ctx))
    with torch.no_grad():
        assert torch.allclose(tiny_lean(tokens), tiny_model(tokens), atol=1e-5)


def test_rotary_lean_twin_matches_hooked_transformer(tiny_cfg):
    import dataclasses

    from saelib.zoo.lm import LeanGPT, rotary_cos_sin, rotate

    cfg = dataclasses.replace(tiny_cfg, positional_embedding_type="rotary")
    torch.manual_seed(0)
    lean = LeanGPT(cfg)
    assert not any(name.startswith("pos_embed") for name in lean.state_dict())
    hooked = to_hooked_transformer(lean.state_dict(), cfg)
    tokens = torch.randint(0, cfg.d_vocab, (3, cfg.n_ctx))
    with torch.no_grad():
        logits = lean(tokens)
        assert torch.allclose(logits, hooked(tokens), atol=1e-5)
    # a rotated query-key score depends on the two positions' offset only
    cos, sin = rotary_cos_sin(cfg.n_ctx, cfg.d_head, cfg.rotary_base)
    q, k = torch.randn(2, cfg.d_head)
    q_SE, k_SE = rotate(q.expand(cfg.n_ctx, -1), cos, sin), rotate(k.expand(cfg.n_ctx, -1), cos, sin)
    scores = q_SE @ k_SE.T
    assert torch.allclose(scores[7, 3], scores[20, 16], atol=1e-5) and torch.allclose(scores[5, 5], q @ k, atol=1e-5)
    assert not torch.allclose(scores[7, 3], scores[7, 4], atol=1e-3)
    with pytest.raises(ValueError, match="positional_embedding_type"):
        dataclasses.replace(tiny_cfg, positional_embedding_type="alibi")


def test_weights_for_another_shape_are_refused(tiny_lean, tiny_cfg):
    import dataclasses

    with pytest.raises(Exception, match="size mismatch|do not match"):
        to_hooked_transformer(tiny_lean.state_dict(), dataclasses.replace(tiny_cfg, d_mlp=32))


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
