"""fetch_model: put Phi-3's files (Hub, local folder or builtin:tiny-phi3) into an MLflow run."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click
import mlflow

from phi3flow import fetch, settings
from phi3flow.errors import run_step


@click.command()
@click.option("--model-id", default=settings.DEFAULT_MODEL_ID, show_default=True,
              help=f"Hub id (owner/name[/subfolder]), a local folder, or {settings.BUILTIN_TINY}.")
@click.option("--revision", default=settings.DEFAULT_REVISION, show_default=True, help="Hub branch, tag or commit.")
def main(model_id: str, revision: str) -> None:
    with mlflow.start_run(run_name="fetch_model") as run, tempfile.TemporaryDirectory() as tmp:
        source = fetch.resolve(model_id, revision, Path(tmp))
        architecture = fetch.architecture_of(source.path)
        print("checking config, tokenizer and weight headers ...", flush=True)
        fetch.check_model_files(source.path)  # a broken checkpoint fails here, before anything is logged
        manifest = fetch.manifest_of(source.path)
        total = sum(int(entry["bytes"]) for entry in manifest.values())
        print(f"logging {len(manifest)} files ({total / 1e6:.1f} MB) to run {run.info.run_id} ...", flush=True)
        mlflow.log_artifacts(str(source.path), artifact_path=settings.MODEL_ARTIFACT_DIR)
        mlflow.log_dict(manifest, settings.MANIFEST_FILE)
        mlflow.set_tags({
            settings.TAG_MODEL_ID: model_id,
            settings.TAG_REVISION: source.resolved_revision,
            settings.TAG_TOTAL_BYTES: str(total),
            settings.TAG_ARCHITECTURE: architecture,
        })
        print(f"fetch_model run {run.info.run_id}: {model_id} @ {source.resolved_revision}", flush=True)


if __name__ == "__main__":
    run_step(main)
