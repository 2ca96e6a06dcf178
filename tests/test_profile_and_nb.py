import json

import plotly.io as pio
import pytest
import torch

import saelib
from saelib import nb


def test_profile_pick_follows_environment(monkeypatch):
    monkeypatch.setenv("SAELIB_PROFILE", "smoke")
    assert saelib.profile().pick(smoke=1, default=2, full=3) == 1
    monkeypatch.setenv("SAELIB_PROFILE", "full")
    assert saelib.profile().pick(smoke=1, default=2, full=3) == 3
    assert saelib.profile().pick(smoke=1, default=2) == 2  # full falls back to default
    monkeypatch.delenv("SAELIB_PROFILE")
    assert saelib.profile().name == "default"


def test_unknown_profile_is_named(monkeypatch):
    monkeypatch.setenv("SAELIB_PROFILE", "quick")
    with pytest.raises(ValueError, match="'quick'.*smoke, default, full"):
        saelib.profile()


def test_setup_seeds_disables_grad_and_goes_offline(monkeypatch):
    monkeypatch.setenv("CI", "true")
    ctx = nb.setup(seed=3)
    first = torch.rand(3)
    nb.setup(seed=3)
    assert torch.equal(first, torch.rand(3))
    assert not torch.is_grad_enabled()
    assert ctx.in_ci and not ctx.in_colab and ctx.device.type in ("cpu", "cuda")
    assert "connected" not in pio.renderers.default and "notebook" in pio.renderers.default
    import circuitsvis.utils.render as cv_render

    # the inline bundle is used, and the network is never probed
    assert cv_render.internet_on() is False
    assert "unpkg.com" not in cv_render.RenderedHTML("LOCAL", "CDN")._repr_html_()
    torch.set_grad_enabled(True)


def test_save_results_writes_json(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELIB_RESULTS", str(tmp_path))
    monkeypatch.setenv("SAELIB_PROFILE", "smoke")
    path = nb.save_results("99_demo", {"model": "embedded", "fvu": 0.25})
    assert path == tmp_path / "smoke" / "embedded" / "99_demo.json"
    assert json.loads(path.read_text()) == {"notebook": "99_demo", "profile": "smoke", "model": "embedded", "fvu": 0.25}


def test_results_of_one_profile_or_model_never_replace_another(monkeypatch, tmp_path):
    """One results file per notebook served every profile: the smoke tests overwrote the
    main job's numbers, and a notebook alone in one profile refused the other's file."""
    monkeypatch.setenv("SAELIB_RESULTS", str(tmp_path))
    for name, model, value in [("default", "embedded", 1), ("smoke", "embedded", 2), ("default", "gpt2", 3)]:
        monkeypatch.setenv("SAELIB_PROFILE", name)
        nb.save_results("98_demo", {"model": model, "main_sae": value})
    monkeypatch.setenv("SAELIB_PROFILE", "default")
    assert nb.load_results("98_demo", "embedded")["main_sae"] == 1
    assert nb.load_results("98_demo", "gpt2")["main_sae"] == 3
    monkeypatch.setenv("SAELIB_PROFILE", "smoke")
    assert nb.load_results("98_demo", "embedded")["main_sae"] == 2
    with pytest.raises(FileNotFoundError, match="run notebooks/98_demo.ipynb first with MODEL = 'gpt2' and SAELIB_PROFILE=smoke"):
        nb.load_results("98_demo", "gpt2")
