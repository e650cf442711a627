"""Resolve a model source (Hub id, local folder or the embedded tiny model) to a folder of files."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from phi3flow import settings, tiny
from phi3flow.errors import UserError

# owner/name, optionally followed by a subfolder (ONNX repos keep one variant per subfolder)
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?$")


@dataclass(frozen=True)
class Source:
    path: Path  # folder holding the model files
    model_id: str
    revision: str  # as asked for
    resolved_revision: str  # a Hub commit SHA, or a content hash for local and builtin sources


def manifest_of(folder: Path) -> dict[str, dict[str, int | str]]:
    """Relative path -> sha256 and size of every file below folder."""
    manifest: dict[str, dict[str, int | str]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        manifest[path.relative_to(folder).as_posix()] = {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    return manifest


def content_hash(manifest: dict) -> str:
    """A stable identity for files that have no Hub commit: the hash of their manifest."""
    return "sha256:" + hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def architecture_of(folder: Path) -> str:
    """The Phi-3 architecture of the model in folder, or a UserError for anything else."""
    genai = folder / "genai_config.json"
    if genai.is_file():
        model_type = json.loads(genai.read_text()).get("model", {}).get("type")
        if model_type in settings.PHI3_GENAI_TYPES:
            return f"onnxruntime-genai:{model_type}"
        raise UserError(f"{folder.name}: onnxruntime-genai model type '{model_type}' is not Phi-3")
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"no config.json or genai_config.json in the model folder {folder}")
    data = json.loads(config.read_text())
    architectures = data.get("architectures") or []
    matches = settings.PHI3_ARCHITECTURES.intersection(architectures)
    if data.get("model_type") != "phi3" or not matches:
        raise UserError(
            f"not a Phi-3 causal LM: model_type={data.get('model_type')!r}, architectures={architectures}"
        )
    return sorted(matches)[0]


def resolve(model_id: str, revision: str, workdir: Path) -> Source:
    """Make the model's files available locally; workdir holds anything that must be built."""
    return _local_source(model_id, revision, workdir) or _from_hub(model_id, revision)


def resolve_revision(model_id: str, revision: str, workdir: Path) -> str:
    """What `resolve` would record as the resolved revision, without downloading Hub files.

    A Hub commit SHA costs one metadata request; local and builtin sources are hashed (the tiny
    model is built into workdir, a few seconds).
    """
    local = _local_source(model_id, revision, workdir)
    return local.resolved_revision if local else _hub_commit(model_id, revision)


def _local_source(model_id: str, revision: str, workdir: Path) -> Source | None:
    """The builtin model or an existing local folder; None for a valid Hub id; UserError otherwise."""
    if model_id.startswith("builtin:"):
        name = model_id.removeprefix("builtin:")
        if name not in tiny.FAMILY:
            raise UserError(f"unknown builtin model '{model_id}'; the builtins are {', '.join(settings.BUILTINS)}")
        path = tiny.build(workdir / name, name)
        return Source(path, model_id, revision, content_hash(manifest_of(path)))

    local = Path(os.path.expanduser(model_id))
    if local.is_dir():
        return Source(local.resolve(), model_id, revision, content_hash(manifest_of(local)))
    if model_id.startswith(("/", ".", "~")):
        raise UserError(f"local model folder '{model_id}' does not exist")
    if not _HUB_ID.match(model_id):
        raise UserError(f"model_id '{model_id}' is neither an existing local folder, a Hub id (owner/name) nor '{settings.BUILTIN_TINY}'")
    return None


def _hub_commit(model_id: str, revision: str) -> str:
    """The commit SHA that revision (branch, tag or commit) of a Hub model points at."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id = "/".join(model_id.split("/", 2)[:2])
    # The token comes only from HF_TOKEN (huggingface_hub reads it); it is never a parameter, so
    # it never reaches MLflow's params, tags or artifacts.
    try:
        return HfApi().model_info(repo_id, revision=revision, timeout=settings.HUB_TIMEOUT_S).sha
    except GatedRepoError:
        raise UserError(f"'{repo_id}' is gated: accept its licence on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise UserError(f"no model '{repo_id}' on the Hugging Face Hub (or it is private: set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"model '{repo_id}' has no revision '{revision}'") from None
    except Exception as exc:  # network failures surface as several client-library types
        raise UserError(f"cannot reach the Hugging Face Hub for '{repo_id}': {exc}") from None


def _from_hub(model_id: str, revision: str) -> Source:
    from huggingface_hub import snapshot_download

    parts = model_id.split("/", 2)
    repo_id = "/".join(parts[:2])
    subfolder = parts[2] if len(parts) == 3 else ""
    sha = _hub_commit(model_id, revision)

    patterns = [f"{subfolder}/{p}" if subfolder else p for p in settings.HUB_ALLOW_PATTERNS]
    print(f"downloading {model_id} at {sha} ...", flush=True)
    try:
        # Into the Hugging Face cache, so a scheduled rerun of the same commit downloads nothing.
        snapshot = snapshot_download(
            repo_id, revision=sha, allow_patterns=patterns, etag_timeout=settings.HUB_TIMEOUT_S
        )
    except Exception as exc:
        raise UserError(f"download of '{model_id}' at {sha} failed: {exc}") from None
    path = Path(snapshot) / subfolder
    if not path.is_dir():
        raise UserError(f"'{repo_id}' has no folder '{subfolder}' at {sha}")
    return Source(path, model_id, revision, sha)
