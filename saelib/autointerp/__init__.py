"""Automated interpretability: explain -> simulate -> score (Bills et al. 2023; delphi).

- ``examples``: explain / score / quantile-band / random / non-activating context windows
  of a feature, from ``FeatureActivations`` (no model rerun);
- ``patterns``: the offline explainer and simulator (token patterns, N2G-like), and the
  top-tokens-only reference explainer;
- ``llm``: the same over any OpenAI-compatible chat-completions server (optional);
- ``pipeline``: ``score_feature`` / ``score_features`` with any explainer and simulator;
- ``scorers``: correlation, balanced accuracy, bootstrap intervals;
- ``planted``: features with known rules, to check an explainer.
"""
