"""Explain -> simulate -> score, for one feature or many, with any explainer and simulator.

An *explainer* has ``explain(tokens_SL, activations_SL) -> str``; a *simulator* has
``simulate(explanation, tokens_SL) -> predicted_SL`` (0..10 per token). The offline pair is
``saelib.autointerp.patterns``; ``saelib.autointerp.llm`` has the same two methods over an
OpenAI-compatible server. Windows are the store's context windows without the BOS column,
so every token scored has its true activation.

Scores of one feature (``FeatureScore``):

- ``correlation``: Pearson r of simulated against true activations over the ``score_top``
  and ``random`` windows pooled (Bills et al. 2023, top-and-random, 1:1);
- ``detection``: balanced accuracy of "this window activates the feature" (the simulator
  predicts ≥ ``fires_at`` somewhere in it) over the activating windows (``score_top`` and the quantile
  bands) against non-activating ones (delphi's detection; delphi asks the LLM directly,
  here the answer is read off the simulation, so one simulator serves every score);
- ``fuzzing``: each activating window shown twice, once with its activating tokens marked
  and once with as many non-activating tokens marked; "correctly marked" is answered yes
  when the simulator predicts ≥ ``fires_at`` on at least half the marked tokens (delphi's fuzzing,
  read off the simulation in the same way).

A score that cannot be computed (a dense feature has no non-activating window; a simulator
failed) is NaN; ``failure`` says why when something went wrong.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..features import FeatureActivations
from .examples import FeatureExamples, sample_examples
from .patterns import ExplanationSyntaxError
from .scorers import balanced_accuracy, correlation_score

PREDICTS_ACTIVE = 1.0
"""A simulated activation at or above this (on the 0..10 scale) counts as 'fires', unless
the simulator sets its own ``fires_at``."""


class AutointerpFailure(RuntimeError):
    """One feature could not be explained or simulated (a malformed LLM reply, an
    unreadable explanation); recorded for that feature, not raised through a whole run."""


class FeatureScore(NamedTuple):
    feature: int
    explanation: str
    correlation: float
    """Pearson r over the top and random windows (NaN when it failed)."""
    detection: float
    """Balanced accuracy over activating vs non-activating windows (NaN: no negatives)."""
    fuzzing: float
    """Balanced accuracy over correctly vs wrongly marked activating windows (NaN: none)."""
    n_scored_tokens: int
    """Tokens pooled into ``correlation``."""
    n_positive: int
    """Activating windows in ``detection``."""
    n_negative: int
    """Non-activating windows in ``detection``."""
    missing: int
    """Examples asked for that did not exist (``FeatureExamples.missing``)."""
    failure: str
    """Empty, or why this feature got no scores."""


def windows(acts: FeatureActivations, feature: int, contexts) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_SL, activations_SL) of ``feature`` over the given context windows, BOS column dropped."""
    contexts = np.asarray(contexts, dtype=np.int64)
    manifest = acts.store.manifest
    per, first = manifest.rows_per_context, manifest.first_position
    tokens_SL = np.asarray(acts.store.contexts())[contexts][:, first:]
    rows = (contexts[:, None] * per + np.arange(per)).reshape(-1)
    return tokens_SL, acts.activation_at(feature, rows).reshape(len(contexts), per)


def score_feature(acts: FeatureActivations, feature: int, explainer, simulator, examples: FeatureExamples | None = None,
                  seed: int = 0, **sizes) -> FeatureScore:
    """Explain ``feature`` on its explain set and score the explanation on the held-out sets
    (``sizes``: the keyword arguments of ``sample_examples``)."""
    ex = examples if examples is not None else sample_examples(acts, feature, seed=seed, **sizes)
    positives = [e.context for e in ex.score_top] + [e.context for band in ex.score_bands for e in band]
    correlation_set = [e.context for e in ex.score_top] + list(ex.random)
    scored = list(dict.fromkeys(positives + correlation_set + list(ex.non_activating)))
    explanation = ""
    try:
        explanation = explainer.explain(*windows(acts, feature, [e.context for e in ex.explain]))
        if not explanation or not explanation.strip():
            raise AutointerpFailure("the explainer returned an empty explanation")
        tokens_SL, true_SL = windows(acts, feature, scored)
        predicted_SL = np.asarray(simulator.simulate(explanation, tokens_SL), dtype=np.float64)
        if predicted_SL.shape != true_SL.shape:
            raise AutointerpFailure(f"the simulator returned {predicted_SL.shape} predictions for {true_SL.shape} tokens")
    except (AutointerpFailure, ExplanationSyntaxError) as error:
        return FeatureScore(int(feature), explanation, np.nan, np.nan, np.nan, 0, 0, 0, ex.missing,
                            f"{type(error).__name__}: {error}")
    where = {c: i for i, c in enumerate(scored)}
    pick = [where[c] for c in correlation_set]
    correlation = correlation_score(list(true_SL[pick]), list(predicted_SL[pick]))
    fires_at = float(getattr(simulator, "fires_at", PREDICTS_ACTIVE))
    fires_S = (predicted_SL >= fires_at).any(1)
    negatives = list(ex.non_activating)
    detection = (balanced_accuracy([True] * len(positives) + [False] * len(negatives),
                                   [fires_S[where[c]] for c in positives + negatives]).balanced_accuracy
                 if positives and negatives else np.nan)
    return FeatureScore(int(feature), explanation, correlation.score, detection,
                        _fuzzing(true_SL[[where[c] for c in positives]], predicted_SL[[where[c] for c in positives]],
                                 fires_at, np.random.default_rng([seed, feature])),
                        correlation.n_tokens, len(positives), len(negatives), ex.missing, "")


def _fuzzing(true_SL: np.ndarray, predicted_SL: np.ndarray, fires_at: float, rng) -> float:
    labels, answers = [], []
    for true_L, predicted_L in zip(true_SL, predicted_SL):
        active, silent = np.flatnonzero(true_L > 0), np.flatnonzero(true_L <= 0)
        if len(active) == 0 or len(silent) < len(active):
            continue
        wrong = rng.choice(silent, len(active), replace=False)
        for marked, correct in ((active, True), (wrong, False)):
            labels.append(correct)
            answers.append(bool((predicted_L[marked] >= fires_at).mean() >= 0.5))
    return balanced_accuracy(labels, answers).balanced_accuracy if labels else np.nan


def score_features(acts: FeatureActivations, features, explainer, simulator, seed: int = 0, progress: bool = True,
                   **sizes):
    """``score_feature`` for each of ``features``: a DataFrame with one row per feature
    (the ``FeatureScore`` fields). Features that never fire are skipped and counted in
    ``frame.attrs["skipped_dead"]``."""
    import pandas as pd
    from tqdm.auto import tqdm

    fired = np.diff(acts.offsets_F1) > 0
    features = [int(f) for f in features]
    live = [f for f in features if fired[f]]
    rows = []
    with tqdm(total=len(live), desc=f"autointerp ({getattr(explainer, 'name', type(explainer).__name__)})",
              disable=not progress, leave=False) as bar:  # closed (and cleared) even when a server error stops the run
        for f in live:
            rows.append(score_feature(acts, f, explainer, simulator, seed=seed, **sizes))
            bar.update()
    frame = pd.DataFrame(rows, columns=FeatureScore._fields)
    frame.attrs["skipped_dead"] = len(features) - len(live)
    return frame
