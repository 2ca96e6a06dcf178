"""Evaluation: metrics on hand-made cases, the exact splice identity, downstream losses,
baselines, the one-call evaluate row, and the frontier helpers."""

import math

import pandas as pd
import numpy as np
import pytest
import torch

from saelib import metrics
from saelib.baselines import neuron_sae, pca_basis, pca_sae, random_basis, random_sae, signed_basis_sae
from saelib.harvest import HarvestConfig, harvest
from saelib.models import UnknownHookError
from saelib.sae import SAEConfig, make_sae
from saelib.splice import ablation_hook, run_with_saes, spliced

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def tokens_NL(tiny_cfg):
    tokens = torch.randint(1, tiny_cfg.d_vocab, (24, 12), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 0
    return tokens


@pytest.fixture(scope="module")
def store(tiny_model, tokens_NL, tmp_path_factory):
    cfg = HarvestConfig(hooks=[HOOK], dtype="float32", out_dir=str(tmp_path_factory.mktemp("stores")), progress=False)
    return harvest(tiny_model, tokens_NL, cfg)[HOOK]


def random_topk_sae(d_in, d_sae=64, k=4, hook=HOOK, seed=0):
    torch.manual_seed(seed)
    sae = make_sae(SAEConfig(d_in, d_sae, "topk", k=k, hook_name=hook))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    return sae.eval()


def identity_sae(d_in, hook=HOOK):
    return signed_basis_sae(torch.eye(d_in), k=d_in, hook_name=hook)


# -- metrics on hand-made cases --------------------------------------------------------------


def test_reconstruction_metrics_on_known_cases():
    x = torch.tensor([[3.0, 4.0], [1.0, 0.0], [-1.0, 2.0]])
    assert metrics.fvu(x, x) == 0 and metrics.mse(x, x) == 0
    assert metrics.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0)
    half = 0.5 * x
    assert metrics.cosine_similarity(x, half) == pytest.approx(1.0)
    assert metrics.l2_ratio(x, half) == pytest.approx(0.5)
    assert metrics.mse(x, half) == pytest.approx((0.25 * x.pow(2).sum(-1)).mean().item())
    assert metrics.cosine_similarity(x, -x) == pytest.approx(-1.0)


def test_sparsity_and_density_on_known_latents():
    latents = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 3.0, 0.0, 0.0], [0.0, 1.0, 0.5, 0.0], [0.0, 4.0, 0.0, 0.0]])
    assert metrics.l0(latents) == pytest.approx(6 / 4)
    assert metrics.l1(latents) == pytest.approx(11.5 / 4)
    frequency = metrics.firing_frequency(latents)
    assert frequency.tolist() == [0.0, 1.0, 0.25, 0.25]
    assert metrics.dead_fraction(frequency) == 0.25
    assert metrics.dense_fraction(frequency, threshold=0.5) == 0.25
    assert metrics.log10_density(frequency, floor=1e-6).tolist() == pytest.approx([-6.0, 0.0, math.log10(0.25), math.log10(0.25)])


def test_streamed_metrics_equal_the_one_shot_metrics():
    torch.manual_seed(0)
    x = torch.randn(1000, 16) * torch.linspace(0.1, 3, 16) + 2.0
    sae = random_topk_sae(16, d_sae=40, k=5, hook="")
    with torch.no_grad():
        recon, latents = sae(x)
    streamed = metrics.reconstruction_metrics(sae, x, batch_size=300)  # uneven last batch
    assert streamed.n_rows == 1000
    assert streamed.fvu == pytest.approx(metrics.fvu(x, recon), rel=1e-9)
    assert streamed.mse == pytest.approx(metrics.mse(x, recon), rel=1e-9)
    assert streamed.cosine == pytest.approx(metrics.cosine_similarity(x, recon), rel=1e-9)
    assert streamed.l2_ratio == pytest.approx(metrics.l2_ratio(x, recon), rel=1e-9)
    assert streamed.l0 == pytest.approx(5.0) and streamed.l1 == pytest.approx(metrics.l1(latents), rel=1e-9)
    torch.testing.assert_close(streamed.frequency_F, metrics.firing_frequency(latents))
    assert streamed.dead_fraction == metrics.dead_fraction(metrics.firing_frequency(latents))


def test_token_losses_and_kl_on_known_distributions():
    tokens = torch.tensor([[0, 1, 2]])
    uniform = torch.zeros(1, 3, 5)
    assert metrics.token_losses(uniform, tokens)[0].tolist() == pytest.approx([math.log(5)] * 2)
    assert metrics.kl_divergence(uniform, uniform).abs().max() == 0
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    expected = float((p * (p / q).log()).sum())
    assert metrics.kl_divergence(p.log()[None, None], q.log()[None, None]).item() == pytest.approx(expected)
    assert metrics.recovered(ce_ablated=5.0, ce_spliced=3.0, ce_clean=2.0) == pytest.approx(2 / 3)
    assert math.isnan(metrics.recovered(2.0, 2.0, 2.0))


# -- splicing ------------------------------------------------------------------------------


def test_splice_with_error_term_reproduces_the_clean_logits_exactly(tiny_model, tokens_NL):
    sae = random_topk_sae(tiny_model.cfg.d_model)
    clean = tiny_model(tokens_NL)
    with_error = run_with_saes(tiny_model, tokens_NL, sae, with_error=True)
    assert torch.equal(with_error, clean)  # bitwise, not approximately
    without_error = run_with_saes(tiny_model, tokens_NL, sae)
    assert (without_error - clean).abs().max() > 1e-3  # a random SAE is a real intervention
    assert torch.equal(tiny_model(tokens_NL), clean)  # the hooks are gone after the block


def test_several_saes_at_once_with_error_terms_are_exact(tiny_model, tokens_NL):
    saes = [random_topk_sae(tiny_model.cfg.d_model, hook="blocks.0.hook_resid_post"),
            random_topk_sae(tiny_model.cfg.d_mlp, hook="blocks.1.mlp.hook_post", seed=1)]
    clean = tiny_model(tokens_NL)
    assert torch.equal(run_with_saes(tiny_model, tokens_NL, saes, with_error=True), clean)
    with spliced(tiny_model, saes) as record:
        tiny_model(tokens_NL)
    assert set(record) == {"blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"}
    assert record["blocks.1.mlp.hook_post"].shape == (*tokens_NL.shape, 64)


def test_an_edit_moves_the_activation_by_exactly_the_decoded_difference(tiny_model, tokens_NL):
    sae = random_topk_sae(tiny_model.cfg.d_model)
    _, cache = tiny_model.run_with_cache(tokens_NL, names_filter=HOOK)
    clean_BLD = cache[HOOK]
    latents_BLF = sae.encode(clean_BLD)
    feature = int(latents_BLF[:, 1:].ne(0).sum((0, 1)).argmax())

    def remove_feature(latents, hook):
        latents[..., feature] = 0
        return latents

    with spliced(tiny_model, sae, with_error=True, edit=remove_feature):
        _, edited_cache = tiny_model.run_with_cache(tokens_NL, names_filter=HOOK)
    expected = clean_BLD - latents_BLF[..., feature, None] * sae.W_dec[feature]
    expected[:, 0] = clean_BLD[:, 0]  # BOS untouched
    torch.testing.assert_close(edited_cache[HOOK], expected, atol=1e-5, rtol=1e-5)


def test_identity_dictionary_splices_without_changing_the_model(tiny_model, tokens_NL):
    clean = tiny_model(tokens_NL)
    spliced_logits = run_with_saes(tiny_model, tokens_NL, identity_sae(tiny_model.cfg.d_model), skip_bos=False)
    torch.testing.assert_close(spliced_logits, clean, atol=1e-4, rtol=1e-4)


def test_ablations_leave_bos_alone(tiny_model, tokens_NL):
    clean = tiny_model(tokens_NL)
    zeroed = tiny_model.run_with_hooks(tokens_NL, fwd_hooks=[(HOOK, ablation_hook("zero"))])
    torch.testing.assert_close(zeroed[:, 0], clean[:, 0])
    assert (zeroed[:, 1:] - clean[:, 1:]).abs().max() > 1e-3
    everywhere = tiny_model.run_with_hooks(tokens_NL, fwd_hooks=[(HOOK, ablation_hook("zero", skip_bos=False))])
    assert (everywhere[:, 0] - clean[:, 0]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="mean_D"):
        ablation_hook("mean")


def test_bad_splice_targets_are_named(tiny_model, tokens_NL):
    with pytest.raises(UnknownHookError, match="blocks.0.hook_resid_post"):
        with spliced(tiny_model, {"blocks.0.hook_resid_pots": random_topk_sae(32)}):
            pass
    with pytest.raises(ValueError, match="d_in mismatch"):
        run_with_saes(tiny_model, tokens_NL, random_topk_sae(48))
    with pytest.raises(ValueError, match="hook_name"):
        run_with_saes(tiny_model, tokens_NL, random_topk_sae(32, hook=""))


# -- downstream loss ---------------------------------------------------------------------------


def test_downstream_loss_of_perfect_and_of_empty_dictionaries(tiny_model, tokens_NL):
    d = tiny_model.cfg.d_model
    perfect = metrics.downstream_losses(tiny_model, tokens_NL, identity_sae(d), batch_size=10)
    assert perfect.ce_spliced == pytest.approx(perfect.ce_clean, abs=1e-4)
    assert perfect.ce_recovered == pytest.approx(1.0, abs=1e-3) and perfect.kl_spliced < 1e-6
    assert perfect.ce_zero != perfect.ce_clean and perfect.kl_zero > 1e-4  # a random model: small but real effect
    assert perfect.n_tokens == tokens_NL.shape[0] * (tokens_NL.shape[1] - 1)
    clean_ce = metrics.token_losses(tiny_model(tokens_NL), tokens_NL).mean().item()
    assert perfect.ce_clean == pytest.approx(clean_ce, rel=1e-5)
    zeroed = tiny_model.run_with_hooks(tokens_NL, fwd_hooks=[(HOOK, ablation_hook("zero"))])
    kl_by_hand = metrics.kl_divergence(tiny_model(tokens_NL)[:, :-1], zeroed[:, :-1]).mean().item()
    assert perfect.kl_zero == pytest.approx(kl_by_hand, rel=1e-4)  # averaged over the CE's predictions

    empty = make_sae(SAEConfig(d, 8, "topk", k=2, hook_name=HOOK))
    with torch.no_grad():
        empty.W_dec.zero_()  # reconstructs every vector as b_dec = 0: zero-ablation
    nothing = metrics.downstream_losses(tiny_model, tokens_NL, empty)
    assert nothing.ce_spliced == pytest.approx(nothing.ce_zero, rel=1e-6)
    assert nothing.ce_recovered == pytest.approx(0.0, abs=1e-6)


def test_downstream_losses_follow_the_machine_load_with_the_same_numbers(tiny_model, tokens_NL, always_busy):
    sae = identity_sae(tiny_model.cfg.d_model)
    mean_D = metrics.hook_mean(tiny_model, tokens_NL, HOOK, batch_size=4)
    assert always_busy[:1] == [1] and torch.get_num_threads() == 2  # fewer threads, then put back
    always_busy.clear()
    busy = metrics.downstream_losses(tiny_model, tokens_NL, sae, mean_D=mean_D, batch_size=4)
    assert always_busy[:1] == [1] and torch.get_num_threads() == 2
    torch.set_num_threads(1)  # the baseline: on one thread a governor has nothing to take away
    settings = len(always_busy)
    assert metrics.hook_mean(tiny_model, tokens_NL, HOOK, batch_size=4).equal(mean_D)
    assert metrics.downstream_losses(tiny_model, tokens_NL, sae, mean_D=mean_D, batch_size=4) == busy
    assert len(always_busy) == settings


def test_hook_mean_skips_bos(tiny_model, tokens_NL):
    _, cache = tiny_model.run_with_cache(tokens_NL, names_filter=HOOK)
    expected = cache[HOOK][:, 1:].reshape(-1, tiny_model.cfg.d_model).mean(0)
    torch.testing.assert_close(metrics.hook_mean(tiny_model, tokens_NL, HOOK, batch_size=7), expected, atol=1e-5, rtol=1e-5)


# -- baselines ---------------------------------------------------------------------------------


def test_signed_basis_keeps_the_largest_coordinates():
    basis = random_basis(6, seed=3)
    torch.testing.assert_close(basis @ basis.T, torch.eye(6), atol=1e-5, rtol=0)
    x = torch.randn(50, 6)
    exact = signed_basis_sae(basis, k=6)
    torch.testing.assert_close(exact(x).recon_BD, x, atol=1e-5, rtol=0)
    one = signed_basis_sae(basis, k=1)
    coords = x @ basis.T
    best = coords.abs().argmax(-1)
    expected = coords.gather(1, best[:, None]) * basis[best]
    torch.testing.assert_close(one(x).recon_BD, expected, atol=1e-5, rtol=1e-5)
    assert metrics.l0(one(x).latents_BF) == 1.0
    with pytest.raises(ValueError, match="orthonormal"):
        signed_basis_sae(2 * basis, k=1)


def test_pca_beats_random_and_neuron_directions_on_anisotropic_data(store):
    k = 3
    fvus = {name: metrics.reconstruction_metrics(make(store, k), store).fvu
            for name, make in {"pca": pca_sae, "random": random_sae, "neurons": neuron_sae}.items()}
    assert fvus["pca"] < fvus["random"] and fvus["pca"] < fvus["neurons"], fvus
    basis, variance = pca_basis(store.rows(0, len(store)))
    assert (variance[:-1] >= variance[1:]).all()
    # k-sparse PCA with every direction allowed is exact
    assert metrics.reconstruction_metrics(pca_sae(store, store.d_in), store).fvu < 1e-8
    assert pca_sae(store, k).cfg.metadata["baseline"] == "pca" and pca_sae(store, k).cfg.hook_name == HOOK


# -- one call, and the frontier --------------------------------------------------------------------


def test_evaluate_gives_one_tidy_row(tiny_model, store):
    perfect = metrics.evaluate(identity_sae(store.d_in), tiny_model, store, name="identity", n_ce_contexts=8)
    partial = metrics.evaluate(random_topk_sae(store.d_in), tiny_model, store, name="random")
    table = pd.concat([perfect, partial], ignore_index=True)
    assert list(table.name) == ["identity", "random"] and len(table.columns) == len(perfect.columns)
    first = table.iloc[0]
    assert first.fvu < 1e-8 and first.l0 <= store.d_in and first.ce_recovered == pytest.approx(1, abs=1e-3)
    assert first.n_rows == len(store) and first.n_tokens == 8 * 11 and first.conventions == metrics.CONVENTIONS
    assert table.iloc[1].fvu > 0.01 and table.iloc[1].l0 == pytest.approx(4.0)
    with pytest.raises(ValueError, match="d_in mismatch"):
        metrics.evaluate(random_topk_sae(48), tiny_model, store)


def test_pareto_frontier_and_interpolation():
    table = pd.DataFrame({"l0": [8, 16, 32, 16, 64, 40], "fvu": [0.5, 0.35, 0.2, 0.4, 0.1, 0.25],
                          "name": list("abcdef")})
    front = metrics.pareto_frontier(table)
    assert list(front.name) == ["a", "b", "c", "e"]  # d is beaten by b, f by c
    assert metrics.interpolate_at(front, 32) == pytest.approx(0.2)
    assert metrics.interpolate_at(front, math.sqrt(32 * 64)) == pytest.approx(0.15)  # midway in log L0
    assert metrics.interpolate_at(front, 12, log_x=False) == pytest.approx(0.425)
    assert math.isnan(metrics.interpolate_at(front, 100))


def test_special_tokens_are_left_out_of_metrics_and_splicing(tiny_model, tokens_NL, store, monkeypatch):
    """Rows at special tokens are left out of reconstruction metrics and stay clean when the
    SAE or an ablation replaces the hook (the convention training follows)."""
    import saelib.data

    sae = random_topk_sae(store.d_in)
    special_rows = store.special_rows(0, len(store))
    assert not special_rows.any()  # the tiny model has no tokenizer, so no special tokens
    rows = store.rows(0, len(store))
    tokens = store.tokens_of(np.arange(len(store)))
    store.manifest.special_token_ids = [int(tokens[5]), int(tokens[40])]
    keep = ~np.isin(tokens, store.manifest.special_token_ids)
    assert 2 <= (~keep).sum() < len(keep)
    skipped = metrics.reconstruction_metrics(sae, store)
    by_hand = metrics.reconstruction_metrics(sae, rows[torch.from_numpy(keep)])
    assert skipped.n_rows == keep.sum() and skipped.fvu == pytest.approx(by_hand.fvu, rel=1e-9)
    assert metrics.reconstruction_metrics(sae, store, skip_special=False).n_rows == len(store)
    store.manifest.special_token_ids = []

    # Every token special: nothing may be replaced, so every loss is the clean one.
    monkeypatch.setattr(saelib.data, "special_token_ids", lambda model: list(range(model.cfg.d_vocab)))
    untouched = metrics.downstream_losses(tiny_model, tokens_NL, sae)
    assert untouched.ce_spliced == pytest.approx(untouched.ce_clean, abs=1e-6)
    assert untouched.ce_zero == pytest.approx(untouched.ce_clean, abs=1e-6)
    replaced = metrics.downstream_losses(tiny_model, tokens_NL, sae, skip_special=False)
    assert abs(replaced.ce_zero - replaced.ce_clean) > 1e-4
