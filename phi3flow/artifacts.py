"""Read a fetch run's model by run ID: the only way a step gets another step's files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from phi3flow import settings
from phi3flow.errors import AUTH_ERROR_CODES, UserError
from phi3flow.fetch import manifest_of


@dataclass(frozen=True)
class FetchedModel:
    path: Path
    run_id: str
    model_id: str
    resolved_revision: str

    @property
    def lineage_tags(self) -> dict[str, str]:
        return {
            settings.TAG_FETCH_RUN_ID: self.run_id,
            settings.TAG_MODEL_ID: self.model_id,
            settings.TAG_REVISION: self.resolved_revision,
        }


def verify_manifest(folder: Path, manifest: dict) -> None:
    """Fail unless folder holds exactly the files of the manifest with the same checksums."""
    actual = manifest_of(folder)
    missing = sorted(set(manifest) - set(actual))
    extra = sorted(set(actual) - set(manifest))
    changed = sorted(k for k in set(manifest) & set(actual) if manifest[k]["sha256"] != actual[k]["sha256"])
    if missing or extra or changed:
        raise UserError(f"model files do not match the manifest: missing={missing} unexpected={extra} checksum mismatch={changed}")


def finished_run(run_id: str) -> Run:
    """The run with this ID, which must have finished: how every step reads its upstream run."""
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException as exc:
        if exc.error_code in AUTH_ERROR_CODES:
            raise  # the run may exist: run_step reports the refusal
        raise UserError(f"no run with ID '{run_id}' in the tracking store {mlflow.get_tracking_uri()}") from None
    if run.info.status != "FINISHED":
        raise UserError(f"run '{run_id}' is {run.info.status}, not FINISHED")
    return run


def download_fetched_model(fetch_run_id: str, dst: Path) -> FetchedModel:
    """Download the `model/` artifacts of a fetch_model run into dst and verify them."""
    client = mlflow.MlflowClient()
    run = finished_run(fetch_run_id)
    names = {f.path for f in client.list_artifacts(fetch_run_id)}
    if settings.MODEL_ARTIFACT_DIR not in names or settings.MANIFEST_FILE not in names:
        raise UserError(f"run '{fetch_run_id}' has no {settings.MODEL_ARTIFACT_DIR}/ and {settings.MANIFEST_FILE}: is it a fetch_model run?")
    manifest = mlflow.artifacts.load_dict(f"runs:/{fetch_run_id}/{settings.MANIFEST_FILE}")
    print(f"downloading model files of run {fetch_run_id} ...", flush=True)
    path = mlflow.artifacts.download_artifacts(
        run_id=fetch_run_id, artifact_path=settings.MODEL_ARTIFACT_DIR, dst_path=str(dst)
    )
    verify_manifest(Path(path), manifest)
    tags = run.data.tags
    return FetchedModel(
        path=Path(path),
        run_id=fetch_run_id,
        model_id=tags.get(settings.TAG_MODEL_ID, run.data.params.get("model_id", "")),
        resolved_revision=tags.get(settings.TAG_REVISION, ""),
    )
