import numpy as np
import pandas as pd
import torch

from saelib.controls import RANDOM, RANDOM_REAL_EMBEDDINGS, TRAINED, control_models, token_specificity, token_variance_share
from saelib.harvest import model_label


def test_control_models_randomise_all_but_what_they_keep(tiny_model):
    variants = control_models(tiny_model, seed=0)
    assert list(variants) == [TRAINED, RANDOM, RANDOM_REAL_EMBEDDINGS]
    assert variants[TRAINED] is tiny_model
    trained = dict(tiny_model.named_parameters())
    for name, variant in variants.items():
        if name == TRAINED:
            continue
        # the embedding parameters by module: TransformerBridge names parameters after the model it wraps
        embedding = {id(p) for attr in ("embed", "pos_embed", "unembed") if getattr(variant, attr, None) is not None
                     for p in getattr(variant, attr).parameters()}
        assert embedding
        for param_name, param in variant.named_parameters():
            kept = name == RANDOM_REAL_EMBEDDINGS and id(param) in embedding
            assert torch.equal(param, trained[param_name]) == kept, (name, param_name)
    # each variant harvests into its own store folder
    assert len({model_label(v) for v in variants.values()}) == 3


def test_token_specificity_counts_single_token_features():
    tables = {
        "a": pd.DataFrame({"top_token_share": [1.0, 0.95, 0.2, 0.5], "token_entropy": [0.0, 0.1, 2.0, 1.0]}),
        "b": pd.DataFrame({"top_token_share": [0.3, 0.4], "token_entropy": [1.5, 2.5]}),
    }
    summary = token_specificity(tables, single_token_share=0.9)
    assert summary.loc["a", "single_token_features"] == 0.5 and summary.loc["b", "single_token_features"] == 0.0
    assert summary.loc["a", "median_token_entropy"] == 0.55 and summary.loc["b", "mean_token_entropy"] == 2.0
    assert summary.loc["a", "live_features"] == 4


def test_token_variance_share_is_one_for_a_function_of_the_token_and_small_for_noise():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (5000,), generator=generator).numpy()
    table = torch.randn(20, 8, generator=generator)
    assert abs(token_variance_share(table[tokens], tokens) - 1.0) < 1e-9
    noise = torch.randn(5000, 8, generator=generator)
    assert token_variance_share(noise, tokens) < 0.02  # 20 group means of 250 noise vectors each
    half = table[tokens] + noise * table.std()  # token part and noise of equal variance
    assert 0.35 < token_variance_share(half, tokens) < 0.65


def test_initialised_model_is_a_step_0_checkpoint(embedded):
    # The architecture's own initialisation: a model that has learned nothing predicts nearly
    # uniformly (loss near ln V), where the trained model and the statistics-matched
    # re-randomisation do not; same seed, same weights; LayerNorm gains start at one.
    import math

    from saelib.models import initialised_model, model_fingerprint

    fresh = initialised_model("embedded", seed=0, device="cpu")
    tokens = embedded.to_tokens("The sailor saw the whale near the ship, and the whale swam away from the ship.")
    with torch.no_grad():
        uniform = math.log(embedded.cfg.d_vocab)
        assert abs(float(fresh(tokens, return_type="loss")) - uniform) < 0.05
        assert float(embedded(tokens, return_type="loss")) < uniform - 2
    assert torch.equal(fresh.blocks[0].ln1.w, torch.ones_like(fresh.blocks[0].ln1.w))
    assert fresh.cfg.model_name == "embedded-init0" and model_label(fresh) != model_label(embedded)
    again, other = initialised_model("embedded", seed=0, device="cpu"), initialised_model("embedded", seed=1, device="cpu")
    assert model_fingerprint(again) == model_fingerprint(fresh) != model_fingerprint(other)


def test_initialised_model_of_a_checkpoint_folder(tmp_path):
    from saelib.models import initialised_model, load_model
    from saelib.zoo.checkpoints import make_checkpoint, train_small_tokenizer

    # make_checkpoint's random stand-in *is* transformers' from_config initialisation under
    # torch seed 3, so the re-initialised model of any folder of that architecture, at seed 3,
    # must be that stand-in exactly, and at another seed must not be
    folder = make_checkpoint(tmp_path / "gpt2", "gpt2", seed=3,
                             tokenizer=train_small_tokenizer(vocab_size=512, n_windows=50))
    stand_in = load_model(str(folder), device="cpu")
    fresh, other = initialised_model(str(folder), seed=3, device="cpu"), initialised_model(str(folder), seed=4, device="cpu")
    assert fresh.cfg.model_name == "gpt2-init3"
    tokens = stand_in.to_tokens("The whale swam past the ship.")
    with torch.no_grad():
        assert torch.allclose(fresh(tokens), stand_in(tokens), atol=1e-5)
        assert not torch.allclose(other(tokens), stand_in(tokens), atol=1e-3)


def test_gaussian_noise_store_keeps_second_order_statistics_and_nothing_else(embedded, tmp_path):
    # Residual activations carry the current token (token_variance_share well above 0); noise
    # with the same mean and covariance, beside the same tokens, carries none of it.
    from saelib.controls import gaussian_noise_store
    from saelib.data import token_windows
    from saelib.harvest import HarvestConfig, harvest
    from saelib.store import ActivationStore

    hook = "blocks.1.hook_resid_post"
    tokens = token_windows(embedded, 8192, context_len=64, seed=0)
    store = harvest(embedded, tokens, HarvestConfig(hooks=[hook], out_dir=str(tmp_path / "real"), shard_mb=0.5,
                                                    progress=False))[hook]
    noise = gaussian_noise_store(store, tmp_path / "noise", seed=0)
    assert noise.manifest.complete and len(noise) == len(store) and noise.manifest.model == "embedded-noise"
    real_ND, noise_ND = store.rows(0, len(store)).double(), noise.rows(0, len(noise)).double()
    assert torch.allclose(noise_ND.mean(0), real_ND.mean(0), atol=0.05 * float(real_ND.std()))
    real_cov, noise_cov = torch.cov(real_ND.T), torch.cov(noise_ND.T)
    assert float((noise_cov - real_cov).norm() / real_cov.norm()) < 0.1
    tokens = store.tokens_of(np.arange(len(store)))
    # with G distinct tokens among N rows, the unadjusted share of a variable unrelated to the
    # token sits at its chance level (G - 1) / (N - 1); the adjusted share (default) at zero
    chance = (len(np.unique(tokens)) - 1) / (len(tokens) - 1)
    assert chance > 0.1  # many tokens seen once: the correction matters here
    assert abs(token_variance_share(noise_ND.float(), tokens, adjusted=False) - chance) < 0.03
    assert abs(token_variance_share(noise_ND.float(), tokens)) < 0.03
    assert token_variance_share(real_ND.float(), tokens) > 0.3
    # the same seed writes the same store, and a store that lost its last shards resumes to it
    again = gaussian_noise_store(store, tmp_path / "again", seed=0, chunk_rows=1000)
    assert torch.equal(again.rows(0, len(again)), noise.rows(0, len(noise)))
    shards = sorted((tmp_path / "again").glob("shard_*.npy"))
    assert len(shards) > 1
    shards[-1].unlink()  # as if killed before its last shard landed
    resumed = gaussian_noise_store(store, tmp_path / "again", seed=0, chunk_rows=1000)
    assert len(resumed) == len(noise) and torch.equal(resumed.rows(0, len(resumed)), noise.rows(0, len(noise)))
    assert ActivationStore(tmp_path / "again", verify="full").manifest.complete


def test_context_dependence_is_zero_where_only_the_token_counts(embedded):
    # At hook_embed an activation is a function of the current token alone, so every latent's
    # dependence is exactly 0; after attention (layer 1 residual) the same kind of dictionary
    # depends on the context.
    from saelib.controls import context_dependence
    from saelib.data import token_windows
    from saelib.sae import SAEConfig, make_sae

    tokens = token_windows(embedded, 64 * 32, context_len=32, seed=0)
    d = embedded.cfg.d_model
    dependences = {}
    for hook in ("hook_embed", "blocks.1.hook_resid_post"):
        torch.manual_seed(0)
        sae = make_sae(SAEConfig(d_in=d, d_sae=64, architecture="topk", k=8, hook_name=hook))
        dependences[hook] = context_dependence(embedded, sae, tokens)
    at_embed, after_attention = dependences["hook_embed"], dependences["blocks.1.hook_resid_post"]
    assert np.isfinite(at_embed).sum() > 20 and np.nanmax(at_embed) == 0.0
    assert np.nanmedian(after_attention) > 0.2
