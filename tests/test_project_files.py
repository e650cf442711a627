"""The project's declarations agree with each other."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from conftest import REPO


def _pyproject_pins() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])


def test_python_env_and_conda_pin_the_same_versions_as_pyproject():
    pins = _pyproject_pins()
    assert all("==" in pin for pin in pins)
    assert "torch==2.13.0" in pins
    python_env = yaml.safe_load((REPO / "python_env.yaml").read_text())
    assert python_env["python"] == "3.11"
    assert set(python_env["dependencies"]) == pins
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    assert "python=3.11" in conda["dependencies"]
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert set(pip_section) == pins


def test_mlproject_declares_the_entry_points():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    assert set(project["entry_points"]) == {"main", "fetch_model", "log_pipeline", "log_onnx_wrapper", "evaluate",
                                            "serve", "batch_score"}
    assert project["python_env"] == "python_env.yaml"
    fetch = project["entry_points"]["fetch_model"]["parameters"]
    assert fetch["model_id"]["default"] == "microsoft/Phi-3-mini-4k-instruct"
    assert fetch["revision"]["default"] == "main"


def test_ci_runs_exactly_the_readme_test_command():
    ci_command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in (REPO / "README.md").read_text()


def test_ruff_finds_nothing():
    """The lint configured in pyproject.toml ([tool.ruff]) is clean."""
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run([str(ruff), "check", "--no-cache", "--output-format", "concise", "."],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
