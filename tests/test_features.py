"""FeatureActivations: sparse records of an SAE over a store, checked against dense encodes."""

import copy

import numpy as np
import pytest
import torch

from saelib.features import FeatureActivations, decoder_neighbours, logit_effects
from saelib.harvest import HarvestConfig, harvest
from saelib.sae import SAEConfig, make_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def store(tiny_model, tiny_cfg, tmp_path_factory):
    tokens = torch.randint(1, tiny_cfg.d_vocab, (20, 10), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = 0
    tokens[:, 5] = 7  # one token repeated in every context: some latent will love it
    cfg = HarvestConfig(hooks=[HOOK], dtype="float32", out_dir=str(tmp_path_factory.mktemp("s")), progress=False)
    return harvest(tiny_model, tokens, cfg)[HOOK]


@pytest.fixture(scope="module")
def sae(store):
    torch.manual_seed(0)
    return make_sae(SAEConfig(store.d_in, 48, "topk", k=3, hook_name=HOOK)).eval()


@pytest.fixture(scope="module")
def acts(sae, store):
    return FeatureActivations.collect(sae, store, batch_size=37)


def dense(sae, store):
    with torch.no_grad():
        return sae.encode(store.rows(0, len(store))).numpy()


def test_sparse_record_equals_the_dense_encode(sae, store, acts):
    latents_NF = dense(sae, store)
    assert acts.n_rows == len(store) and acts.d_sae == 48
    np.testing.assert_allclose(acts.density(), (latents_NF != 0).mean(0))
    np.testing.assert_allclose(acts.max_activation(), latents_NF.max(0), rtol=1e-6)
    feature = int((latents_NF != 0).sum(0).argmax())
    rows, values = acts.of(feature)
    np.testing.assert_array_equal(rows, np.flatnonzero(latents_NF[:, feature]))
    np.testing.assert_allclose(values, latents_NF[rows, feature], rtol=1e-6)
    probe = np.arange(len(store))
    np.testing.assert_allclose(acts.activation_at(feature, probe), latents_NF[:, feature], rtol=1e-6)
    per_context_LF = (latents_NF != 0).reshape(-1, store.manifest.rows_per_context, 48).any(1)
    np.testing.assert_array_equal(acts.context_counts(), per_context_LF.sum(0))


def test_the_whole_record_is_the_dense_encode_by_latent_then_row(sae, store, acts):
    latents_NF = dense(sae, store)
    rows_N, latents_N = np.nonzero(latents_NF.T)[::-1]  # by latent, then row: the record's order
    np.testing.assert_array_equal(acts.offsets_F1, np.concatenate([[0], np.cumsum((latents_NF != 0).sum(0))]))
    np.testing.assert_array_equal(acts.rows, rows_N)
    np.testing.assert_allclose(acts.values, latents_NF[rows_N, latents_N], rtol=1e-6)
    assert acts.rows.dtype == np.int64 and acts.values.dtype == np.float32 and acts.offsets_F1.dtype == np.int64
    nothing = FeatureActivations.collect(sae, store, n_rows=0)
    assert len(nothing.rows) == len(nothing.values) == 0 and nothing.offsets_F1.tolist() == [0] * 49


def test_collecting_follows_the_machine_load_with_the_same_record(sae, store, acts, always_busy):
    busy = FeatureActivations.collect(sae, store, batch_size=7)
    assert always_busy[:1] == [1] and torch.get_num_threads() == 2  # fewer threads, then put back
    for name in ("rows", "values", "offsets_F1"):
        np.testing.assert_array_equal(getattr(busy, name), getattr(acts, name))


def test_top_examples_are_the_largest_one_per_context(sae, store, acts):
    latents_NF = dense(sae, store)
    feature = int((latents_NF != 0).sum(0).argmax())
    top = acts.top_examples(feature, n=5)
    values = [e.value for e in top]
    assert values == sorted(values, reverse=True) and values[0] == pytest.approx(latents_NF[:, feature].max())
    assert len({e.context for e in top}) == len(top)
    for example in top:  # the example points back at its token in the store
        assert store.contexts()[example.context, example.position] == store.tokens_of(example.row)
        tokens_L, acts_L = acts.context_activations(feature, example)
        assert acts_L[example.position] == pytest.approx(example.value) and acts_L[0] == 0
        assert len(tokens_L) == store.manifest.context_len
    with pytest.raises(IndexError, match="latents 0..47"):
        acts.of(48)


def test_quantile_bands_cover_every_activation(acts):
    feature = int(np.argmax(np.diff(acts.offsets_F1)))
    bands = acts.quantile_bands(feature, n_bands=3, per_band=4)
    assert len(bands) == 3 and bands[0]["high"] == pytest.approx(acts.max_activation()[feature])
    assert sum(b["share"] for b in bands) == pytest.approx(1.0)
    for band in bands:
        assert len(band["examples"]) <= 4
        assert all(band["low"] - 1e-6 <= e.value <= band["high"] + 1e-6 for e in band["examples"])


def test_feature_table_and_token_counts(store, acts):
    table = acts.feature_table()
    assert set(table.feature) == set(np.flatnonzero(np.diff(acts.offsets_F1)))
    assert (table.top_token_share <= 1).all() and (table.density > 0).all()
    feature = int(table.sort_values("top_token_share").iloc[-1].feature)
    rows, _ = acts.of(feature)
    ids, counts = np.unique(store.tokens_of(rows), return_counts=True)
    assert acts.token_counts(feature, 1)[0] == (int(ids[counts.argmax()]), int(counts.max()))
    assert acts.top_token_share(feature) == pytest.approx(counts.max() / len(rows))


def test_share_in_contexts(store, acts):
    feature = int(np.argmax(np.diff(acts.offsets_F1)))
    rows, _ = acts.of(feature)
    contexts, _ = store.locate(rows)
    mask = np.zeros(len(store.contexts()), dtype=bool)
    mask[::2] = True
    assert acts.share_in_contexts(feature, mask) == pytest.approx(np.mean(contexts % 2 == 0))
    assert acts.share_in_contexts(feature, np.ones_like(mask)) == 1.0


def test_logit_effects_and_neighbours(tiny_model, sae):
    sae = copy.deepcopy(sae)
    effects, promoted, suppressed = logit_effects(sae, tiny_model, 3, n=4)
    expected = sae.W_dec[3] @ tiny_model.W_U
    torch.testing.assert_close(effects, expected.detach())
    assert promoted[0] == int(expected.argmax()) and suppressed[0] == int(expected.argmin())
    with torch.no_grad():
        sae.W_dec[5] = 2 * sae.W_dec[3]  # a parallel atom is the nearest neighbour, cosine 1
    assert decoder_neighbours(sae, 3, n=2)[0] == (5, pytest.approx(1.0, abs=1e-5))


def test_token_entropy_is_zero_for_one_token_and_log_n_for_n_even_tokens(store, acts):
    table = acts.feature_table()
    for row in table.itertuples():
        rows, _ = acts.of(row.feature)
        _, counts = np.unique(store.tokens_of(rows), return_counts=True)
        p = counts / counts.sum()
        assert row.token_entropy == pytest.approx(-(p * np.log(p)).sum())
        assert (row.token_entropy == 0) == (row.top_token_share == 1.0)
    # a hand-made record: latent 0 on one token three times, latent 1 once on each of four tokens
    tokens = store.tokens_of(np.arange(acts.n_rows))
    first_rows = [int(np.flatnonzero(tokens == t)[0]) for t in np.unique(tokens)[:4]]
    one = np.flatnonzero(tokens == 7)[:3]  # the store fixture puts token 7 in every context
    assert len(one) == 3
    made = FeatureActivations(np.array([*one, *sorted(first_rows)]), np.ones(7, dtype=np.float32), np.array([0, 3, 7]), acts.n_rows, store)
    assert made.token_entropy(0) == 0.0
    assert made.token_entropy(1) == pytest.approx(np.log(4))


def test_logit_effects_go_through_the_layer_output_weights(tiny_model):
    """An MLP-neuron SAE's atom reaches the logits through W_out, a hook_z atom through W_O;
    the old code multiplied d_mlp-wide atoms by W_U and failed with a shape error."""
    from saelib.sae import SAEConfig, make_sae

    cfg = tiny_model.cfg
    mlp = make_sae(SAEConfig(d_in=cfg.d_mlp, d_sae=8, architecture="topk", k=2, hook_name="blocks.1.mlp.hook_post"))
    effects, _, _ = logit_effects(mlp, tiny_model, 2)
    torch.testing.assert_close(effects, (mlp.W_dec[2] @ tiny_model.blocks[1].mlp.W_out @ tiny_model.W_U).detach())
    z = make_sae(SAEConfig(d_in=cfg.n_heads * cfg.d_head, d_sae=8, architecture="topk", k=2, hook_name="blocks.0.attn.hook_z"))
    effects, _, _ = logit_effects(z, tiny_model, 1)
    by_hand = (z.W_dec[1].reshape(cfg.n_heads, cfg.d_head)[:, :, None] * tiny_model.blocks[0].attn.W_O).sum((0, 1))
    torch.testing.assert_close(effects, (by_hand @ tiny_model.W_U).detach(), rtol=1e-4, atol=1e-5)
    q = make_sae(SAEConfig(d_in=cfg.d_model, d_sae=8, architecture="topk", k=2, hook_name="blocks.0.ln1.hook_normalized"))
    with pytest.raises(ValueError, match="residual stream.*ln1.hook_normalized"):
        logit_effects(q, tiny_model, 0)
