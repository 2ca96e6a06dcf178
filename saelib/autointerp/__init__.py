"""Automated interpretability (issue 16, in progress): explain -> simulate -> score.

Built so far: ``scorers`` (correlation scoring as Bills et al. 2023, balanced accuracy for
delphi's detection and fuzzing, bootstrap intervals). Still to come: examples from
``FeatureActivations``, the offline pattern explainer and simulator, the optional
OpenAI-compatible LLM client, and notebook 06.
"""
