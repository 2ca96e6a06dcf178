import json
import re

import nbformat
import pytest

from saelib import report

REMOTE_PAGE = """<html><head>
<script src="https://cdnjs.cloudflare.com/ajax/libs/require.js/2.1.10/require.min.js"></script>
<link rel="stylesheet" href="https://cdn.example/x.css">
<script type="module">
import mermaid from "https://cdnjs.cloudflare.com/ajax/libs/mermaid/11.10.0/mermaid.esm.min.mjs";
const elk = await import("https://cdn.example/elk.mjs");
</script>
<script>var local = 1;</script></head><body><a href="https://example.org">a link stays</a></body></html>"""


def test_strip_remote_resources_removes_every_fetch_and_keeps_the_rest():
    assert len(report.remote_resources(REMOTE_PAGE)) == 4
    cleaned = report.strip_remote_resources(REMOTE_PAGE)
    assert report.remote_resources(cleaned) == []
    assert "var local = 1;" in cleaned and '<a href="https://example.org">' in cleaned


@pytest.fixture(scope="module")
def executed_plot_report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nb")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [
        nbformat.v4.new_markdown_cell("# 99 · Demo"),
        nbformat.v4.new_code_cell(
            "import saelib, plotly.express as px\nsaelib.nb.setup()\n"
            "px.bar(x=['alpha', 'beta'], y=[1, 2], title='offline bar')"
        ),
    ]
    path = folder / "99_demo.ipynb"
    nbformat.write(nb, path)
    run = report.run_notebook(path, folder / "executed", folder / "reports", timeout=120)
    return run, (folder / "reports" / "99_demo.html").read_text()


def test_report_of_a_plot_is_offline_and_self_contained(executed_plot_report):
    run, html = executed_plot_report
    assert run["ok"], run
    assert report.remote_resources(html) == []
    assert "offline bar" in html and "Plotly.newPlot" in html
    # the library itself is inlined, once
    assert len(re.findall(r"plotly\.js v\d", html)) == 1


def test_notebooks_run_in_numeric_order(tmp_path):
    for name in ["10_b", "02_a", "colab_tutorial", "00_q"]:
        (tmp_path / f"{name}.ipynb").write_text("{}")
    assert [p.stem for p in report.notebook_paths(tmp_path)] == ["00_q", "02_a", "10_b", "colab_tutorial"]


def test_quickstart_report_opens_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELIB_PROFILE", "smoke")
    monkeypatch.setenv("SAELIB_RESULTS", str(tmp_path / "results"))
    quickstart = next(p for p in report.notebook_paths() if p.name.startswith("00_"))
    run = report.run_notebook(quickstart, tmp_path / "executed", tmp_path / "reports", timeout=600)
    assert run["ok"], run
    html = (tmp_path / "reports" / f"{quickstart.stem}.html").read_text()
    assert report.remote_resources(html) == []
    assert "00 · Quickstart" in html and "Plotly.newPlot" in html
    assert (tmp_path / "results" / "smoke" / "embedded" / "00_quickstart.json").exists()


def test_summary_table_keeps_scalars_and_flattens_dicts(tmp_path):
    (tmp_path / "default" / "embedded").mkdir(parents=True)
    (tmp_path / "smoke" / "embedded").mkdir(parents=True)
    (tmp_path / "default" / "embedded" / "01_a.json").write_text(
        json.dumps({"notebook": "01_a", "fvu": 0.5, "runs": [{"x": 1}], "main": {"l0": 32}}))
    (tmp_path / "default" / "embedded" / "02_b.json").write_text(
        json.dumps({"notebook": "02_b", "ce": 0.9, "main": {"l0": 8, "fvu": 0.1}, "headline": ["main.fvu"]}))
    (tmp_path / "smoke" / "embedded" / "01_a.json").write_text(json.dumps({"notebook": "01_a", "fvu": 0.9}))
    table = report.summary_table(folder=tmp_path / "default")
    assert list(table.notebook) == ["01_a", "02_b"]
    assert set(table.columns) == {"notebook", "fvu", "main.l0", "main.fvu", "ce"} and table.loc[0, "main.l0"] == 32
    # The printed table: a few rows per notebook, named keys where the notebook chose them.
    headlines = report.headline_table(folder=tmp_path / "default")
    assert headlines[["notebook", "result", "value"]].values.tolist() == [["01_a", "fvu", 0.5], ["02_b", "main.fvu", 0.1]]
