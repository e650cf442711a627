"""log_pipeline: log a fetch run's Phi-3 as MLflow's transformers flavor (`phi3-pipeline`, llm/v1/chat)."""

from __future__ import annotations

import click
import mlflow

from phi3flow import chain, settings
from phi3flow.artifacts import download_fetched_model
from phi3flow.errors import run_step
from phi3flow.pipeline_model import DTYPES, check_dtype, log_pipeline_model


@click.command()
@click.option("--fetch-run-id", default="",
              help="Run ID of a fetch_model run; empty: the newest FINISHED one in the experiment.")
@click.option("--max-tokens", type=int, default=settings.DEFAULT_MAX_TOKENS, show_default=True,
              help="Default answer length (max_new_tokens).")
@click.option("--sampling", type=bool, default=False, show_default=True,
              help="Sample by default (do_sample) instead of greedy decoding.")
@click.option("--dtype", default="auto", show_default=True,
              help=f"One of {', '.join(DTYPES)}; auto: the checkpoint's own.")
@click.option("--registered-model-name", default="", help="Also register the model under this name.")
def main(fetch_run_id: str, max_tokens: int, sampling: bool, dtype: str, registered_model_name: str) -> None:
    with mlflow.start_run(run_name="log_pipeline") as run:
        check_dtype(dtype)
        fetch_run_id = chain.run_id_or_newest(fetch_run_id, "fetch_model", "fetch_run_id")
        fetched = download_fetched_model(fetch_run_id)  # from the local cache of fetched files
        mlflow.set_tags(fetched.lineage_tags)
        info = log_pipeline_model(
            fetched.path, fetched.model_id, max_new_tokens=max_tokens, do_sample=sampling,
            dtype=dtype, registered_model_name=registered_model_name or None,
        )
        print(f"log_pipeline run {run.info.run_id}: {info.model_uri}", flush=True)


if __name__ == "__main__":
    run_step(main)
