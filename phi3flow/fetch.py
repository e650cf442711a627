"""Resolve a model source (Hub id, local folder or the embedded tiny model) to a folder of files."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from phi3flow import settings, tiny
from phi3flow.errors import UserError

ONNX_ARCHITECTURE_PREFIX = "onnxruntime-genai:"  # architecture_of a prebuilt onnxruntime-genai folder
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
    return {path.relative_to(folder).as_posix(): {"sha256": sha256_of(path), "bytes": path.stat().st_size}
            for path in sorted(p for p in folder.rglob("*") if p.is_file())}


def sha256_of(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def content_hash(manifest: dict) -> str:
    """A stable identity for files that have no Hub commit: the hash of their manifest."""
    return "sha256:" + hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def is_prebuilt_onnx(architecture: str) -> bool:
    """Whether an architecture of architecture_of is an onnxruntime-genai folder (no transformers checkpoint)."""
    return architecture.startswith(ONNX_ARCHITECTURE_PREFIX)


def architecture_of(folder: Path) -> str:
    """The Phi-3 architecture of the model in folder, or a UserError for anything else."""
    genai = folder / "genai_config.json"
    if genai.is_file():
        model_type = read_json(genai).get("model", {}).get("type")
        if model_type in settings.PHI3_GENAI_TYPES:
            return f"{ONNX_ARCHITECTURE_PREFIX}{model_type}"
        raise UserError(f"{folder.name}: onnxruntime-genai model type '{model_type}' is not Phi-3")
    config = folder / "config.json"
    if not config.is_file():
        raise UserError(f"no config.json or genai_config.json in the model folder {folder}")
    data = read_json(config)
    architectures = data.get("architectures") or []
    matches = settings.PHI3_ARCHITECTURES.intersection(architectures)
    if data.get("model_type") != "phi3" or not matches:
        raise UserError(
            f"not a Phi-3 causal LM: model_type={data.get('model_type')!r}, architectures={architectures}"
        )
    return sorted(matches)[0]


def read_json(path: Path) -> dict:
    """A JSON object file of the model, or a UserError naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path.name}: not readable as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path.name}: expected a JSON object, got {type(data).__name__}")
    return data


# ---- checks of what was fetched: each failure names the file, before anything is logged ----------

def check_model_files(folder: Path) -> None:
    """Fail with one line unless the later steps can read folder: config, tokenizer, weights.

    Reads only JSON files, tokenizer files and safetensors headers, never the weights: seconds for
    any size of model.
    """
    genai = folder / "genai_config.json"
    if genai.is_file():
        decoder_file = read_json(genai).get("model", {}).get("decoder", {}).get("filename", "model.onnx")
        if not (folder / decoder_file).is_file():
            raise UserError(f"{decoder_file}: missing (genai_config.json names it as the decoder)")
        check_tokenizer(folder, genai_folder=folder)
        return
    config = read_json(folder / "config.json")
    _load_with_transformers(folder, "config.json", "AutoConfig")
    with tempfile.TemporaryDirectory() as tmp:
        check_tokenizer(folder, genai_folder=_genai_tokenizer_folder(folder, config, Path(tmp)))
    check_safetensors(folder, config)


def check_tokenizer(folder: Path, genai_folder: Path) -> None:
    """The tokenizer files exist and both runtimes load them (transformers, onnxruntime-genai)."""
    if not any((folder / name).is_file() for name in settings.TOKENIZER_FILES):
        raise UserError(f"{' or '.join(settings.TOKENIZER_FILES)}: missing, the model folder has no tokenizer")
    _load_with_transformers(folder, "tokenizer files", "AutoTokenizer")
    import onnxruntime_genai as og

    try:
        og.Tokenizer(str(genai_folder))
    except Exception as exc:  # og raises RuntimeError naming the file it could not read
        raise UserError(f"tokenizer files: not loadable by onnxruntime-genai: {first_line(exc)}") from None


def _load_with_transformers(folder: Path, what: str, loader: str) -> None:
    import transformers

    try:
        getattr(transformers, loader).from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for a broken file
        raise UserError(f"{what}: not loadable by transformers: {first_line(exc)}") from None


def _genai_tokenizer_folder(folder: Path, config: dict, workdir: Path) -> Path:
    """A folder where onnxruntime-genai can load folder's tokenizer.

    og loads a tokenizer only through a genai_config.json, which a checkpoint folder does not
    have (the model builder writes one): link the tokenizer files next to the least config og
    accepts for that.
    """
    for path in folder.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "added_tokens")) or path.suffix == ".jinja":
            (workdir / path.name).symlink_to(path.resolve())
    minimal = {"model": {"type": config.get("model_type", "phi3"),
                         "context_length": int(config.get("max_position_embeddings") or 4096)}}
    (workdir / "genai_config.json").write_text(json.dumps(minimal))
    return workdir


def first_line(exc: BaseException) -> str:
    """An exception as one line: libraries' messages often run over many."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_safetensors(folder: Path, config: dict) -> None:
    """Every safetensors header complete, the index's tensors where it says, shapes as the config says."""
    from safetensors import SafetensorError, safe_open

    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise UserError("*.safetensors: missing, the model folder has no weights in safetensors format")
    shapes: dict[str, tuple[str, list[int]]] = {}  # tensor -> (file, shape)
    for name in files:
        try:  # reads the header and checks that its offsets cover the file exactly
            with safe_open(str(folder / name), framework="numpy") as weights:
                for tensor in weights.keys():
                    shapes[tensor] = (name, list(weights.get_slice(tensor).get_shape()))
        except SafetensorError as exc:
            raise UserError(f"{name}: incomplete or corrupt safetensors file ({exc}): fetch it again") from None
    index_file = folder / settings.SAFETENSORS_INDEX
    if index_file.is_file():
        weight_map = read_json(index_file).get("weight_map") or {}
        if not weight_map:
            raise UserError(f"{index_file.name}: no weight_map")
        for tensor, file in sorted(weight_map.items()):
            if tensor not in shapes or shapes[tensor][0] != file:
                found = f"it is in {shapes[tensor][0]}" if tensor in shapes else "no file holds it"
                raise UserError(f"{index_file.name}: places {tensor} in {file}, but {found}")
        if unindexed := sorted(set(shapes) - set(weight_map)):
            raise UserError(f"{shapes[unindexed[0]][0]}: holds {unindexed[0]}, which {index_file.name} does not list")
    elif len(files) > 1:
        raise UserError(f"{index_file.name}: missing, and the weights are split over {len(files)} files")
    _check_shapes_against_config(shapes, config)


def _check_shapes_against_config(shapes: dict[str, tuple[str, list[int]]], config: dict) -> None:
    vocab, hidden, layers = config.get("vocab_size"), config.get("hidden_size"), config.get("num_hidden_layers")
    expected = {"model.embed_tokens.weight": [vocab, hidden]}
    if not config.get("tie_word_embeddings"):
        expected["lm_head.weight"] = [vocab, hidden]
    for tensor, shape in expected.items():
        if tensor not in shapes:
            raise UserError(f"*.safetensors: no file holds {tensor}")
        file, found = shapes[tensor]
        if found != shape:
            raise UserError(f"{file}: {tensor} has shape {found}, config.json says {shape} (vocab_size, hidden_size)")
    found_layers = {int(m.group(1)) for t in shapes if (m := re.match(r"model\.layers\.(\d+)\.", t))}
    if found_layers != set(range(layers or 0)):
        raise UserError(f"*.safetensors: the weights hold {len(found_layers)} layers, config.json says "
                        f"num_hidden_layers={layers}")


def resolve(model_id: str, revision: str, workdir: Path) -> Source:
    """Make the model's files available locally; workdir holds anything that must be built."""
    return _local_source(model_id, revision, workdir) or _from_hub(model_id, revision)


def resolve_revision(model_id: str, revision: str, workdir: Path) -> str:
    """What `resolve` would record as the resolved revision, without downloading Hub files.

    A Hub commit SHA costs one metadata request; local and builtin sources are hashed (a builtin model
    not in the local cache yet is built into workdir, a few seconds).
    """
    local = _local_source(model_id, revision, workdir)
    return local.resolved_revision if local else _hub_commit(model_id, revision)


def _local_source(model_id: str, revision: str, workdir: Path) -> Source | None:
    """The builtin model or an existing local folder; None for a valid Hub id; UserError otherwise."""
    if model_id.startswith("builtin:"):
        name = model_id.removeprefix("builtin:")
        if name not in tiny.FAMILY:
            raise UserError(f"unknown builtin model '{model_id}'; the builtins are {', '.join(settings.BUILTINS)}")
        path, built_hash = builtin_folder(name, workdir)
        return Source(path, model_id, revision, built_hash)

    local = Path(os.path.expanduser(model_id))
    if local.is_dir():
        return Source(local.resolve(), model_id, revision, content_hash(manifest_of(local)))
    if model_id.startswith(("/", ".", "~")):
        raise UserError(f"local model folder '{model_id}' does not exist")
    if not _HUB_ID.match(model_id):
        raise UserError(f"model_id '{model_id}' is neither an existing local folder, a Hub id (owner/name) nor "
                        f"'{settings.BUILTIN_TINY}'")
    return None


def builtin_folder(name: str, workdir: Path) -> tuple[Path, str]:
    """The builtin member `name` and its content hash: the local cache's copy when one built by the same
    recipe is there and intact, else a fresh build into workdir, then copied into the cache.

    Building imports torch and transformers' Phi-3 modeling, seconds at the start of every fetch_model and
    of every main (it hashes the build to key fetch_model), for files that depend only on tiny.py and the
    libraries that write them: those are the entry's key. The entry's content hash is checked on every
    use, so a damaged one is built again, never logged. Best effort: a cache that cannot be written only
    means the next run builds again.
    """
    entry = settings.cache_dir() / "builtin" / _builtin_recipe(name)
    recorded = entry.with_name(entry.name + ".sha256")
    if entry.is_dir() and recorded.is_file():
        found = content_hash(manifest_of(entry))
        if recorded.read_text().strip() == found:
            return entry, found
    path = tiny.build(workdir / name, name)
    built = content_hash(manifest_of(path))
    staging = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
        shutil.copytree(path, staging, dirs_exist_ok=True)
        if entry.exists():  # damaged: its files no longer match the hash recorded beside it
            recorded.unlink(missing_ok=True)
            shutil.rmtree(entry)
        staging.rename(entry)  # whole or absent, for a process reading the cache meanwhile
        staging = None
        recorded.write_text(built + "\n")
    except OSError:  # another process stored it first, or the cache is not writable
        pass
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return path, built


def _builtin_recipe(name: str) -> str:
    """The cache entry's name: the member, and a hash of what its bytes depend on (tiny.py, and the versions
    of the libraries that write them)."""
    from importlib.metadata import version

    recipe = hashlib.sha256(Path(tiny.__file__).read_bytes())
    recipe.update(" ".join(f"{lib}=={version(lib)}" for lib in ("torch", "transformers", "tokenizers",
                                                               "safetensors")).encode())
    return f"{name}-{recipe.hexdigest()[:16]}"


def _hub_commit(model_id: str, revision: str) -> str:
    """The commit SHA that revision (branch, tag or commit) of a Hub model points at."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id = "/".join(model_id.split("/", 2)[:2])
    # The token comes only from HF_TOKEN (huggingface_hub reads it); it is never a parameter, so
    # it never reaches MLflow's params, tags or artifacts.
    try:
        # no timeout unless given one; the downloads below take the same one by default
        return HfApi().model_info(repo_id, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
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
        snapshot = snapshot_download(repo_id, revision=sha, allow_patterns=patterns)
    except Exception as exc:
        raise UserError(f"download of '{model_id}' at {sha} failed: {exc}") from None
    path = Path(snapshot) / subfolder
    if not path.is_dir():
        raise UserError(f"'{repo_id}' has no folder '{subfolder}' at {sha}")
    return Source(path, model_id, revision, sha)
