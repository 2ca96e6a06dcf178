"""Conventions every notebook keeps (DESIGN.md, "Notebook conventions")."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
COLAB_GUARD = re.compile(r"if\s+.*(colab|in_colab)", re.IGNORECASE)


def test_there_are_notebooks():
    assert NOTEBOOKS


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.name)
def notebook(request) -> tuple[Path, dict]:
    return request.param, json.loads(request.param.read_text())


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell: dict) -> str:
    return "".join(cell["source"])


def test_outputs_are_stripped(notebook):
    path, nb = notebook
    for cell in _code_cells(nb):
        assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name}: stored output"
    assert "widgets" not in nb.get("metadata", {}), f"{path.name}: stored widget state"


def test_kernelspec_is_python3(notebook):
    path, nb = notebook
    assert nb["metadata"]["kernelspec"]["name"] == "python3", path.name


def test_opens_with_title_then_parameters(notebook):
    path, nb = notebook
    first, second = nb["cells"][0], nb["cells"][1]
    assert first["cell_type"] == "markdown" and re.match(r"# (\d\d|Colab) · \S", _source(first)), path.name
    assert "runtime" in _source(first).lower(), f"{path.name}: the title cell should state the runtime"
    assert second["cell_type"] == "code" and "parameters" in second["metadata"].get("tags", []), path.name
    assert "profile()" in _source(second) and "MODEL" in _source(second), path.name


def test_ends_with_assertions_and_saves_results(notebook):
    path, nb = notebook
    code = _code_cells(nb)
    assert "assert " in _source(code[-1]), f"{path.name}: the last code cell should assert key results"
    assert any("save_results(" in _source(c) for c in code), f"{path.name}: results/*.json not written"


def test_pip_only_under_a_colab_guard(notebook):
    path, nb = notebook
    for cell in _code_cells(nb):
        lines = _source(cell).splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith(("%pip", "!pip")):
                assert any(COLAB_GUARD.search(l) for l in lines[:i]), f"{path.name}: {line!r} outside a Colab guard"
