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


def _asserts_only(source: str) -> int:
    """How many asserts a cell holds if it is made of asserts alone (loops and ifs around
    asserts, and assignments of thresholds, allowed), else 0."""
    import ast

    count = 0
    for statement in ast.parse(source).body:
        nested = [node for node in ast.walk(statement) if isinstance(node, ast.Assert)]
        if isinstance(statement, ast.Assign):
            continue
        if not isinstance(statement, (ast.Assert, ast.For, ast.If)) or not nested:
            return 0
        count += len(nested)
    return count


def test_ends_with_assertions_on_saved_results(notebook):
    """The last code cell is nothing but asserts (at least three), after the cell that saves
    the results: containing the text 'assert ' somewhere was accepted before."""
    path, nb = notebook
    code = _code_cells(nb)
    assert _asserts_only(_source(code[-1])) >= 3, f"{path.name}: the last code cell should be asserts on key results"
    saving = [i for i, c in enumerate(code) if "save_results(" in _source(c)]
    assert saving and saving[-1] < len(code) - 1, f"{path.name}: results must be saved before the final asserts"


def test_assert_only_check_tells_apart_asserts_and_other_code():
    assert _asserts_only("assert a\nfor x in y:\n    assert x\nassert b, b") == 3
    assert _asserts_only("print('assert ')\nassert a") == 0
    assert _asserts_only("x = 1") == 0
    assert _asserts_only("bar = 0.5\nassert a < bar") == 1


def test_pip_only_under_a_colab_guard(notebook):
    path, nb = notebook
    for cell in _code_cells(nb):
        lines = _source(cell).splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith(("%pip", "!pip")):
                assert any(COLAB_GUARD.search(l) for l in lines[:i]), f"{path.name}: {line!r} outside a Colab guard"
