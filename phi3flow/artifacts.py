"""Read a fetch run's model by run ID: the only way a step gets another step's files."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from phi3flow import settings
from phi3flow.errors import AUTH_ERROR_CODES, UserError
from phi3flow.fetch import content_hash, sha256_of
from phi3flow.step_process import owner, remove_dead_tmp


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


def download_fetched_model(fetch_run_id: str, cache_root: Path | None = None) -> FetchedModel:
    """The `model/` files of a fetch_model run, verified against its manifest, from the local cache.

    The folder returned is a cache entry, shared with the other steps of this machine: read it, never
    write into it (copy what must change, as working_copy does).
    """
    client = mlflow.MlflowClient()
    run = finished_run(fetch_run_id)
    names = {f.path for f in client.list_artifacts(fetch_run_id)}
    if settings.MODEL_ARTIFACT_DIR not in names or settings.MANIFEST_FILE not in names:
        raise UserError(f"run '{fetch_run_id}' has no {settings.MODEL_ARTIFACT_DIR}/ and {settings.MANIFEST_FILE}: is "
                        "it a fetch_model run?")
    manifest = mlflow.artifacts.load_dict(f"runs:/{fetch_run_id}/{settings.MANIFEST_FILE}")
    path = cached_model_files(fetch_run_id, manifest, cache_root or settings.cache_dir())
    tags = run.data.tags
    return FetchedModel(
        path=path,
        run_id=fetch_run_id,
        model_id=tags.get(settings.TAG_MODEL_ID, run.data.params.get("model_id", "")),
        resolved_revision=tags.get(settings.TAG_REVISION, ""),
    )


# ---- the local cache of fetched model files --------------------------------------------------------
# MLflow has no local artifact cache: each download_artifacts call fetches every byte again (7.6 GB
# for Phi-3-mini, through the tracking server when it proxies artifacts). Layout under cache_root:
#   fetched/<key>/                  one entry: exactly the files of a fetch run's model/ artifacts
#   fetched/<key>.lock              held while a step checks, downloads or replaces that entry
#   partial/<host>-<pid>/<key>/     a download in progress, renamed into fetched/ once complete and verified
# key = sha256 of the manifest (file -> sha256, bytes) the run logged. The entry is found through
# what the run's manifest says, never through a folder another step names, and two fetch runs of
# the same files share it. There is no eviction: like the Hugging Face cache it keeps one copy per
# distinct checkpoint until it is removed (safe whenever no step runs).

def cache_key(manifest: dict) -> str:
    """The cache entry of a manifest: its sha256 (what fetch.content_hash computes, without the prefix)."""
    return content_hash(manifest).removeprefix("sha256:")


def cached_model_files(fetch_run_id: str, manifest: dict, cache_root: Path) -> Path:
    """The cache entry holding the files manifest describes: verified if present, else downloaded from the run."""
    entry = cache_root / "fetched" / cache_key(manifest)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with entry_lock(entry):
        if entry.is_dir():
            problem = mismatch(entry, manifest)
            if not problem:
                print(f"model files of run {fetch_run_id}: in the local cache ({entry}), verified, not downloaded",
                      flush=True)
                return entry
            print(f"the cached model files {entry} do not match the manifest ({problem}): "
                  "discarding them and downloading again", flush=True)
            discard(entry, cache_root)
        download_entry(fetch_run_id, manifest, entry, cache_root)
    return entry


@contextmanager
def entry_lock(entry: Path) -> Iterator[None]:
    """Exclusive use of entry while it is checked or made: a second step waits, then finds it complete."""
    fd = os.open(entry.with_name(f"{entry.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that downloads or checks {entry} ...", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock, also when the process is killed


def download_entry(fetch_run_id: str, manifest: dict, entry: Path, cache_root: Path) -> None:
    """Download the run's model/ files into a private folder, verify them, and rename it to entry.

    A download that is interrupted, killed or does not match the manifest never becomes an entry.
    """
    partial_root = cache_root / "partial"
    remove_dead_tmp(partial_root)  # downloads of processes that were killed
    staging = partial_root / owner().replace(":", "-")
    staging.mkdir(parents=True, exist_ok=True)
    try:
        total = sum(int(item["bytes"]) for item in manifest.values())
        print(f"downloading model files of run {fetch_run_id} ({total / 1e6:.1f} MB) into the local cache "
              f"{entry.parent} ...", flush=True)
        path = Path(mlflow.artifacts.download_artifacts(
            run_id=fetch_run_id, artifact_path=settings.MODEL_ARTIFACT_DIR, dst_path=str(staging / entry.name)))
        if problem := mismatch(path, manifest):
            raise UserError(f"model files do not match the manifest: {problem}")
        for file in path.rglob("*"):
            if file.is_file():
                file.chmod(0o444)  # read-only: steps share the entry and must not change it
        try:
            path.rename(entry)
        except OSError:  # another process put the same files there first (a file system without flock)
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def discard(entry: Path, cache_root: Path) -> None:
    """Take entry out of the cache at once (a rename), then delete it."""
    trash = cache_root / "partial" / owner().replace(":", "-") / f"discarded-{entry.name}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    entry.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def mismatch(folder: Path, manifest: dict) -> str:
    """How folder differs from manifest ("" when it holds exactly its files and bytes).

    Sizes are compared first (a stat per file); then every byte is hashed. Hashing reads the whole
    checkpoint each time an entry is used (7.64 GB for Phi-3-mini, on one core of a busy 2-core
    machine: 11 s from the page cache, 28 s from disk), less than downloading it again, and it is
    the only check that sees a byte changed in place. A
    stamp of sizes and modification times written after the first check would be cheaper and
    would miss exactly such a change (a rewrite that keeps the size, a time set back).
    """
    found = {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}
    missing = sorted(set(manifest) - set(found))
    extra = sorted(set(found) - set(manifest))
    # A file of another size cannot have the manifest's checksum: no need to hash anything.
    changed = sorted(name for name in set(manifest) & set(found)
                     if found[name].stat().st_size != int(manifest[name]["bytes"]))
    if not (missing or extra or changed):
        changed = sorted(name for name in manifest if sha256_of(found[name]) != manifest[name]["sha256"])
    if missing or extra or changed:
        return f"missing={missing} unexpected={extra} checksum mismatch={changed}"
    return ""


def working_copy(src: Path, dst: Path) -> Path:
    """A private copy of src that may be changed: JSON files (configs, which logging rewrites)
    copied, the others (weights, tokenizer files: read only) hard-linked, or copied on another file system.

    A hard link shares the bytes of src: nothing may write into a linked file.
    """
    for file in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if file.suffix != ".json":
            try:
                os.link(file, target)
                continue
            except OSError:  # another file system
                pass
        shutil.copyfile(file, target)  # not copy2: the copy is writable
    return dst
