"""Autointerp scorers on hand-made cases with known answers."""

import numpy as np
import pytest

from saelib.autointerp.scorers import balanced_accuracy, bootstrap_interval, correlation_score


def test_correlation_of_perfect_constant_and_inverted_simulators():
    truth = [np.array([0.0, 3.0, 0.0, 1.0]), np.array([2.0, 0.0, 0.0])]
    assert correlation_score(truth, truth).score == pytest.approx(1.0)
    assert correlation_score(truth, [2 * t + 5 for t in truth]).score == pytest.approx(1.0)  # scale-free
    assert correlation_score(truth, [-t for t in truth]).score == pytest.approx(-1.0)
    constant = correlation_score(truth, [np.full_like(t, 7.0) for t in truth])
    assert constant.score == 0.0 and constant.n_tokens == 7 and constant.n_sequences == 2


def test_correlation_pools_tokens_before_correlating():
    """Pooled, not averaged per sequence: a simulator right within each sequence but wrong
    about which sequence is strong scores below 1."""
    truth = [np.array([0.0, 1.0]), np.array([0.0, 10.0])]
    guess = [np.array([0.0, 10.0]), np.array([0.0, 1.0])]
    pooled = np.corrcoef(np.concatenate(truth), np.concatenate(guess))[0, 1]
    assert correlation_score(truth, guess).score == pytest.approx(pooled)
    assert pooled < 0.9


def test_correlation_of_noise_is_near_zero():
    rng = np.random.default_rng(0)
    assert abs(correlation_score(rng.normal(size=(200, 64)), rng.normal(size=(200, 64))).score) < 0.02


def test_mismatched_or_empty_inputs_are_named():
    with pytest.raises(ValueError, match="differ in shape"):
        correlation_score([np.zeros(3)], [np.zeros(4)])
    with pytest.raises(ValueError, match="at least 2"):
        correlation_score([np.zeros(1)], [np.zeros(1)])


def test_balanced_accuracy_on_known_answers():
    labels = [True] * 3 + [False] * 9
    assert balanced_accuracy(labels, labels).balanced_accuracy == 1.0
    assert balanced_accuracy(labels, [True] * 12).balanced_accuracy == 0.5  # always yes: chance
    assert balanced_accuracy(labels, [not x for x in labels]).balanced_accuracy == 0.0
    half = balanced_accuracy(labels, [True, False, False] + [False] * 9)  # 1/3 hits, every rejection right
    assert half.balanced_accuracy == pytest.approx((1 / 3 + 1) / 2) and (half.n_positive, half.n_negative) == (3, 9)
    with pytest.raises(ValueError, match="both classes"):
        balanced_accuracy([True, True], [True, False])


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_more_scores():
    rng = np.random.default_rng(1)
    few = bootstrap_interval(rng.normal(0.5, 0.2, size=20))
    many = bootstrap_interval(rng.normal(0.5, 0.2, size=2000))
    assert few[1] < few[0] < few[2] and many[1] < 0.5 < many[2]
    assert (many[2] - many[1]) < (few[2] - few[1]) / 5
    assert bootstrap_interval([1.0, np.nan, 1.0]) == (1.0, 1.0, 1.0)
