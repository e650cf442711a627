"""evaluate: score the pipeline and ONNX models on an eval set, compare them, and move the `champion` alias."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import mlflow

from phi3flow import chain, settings
from phi3flow.errors import run_step
from phi3flow.eval_data import load_eval_data
from phi3flow.evaluation import evaluate_and_promote


@click.command()
@click.option("--pipeline-run-id", default="",
              help="Run ID of a log_pipeline run; empty: the newest FINISHED one in the experiment; "
                   f"'{settings.NO_PIPELINE_RUN}': evaluate the ONNX model alone (a prebuilt ONNX source).")
@click.option("--onnx-run-id", default="",
              help="Run ID of a log_onnx_wrapper run; empty: the newest FINISHED one in the experiment.")
@click.option("--eval-data", default=settings.BUNDLED_EVAL_DATA, show_default=True,
              help="'bundled', or a .jsonl/.csv/.parquet file (path or artifact URI) with prompt, reference[, system].")
@click.option("--max-tokens", type=int, default=settings.EVAL_MAX_TOKENS, show_default=True,
              help="Answer length per request.")
@click.option("--max-rows", type=int, default=settings.EVAL_MAX_ROWS, show_default=True,
              help="Refuse an evaluation set with more rows.")
@click.option("--pipeline-model-name", default=settings.PIPELINE_MODEL_NAME, show_default=True,
              help="Registered model name of the pipeline model.")
@click.option("--onnx-model-name", default=settings.ONNX_MODEL_NAME, show_default=True,
              help="Registered model name of the ONNX model.")
@click.option("--tolerance", type=float, default=settings.DEFAULT_TOLERANCE, show_default=True,
              help=f"How far below the current champion's {settings.QUALITY_METRIC} a winner may be and "
                   "still be promoted.")
def main(pipeline_run_id: str, onnx_run_id: str, eval_data: str, max_tokens: int, max_rows: int,
         pipeline_model_name: str, onnx_model_name: str, tolerance: float) -> None:
    with mlflow.start_run(run_name="evaluate") as run, tempfile.TemporaryDirectory() as tmp:
        pipeline_run_id = chain.run_id_or_newest(pipeline_run_id, "log_pipeline", "pipeline_run_id")
        onnx_run_id = chain.run_id_or_newest(onnx_run_id, "log_onnx_wrapper", "onnx_run_id")
        data = load_eval_data(eval_data, Path(tmp), max_rows)
        print(f"evaluating on {len(data.rows)} prompts from {eval_data}", flush=True)
        outcome = evaluate_and_promote(pipeline_run_id, onnx_run_id, data, max_tokens,
                                       pipeline_model_name, onnx_model_name, tolerance, Path(tmp))
        print(f"evaluate run {run.info.run_id}: champion {outcome.decision.champion.ref} ({outcome.decision.action})",
              flush=True)


if __name__ == "__main__":
    run_step(main)
