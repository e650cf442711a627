"""fetch_model through `mlflow run`, on the embedded tiny model and on bad input."""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import assert_failed_with, assert_ok, invoke_step, mlflow_run
from phi3flow import fetch, settings
from phi3flow.artifacts import download_fetched_model
from phi3flow.errors import UserError
from steps import fetch_model as fetch_model_step


def test_fetch_builtin_logs_files_manifest_params_and_tags(fetch_run_id, tmp_path):
    run = mlflow.MlflowClient().get_run(fetch_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model_id": "builtin:tiny-phi3", "revision": "main"}
    tags = run.data.tags
    assert tags[settings.TAG_MODEL_ID] == "builtin:tiny-phi3"
    assert tags[settings.TAG_REVISION].startswith("sha256:")
    assert tags[settings.TAG_ARCHITECTURE] == "Phi3ForCausalLM"

    fetched = download_fetched_model(fetch_run_id, tmp_path)  # verifies every checksum
    manifest = mlflow.artifacts.load_dict(f"runs:/{fetch_run_id}/manifest.json")
    assert set(manifest) == {
        "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    }
    assert int(tags[settings.TAG_TOTAL_BYTES]) == sum(e["bytes"] for e in manifest.values())
    assert fetched.path.is_relative_to(tmp_path)
    assert fetched.lineage_tags == {
        settings.TAG_FETCH_RUN_ID: fetch_run_id,
        settings.TAG_MODEL_ID: "builtin:tiny-phi3",
        settings.TAG_REVISION: tags[settings.TAG_REVISION],
    }


def test_downloaded_tiny_model_is_phi3_and_generates(fetch_run_id, tmp_path):
    path = download_fetched_model(fetch_run_id, tmp_path).path
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert type(model).__name__ == "Phi3ForCausalLM"
    assert cfg.max_position_embeddings == cfg.original_max_position_embeddings
    assert cfg.sliding_window is None
    assert set(cfg.eos_token_id) == {tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|end|>")}
    for special in ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]:
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    prompt = tok.apply_chat_template([{"role": "user", "content": settings.SEED_QUESTION}], tokenize=False, add_generation_prompt=True)
    assert prompt == f"<|user|>\n{settings.SEED_QUESTION}<|end|>\n<|assistant|>\n"
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    assert torch.equal(out[0, : ids.shape[1]], ids[0])


def test_builtin_fetch_is_byte_identical_across_runs(fetch_run_id, tracking_uri):
    second = assert_ok(mlflow_run("fetch_model", {"model_id": "builtin:tiny-phi3"}, tracking_uri))
    assert second != fetch_run_id
    first_manifest = mlflow.artifacts.load_dict(f"runs:/{fetch_run_id}/manifest.json")
    second_manifest = mlflow.artifacts.load_dict(f"runs:/{second}/manifest.json")
    assert first_manifest == second_manifest
    client = mlflow.MlflowClient()
    assert client.get_run(second).data.tags[settings.TAG_REVISION] == client.get_run(fetch_run_id).data.tags[settings.TAG_REVISION]


def test_fetch_local_folder(tiny_dir, tracking_uri, tmp_path):
    run_id = assert_ok(mlflow_run("fetch_model", {"model_id": str(tiny_dir)}, tracking_uri))
    fetched = download_fetched_model(run_id, tmp_path)
    assert (fetched.path / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()


class _FakeHub(BaseHTTPRequestHandler):
    """A Hub on loopback that answers 404 for a missing repo and never answers for a 'slow' one."""

    def do_GET(self):  # noqa: N802 (http.server's naming)
        if "slow" in self.path:
            time.sleep(120)
            return
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(json.dumps({"error": "Repository not found"}).encode())

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _non_phi3_folder(tmp_path):
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return str(folder)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("unknown-hub-id", "no model 'someone/missing-model' on the Hugging Face Hub"),
        ("unreachable-hub", "cannot reach the Hugging Face Hub"),
        ("hub-never-answers", "cannot reach the Hugging Face Hub"),
        ("missing-folder", "local model folder '/nonexistent/phi3' does not exist"),
        ("not-phi3", "not a Phi-3 causal LM: model_type='llama'"),
        ("unknown-builtin", "unknown builtin model 'builtin:tiny-llama'"),
        ("not-an-id", "is neither an existing local folder, a Hub id"),
    ],
)
def test_bad_input_fails_fast_with_one_line(case, message, tracking_uri, fake_hub, tmp_path):
    env = {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    model_id = {
        "unknown-hub-id": "someone/missing-model",
        "unreachable-hub": "someone/any-model",
        "hub-never-answers": "someone/slow-model",
        "missing-folder": "/nonexistent/phi3",
        "not-phi3": _non_phi3_folder(tmp_path),
        "unknown-builtin": "builtin:tiny-llama",
        "not-an-id": "just-a-name",
    }[case]
    # A closed loopback port stands for a Hub with no network path to it.
    env["HF_ENDPOINT"] = "http://127.0.0.1:9" if case == "unreachable-hub" else fake_hub
    result = mlflow_run("fetch_model", {"model_id": model_id}, tracking_uri, timeout=120, **env)
    assert result.seconds < 30
    assert_failed_with(result, message)


def test_download_rejects_bad_run_ids_and_tampered_files(fetch_run_id, tracking_uri, tmp_path):
    with pytest.raises(UserError, match="no run with ID 'f00'"):
        download_fetched_model("f00", tmp_path / "a")
    with mlflow.start_run() as other:
        mlflow.log_param("x", 1)
    with pytest.raises(UserError, match="is it a fetch_model run"):
        download_fetched_model(other.info.run_id, tmp_path / "b")
    # A run whose files no longer match its manifest: same manifest, one byte changed.
    src = download_fetched_model(fetch_run_id, tmp_path / "c").path
    (src / "config.json").write_text((src / "config.json").read_text() + " ")
    manifest = mlflow.artifacts.load_dict(f"runs:/{fetch_run_id}/manifest.json")
    with mlflow.start_run() as tampered:
        mlflow.log_artifacts(str(src), "model")
        mlflow.log_dict(manifest, "manifest.json")
    with pytest.raises(UserError, match=r"checksum mismatch=\['config.json'\]"):
        download_fetched_model(tampered.info.run_id, tmp_path / "d")


# ---- what fetch_model checks before it logs: broken checkpoints ---------------------------------

def shard_weights(src: Path, dst: Path, shards: int = 2) -> Path:
    """A copy of the checkpoint in src with its weights split over shards files and an index, as the Hub has them."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i::shards]}
        save_file(part, dst / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / settings.SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return dst


def _broken(case: str, tiny_dir: Path, folder: Path) -> Path:
    """tiny_dir with one thing broken, as a user might have it on disk."""
    if case.startswith("index-"):
        shard_weights(tiny_dir, folder)
    else:
        shutil.copytree(tiny_dir, folder)
    if case == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
    elif case == "corrupt-tokenizer":
        (folder / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    elif case == "config-not-json":
        (folder / "config.json").write_text("{'model_type': 'phi3'}")
    elif case == "truncated-weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted copy
    elif case == "vocab-mismatch":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 64}))
    elif case == "index-wrong-file":
        index = json.loads((folder / settings.SAFETENSORS_INDEX).read_text())
        index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors" if index["weight_map"]["lm_head.weight"].startswith("model-00002") else "model-00002-of-00002.safetensors"
        (folder / settings.SAFETENSORS_INDEX).write_text(json.dumps(index))
    elif case == "index-missing-shard":
        (folder / "model-00002-of-00002.safetensors").unlink()
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-tokenizer", "tokenizer.json or tokenizer.model: missing"),
        ("corrupt-tokenizer", "tokenizer files: transformers cannot load them"),
        ("config-not-json", "config.json: not readable as JSON"),
        ("truncated-weights", "model.safetensors: incomplete or corrupt safetensors file"),
        ("vocab-mismatch", "model.safetensors: model.embed_tokens.weight has shape [770, 64], config.json says [834, 64]"),
        ("index-wrong-file", "model.safetensors.index.json: places lm_head.weight in model-0000"),
        ("index-missing-shard", "model.safetensors.index.json: places"),
    ],
)
def test_broken_checkpoint_fails_naming_the_file(case, message, tiny_dir, tracking_uri, tmp_path):
    folder = _broken(case, tiny_dir, tmp_path / case)
    error, run = invoke_step(fetch_model_step.main, ["--model-id", str(folder)])
    assert isinstance(error, UserError), error
    assert message in str(error)
    assert "\n" not in str(error)
    assert run.info.status == "FAILED"
    assert not mlflow.MlflowClient().list_artifacts(run.info.run_id)  # nothing logged


def test_sharded_checkpoint_passes_the_checks(tiny_dir, tmp_path):
    fetch.check_model_files(shard_weights(tiny_dir, tmp_path / "sharded"))


def test_truncated_weights_fail_the_fetch_run_within_seconds(tiny_dir, tracking_uri, tmp_path):
    folder = _broken("truncated-weights", tiny_dir, tmp_path / "truncated")
    result = mlflow_run("fetch_model", {"model_id": str(folder)}, tracking_uri, timeout=300)
    assert_failed_with(result, "model.safetensors: incomplete or corrupt safetensors file")
    assert result.seconds < 60  # headers only: the weights are never loaded
