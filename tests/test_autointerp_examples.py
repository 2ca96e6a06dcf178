"""Examples for explaining and scoring: disjoint sets, one per context, every band, silent contexts."""

import numpy as np
import pytest
import torch

from saelib.autointerp.examples import sample_examples
from saelib.features import FeatureActivations
from saelib.store import StoreManifest
from saelib.store_writer import StoreWriter

CONTEXT_LEN, N_CONTEXTS = 9, 100  # BOS skipped: 8 rows per context


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    manifest = StoreManifest(model="toy", model_fingerprint="0", hook="h", d_in=2, dtype="float32", shard_rows=256,
                             context_len=CONTEXT_LEN, n_contexts=N_CONTEXTS, first_position=1, contexts_sha256="")
    contexts = np.arange(N_CONTEXTS * CONTEXT_LEN, dtype=np.int32).reshape(N_CONTEXTS, CONTEXT_LEN) % 50
    writer = StoreWriter(tmp_path_factory.mktemp("store"), manifest, contexts)
    writer.append(torch.zeros(N_CONTEXTS * (CONTEXT_LEN - 1), 2))
    return writer.close()


def made_activations(store):
    """Feature 0: fires in the first 60 contexts, twice each (peak value = 100 - context);
    feature 1: never; feature 2: in contexts 5 and 7 only."""
    per = CONTEXT_LEN - 1
    f0_rows = np.array([c * per + p for c in range(60) for p in (2, 5)])
    f0_values = np.array([(100 - c) * (1.0 if p == 5 else 0.5) for c in range(60) for p in (2, 5)], dtype=np.float32)
    f2_rows, f2_values = np.array([5 * per + 1, 7 * per + 3]), np.array([1.0, 2.0], dtype=np.float32)
    rows = np.concatenate([f0_rows, f2_rows])
    values = np.concatenate([f0_values, f2_values])
    return FeatureActivations(rows, values, np.array([0, len(f0_rows), len(f0_rows), len(rows)]), len(store), store)


def test_explain_and_score_sets_are_disjoint_top_contexts_dealt_alternately(store):
    acts = made_activations(store)
    ex = sample_examples(acts, 0, n_explain=5, n_score_top=5, n_bands=4, per_band=3, seed=1)
    explain_contexts = [e.context for e in ex.explain]
    score_contexts = [e.context for e in ex.score_top]
    assert explain_contexts == [0, 2, 4, 6, 8] and score_contexts == [1, 3, 5, 7, 9]
    assert all(e.value == 100 - e.context for e in ex.explain + ex.score_top)  # each context's peak
    band_contexts = [e.context for band in ex.score_bands for e in band]
    assert len(band_contexts) == 12 and not set(band_contexts) & set(explain_contexts + score_contexts)
    # Equal-count bands over contexts 10..59, highest first: band b holds contexts 10 + 12.5b ...
    for b, band in enumerate(ex.score_bands):
        assert all(10 + 12 * b <= e.context <= 10 + 13 * (b + 1) for e in band), (b, band)
    assert len(ex.non_activating) == 5 + 12 and all(60 <= c < N_CONTEXTS for c in ex.non_activating)
    assert len(ex.random) == 5 and not set(ex.random) & set(explain_contexts + score_contexts)
    assert ex.missing == 0
    again = sample_examples(acts, 0, n_explain=5, n_score_top=5, n_bands=4, per_band=3, seed=1)
    assert again == ex  # deterministic for a seed


def test_a_rare_feature_gets_what_exists_and_the_shortfall_is_counted(store):
    acts = made_activations(store)
    ex = sample_examples(acts, 2, n_explain=4, n_score_top=4, n_bands=2, per_band=2)
    assert [e.context for e in ex.explain] == [7] and [e.context for e in ex.score_top] == [5]
    assert all(len(b) == 0 for b in ex.score_bands) and len(ex.non_activating) == 1
    assert ex.missing == (4 + 4 + 2 * 2 + 1) - (1 + 1 + 1)
    with pytest.raises(ValueError, match="feature 1 never fires"):
        sample_examples(acts, 1)
