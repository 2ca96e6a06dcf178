"""Automated interpretability (issue 16, in progress): explain -> simulate -> score.

Built so far: ``examples`` (explain / score / quantile-band / non-activating contexts from
``FeatureActivations``) and ``scorers`` (correlation scoring as Bills et al. 2023, balanced
accuracy for delphi's detection and fuzzing, bootstrap intervals). Still to come: the
offline pattern explainer and simulator, the optional OpenAI-compatible LLM client, and
notebook 06.
"""
