"""main: fetch_model -> log_pipeline and log_onnx_wrapper -> evaluate, reusing every unchanged step's run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import mlflow

from phi3flow import chain, settings, step_process
from phi3flow.errors import UserError, run_step
from phi3flow.onnx_convert import DEFAULT_INT4_BLOCK_SIZE, INT4_BLOCK_SIZES, PRECISIONS
from phi3flow.onnx_model import INTERFACES


@click.command()
@click.option("--model-id", default=settings.DEFAULT_MODEL_ID, show_default=True,
              help=f"Hub id (owner/name[/subfolder]), a local folder, or {settings.BUILTIN_TINY}.")
@click.option("--revision", default=settings.DEFAULT_REVISION, show_default=True, help="Hub branch, tag or commit.")
@click.option("--precision", default="int4", show_default=True, help=f"ONNX precision: one of {', '.join(PRECISIONS)}.")
@click.option("--interface", default="chat", show_default=True,
              help=f"ONNX pyfunc interface: one of {', '.join(INTERFACES)}; evaluate scores chat models, so "
                   "main takes chat.")
@click.option("--int4-block-size", default=str(DEFAULT_INT4_BLOCK_SIZE), show_default=True,
              help=f"Weights per int4 scale: one of {', '.join(map(str, INT4_BLOCK_SIZES))} (log_onnx_wrapper's).")
@click.option("--threads", default=settings.ONNX_THREADS_AUTO, show_default=True,
              help="onnxruntime threads of the ONNX model: 'auto' or a number (log_onnx_wrapper's).")
@click.option("--eval-data", default=settings.BUNDLED_EVAL_DATA, show_default=True,
              help="Evaluation set of the evaluate step.")
@click.option("--force", type=bool, default=False, show_default=True,
              help="Rerun every step even when a finished run matches.")
@click.option("--env-manager", default="", help="Env manager of the steps; empty: the one main was started with.")
def main(model_id: str, revision: str, precision: str, interface: str, int4_block_size: str, threads: str,
         eval_data: str, force: bool, env_manager: str) -> None:
    onnx_params = {"precision": precision, "interface": interface, "int4_block_size": int4_block_size,
                   "threads": threads}
    # SIGTERM, and the end of the process that started main, interrupt it like Ctrl-C (run_step):
    # MLflow stops the running step and marks its run FAILED, and this run ends FAILED.
    with mlflow.start_run(run_name="main") as run, tempfile.TemporaryDirectory() as tmp:
        chain.check_parameters(onnx_params, eval_data, Path(tmp))
        # Held until this process and every step it starts have ended (a kill of any of them included).
        step_process.hold_run_lock(mlflow.get_tracking_uri(), run.info.experiment_id)
        client = mlflow.MlflowClient()
        stale = chain.mark_stale_runs(client, run.info.experiment_id)
        project = Path.cwd()  # MLflow Projects runs every entry point in the project folder
        flow = chain.Chain(project, run.info.experiment_id,
                           env_manager or chain.caller_env_manager(client.get_run(run.info.run_id)),
                           chain.code_version(project), force, client)
        mlflow.set_tags({settings.TAG_ENV_MANAGER: flow.env_manager, settings.TAG_CODE_VERSION: flow.code})
        try:
            chain.run_flow(flow, model_id, revision, onnx_params, eval_data, Path(tmp))
        except KeyboardInterrupt:
            raise UserError("interrupted: the running step was stopped and its run marked FAILED") from None
        finally:
            mlflow.log_dict({**flow.summary(), "stale_runs_marked_killed": stale}, settings.SUMMARY_FILE)
        for step in flow.runs:
            print(f"  {step.entry_point:<17} {'reused' if step.reused else 'ran':<7} {step.run_id}", flush=True)
        print(f"main run {run.info.run_id}: {sum(not s.reused for s in flow.runs)} steps run, "
              f"{sum(s.reused for s in flow.runs)} reused", flush=True)


if __name__ == "__main__":
    run_step(main)
