"""The main job: execute every notebook in order, export offline HTML reports, and
collect each notebook's ``results/<profile>/<model>/*.json`` into a summary table (all
numbers, ``reports/summary.csv``) and a headline table (a few per notebook, printed).

Reports must open with no network, so every ``<script src="http...">`` and ES-module
import from a URL that nbconvert's template adds (require.js, MathJax, mermaid,
the widget manager) is removed; plotly is inlined by ``saelib.nb.setup``.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pandas as pd

from .paths import project_root, results_dir
from .profile import profile

_REMOTE_SCRIPT = re.compile(r"<script\b[^>]*\bsrc=[\"']https?://[^>]*>\s*</script>", re.IGNORECASE)
_REMOTE_IMPORT = re.compile(r"""^\s*import\b[^;\n]*["']https?://[^"']+["'];?\s*$""", re.MULTILINE)
_REMOTE_DYNAMIC_IMPORT = re.compile(r"""import\(\s*["']https?://[^"']+["']\s*\)""")
_REMOTE_STYLESHEET = re.compile(r"<link\b[^>]*\bhref=[\"']https?://[^>]*>", re.IGNORECASE)


def strip_remote_resources(html: str) -> str:
    """Remove every script, module import and stylesheet that would be fetched from the network."""
    html = _REMOTE_SCRIPT.sub("", html)
    html = _REMOTE_IMPORT.sub("", html)
    html = _REMOTE_DYNAMIC_IMPORT.sub("Promise.reject(new Error('offline report'))", html)
    return _REMOTE_STYLESHEET.sub("", html)


def remote_resources(html: str) -> list[str]:
    """Every network resource the page would load (empty for an offline report)."""
    found = _REMOTE_SCRIPT.findall(html) + _REMOTE_IMPORT.findall(html)
    found += _REMOTE_DYNAMIC_IMPORT.findall(html) + _REMOTE_STYLESHEET.findall(html)
    return found


def notebook_paths(folder: str | Path | None = None) -> list[Path]:
    """The notebooks in run order (``NN_name.ipynb`` sorted by name; others last)."""
    folder = Path(folder or project_root() / "notebooks")
    return sorted(folder.glob("*.ipynb"), key=lambda p: (not p.name[:2].isdigit(), p.name))


def export_html(notebook_node) -> str:
    """A self-contained HTML page of an executed notebook."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", embed_images=True)
    body, _ = exporter.from_notebook_node(notebook_node)
    return strip_remote_resources(body)


def run_notebook(path: Path, executed_dir: Path, report_dir: Path, timeout: int = 3600) -> dict:
    """Execute one notebook in its own folder; write the executed copy and its HTML report."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    started = time.time()
    error = None
    # The kernel inherits the environment: tell it no front end will ever answer widgets,
    # so interactive views render a static version into the report (saelib.explorer).
    previous = os.environ.get("SAELIB_HEADLESS")
    os.environ["SAELIB_HEADLESS"] = "1"
    try:
        client.execute()
    except CellExecutionError as err:
        error = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
    finally:
        if previous is None:
            os.environ.pop("SAELIB_HEADLESS", None)
        else:
            os.environ["SAELIB_HEADLESS"] = previous
    seconds = time.time() - started
    executed_dir.mkdir(parents=True, exist_ok=True)
    report_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, executed_dir / path.name)
    (report_dir / f"{path.stem}.html").write_text(export_html(nb), encoding="utf-8")
    return {"notebook": path.stem, "seconds": round(seconds, 1), "ok": error is None, "error": error}


def _result_files(profile_name: str | None, folder: str | Path | None) -> list[Path]:
    root = Path(folder) if folder else results_dir() / profile(profile_name).name
    return sorted(root.glob("*/*.json"), key=lambda p: (p.name, p.parent.name))


def summary_table(profile_name: str | None = None, folder: str | Path | None = None) -> pd.DataFrame:
    """One row per notebook and model of one profile (default: the active one), read from
    ``results/<profile>/<model>/*.json``: the key numbers, nested dicts flattened to
    ``a.b`` columns; lists (tables of runs, sweeps) stay in the JSON files."""
    rows = []
    for path in _result_files(profile_name, folder):
        flat = pd.json_normalize(json.loads(path.read_text())).iloc[0].to_dict()
        rows.append({key: value for key, value in flat.items() if not isinstance(value, (list, dict))})
    return pd.DataFrame(rows)


_NOT_HEADLINE = {"notebook", "profile", "model", "headline"}


def headline_table(profile_name: str | None = None, folder: str | Path | None = None) -> pd.DataFrame:
    """A long table (notebook, model, result, value) of each notebook's headline numbers:
    the keys it named in ``save_results(headline=...)``, else its top-level numbers and
    strings."""
    rows = []
    for path in _result_files(profile_name, folder):
        results = json.loads(path.read_text())
        flat = pd.json_normalize(results).iloc[0].to_dict()
        keys = results.get("headline") or [k for k, v in results.items()
                                           if k not in _NOT_HEADLINE and isinstance(v, (int, float, str, bool))]
        for key in keys:
            value = flat.get(key)
            if isinstance(value, float):
                value = round(value, 4)
            rows.append({"notebook": results.get("notebook", path.stem), "model": results.get("model"),
                         "result": key, "value": value})
    return pd.DataFrame(rows, columns=["notebook", "model", "result", "value"])


def run_all(
    only: list[str] | None = None,
    out_dir: str | Path | None = None,
    timeout: int = 3600,
    model: str | None = None,
) -> pd.DataFrame:
    """Run the notebooks in order (``only``: name prefixes to keep); returns the run table.
    With a ``model`` other than the embedded one, executed notebooks and reports go to
    ``by_model/<model>/executed/`` and ``by_model/<model>/reports/``, beside the main job's."""
    out_dir = Path(out_dir or project_root())
    if model and model != "embedded":
        from .paths import path_label

        out_dir = out_dir / "by_model" / path_label(model)
    runs = []
    chosen = [p for p in notebook_paths() if not only or any(p.stem.startswith(prefix) for prefix in only)]
    if not chosen:
        raise ValueError(f"--only {' '.join(only or [])} matches no notebook; the notebooks are "
                         f"{', '.join(p.stem for p in notebook_paths())}")
    for path in chosen:
        print(f"[saelib] running {path.name} (profile {os.environ.get('SAELIB_PROFILE', 'default')}, "
              f"model {model or os.environ.get('SAELIB_MODEL') or 'embedded'})", flush=True)
        run = run_notebook(path, out_dir / "executed", out_dir / "reports", timeout=timeout)
        print(f"[saelib]   {'ok' if run['ok'] else 'FAILED'} in {run['seconds']} s" + (f": {run['error']}" if run["error"] else ""), flush=True)
        runs.append(run)
    table = pd.DataFrame(runs)
    name = profile().name
    reports = out_dir / "reports"
    reports.mkdir(parents=True, exist_ok=True)
    table.to_csv(reports / "runs.csv", index=False)
    summary_table(name).to_csv(reports / "summary.csv", index=False)
    headlines = headline_table(name)
    headlines.to_csv(reports / "headline.csv", index=False)
    print("\n[saelib] notebooks\n" + table.to_string(index=False))
    if len(headlines):
        print(f"\n[saelib] headline results, profile {name} (all of them: reports/summary.csv, "
              f"results/{name}/<model>/*.json)\n" + headlines.to_string(index=False))
    return table
