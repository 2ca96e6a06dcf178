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
    path = nb.save_results("99_demo", {"fvu": 0.25})
    assert json.loads(path.read_text()) == {"notebook": "99_demo", "profile": "smoke", "fvu": 0.25}


def test_load_results_round_trips_and_names_the_notebook_to_run(monkeypatch, tmp_path):
    monkeypatch.setenv("SAELIB_RESULTS", str(tmp_path))
    monkeypatch.setenv("SAELIB_PROFILE", "smoke")
    with pytest.raises(FileNotFoundError, match="run notebooks/98_demo.ipynb first"):
        nb.load_results("98_demo")
    nb.save_results("98_demo", {"main_sae": "x"})
    assert nb.load_results("98_demo")["main_sae"] == "x"
    monkeypatch.setenv("SAELIB_PROFILE", "default")
    with pytest.raises(ValueError, match="SAELIB_PROFILE=default"):
        nb.load_results("98_demo")
