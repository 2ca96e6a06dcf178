"""Notebook 05's HTML report opened in a real browser (headless Chromium, closed network).

The report is made as the main job makes ``reports/05_feature_dashboards.html``: notebooks
03 and 05 run here through ``saelib.report.run_notebook`` in the smoke profile, into
temporary folders. The browser must render the token views, plotly's
plots and the static explorer with no network: the DOM after scripts ran is checked for
the expected token text and plot elements, and the screenshot must not be blank.

Chromium comes from Debian (``apt-get install chromium``); CI installs it in ``.ci/run``.
Elsewhere the test is skipped when no Chromium is found.
"""

import html
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from saelib.paths import project_root
from saelib.report import notebook_paths, remote_resources, run_notebook

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--hide-scrollbars", "--virtual-time-budget=15000"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI must install Chromium for the browser test: apt-get install -y chromium")
        pytest.skip("no Chromium found: `apt-get install chromium` to run the browser test")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory, chromium) -> tuple[Path, dict]:
    """(HTML report of notebook 05, its results JSON) from a smoke run of notebooks 03 and 05."""
    out = tmp_path_factory.mktemp("mainjob")
    saved = {k: os.environ.get(k) for k in ("SAELIB_PROFILE", "SAELIB_RESULTS", "SAELIB_ARTIFACTS")}
    os.environ.update(SAELIB_PROFILE="smoke", SAELIB_RESULTS=str(out / "results"), SAELIB_ARTIFACTS=str(out / "artifacts"))
    try:
        for path in notebook_paths(project_root() / "notebooks"):
            if path.name.startswith(("03_", "05_")):
                run = run_notebook(path, out / "executed", out / "reports", timeout=1200)
                assert run["ok"], run
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    results = json.loads((out / "results" / "smoke" / "embedded" / "05_feature_dashboards.json").read_text())
    return out / "reports" / "05_feature_dashboards.html", results


def run_browser(chromium: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, *BROWSER_FLAGS, *args], capture_output=True, text=True, timeout=180)


def test_report_needs_no_network(report):
    page = report[0].read_text(encoding="utf-8")
    assert remote_resources(page) == []
    assert "saelib-tokens" in page and "static dashboards" in page


def test_report_renders_tokens_and_plots_in_chromium(chromium, report):
    path, results = report
    dom = run_browser(chromium, "--dump-dom", path.as_uri()).stdout
    assert "saelib-dashboard-header" in dom and "Top activations" in dom
    # plotly.js ran: it draws <svg class="main-svg"> into each plot's div
    assert dom.count('class="main-svg"') >= 4, "plotly figures did not render"
    token = html.escape(results["single_token_text"].replace("\n", "↵").strip(), quote=False)
    if token:
        assert token in dom, f"the single-token feature's token {token!r} is not in the rendered page"


def test_screenshot_is_not_blank(chromium, report, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    run_browser(chromium, f"--screenshot={shot}", "--window-size=1280,2400", report[0].as_uri())
    assert shot.exists(), "Chromium wrote no screenshot"
    image = Image.open(shot).convert("L")
    histogram = image.histogram()
    non_white = 1 - histogram[255] / sum(histogram)
    assert non_white > 0.02, f"screenshot is nearly blank ({non_white:.1%} non-white pixels)"
    assert len(set(image.getdata())) > 20  # text, shading and plots, not a flat page
