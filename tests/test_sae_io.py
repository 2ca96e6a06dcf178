"""SAELens-format folders: settings saelib cannot honour are refused by name, never ignored."""

import json

import pytest
import torch
from safetensors.torch import save_file

from saelib.sae_io import SAEFormatError, load_sae, read_saelens_cfg

BASE = {"architecture": "standard", "d_in": 4, "d_sae": 8, "apply_b_dec_to_input": True,
        "normalize_activations": "none", "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.0.hook_resid_post"}}


@pytest.mark.parametrize("change, field", [
    ({"normalize_activations": "layer_norm"}, "normalize_activations"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations"),
    ({"apply_b_dec_to_input": False}, "apply_b_dec_to_input"),
    ({"architecture": "gated"}, "architecture"),
    ({"architecture": "topk", "k": 3, "rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm"),
    ({"reshape_activations": "hook_z"}, "reshape_activations"),
    ({"metadata": {"sae_lens_version": "6.5.0", "hook_head_index": 3}}, "hook_head_index"),
    ({"architecture": "topk"}, "needs k"),
])
def test_settings_we_cannot_honour_are_refused_by_name(change, field):
    with pytest.raises(SAEFormatError, match=field):
        read_saelens_cfg({**BASE, **change}, where="x/cfg.json")


def test_pre_6_keys_are_read():
    cfg = read_saelens_cfg({"d_in": 4, "d_sae": 8, "hook_point": "blocks.1.hook_resid_pre", "model_name": "gpt2",
                            "activation_fn_str": "relu", "normalize_activations": False})
    assert (cfg.architecture, cfg.hook_name, cfg.model_name) == ("relu", "blocks.1.hook_resid_pre", "gpt2")
    with pytest.raises(SAEFormatError, match="hook_head_index"):
        read_saelens_cfg({"d_in": 4, "d_sae": 8, "hook_point": "blocks.1.attn.hook_z", "hook_point_head_index": 2})


def test_batchtopk_folder_with_one_threshold_per_latent_loads_as_batchtopk(tmp_path):
    torch.manual_seed(0)
    weights = {"W_enc": torch.randn(4, 8), "b_enc": torch.zeros(8), "W_dec": torch.randn(8, 4), "b_dec": torch.zeros(4),
               "threshold": torch.full((8,), 0.3)}
    save_file(weights, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps({**BASE, "architecture": "batchtopk", "k": 2}))
    sae = load_sae(tmp_path)
    assert sae.architecture == "batchtopk" and float(sae.threshold) == pytest.approx(0.3)
    x = torch.randn(5, 4)
    pre = x @ weights["W_enc"]
    torch.testing.assert_close(sae.encode(x), pre * (pre > 0.3))


def test_broken_cfg_json_is_named(tmp_path):
    save_file({"W_enc": torch.zeros(4, 8)}, str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match="cfg.json is not valid JSON"):
        load_sae(tmp_path)
