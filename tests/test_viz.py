"""HTML builders of the dashboards and the explorer's logic, on the embedded model."""

import html
import re

import numpy as np
import pytest
import torch

from saelib import explorer as explorer_module
from saelib.data import token_windows
from saelib.explorer import FeatureExplorer
from saelib.features import FeatureActivations
from saelib.harvest import HarvestConfig, harvest
from saelib.models import load_model
from saelib.report import remote_resources
from saelib.sae import SAEConfig, make_sae
from saelib.viz import feature_dashboard, token_html

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    return load_model("embedded", device="cpu")


@pytest.fixture(scope="module")
def sae_and_acts(model, tmp_path_factory):
    tokens = token_windows(model, 40 * 32, context_len=32, seed=3)
    store = harvest(model, tokens, HarvestConfig(hooks=[HOOK], dtype="float32", out_dir=str(tmp_path_factory.mktemp("s")),
                                                 progress=False))[HOOK]
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(store.d_in, 64, "topk", k=4, hook_name=HOOK)).eval()
    return sae, FeatureActivations.collect(sae, store)


def busiest(acts):
    return int(np.argmax(np.diff(acts.offsets_F1)))


def test_token_html_shades_escapes_and_needs_no_javascript():
    out = token_html(["<b>", " x", "\n"], [0.0, 2.0, 1.0], peak=1)
    assert "<script" not in out and "&lt;b&gt;" in out and "↵" in out
    alphas = [float(a) for a in re.findall(r"rgba\(255,127,14,([0-9.]+)\)", out)]
    assert alphas == [0.0, 1.0, 0.5]
    assert out.count("outline") == 1 and "title=\"&#x27; x&#x27;: 2\"" in out


def test_dashboard_html_has_every_section(model, sae_and_acts):
    sae, acts = sae_and_acts
    feature = busiest(acts)
    dashboard = feature_dashboard(acts, sae, model, feature, label="random SAE", n_top=5)
    page = dashboard.html()
    for piece in ["Top activations", "Interval", "contains", "promoted tokens", "suppressed tokens",
                  "nearest features by decoder cosine", f"feature #{feature}", "plotly-graph-div"]:
        assert piece in page, piece
    top_example, tokens, acts_L, peak = dashboard.top[0]
    assert acts_L[peak] == pytest.approx(top_example.value) and top_example.value == pytest.approx(dashboard.max_activation)
    assert html.escape(tokens[peak].replace("\n", "↵").replace("\t", "→")) in page
    assert dashboard.top_tokens[0][1] >= 1 and len(dashboard.promoted) == 8
    assert "saelib-explanation" not in page
    explained = feature_dashboard(acts, sae, model, feature, explanation="fires on '<b>' (7) · r = 0.81").header_html()
    assert "<b>explanation:</b> fires on &#x27;&lt;b&gt;&#x27; (7) · r = 0.81" in explained


def test_saved_dashboard_is_a_standalone_offline_page(model, sae_and_acts, tmp_path):
    sae, acts = sae_and_acts
    path = tmp_path / "f.html"
    feature_dashboard(acts, sae, model, busiest(acts)).save(path)
    page = path.read_text()
    assert page.startswith("<!doctype html>") and remote_resources(page) == []
    assert page.count("plotly.js v") <= 2 and len(page) < 6_000_000  # plotly.js inlined once (~4.6 MB)


def test_explorer_search_text_and_static_fallback(model, sae_and_acts, monkeypatch):
    sae, acts = sae_and_acts
    explorer = FeatureExplorer(model, {"random": (sae, acts)})
    table = explorer.table("random")
    feature = int(table.sort_values("top_token_share").iloc[-1].feature)
    top_token = table.set_index("feature").loc[feature, "top_tokens"][0]
    if top_token.strip():
        assert feature in explorer.search("random", top_token.strip().upper())
    assert explorer.search("random", "   ") == []
    tokens, latents_LF = explorer.text_latents("random", "The whale swam.")
    assert "".join(tokens) == "The whale swam." and latents_LF.shape == (len(tokens), 64)
    assert (np.count_nonzero(latents_LF, axis=1) <= 4).all()
    assert "whale" in explorer.text_html("random", "The whale swam.", feature)
    other = int(table.feature.iloc[0])
    explained = FeatureExplorer(model, {"random": (sae, acts)}, explanations={"random": {other: "fires on 'zebra' (9)"}})
    assert explained.search("random", "ZEBRA") == [other] and explorer.search("random", "zebra") == []
    assert explained.table("random").set_index("feature").explanation[other] == "fires on 'zebra' (9)"
    assert "fires on &#x27;zebra&#x27; (9)" in explained.dashboard("random", other).header_html()

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, *a, **k: shown.append(obj))
    monkeypatch.setattr("plotly.graph_objects.Figure.show", lambda self, *a, **k: shown.append(self))
    monkeypatch.setenv("SAELIB_HEADLESS", "1")
    explorer.display(static_features=[feature])
    assert explorer_module.headless() and explorer._widget is None  # no widget in a report
    html_parts = "".join(o.data for o in shown if isinstance(getattr(o, "data", None), str))
    assert "static dashboards" in html_parts and "Top activations" in html_parts


def test_explorer_widget_reacts_to_its_controls(model, sae_and_acts):
    pytest.importorskip("ipywidgets")
    sae, acts = sae_and_acts
    explorer = FeatureExplorer(model, {"a": (sae, acts), "b": (sae, acts)})
    box = explorer.widget
    assert box is explorer.widget  # built once
    assert explorer.shown == ("a", 0)
    explorer.feature_choice.value = busiest(acts)
    assert explorer.shown == ("a", busiest(acts))  # the dashboard was redrawn for the new feature
    explorer.sae_choice.value = "b"
    assert explorer.shown == ("b", busiest(acts)) and explorer.feature_choice.max == 63
    explorer.query.value = "e"
    assert all(isinstance(value, int) for _, value in explorer.results.options)
    with pytest.raises(ValueError, match="at least one SAE"):
        FeatureExplorer(model, {})
