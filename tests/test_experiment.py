"""Where `mlflow run` of the project lands with no experiment chosen (the `phi3flow` experiment), and the
design card's command as written there: run IDs a step takes are optional (tests/test_optional_run_ids.py)."""

from __future__ import annotations

import sys

import mlflow
from conftest import BIN, REPO, assert_ok, mlflow_run

from phi3flow import settings
from phi3flow.experiment import runs_this_project


def test_the_design_card_commands_land_in_phi3flow_and_chain_by_the_newest_run(tmp_path, monkeypatch):
    """`mlflow run . -e fetch_model -P model_id=...`, then `mlflow run . -e log_onnx_wrapper` with no parameter
    at all (the design card's command), on a fresh tracking store with no experiment chosen."""
    # The provider is found through the installed project's entry points (pyproject.toml): after
    # changing them, `pip install -e .` again.
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    fetched = assert_ok(mlflow_run("fetch_model", {"model_id": settings.BUILTIN_TINY}, uri, cwd=tmp_path))
    wrapped = mlflow_run("log_onnx_wrapper", {}, uri, cwd=tmp_path)
    assert_ok(wrapped)
    assert f"fetch_run_id not given: using the newest FINISHED fetch_model run {fetched}" in wrapped.stdout
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(settings.DEFAULT_EXPERIMENT_NAME)
    assert experiment is not None, [e.name for e in client.search_experiments()]
    runs = {run.info.run_id: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {fetched, wrapped.run_id}
    # named from inside the step, when started by hand too
    assert runs[fetched].info.run_name == "fetch_model" and runs[wrapped.run_id].info.run_name == "log_onnx_wrapper"
    assert runs[wrapped.run_id].data.tags[settings.TAG_FETCH_RUN_ID] == fetched
    assert client.search_runs(["0"]) == []  # nothing in Default


def test_only_mlflow_run_of_this_project_is_recognised(tmp_path):
    mlflow_cli = str(BIN / "mlflow")
    assert runs_this_project([mlflow_cli, "run", str(REPO), "-e", "main"])
    assert runs_this_project([mlflow_cli, "run", "-e", "evaluate", "-P", "x=1", str(REPO)])
    (tmp_path / "MLproject").write_text("name: another\n")
    assert not runs_this_project([mlflow_cli, "run", str(tmp_path)])
    assert not runs_this_project([mlflow_cli, "server", str(REPO)])
    assert not runs_this_project([sys.executable, "-m", "steps.main", str(REPO)])
