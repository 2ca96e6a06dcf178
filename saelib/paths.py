"""Where saelib reads shipped data and writes generated outputs.

Every location can be overridden by an environment variable, so scripts, notebooks
and tests agree without passing paths around.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def project_root() -> Path:
    """The checkout holding ``pyproject.toml`` (``$SAELIB_ROOT`` overrides)."""
    if os.environ.get("SAELIB_ROOT"):
        return Path(os.environ["SAELIB_ROOT"]).resolve()
    return _PACKAGE_DIR.parent


def data_dir() -> Path:
    """Shipped embedded-model files (``$SAELIB_DATA`` overrides)."""
    return Path(os.environ.get("SAELIB_DATA") or project_root() / "data")


def results_dir() -> Path:
    """Key numbers of each notebook as ``NN_name.json`` (``$SAELIB_RESULTS`` overrides)."""
    return Path(os.environ.get("SAELIB_RESULTS") or project_root() / "results")


def artifacts_dir() -> Path:
    """Activation stores, trained SAEs and other large generated files (``$SAELIB_ARTIFACTS``)."""
    return Path(os.environ.get("SAELIB_ARTIFACTS") or project_root() / "build" / "artifacts")


def sae_folder(model_name: str, hook: str, name: str) -> Path:
    """Where a trained SAE is saved: one folder per (model, hook point, run name) under
    ``<artifacts>/saes``, holding ``cfg.json`` and ``sae_weights.safetensors``."""
    return artifacts_dir() / "saes" / model_name / hook / name


def run_folder(model_name: str, hook: str, name: str) -> Path:
    """Checkpoints and ``metrics.jsonl`` of a training run (resumable), beside the SAEs."""
    return artifacts_dir() / "runs" / model_name / hook / name
