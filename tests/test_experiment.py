"""Where `mlflow run` of the project lands with no experiment chosen: the `phi3flow` experiment."""

from __future__ import annotations

import subprocess
import sys

import mlflow
from conftest import BIN, REPO, step_env

from phi3flow import settings
from phi3flow.experiment import runs_this_project


def test_mlflow_run_with_no_experiment_lands_in_phi3flow_and_is_named(tmp_path):
    # The provider is found through the installed project's entry points (pyproject.toml): after
    # changing them, `pip install -e .` again.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {k: v for k, v in step_env(uri).items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")}
    cmd = [str(BIN / "mlflow"), "run", str(REPO), "-e", "fetch_model", "-P", "model_id=builtin:tiny-phi3",
           "--env-manager", "local"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(settings.DEFAULT_EXPERIMENT_NAME)
    assert experiment is not None, [e.name for e in client.search_experiments()]
    [run] = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "fetch_model"  # named from inside the step, when started by hand too
    assert client.search_runs(["0"]) == []  # nothing in Default


def test_only_mlflow_run_of_this_project_is_recognised(tmp_path):
    mlflow_cli = str(BIN / "mlflow")
    assert runs_this_project([mlflow_cli, "run", str(REPO), "-e", "main"])
    assert runs_this_project([mlflow_cli, "run", "-e", "evaluate", "-P", "x=1", str(REPO)])
    (tmp_path / "MLproject").write_text("name: another\n")
    assert not runs_this_project([mlflow_cli, "run", str(tmp_path)])
    assert not runs_this_project([mlflow_cli, "server", str(REPO)])
    assert not runs_this_project([sys.executable, "-m", "steps.main", str(REPO)])
