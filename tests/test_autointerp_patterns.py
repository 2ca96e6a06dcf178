"""The offline explainer on planted features over real text: it must name each rule and score
≥ 0.9 on held-out windows; noise must score ≈ 0; the top-tokens reference cannot see context."""

import numpy as np
import pytest
import torch

from saelib.autointerp.patterns import (NOTHING, Clause, ExplanationSyntaxError, PatternExplainer, PatternSimulator,
                                        Vocabulary, parse, render)
from saelib.autointerp.pipeline import score_feature, score_features
from saelib.autointerp.planted import inside, noise, on_token, on_token_after, planted_activations
from saelib.data import token_windows
from saelib.store import StoreManifest
from saelib.store_writer import StoreWriter


@pytest.fixture(scope="module")
def vocabulary(embedded):
    return Vocabulary.of_tokenizer(embedded.tokenizer)


@pytest.fixture(scope="module")
def text_store(embedded, tmp_path_factory):
    """Real text windows of the embedded corpus (activations unused: planted features read only tokens)."""
    contexts = token_windows(embedded, 256 * 128, context_len=128, seed=3).numpy().astype(np.int32)
    manifest = StoreManifest(model="embedded", model_fingerprint="0", hook="h", d_in=1, dtype="float32",
                             shard_rows=1 << 14, context_len=128, n_contexts=len(contexts), first_position=1,
                             contexts_sha256="")
    writer = StoreWriter(tmp_path_factory.mktemp("text_store"), manifest, contexts)
    writer.append(torch.zeros(len(contexts) * 127, 1))
    return writer.close()


@pytest.fixture(scope="module")
def planted(text_store, vocabulary):
    ids = {s: vocabulary.first_id[s] for s in [" the", " of", "(", ")"]}
    rules = [on_token(ids[" the"]), on_token_after(ids[" of"], ids[" the"]), inside(ids["("], ids[")"]),
             noise(0.03, seed=1)]
    return planted_activations(text_store, rules, seed=2)


EXPECTED = ["' the' (", "' the' after ' of'", "tokens after '(' until ')'"]


def test_patterns_explainer_names_each_rule_and_predicts_held_out_text(planted, vocabulary):
    scores = score_features(planted, range(4), PatternExplainer(vocabulary), PatternSimulator(vocabulary),
                            progress=False)
    for feature, clause in enumerate(EXPECTED):
        row = scores.iloc[feature]
        assert clause in row.explanation, (feature, row.explanation)
        assert row.correlation >= 0.9 and row.detection >= 0.9 and row.fuzzing >= 0.9, row
        assert row.failure == "" and row.n_positive >= 20 and row.n_negative >= 10
    assert abs(scores.iloc[3].correlation) < 0.1, scores.iloc[3]  # noise: nothing to explain
    assert scores.iloc[0].explanation.count(";") == 0  # one clause suffices for a one-token rule


def test_top_tokens_reference_cannot_express_context(planted, vocabulary):
    patterns = score_features(planted, [1, 2], PatternExplainer(vocabulary), PatternSimulator(vocabulary), progress=False)
    tokens = score_features(planted, [1, 2], PatternExplainer(vocabulary, kinds=("token",)), PatternSimulator(vocabulary),
                            progress=False)
    assert "after" not in " ".join(tokens.explanation)
    assert (patterns.correlation.to_numpy() > tokens.correlation.to_numpy() + 0.3).all(), (patterns, tokens)


def test_explanations_round_trip_through_their_text(vocabulary):
    clauses = [Clause("token", "a;b'c", None, None, 3), Clause("bigram", " the", ' "of"', None, 10),
               Clause("after", None, "\n", None, 1), Clause("since", None, "(", ")", 4), Clause("since", None, "def", None, 2)]
    assert parse(render(clauses)) == clauses
    assert parse(NOTHING) == []
    with pytest.raises(ExplanationSyntaxError, match="does not start with"):
        parse("the letter a")
    with pytest.raises(ExplanationSyntaxError, match="cannot read the clause"):
        parse("fires on ' the' (3); whatever")


def test_the_simulator_reads_only_the_text(vocabulary):
    tokens = np.array([[vocabulary.first_id[s] for s in [" of", " the", " man", " the", "(", " x", ")", " y"]]])
    simulate = PatternSimulator(vocabulary).simulate
    assert simulate("fires on ' the' after ' of' (7)", tokens).tolist() == [[0, 7, 0, 0, 0, 0, 0, 0]]
    assert simulate("fires on ' the' (2); ' the' after ' of' (9)", tokens).tolist() == [[0, 9, 0, 2, 0, 0, 0, 0]]
    assert simulate("fires on tokens after '(' until ')' (5)", tokens).tolist() == [[0, 0, 0, 0, 0, 5, 0, 0]]
    assert simulate("fires on tokens anywhere after '(' (5)", tokens).tolist() == [[0, 0, 0, 0, 0, 5, 5, 5]]
    assert simulate("fires on any token after ' the' (4)", tokens).tolist() == [[0, 0, 4, 0, 4, 0, 0, 0]]
    assert simulate("fires on 'no-such-token' (4)", tokens).sum() == 0


def test_bad_input_is_recorded_not_raised(planted, vocabulary):
    class Empty:
        name = "empty"

        def explain(self, tokens_SL, activations_SL):
            return "  "

    class Unreadable(Empty):
        def explain(self, tokens_SL, activations_SL):
            return "it likes nouns"

    simulator = PatternSimulator(vocabulary)
    empty = score_feature(planted, 0, Empty(), simulator)
    assert np.isnan(empty.correlation) and "empty explanation" in empty.failure
    unreadable = score_feature(planted, 0, Unreadable(), simulator)
    assert np.isnan(unreadable.correlation) and "ExplanationSyntaxError" in unreadable.failure
    # A feature that never fires is skipped and counted, not scored as zero.
    with_dead = planted_activations(planted.store, [on_token(-5), on_token(vocabulary.first_id[" the"])])
    scores = score_features(with_dead, [0, 1], PatternExplainer(vocabulary), simulator, progress=False)
    assert scores.feature.tolist() == [1] and scores.attrs["skipped_dead"] == 1
    # A rare feature is scored on what exists; the shortfall is counted.
    rare = score_feature(planted, 1, PatternExplainer(vocabulary), simulator, n_explain=200, n_score_top=200)
    assert rare.missing > 0 and not np.isnan(rare.correlation)
