"""The one dependency list (pyproject.toml) and the conda file must not drift apart."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _conda_pip_lines() -> list[str]:
    text = (ROOT / "environment.yml").read_text()
    pip_block = text.split("- pip:", 1)[1]
    return [m.group(1).strip() for m in re.finditer(r"^\s+-\s+(.+)$", pip_block, re.MULTILINE)]


def test_environment_installs_the_package_with_every_extra():
    extras = sorted(_pyproject()["project"]["optional-dependencies"])
    installs = [line for line in _conda_pip_lines() if line.startswith("-e .")]
    assert installs, "environment.yml must install the package itself (pip: -e .[extras])"
    named = set(re.search(r"\[(.*)\]", installs[0]).group(1).split(","))
    assert named == set(extras), f"environment.yml installs extras {named}, pyproject has {extras}"


def test_environment_pins_nothing_that_pyproject_does_not_allow():
    deps = {Requirement(d).name: Requirement(d) for d in _pyproject()["project"]["dependencies"]}
    for line in _conda_pip_lines():
        if line.startswith("-e"):
            continue
        req = Requirement(line)
        assert req.name in deps, f"environment.yml adds {req.name}, which pyproject.toml does not list"
        pinned = next(iter(req.specifier)).version
        assert deps[req.name].specifier.contains(pinned), f"{line} violates pyproject's {deps[req.name]}"


def test_readme_has_exactly_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Set-up", 1)[1].split("```", 2)[1]
    commands = [l for l in block.splitlines()[1:] if l.strip() and not l.strip().startswith("#")]
    assert commands == ["bash run.sh all", "bash run.sh test"], commands


def test_ci_runs_the_readme_test_command():
    assert "bash run.sh test" in (ROOT / ".ci" / "run").read_text()
