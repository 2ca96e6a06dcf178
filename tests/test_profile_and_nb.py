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


def test_one_variable_sets_every_notebooks_model_and_folders_get_their_own_label(monkeypatch, tmp_path):
    from saelib.paths import path_label, results_folder, sae_folder

    monkeypatch.delenv("SAELIB_MODEL", raising=False)
    assert nb.model_name() == "embedded"
    monkeypatch.setenv("SAELIB_MODEL", "pythia-70m-deduped")
    assert nb.model_name() == "pythia-70m-deduped"
    folder = tmp_path / "my-gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"saelib_random_weights": True}))
    assert path_label(str(folder)) == "my-gpt2" and path_label("EleutherAI/pythia-70m") == "EleutherAI__pythia-70m"
    monkeypatch.setenv("SAELIB_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("SAELIB_RESULTS", str(tmp_path / "results"))
    # An absolute model path must not send SAEs or results into (or next to) the checkpoint itself.
    assert sae_folder(str(folder), "blocks.0.hook_resid_post", "x").is_relative_to(tmp_path / "artifacts")
    assert results_folder(str(folder)).is_relative_to(tmp_path / "results")
    assert nb.trained_model(str(folder)) is False and nb.trained_model("embedded") is True
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert nb.trained_model(str(folder)) is True  # a real checkpoint: claims are checked
