"""The examples an explainer sees and a scorer scores, drawn from ``FeatureActivations``
(no model rerun). One example is one context window, represented by the feature's peak in it.

- ``explain`` and ``score_top``: the top-activating contexts, dealt alternately (1st to
  explain, 2nd to score, 3rd to explain...), so both sets span the same range and never
  share a context (Bills et al. 2023 explain on top examples and score on others);
- ``score_bands``: the remaining activating contexts cut into ``n_bands`` bands of equal
  count by activation (quantiles, highest first), ``per_band`` drawn at random from each
  (delphi: 10 bands, so a score covers weak activations too, not only the top);
- ``random``: contexts drawn at random from the rest, whatever the feature does there, as
  many as ``score_top`` (Bills et al.'s top-and-random scoring: 1:1);
- ``non_activating``: random contexts where the feature never fires, as many as the
  activating ones scored unless asked otherwise (delphi's detection and fuzzing).

Only contexts the collected rows cover completely are drawn as ``random`` or
``non_activating``, so every scored token has its true activation.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..features import Example, FeatureActivations


class FeatureExamples(NamedTuple):
    feature: int
    explain: list[Example]
    """Top-activating contexts for the explainer, strongest first."""
    score_top: list[Example]
    """Other top-activating contexts, for scoring, strongest first."""
    score_bands: list[list[Example]]
    """Per activation band (highest first), contexts outside the two sets above."""
    random: list[int]
    """Context indices (``store.contexts()``) drawn at random outside ``explain`` and ``score_top``."""
    non_activating: list[int]
    """Context indices where the feature never fires."""
    missing: int
    """Examples asked for that the collected activations could not supply (0: all there)."""


def sample_examples(acts: FeatureActivations, feature: int, n_explain: int = 10, n_score_top: int = 10,
                    n_bands: int = 10, per_band: int = 2, n_non_activating: int | None = None,
                    n_random: int | None = None, seed: int = 0) -> FeatureExamples:
    """Examples of ``feature`` for explaining and scoring (sizes as in the module docstring).
    A feature that fires in fewer contexts than asked gets what exists, with ``missing``
    counting the shortfall; one that never fires raises ``ValueError``."""
    peaks = acts.top_examples(feature, n=len(acts.of(feature)[0]))  # every context's peak, strongest first
    if not peaks:
        raise ValueError(f"feature {feature} never fires on the {acts.n_rows} rows collected: nothing to explain "
                         "(collect more rows, or skip dead features)")
    rng = np.random.default_rng([seed, feature])
    n_top = min(len(peaks), n_explain + n_score_top)
    explain_idx = [i for i in range(n_top) if i % 2 == 0][:n_explain]
    score_idx = [i for i in range(n_top) if i not in explain_idx][:n_score_top]
    used = set(explain_idx) | set(score_idx)
    explain_idx += [i for i in range(n_top) if i not in used][: n_explain - len(explain_idx)]
    used = set(explain_idx) | set(score_idx)
    rest = np.array([i for i in range(len(peaks)) if i not in used], dtype=np.int64)
    bands = []
    for chunk in np.array_split(rest, n_bands) if len(rest) else [np.zeros(0, np.int64)] * n_bands:
        chosen = np.sort(rng.choice(chunk, min(per_band, len(chunk)), replace=False)) if len(chunk) else chunk
        bands.append([peaks[i] for i in chosen])
    n_scored = len(score_idx) + sum(len(b) for b in bands)
    wanted_non = n_scored if n_non_activating is None else n_non_activating
    covered = acts.n_rows // acts.store.manifest.rows_per_context  # complete windows only
    silent = np.setdiff1d(np.arange(covered), [e.context for e in peaks])
    non_activating = np.sort(rng.choice(silent, min(wanted_non, len(silent)), replace=False)).tolist()
    wanted_random = n_score_top if n_random is None else n_random
    others = np.setdiff1d(np.arange(covered), [peaks[i].context for i in explain_idx + score_idx])
    random = np.sort(rng.choice(others, min(wanted_random, len(others)), replace=False)).tolist()
    asked = n_explain + n_score_top + n_bands * per_band + wanted_non + wanted_random
    got = len(explain_idx) + n_scored + len(non_activating) + len(random)
    return FeatureExamples(
        feature=int(feature),
        explain=[peaks[i] for i in explain_idx],
        score_top=[peaks[i] for i in score_idx],
        score_bands=bands,
        random=[int(c) for c in random],
        non_activating=[int(c) for c in non_activating],
        missing=asked - got,
    )
