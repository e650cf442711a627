"""main on a prebuilt onnxruntime-genai folder: fetch -> log_onnx_wrapper -> evaluate, no pipeline model."""

from __future__ import annotations

import re

import mlflow
from conftest import REPO, assert_ok, mlflow_run

from phi3flow import settings


def test_main_on_a_prebuilt_onnx_folder_evaluates_the_onnx_model_alone(tiny_onnx_fp32, tracking_uri, tmp_path):
    eval_file = tmp_path / "two.jsonl"
    eval_file.write_text("\n".join((REPO / settings.BUNDLED_EVAL_FILE).read_text().splitlines()[:2]) + "\n")
    experiment_id = mlflow.create_experiment("main-onnx", artifact_location=str(tmp_path / "artifacts"))
    result = mlflow_run("main", {"model_id": str(tiny_onnx_fp32), "precision": "fp32", "eval_data": str(eval_file)},
                        tracking_uri, MLFLOW_EXPERIMENT_ID=experiment_id)
    assert_ok(result)
    main_run_id = re.findall(r"Run \(ID '([0-9a-f]+)'\)", result.stderr)[-1]  # `mlflow run` names main last
    assert (f"[2/4] log_pipeline: skipped: {tiny_onnx_fp32} is a prebuilt onnxruntime-genai folder "
            "(onnxruntime-genai:phi3), "
            "which has no transformers checkpoint to log") in result.stdout
    assert f"main run {main_run_id}: 3 steps run, 0 reused" in result.stdout
    assert "[4/4] evaluate: running" in result.stdout  # numbered in a chain of four, the skipped one included

    client = mlflow.MlflowClient()
    tags = client.get_run(main_run_id).data.tags
    steps = {ep: tags.get(settings.TAG_STEP_RUN.format(ep)) for ep in settings.MAIN_STEPS}
    assert steps["log_pipeline"] is None and all(steps[ep] for ep in ("fetch_model", "log_onnx_wrapper", "evaluate"))
    onnx_run = client.get_run(steps["log_onnx_wrapper"])
    assert onnx_run.data.tags[settings.TAG_ONNX_SOURCE] == "as-fetched"
    evaluate = client.get_run(steps["evaluate"])
    assert evaluate.info.status == "FINISHED"
    assert evaluate.data.params["pipeline_run_id"] == settings.NO_PIPELINE_RUN
    assert evaluate.data.tags[settings.TAG_MODEL_ID] == str(tiny_onnx_fp32)
    assert "onnx/rouge_l/mean" in evaluate.data.metrics
    assert not any(name.startswith(("pipeline/", "agreement/")) for name in evaluate.data.metrics)
    # The champion rule applied to what exists: the ONNX version registered and scored by this run.
    onnx_version = next(v for v in client.search_model_versions(f"name = '{settings.ONNX_MODEL_NAME}'")
                        if v.tags.get(settings.TAG_EVAL_RUN_ID) == evaluate.info.run_id)
    champion = evaluate.data.tags[settings.TAG_CHAMPION]
    holder_name, holder_version = champion.split("/")
    assert str(client.get_model_version_by_alias(holder_name, settings.CHAMPION_ALIAS).version) == holder_version
    if evaluate.data.tags[settings.TAG_CHAMPION_DECISION] == "promoted":
        assert champion == f"{settings.ONNX_MODEL_NAME}/{onnx_version.version}"
    table = mlflow.artifacts.load_text(f"runs:/{evaluate.info.run_id}/comparison/comparison.md")
    assert "| onnx |" in table and "| pipeline |" not in table
