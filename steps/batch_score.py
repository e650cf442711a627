"""batch_score: score a JSONL, CSV or Parquet file of chat requests (or prompts) with a logged model on Spark.

Also runs under spark-submit, which takes a file rather than a module (give both the same master):
`spark-submit --master spark://HOST:7077 steps/batch_score.py --input-path ... --spark-master spark://HOST:7077`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click
import mlflow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # spark-submit runs this file by path

from phi3flow import settings  # noqa: E402
from phi3flow.batch import batch_score  # noqa: E402
from phi3flow.errors import run_step  # noqa: E402


@click.command()
@click.option("--model-uri", default=settings.BATCH_MODEL_URI, show_default=True,
              help="The model: models:/, runs:/ or a local folder.")
@click.option("--input-path", required=True,
              help="A .jsonl, .csv or .parquet file (or folder of them): a local path or an artifact URI.")
@click.option("--spark-master", default=settings.BATCH_SPARK_MASTER, show_default=True,
              help="local[N], spark://HOST:PORT, yarn, k8s://...")
@click.option("--max-tokens", type=int, default=settings.BATCH_MAX_TOKENS, show_default=True,
              help="For rows that do not set max_tokens.")
def main(model_uri: str, input_path: str, spark_master: str, max_tokens: int) -> None:
    with mlflow.start_run() as run, tempfile.TemporaryDirectory() as tmp:
        result = batch_score(model_uri, input_path, spark_master, max_tokens, Path(tmp))
        mlflow.log_artifacts(str(result.output_dir), settings.BATCH_OUTPUT_DIR)
        mlflow.log_metrics({
            "rows": result.rows,
            "errors": result.errors,
            "completion_tokens": result.completion_tokens,
            "seconds": result.seconds,
            "model_loads": result.model_loads,
            "rows_per_second": result.rows_per_second,
            "tokens_per_second": result.tokens_per_second,
        })
        print(f"batch_score run {run.info.run_id}: {result.rows} rows, {result.errors} errors, "
              f"{result.completion_tokens} completion tokens in {result.seconds:.1f} s "
              f"({result.tokens_per_second:.1f} tokens/s); predictions in "
              f"{run.info.artifact_uri}/{settings.BATCH_OUTPUT_DIR}", flush=True)


if __name__ == "__main__":
    run_step(main)
