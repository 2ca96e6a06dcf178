import numpy as np
import pandas as pd
import pytest
import torch

from saelib.controls import (RANDOM_REAL_EMBEDDINGS, REINITIALISED, TRAINED, control_models, token_specificity,
                             token_variance_share)
from saelib.harvest import model_label


def test_control_models_are_the_step_0_model_and_the_re_randomised_one(embedded):
    from saelib.models import initialised_model, model_fingerprint

    variants = control_models(embedded, "embedded", seed=0)
    assert list(variants) == [TRAINED, REINITIALISED, RANDOM_REAL_EMBEDDINGS]
    assert variants[TRAINED] is embedded
    # the re-initialised variant is the architecture's own step-0 initialisation
    assert model_fingerprint(variants[REINITIALISED]) == model_fingerprint(initialised_model("embedded", seed=0, device="cpu"))
    # the re-randomised one keeps exactly the embeddings and unembedding
    trained = dict(embedded.named_parameters())
    kept_variant = variants[RANDOM_REAL_EMBEDDINGS]
    embedding = {id(p) for attr in ("embed", "pos_embed", "unembed") if getattr(kept_variant, attr, None) is not None
                 for p in getattr(kept_variant, attr).parameters()}
    assert embedding
    for param_name, param in kept_variant.named_parameters():
        assert torch.equal(param, trained[param_name]) == (id(param) in embedding), param_name
    # each variant harvests into its own store folder
    assert len({model_label(v) for v in variants.values()}) == 3


def test_control_models_refuse_a_name_of_another_architecture(embedded, tmp_path):
    from saelib.zoo.checkpoints import make_checkpoint, train_small_tokenizer

    folder = make_checkpoint(tmp_path / "gpt2", "gpt2", seed=3,
                             tokenizer=train_small_tokenizer(vocab_size=512, n_windows=50))
    with pytest.raises(ValueError, match="another architecture .* pass the name the model was loaded by"):
        control_models(embedded, str(folder), seed=0)


def test_token_specificity_counts_single_token_features():
    table = pd.DataFrame({"top_token_share": [1.0, 0.95, 0.2, 0.5], "token_entropy": [0.0, 0.1, 2.0, 1.0]})
    summary = token_specificity(table, single_token_share=0.9)
    assert summary["single_token_features"] == 0.5 and summary["mean_top_token_share"] == 0.6625
    assert summary["median_token_entropy"] == 0.55 and summary["mean_token_entropy"] == 0.775
    assert token_specificity(table, single_token_share=0.99)["single_token_features"] == 0.25


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
    windows = token_windows(embedded, 8192, context_len=64, seed=0)
    store = harvest(embedded, windows, HarvestConfig(hooks=[hook], out_dir=str(tmp_path / "real"), shard_mb=0.5,
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
    # held-out noise takes its statistics from another store of the same hook (here a step-0
    # model's, whose activations are far smaller): its rows follow that store, not this one
    from saelib.models import initialised_model

    fresh = harvest(initialised_model("embedded", seed=0, device="cpu"), windows[:32],
                    HarvestConfig(hooks=[hook], out_dir=str(tmp_path / "fresh"), progress=False))[hook]
    borrowed = gaussian_noise_store(store, tmp_path / "borrowed", seed=1, statistics_from=fresh)
    assert len(borrowed) == len(store)
    fresh_ND, borrowed_ND = fresh.rows(0, len(fresh)).double(), borrowed.rows(0, len(borrowed)).double()
    assert abs(float(borrowed_ND.std() / fresh_ND.std()) - 1) < 0.05
    assert float(real_ND.std()) > 3 * float(fresh_ND.std())
    other_hook = harvest(embedded, windows[:8], HarvestConfig(hooks=["blocks.0.hook_mlp_out"], out_dir=str(tmp_path / "other"),
                                                           progress=False))["blocks.0.hook_mlp_out"]
    with pytest.raises(ValueError, match="statistics_from .* same hook"):
        gaussian_noise_store(store, tmp_path / "wrong", statistics_from=other_hook)


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
    # several SAEs read in one set of forward passes give what each gives alone
    torch.manual_seed(0)
    saes = {hook: make_sae(SAEConfig(d_in=d, d_sae=64, architecture="topk", k=8, hook_name=hook))
            for hook in ("hook_embed", "blocks.1.hook_resid_post")}
    together = context_dependence(embedded, saes, tokens)
    for hook, sae in saes.items():
        np.testing.assert_allclose(together[hook], context_dependence(embedded, sae, tokens), rtol=1e-9, atol=1e-12)
    assert np.isfinite(at_embed).sum() > 20 and np.nanmax(at_embed) == 0.0
    assert np.nanmedian(after_attention) > 0.2


def test_repeated_windows_differ_only_before_the_second_copy():
    from saelib.controls import repeated_windows

    repeated, control = repeated_windows(np.arange(100, 200), n_windows=6, half=10, bos=1, seed=0)
    assert repeated.shape == control.shape == (6, 21)
    assert (repeated[:, 0] == 1).all() and (control[:, 0] == 1).all()
    assert torch.equal(repeated[:, 1:11], repeated[:, 11:])  # A then A
    assert torch.equal(control[:, 11:], repeated[:, 11:])  # B then the same A
    assert (control[:, 1:11] != repeated[:, 1:11]).any(1).all()
    assert ((repeated[:, 1:] >= 100) & (repeated[:, 1:] < 200)).all()


def _direction_sae(hook: str, direction_D: torch.Tensor, threshold: float):
    """A one-latent ReLU dictionary that reads ``direction_D`` above ``threshold``."""
    from saelib.sae import SAEConfig, make_sae

    sae = make_sae(SAEConfig(d_in=len(direction_D), d_sae=2, architecture="relu", hook_name=hook))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.W_enc[:, 0] = direction_D
        sae.b_enc.zero_()
        sae.b_enc[0] = -threshold
        sae.b_enc[1] = -1e9  # never fires
        sae.b_dec.zero_()
    return sae


def test_induction_scores_find_the_repetition_only_where_induction_heads_exist(embedded):
    # A latent reading the direction in which the trained model's late residual stream moves
    # on a repeated sequence (fitted on other windows) is an induction feature; the same
    # construction on the step-0 model is not, and at hook_embed, where the second halves
    # are identical, every score is exactly 0.
    from saelib.controls import feature_classes, induction_features, induction_scores, repeated_windows
    from saelib.harvest import _capture
    from saelib.models import initialised_model
    from saelib.sae import SAEConfig, make_sae

    hook = "blocks.3.hook_resid_post"
    pool = np.arange(300, 3000)
    fit_repeated, fit_control = repeated_windows(pool, 32, 20, bos=0, seed=1)
    test_repeated, test_control = repeated_windows(pool, 32, 20, bos=0, seed=2)
    shares = {}
    for name, model in (("trained", embedded), ("step 0", initialised_model("embedded", seed=0, device="cpu"))):
        acts = {kind: _capture(model, windows, [hook], None)[hook][:, -20:].flatten(0, 1)
                for kind, windows in (("repeated", fit_repeated), ("control", fit_control))}
        direction = acts["repeated"].mean(0) - acts["control"].mean(0)
        direction = direction / direction.norm()
        projections = torch.cat([acts["repeated"], acts["control"]]) @ direction
        sae = _direction_sae(hook, direction, float(projections.median()))
        scores = induction_scores(model, sae, test_repeated, test_control)
        shares[name] = feature_classes(np.array([True, False]), induction=scores)["induction_features"]
        if name == "trained":
            assert scores.score_F[0] > 0.5 and scores.repeat_rate_F[0] > 0.3, scores
            assert np.isnan(scores.score_F[1])  # fires on neither kind of window
        else:
            assert abs(scores.score_F[0]) < 0.3, scores
    assert shares == {"trained": 1.0, "step 0": 0.0}
    torch.manual_seed(0)
    at_embed = induction_scores(embedded, make_sae(SAEConfig(d_in=embedded.cfg.d_model, d_sae=64, architecture="topk",
                                                             k=8, hook_name="hook_embed")), test_repeated, test_control)
    assert np.isfinite(at_embed.score_F).sum() > 10 and np.nanmax(np.abs(at_embed.score_F)) == 0.0
    assert not induction_features(at_embed).any()


def test_feature_classes_count_among_live_latents():
    from saelib.controls import InductionScores, feature_classes

    live = np.array([True, True, True, True, False])
    dependence = np.array([0.9, 0.2, np.nan, 0.5, 0.99])  # the dead latent's 0.99 must not count
    induction = InductionScores(score_F=np.array([0.9, 0.9, 0.1, np.nan, 0.9]),
                                repeat_rate_F=np.array([0.2, 0.01, 0.5, 0.0, 0.9]))
    classes = feature_classes(live, dependence, induction)
    assert classes["context_features"] == 2 / 3  # 0.9 and 0.5 among the three readable live latents
    assert classes["median_context_dependence"] == 0.5
    assert classes["induction_features"] == 1 / 4  # only latent 0 is strong and frequent enough
    empty = feature_classes(live)
    assert np.isnan(empty["context_features"]) and np.isnan(empty["induction_features"])


def test_control_measures_follow_the_machine_load_with_the_same_numbers(embedded, always_busy):
    # equal up to float rounding, not bit for bit: at 2 x 32 tokens MKL splits the MLP's
    # output product differently on one and on two threads (2e-5 apart at blocks.0.hook_mlp_out)
    from saelib.controls import context_dependence, induction_scores, repeated_windows
    from saelib.data import token_windows
    from saelib.sae import SAEConfig, make_sae

    torch.manual_seed(0)
    sae = make_sae(SAEConfig(d_in=embedded.cfg.d_model, d_sae=64, architecture="topk", k=8,
                             hook_name="blocks.1.hook_resid_post"))
    tokens = token_windows(embedded, 16 * 32, context_len=32, seed=0)
    repeated, control = repeated_windows(np.arange(300, 3000), 16, 15, bos=0, seed=2)
    measures = {"context": lambda: context_dependence(embedded, sae, tokens, batch_size=2),
                "induction": lambda: induction_scores(embedded, sae, repeated, control, batch_size=2)}
    busy = {}
    for name, measure in measures.items():
        always_busy.clear()
        busy[name] = measure()
        assert always_busy[:1] == [1] and torch.get_num_threads() == 2, name  # fewer threads, then put back
    torch.set_num_threads(1)  # the baseline: on one thread a governor has nothing to take away
    np.testing.assert_allclose(measures["context"](), busy["context"], rtol=1e-5, atol=1e-7)
    for got, want in zip(measures["induction"](), busy["induction"]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
