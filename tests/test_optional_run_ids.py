"""Run IDs a step takes are optional: empty means the newest FINISHED run of that step in the experiment.

The design card's `mlflow run . -e log_onnx_wrapper`, as written, runs in tests/test_experiment.py."""

from __future__ import annotations

import os

import mlflow
import pytest

from phi3flow import settings
from phi3flow.chain import run_id_or_newest
from phi3flow.errors import UserError


def _newest_finished(experiment_id: str, entry_point: str) -> str:
    return mlflow.MlflowClient().search_runs(
        [experiment_id], f"tags.`mlflow.project.entryPoint` = '{entry_point}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )[0].info.run_id


def test_an_empty_run_id_means_the_newest_finished_run_of_that_step(fetch_run_id, capsys):
    experiment_id = os.environ["MLFLOW_EXPERIMENT_ID"]
    newest = _newest_finished(experiment_id, "fetch_model")
    # Other tests may have fetched other models since: the message names whichever is newest.
    model_id = mlflow.MlflowClient().get_run(newest).data.tags[settings.TAG_MODEL_ID]
    with mlflow.start_run(experiment_id=experiment_id):
        assert run_id_or_newest("", "fetch_model", "fetch_run_id") == newest
        assert f"fetch_run_id not given: using the newest FINISHED fetch_model run {newest} ({model_id}, started 20" \
            in capsys.readouterr().out
        assert run_id_or_newest(fetch_run_id, "fetch_model", "fetch_run_id") == fetch_run_id
        assert run_id_or_newest("none", "log_pipeline", "pipeline_run_id") == "none"  # a value, not "empty"
    with mlflow.start_run(experiment_id=mlflow.create_experiment("no-steps-yet")) as run:
        with pytest.raises(UserError) as refused:
            run_id_or_newest("", "log_pipeline", "pipeline_run_id")
    assert str(refused.value) == (f"pipeline_run_id is empty and experiment {run.info.experiment_id} has no FINISHED "
                                  "log_pipeline run: run fetch_model or main first, "
                                  "or pass -P pipeline_run_id=<run id>")
