"""Notebook set-up: one call at the top of every notebook.

``setup()`` detects where the notebook runs (Colab, CI), seeds every generator,
picks the device, turns gradients off (training code turns them on where it needs
them), and makes plots and token views render with no network: plotly's JavaScript
is inlined into the notebook once, and circuitsvis always uses its inline bundle
instead of probing the network and loading from a CDN.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .files import write_text_atomic
from .paths import results_folder
from .profile import Profile, profile


class NotebookContext(NamedTuple):
    """What ``setup`` found and chose."""

    profile: Profile
    """Active run profile (``SAELIB_PROFILE``)."""
    device: torch.device
    """``cuda`` when a GPU is visible, else ``cpu``."""
    seed: int
    """Seed given to python, numpy and torch."""
    in_colab: bool
    """Running inside Google Colab."""
    in_ci: bool
    """Running under CI (``CI`` set to a true value)."""


def in_colab() -> bool:
    return "google.colab" in sys.modules


def env_flag(name: str) -> bool:
    """True when environment variable ``name`` is set to 1, true or yes."""
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def in_ci() -> bool:
    return env_flag("CI")


def model_name(default: str = "embedded") -> str:
    """The model a notebook runs on: ``$SAELIB_MODEL`` when set (``bash run.sh all --model
    NAME`` sets it for every notebook), else ``default``. A notebook's ``parameters`` cell
    calls this, so one switch moves every notebook and the cell still takes an override."""
    return os.environ.get("SAELIB_MODEL", "").strip() or default


def trained_model(model: str | None) -> bool:
    """False only for a random-weight stand-in checkpoint (``python -m saelib zoo checkpoint``):
    notebooks check their claims about a *trained* language model (it predicts text, does
    IOI, ...) only when this is True, and their claims about the pipeline always."""
    from .models import is_random_stand_in

    stand_in = is_random_stand_in(model or "")
    if stand_in:
        print(f"[saelib] {model} is a random-weight stand-in: claims about a trained model are not checked")
    return not stand_in


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def use_offline_plotly() -> None:
    """Render plotly figures with plotly.js embedded in the notebook, not fetched from a CDN."""
    import plotly.io as pio

    # "notebook" inlines plotly.js once per notebook (and survives HTML export);
    # "plotly_mimetype" keeps JupyterLab's native renderer working too.
    pio.renderers.default = "plotly_mimetype+notebook"


def use_inline_circuitsvis() -> None:
    """Make circuitsvis emit its bundled JavaScript instead of a CDN import.

    circuitsvis decides by fetching a web page; with no network that probe costs a
    time-out per view and with a network it switches to the CDN, which an exported
    report cannot load offline.
    """
    try:
        import circuitsvis.utils.render as cv_render
    except ImportError:
        return
    cv_render.internet_on = lambda: False


def setup(seed: int = 0, grad: bool = False, device: str | None = None) -> NotebookContext:
    """Prepare a notebook; returns a ``NotebookContext``."""
    seed_everything(seed)
    torch.set_grad_enabled(grad)
    use_offline_plotly()
    use_inline_circuitsvis()
    chosen = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return NotebookContext(profile(), chosen, seed, in_colab(), in_ci())


def save_results(notebook: str, results: dict, headline: list[str] | None = None) -> Path:
    """Write a notebook's key numbers to ``results/<profile>/<model>/<notebook>.json`` (model
    from ``results["model"]``) atomically, and return the path. ``headline``: the few keys
    (dotted for nested ones, e.g. ``main_sae.fvu``) the main job prints; default: every
    top-level number and string."""
    model = results.get("model")
    out = results_folder(model) / f"{notebook}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"notebook": notebook, "profile": profile().name, "model": model, **results}
    if headline is not None:
        payload["headline"] = list(headline)
    write_text_atomic(out, json.dumps(payload, indent=2, default=float) + "\n")
    return out


def load_results(notebook: str, model: str | None) -> dict:
    """Key numbers an earlier notebook saved with ``save_results`` for ``model`` in the active
    profile; a clear error naming the notebook to run first when they are missing."""
    path = results_folder(model) / f"{notebook}.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run notebooks/{notebook}.ipynb first with MODEL = {model!r} "
            f"and SAELIB_PROFILE={profile().name}"
        )
    return json.loads(path.read_text())
