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
    """Root of the notebooks' key numbers (``$SAELIB_RESULTS`` overrides); each run's files
    lie in ``results_folder(profile, model)`` below it."""
    return Path(os.environ.get("SAELIB_RESULTS") or project_root() / "results")


def results_folder(model: str | None, profile: str | None = None) -> Path:
    """``<results>/<profile>/<model>/``: one folder per run profile (default: the active one)
    and model, so the smoke tests never replace the main job's numbers and a notebook run
    on GPT-2 never replaces the embedded model's."""
    return results_dir() / _profile_name(profile) / path_label(model)


def path_label(model: str | None) -> str:
    """A model name as one folder name: ``embedded``, ``pythia-70m-deduped``,
    ``EleutherAI__pythia-70m`` for a hub name, a local checkpoint folder's own name (as
    TransformerLens names the model it loads from there); ``no-model`` for None."""
    if not model:
        return "no-model"
    from .models import is_local_path

    if is_local_path(str(model)):
        return Path(str(model)).expanduser().resolve().name
    return str(model).strip("/").replace("/", "__").replace("\\", "__")


def artifacts_dir() -> Path:
    """Activation stores, trained SAEs and other large generated files (``$SAELIB_ARTIFACTS``)."""
    return Path(os.environ.get("SAELIB_ARTIFACTS") or project_root() / "build" / "artifacts")


def sae_folder(model_name: str, hook: str, name: str, profile: str | None = None) -> Path:
    """Where a trained SAE is saved: one folder per (profile, model, hook point, run name)
    under ``<artifacts>/saes``, holding ``cfg.json`` and ``sae_weights.safetensors``. The run
    profile (default: the active one) keeps a quick smoke run from replacing real results."""
    return artifacts_dir() / "saes" / _profile_name(profile) / path_label(model_name) / hook / name


def run_folder(model_name: str, hook: str, name: str, profile: str | None = None) -> Path:
    """Checkpoints and ``metrics.jsonl`` of a training run (resumable), laid out as ``sae_folder``."""
    return artifacts_dir() / "runs" / _profile_name(profile) / path_label(model_name) / hook / name


def _profile_name(profile: str | None) -> str:
    from .profile import profile as active_profile

    return active_profile(profile).name
