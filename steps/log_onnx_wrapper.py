"""log_onnx_wrapper: convert a fetch run's Phi-3 to ONNX (int4 by default) and log the `phi3-onnx` pyfunc."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import mlflow

from phi3flow import chain, onnx_model, settings
from phi3flow.artifacts import download_fetched_model
from phi3flow.errors import run_step
from phi3flow.onnx_convert import (
    DEFAULT_INT4_BLOCK_SIZE,
    EXECUTION_PROVIDERS,
    INT4_BLOCK_SIZES,
    PRECISIONS,
    check_options,
    parse_int4_block_size,
)
from phi3flow.threads import parse_threads


@click.command()
@click.option("--fetch-run-id", default="",
              help="Run ID of a fetch_model run; empty: the newest FINISHED one in the experiment.")
@click.option("--precision", default="int4", show_default=True, help=f"One of {', '.join(PRECISIONS)}.")
@click.option("--execution-provider", default="cpu", show_default=True,
              help=f"One of {', '.join(EXECUTION_PROVIDERS)}.")
@click.option("--interface", default="chat", show_default=True, help=f"One of {', '.join(onnx_model.INTERFACES)}.")
@click.option("--registered-model-name", default="", help="Also register the model under this name.")
@click.option("--threads", default=settings.ONNX_THREADS_AUTO, show_default=True,
              help="onnxruntime threads: 'auto' (the CPUs the loading process may run on) or a number.")
@click.option("--int4-block-size", default=str(DEFAULT_INT4_BLOCK_SIZE), show_default=True,
              help=f"int4 conversions: weights per quantization scale, one of {', '.join(map(str, INT4_BLOCK_SIZES))}"
                   " (128: faster, coarser).")
def main(fetch_run_id: str, precision: str, execution_provider: str, interface: str, registered_model_name: str,
         threads: str, int4_block_size: str) -> None:
    with mlflow.start_run(run_name="log_onnx_wrapper") as run, tempfile.TemporaryDirectory() as tmp:
        block_size = parse_int4_block_size(int4_block_size)
        check_options(precision, execution_provider, block_size)
        onnx_model.check_interface(interface)
        fetch_run_id = chain.run_id_or_newest(fetch_run_id, "fetch_model", "fetch_run_id")
        parse_threads(threads)  # a bad value fails before the download and conversion
        mlflow.set_tag(settings.TAG_ONNX_THREADS, threads.strip())
        fetched = download_fetched_model(fetch_run_id)  # from the local cache of fetched files
        mlflow.set_tags(fetched.lineage_tags)
        onnx_dir, converted = onnx_model.onnx_folder(fetched.path, Path(tmp), precision, execution_provider,
                                                      block_size)
        mlflow.set_tag(settings.TAG_ONNX_SOURCE, "converted" if converted else "as-fetched")
        onnx_model.try_generation(onnx_dir, interface)  # a model that cannot run is never logged
        info = onnx_model.log_onnx_model(onnx_dir, interface, fetched.model_id, registered_model_name or None, threads)
        print(f"log_onnx_wrapper run {run.info.run_id}: {info.model_uri}", flush=True)


if __name__ == "__main__":
    run_step(main)
