"""How well an explanation predicts a feature: the scores of the autointerp literature.

- ``correlation_score``: Pearson correlation between the true and the simulated activation
  of every scored token, pooled over all scored sequences (Bills et al. 2023's "all at
  once" score; their top-and-random score pools top-activating and random sequences 1:1).
- ``balanced_accuracy``: for delphi's detection (does this sequence activate the feature?)
  and fuzzing (are the marked tokens the activating ones?): the mean of the hit rate on
  positives and the correct-rejection rate on negatives, so unequal class sizes do not
  reward always answering the same.
- ``bootstrap_interval``: a percentile interval of the mean of per-feature scores, to
  compare dictionaries.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np


class CorrelationScore(NamedTuple):
    score: float
    """Pearson r over all pooled tokens; 0.0 when either side is constant (no linear
    information: a simulator that always says the same scores nothing)."""
    n_tokens: int
    """Tokens pooled."""
    n_sequences: int
    """Sequences pooled."""


def _pooled(sequences) -> tuple[np.ndarray, int]:
    if isinstance(sequences, np.ndarray) and sequences.ndim <= 1:
        sequences = [sequences]
    arrays = [np.asarray(s, dtype=np.float64).reshape(-1) for s in sequences]
    return (np.concatenate(arrays) if arrays else np.zeros(0)), len(arrays)


def correlation_score(true_activations: Sequence, simulated: Sequence) -> CorrelationScore:
    """Pearson r between ``true_activations`` and ``simulated``: each a list of per-sequence
    arrays (or one [sequences, tokens] array) of the same shapes, pooled before correlating."""
    truth, n_sequences = _pooled(true_activations)
    guess, n_guessed = _pooled(simulated)
    if n_sequences != n_guessed or truth.shape != guess.shape:
        raise ValueError(
            f"true and simulated activations differ in shape: {n_sequences} sequences / {truth.size} tokens "
            f"against {n_guessed} / {guess.size}; simulate every scored token once"
        )
    if truth.size < 2:
        raise ValueError(f"correlation needs at least 2 scored tokens, got {truth.size}")
    truth_c, guess_c = truth - truth.mean(), guess - guess.mean()
    scale = np.sqrt((truth_c**2).sum() * (guess_c**2).sum())
    score = float((truth_c * guess_c).sum() / scale) if scale > 0 else 0.0
    return CorrelationScore(score, int(truth.size), n_sequences)


class DetectionScore(NamedTuple):
    balanced_accuracy: float
    """(hit rate on positives + correct-rejection rate on negatives) / 2: 1 perfect, 0.5 chance."""
    n_positive: int
    n_negative: int


def balanced_accuracy(labels: Sequence[bool], predicted: Sequence[bool]) -> DetectionScore:
    """Balanced accuracy of yes/no ``predicted`` against ``labels`` (True: the example
    activates the feature). Both classes must be present."""
    labels_N, predicted_N = np.asarray(labels, dtype=bool), np.asarray(predicted, dtype=bool)
    if labels_N.shape != predicted_N.shape:
        raise ValueError(f"{labels_N.size} labels but {predicted_N.size} predictions")
    n_positive, n_negative = int(labels_N.sum()), int((~labels_N).sum())
    if n_positive == 0 or n_negative == 0:
        raise ValueError(f"balanced accuracy needs both classes; got {n_positive} positive and "
                         f"{n_negative} negative examples: add non-activating (or activating) examples")
    hit_rate = (predicted_N & labels_N).sum() / n_positive
    rejection_rate = (~predicted_N & ~labels_N).sum() / n_negative
    return DetectionScore(float((hit_rate + rejection_rate) / 2), n_positive, n_negative)


def bootstrap_interval(scores: Sequence[float], level: float = 0.95, n_resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``scores`` (NaNs dropped) and a percentile bootstrap
    interval at ``level``, resampling the scores with replacement."""
    values = np.asarray(scores, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        raise ValueError("no scores to average (all missing)")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    tail = (1 - level) / 2
    return float(values.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))
