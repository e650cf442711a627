"""The local cache of fetched model files: downloaded once per machine, verified on every use."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import REPO, assert_ok, mlflow_run, model_uri_of, step_env

from phi3flow import fetch, onnx_model, settings
from phi3flow.artifacts import download_fetched_model
from phi3flow.errors import UserError
from phi3flow.fetch import manifest_of
from phi3flow.step_process import owner
from phi3flow.threads import write_session_options


def manifest(run_id: str) -> dict:
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{settings.MANIFEST_FILE}")


def identity(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Inode, size and modification time of a folder and each file in it: a new download (new
    inodes) or a rewritten file changes them."""
    paths = [folder, *sorted(folder.rglob("*"))]
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_size, p.stat().st_mtime_ns) for p in paths}


def test_the_cache_is_keyed_by_the_sha256_of_the_runs_manifest(fetch_run_id, tmp_path, capsys):
    cache = tmp_path / "cache"
    files = manifest(fetch_run_id)
    entry = download_fetched_model(fetch_run_id, cache).path
    key = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    assert entry == cache / "fetched" / key
    # For the builtin model the resolved revision is that same content hash.
    assert mlflow.MlflowClient().get_run(fetch_run_id).data.tags[settings.TAG_REVISION] == f"sha256:{key}"
    assert manifest_of(entry) == files
    assert not any((cache / "partial").iterdir())  # nothing of the download is left beside the entry
    capsys.readouterr()

    # Another run that logged the same files (their manifest is the same): the same entry, not downloaded.
    with mlflow.start_run() as same_files:
        mlflow.log_artifacts(str(entry), settings.MODEL_ARTIFACT_DIR)
        mlflow.log_dict(files, settings.MANIFEST_FILE)
    before = identity(entry)
    assert download_fetched_model(same_files.info.run_id, cache).path == entry
    assert identity(entry) == before
    printed = capsys.readouterr().out
    assert "verified, not downloaded" in printed and "downloading" not in printed

    # Other files: another manifest, another entry.
    other = shutil.copytree(entry, tmp_path / "other", copy_function=shutil.copyfile)
    (other / "extra.json").write_text("{}")
    with mlflow.start_run() as other_files:
        mlflow.log_artifacts(str(other), settings.MODEL_ARTIFACT_DIR)
        mlflow.log_dict(manifest_of(other), settings.MANIFEST_FILE)
    other_entry = download_fetched_model(other_files.info.run_id, cache).path
    assert other_entry.parent == entry.parent and other_entry != entry
    assert (other_entry / "extra.json").is_file() and not (entry / "extra.json").exists()


def test_a_builtin_member_is_built_once_and_a_damaged_entry_is_built_again(tmp_path, monkeypatch):
    """main hashes the builtin model and fetch_model logs it: both read the cache's copy, not a new build."""
    monkeypatch.setenv(settings.CACHE_DIR_ENV, str(tmp_path / "cache"))
    built, built_hash = fetch.builtin_folder("tiny-phi3", tmp_path / "first")
    assert built == tmp_path / "first" / "tiny-phi3"
    assert built_hash == fetch.content_hash(manifest_of(built))

    cached, cached_hash = fetch.builtin_folder("tiny-phi3", tmp_path / "second")
    assert cached.parent == tmp_path / "cache" / "builtin" and cached.name.startswith("tiny-phi3-")
    assert not (tmp_path / "second").exists()  # nothing was built
    assert cached_hash == built_hash and manifest_of(cached) == manifest_of(built)
    assert sorted(p.name for p in cached.parent.iterdir()) == [cached.name, f"{cached.name}.sha256"]
    # another member: another entry
    fetch.builtin_folder("tiny-phi3.5", tmp_path / "other")
    other, _ = fetch.builtin_folder("tiny-phi3.5", tmp_path / "other-again")
    assert other.parent == cached.parent and other != cached and manifest_of(other) != manifest_of(cached)

    (cached / "config.json").write_text("{}")  # damaged: built again, and the entry repaired
    again, again_hash = fetch.builtin_folder("tiny-phi3", tmp_path / "third")
    assert again == tmp_path / "third" / "tiny-phi3" and again_hash == built_hash
    assert manifest_of(cached) == manifest_of(built)
    assert fetch.builtin_folder("tiny-phi3", tmp_path / "fourth") == (cached, built_hash)


def test_a_second_step_uses_the_cached_files_without_downloading_them(fetch_run_id, tracking_uri, tmp_path):
    cache = tmp_path / "cache"
    entry = download_fetched_model(fetch_run_id, cache).path  # the first use on this machine downloads
    before = identity(entry)
    result = mlflow_run("log_pipeline", {"fetch_run_id": fetch_run_id}, tracking_uri, timeout=600,
                        PHI3FLOW_CACHE_DIR=str(cache))
    run = mlflow.MlflowClient().get_run(assert_ok(result))
    assert f"model files of run {fetch_run_id}: in the local cache ({entry}), verified, not downloaded" in result.stdout
    assert "downloading model files" not in result.stdout
    assert identity(entry) == before  # the same files, neither replaced nor written
    assert run.data.tags[settings.TAG_FETCH_RUN_ID] == fetch_run_id


def _flip_byte(path: Path, tensor: str = "model.embed_tokens.weight") -> None:
    """Change one byte of tensor's values in a safetensors file (same size)."""
    path.chmod(0o644)
    with path.open("r+b") as fh:
        header_size = int.from_bytes(fh.read(8), "little")
        begin = json.loads(fh.read(header_size))[tensor]["data_offsets"][0]
        fh.seek(8 + header_size + begin + 1)
        byte = fh.read(1)
        fh.seek(8 + header_size + begin + 1)
        fh.write(bytes([byte[0] ^ 0xFF]))


def _tamper(entry: Path, how: str) -> None:
    if how == "byte-flipped":  # same size and time: only hashing sees it
        weights = entry / "model.safetensors"
        times = (weights.stat().st_atime_ns, weights.stat().st_mtime_ns)
        _flip_byte(weights)
        os.utime(weights, ns=times)
    elif how == "truncated":
        (entry / "model.safetensors").chmod(0o644)
        os.truncate(entry / "model.safetensors", 10)
    elif how == "missing":
        (entry / "tokenizer.json").unlink()
    else:  # an extra file, as a step writing into the entry would leave
        (entry / "genai_config.json").write_text("{}")


@pytest.mark.parametrize("how", ["byte-flipped", "truncated", "missing", "extra-file"])
def test_a_tampered_entry_is_discarded_and_downloaded_again(how, fetch_run_id, tmp_path, capsys):
    cache = tmp_path / "cache"
    entry = download_fetched_model(fetch_run_id, cache).path
    _tamper(entry, how)
    capsys.readouterr()
    assert download_fetched_model(fetch_run_id, cache).path == entry
    printed = capsys.readouterr().out
    assert f"the cached model files {entry} do not match the manifest" in printed
    assert "discarding them and downloading again" in printed
    assert manifest_of(entry) == manifest(fetch_run_id)


def test_a_step_on_a_tampered_entry_downloads_again_and_logs_the_right_model(fetch_run_id, tracking_uri, tmp_path):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    entry = download_fetched_model(fetch_run_id, cache).path
    _tamper(entry, "byte-flipped")
    result = mlflow_run("log_onnx_wrapper", {"fetch_run_id": fetch_run_id, "precision": "fp32"}, tracking_uri,
                        timeout=600, PHI3FLOW_CACHE_DIR=str(cache))
    assert_ok(result)
    assert ("do not match the manifest (missing=[] unexpected=[] checksum mismatch=['model.safetensors'])"
            in result.stdout)
    assert f"downloading model files of run {fetch_run_id}" in result.stdout
    assert manifest_of(entry) == manifest(fetch_run_id)
    # The logged ONNX model holds the fetched embedding, not the tampered one (fp32: the same values).
    import onnx
    from onnx import numpy_helper

    logged = Path(mlflow.artifacts.download_artifacts(model_uri_of(result), dst_path=str(tmp_path / "logged")))
    model_file = next(logged.rglob("model.onnx"))
    graph = onnx.load(str(model_file), load_external_data=True).graph
    weights = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    embedding = load_file(entry / "model.safetensors")["model.embed_tokens.weight"].float().numpy()
    assert any(w.shape == embedding.shape and (w == embedding).all() for w in weights.values())


def test_a_download_that_does_not_match_or_was_killed_never_becomes_an_entry(fetch_run_id, tmp_path):
    cache = tmp_path / "cache"
    src = shutil.copytree(download_fetched_model(fetch_run_id, tmp_path / "c").path, tmp_path / "files",
                          copy_function=shutil.copyfile)
    _flip_byte(src / "model.safetensors")
    with mlflow.start_run() as tampered:  # stored files that no longer match the run's manifest
        mlflow.log_artifacts(str(src), settings.MODEL_ARTIFACT_DIR)
        mlflow.log_dict(manifest(fetch_run_id), settings.MANIFEST_FILE)
    # What a killed download leaves: a partial folder of a process that is gone.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = owner().rpartition(":")[0]
    left = cache / "partial" / f"{host}-{gone.pid}" / "x"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"half")
    with pytest.raises(UserError, match=r"checksum mismatch=\['model.safetensors'\]"):
        download_fetched_model(tampered.info.run_id, cache)
    assert not [p for p in (cache / "fetched").iterdir() if p.is_dir()]
    assert not any((cache / "partial").iterdir())


def test_concurrent_steps_download_once(fetch_run_id, tracking_uri, tmp_path):
    cache = tmp_path / "cache"
    code = ("from pathlib import Path; from phi3flow.artifacts import download_fetched_model; "
            f"print('entry', download_fetched_model({fetch_run_id!r}, Path({str(cache)!r})).path)")
    env = step_env(tracking_uri, HF_HUB_OFFLINE="1")
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True,
                                  env=env, cwd=REPO) for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    printed = "".join(out for out, _ in outputs)
    assert printed.count("downloading model files") == 1, printed
    entries = {line for line in printed.splitlines() if line.startswith("entry ")}
    assert len(entries) == 1
    assert manifest_of(Path(entries.pop().removeprefix("entry "))) == manifest(fetch_run_id)


def test_a_prebuilt_onnx_folder_is_logged_from_a_working_copy_that_leaves_the_entry_alone(tiny_onnx_fp32, tmp_path):
    entry = shutil.copytree(tiny_onnx_fp32, tmp_path / "entry")
    for file in entry.rglob("*"):
        file.chmod(0o444)  # as a cache entry's files are
    before = identity(entry)
    folder, converted = onnx_model.onnx_folder(entry, tmp_path / "work", "fp32", "cpu")
    assert not converted and folder.is_relative_to(tmp_path / "work")
    write_session_options(folder, {"intra_op_num_threads": 2})  # what logging writes into the folder
    assert identity(entry) == before
    genai_config = json.loads((folder / "genai_config.json").read_text())
    assert genai_config["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2
    assert manifest_of(entry) == manifest_of(tiny_onnx_fp32)
    big = max(entry.rglob("*.onnx.data"), key=lambda p: p.stat().st_size)
    assert (folder / big.name).stat().st_ino == big.stat().st_ino  # shared, not copied
    assert (folder / "genai_config.json").stat().st_ino != (entry / "genai_config.json").stat().st_ino
