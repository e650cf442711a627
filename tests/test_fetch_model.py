"""fetch_model through `mlflow run`, on the embedded tiny model and on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import REPO, assert_failed_with, assert_ok, assert_step_fails_with, invoke_step, mlflow_run, run_seconds
from servers import FakeHub, HubRepo
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config, Phi3ForCausalLM

from phi3flow import fetch, settings
from phi3flow.artifacts import download_fetched_model
from phi3flow.errors import UserError
from phi3flow.onnx_convert import convert
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
    assert (cfg.sliding_window, cfg.max_position_embeddings) == (2047, 4096)  # as Phi-3-mini-4k-instruct
    assert set(cfg.eos_token_id) == {tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|end|>")}
    for special in ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]:
        assert len(tok.encode(special, add_special_tokens=False)) == 1, special
    prompt = tok.apply_chat_template([{"role": "user", "content": settings.SEED_QUESTION}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == f"<|user|>\n{settings.SEED_QUESTION}<|end|>\n<|assistant|>\n"
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    assert torch.equal(out[0, : ids.shape[1]], ids[0])


def test_builtin_fetch_is_byte_identical_across_runs(fetch_run_id, tracking_uri, tmp_path):
    # an empty cache: the second run builds the model again rather than reading the first one's copy
    second = assert_ok(mlflow_run("fetch_model", {"model_id": "builtin:tiny-phi3"}, tracking_uri,
                                  PHI3FLOW_CACHE_DIR=str(tmp_path / "empty-cache")))
    assert second != fetch_run_id
    first_manifest = mlflow.artifacts.load_dict(f"runs:/{fetch_run_id}/manifest.json")
    second_manifest = mlflow.artifacts.load_dict(f"runs:/{second}/manifest.json")
    assert first_manifest == second_manifest
    client = mlflow.MlflowClient()
    assert (client.get_run(second).data.tags[settings.TAG_REVISION]
            == client.get_run(fetch_run_id).data.tags[settings.TAG_REVISION])


def test_fetch_local_folder(tiny_dir, tracking_uri, tmp_path):
    run_id = assert_ok(mlflow_run("fetch_model", {"model_id": str(tiny_dir)}, tracking_uri))
    fetched = download_fetched_model(run_id, tmp_path)
    assert (fetched.path / "model.safetensors").read_bytes() == (tiny_dir / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def fake_hub(tiny_dir, tmp_path_factory):
    """A loopback Hub (tests/servers.py) serving repos laid out like the real ones, and a gated one."""
    with FakeHub(hub_repos(tiny_dir, tmp_path_factory.mktemp("hub"))) as hub:
        yield hub


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
        ("gated-repo", "'someone/gated-model' is gated: accept its licence on the Hub and set HF_TOKEN"),
    ],
)
def test_bad_hub_input_fails_fast_with_one_line(case, message, tracking_uri, fake_hub):
    """Real `mlflow run`s: huggingface_hub reads HF_ENDPOINT when it is imported, so each case needs a
    process of its own pointed at the loopback Hub."""
    env = {"HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    model_id = {
        "unknown-hub-id": "someone/missing-model",
        "unreachable-hub": "someone/any-model",
        "hub-never-answers": "someone/slow-model",
        "gated-repo": "someone/gated-model",
    }[case]
    # A closed loopback port stands for a Hub with no network path to it.
    env["HF_ENDPOINT"] = "http://127.0.0.1:9" if case == "unreachable-hub" else fake_hub.url
    if case == "hub-never-answers":
        env["HF_HUB_ETAG_TIMEOUT"] = "3"  # the step's wait for an answer (10 s by default)
    result = mlflow_run("fetch_model", {"model_id": model_id}, tracking_uri, timeout=120, **env)
    assert_failed_with(result, message)
    # The step's run, its imports included (10-30 s on 2 busy cores): what the bound catches is a fetch left
    # retrying, which takes minutes (huggingface_hub's own retries and timeouts).
    assert run_seconds(result.run_id) < 60


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-folder", "local model folder '/nonexistent/phi3' does not exist"),
        ("not-phi3", "not a Phi-3 causal LM: model_type='llama'"),
        ("unknown-builtin", "unknown builtin model 'builtin:tiny-llama'"),
        ("not-an-id", "is neither an existing local folder, a Hub id"),
    ],
)
def test_each_bad_model_id_has_its_message(case, message, tracking_uri, tmp_path):
    model_id = {
        "missing-folder": "/nonexistent/phi3",
        "not-phi3": _non_phi3_folder(tmp_path),
        "unknown-builtin": "builtin:tiny-llama",
        "not-an-id": "just-a-name",
    }[case]
    assert_step_fails_with(fetch_model_step.main, ["--model-id", model_id], message)


def test_download_rejects_bad_run_ids_and_tampered_files(fetch_run_id, tracking_uri, tmp_path):
    with pytest.raises(UserError, match="no run with ID 'f00'"):
        download_fetched_model("f00", tmp_path / "a")
    with mlflow.start_run() as other:
        mlflow.log_param("x", 1)
    with pytest.raises(UserError, match="is it a fetch_model run"):
        download_fetched_model(other.info.run_id, tmp_path / "b")
    # A run whose files no longer match its manifest: same manifest, one byte changed. Downloaded
    # into an empty cache (d): an entry of the same manifest would hold the right files.
    src = shutil.copytree(download_fetched_model(fetch_run_id, tmp_path / "c").path, tmp_path / "files",
                          copy_function=shutil.copyfile)
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
    size = -(-len(names) // shards)
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[i * size : (i + 1) * size]}  # consecutive tensors, as on the Hub
        save_file(part, dst / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dst / settings.SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                              "weight_map": weight_map}, indent=2))
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
        index["weight_map"]["lm_head.weight"] = ("model-00001-of-00002.safetensors"
                                                 if index["weight_map"]["lm_head.weight"].startswith("model-00002")
                                                 else "model-00002-of-00002.safetensors")
        (folder / settings.SAFETENSORS_INDEX).write_text(json.dumps(index))
    elif case == "index-missing-shard":
        (folder / "model-00002-of-00002.safetensors").unlink()
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-tokenizer", "tokenizer.json or tokenizer.model: missing"),
        ("corrupt-tokenizer", "tokenizer files: not loadable by transformers"),
        ("config-not-json", "config.json: not readable as JSON"),
        ("truncated-weights", "model.safetensors: incomplete or corrupt safetensors file"),
        ("vocab-mismatch",
         "model.safetensors: model.embed_tokens.weight has shape [770, 64], config.json says [834, 64]"),
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
    assert run_seconds(result.run_id) < 60  # headers only: the weights are never loaded



# ---- the Hub download path, against a loopback Hub (HF_ENDPOINT) ---------------------------------

PHI3_MINI = "microsoft/Phi-3-mini-4k-instruct"
PHI4_MINI = "microsoft/Phi-4-mini-instruct"
PHI3_ONNX = "microsoft/Phi-3-mini-4k-instruct-onnx"
ONNX_VARIANT = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"
# What each real repo holds besides the model files, which fetch_model must not download: remote
# code, docs, and duplicate weights in other formats.
NOT_NEEDED = {
    "configuration_phi3.py": b"# remote code", "modeling_phi3.py": b"# remote code", "sample_finetune.py": b"#",
    "README.md": b"# model card", "SECURITY.md": b"#", "CODE_OF_CONDUCT.md": b"#", "NOTICE.md": b"#",
    ".gitattributes": b"*",
    "pytorch_model.bin": os.urandom(4096), "Phi-3-mini-4k-instruct-q4.gguf": os.urandom(4096),
}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _with_real_vocab(tiny_dir: Path, folder: Path) -> Path:
    """The tiny model with Phi-3-mini's padded vocab_size (32064 rows, more than the tokenizer has, as
    in the real config): its embedding shard outgrows huggingface_hub's 10 MB read chunk, so a
    dropped connection leaves something to resume from."""
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    torch.manual_seed(0)
    Phi3ForCausalLM(Phi3Config(**{**config, "vocab_size": 32064})).save_pretrained(folder)
    return folder


def hub_repos(tiny_dir: Path, work: Path) -> dict[str, HubRepo]:
    """The tiny model in the layouts of the real repos (file names as on the Hub)."""
    sharded = _files(shard_weights(_with_real_vocab(tiny_dir, work / "vocab32064"), work / "sharded"))
    tokenizer = json.loads((tiny_dir / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    phi3 = {**sharded, **NOT_NEEDED, "LICENSE": b"MIT", "added_tokens.json": json.dumps(added).encode()}
    tagged = {**phi3, "generation_config.json": json.dumps({"max_length": 1024}).encode()}  # an older release
    phi4 = {**phi3, "vocab.json": json.dumps(tokenizer["model"]["vocab"]).encode(),
            "merges.txt": ("#version: 0.2\n" + "\n".join(merges) + "\n").encode()}
    onnx = _files(convert(tiny_dir, work / "onnx-int4", "int4"))
    variants = {f"{folder}/{name}": data for folder in (ONNX_VARIANT, "cuda/cuda-fp16") for name, data in onnx.items()}
    return {
        PHI3_MINI: HubRepo({"main": phi3, "v1.0": tagged}),
        PHI4_MINI: HubRepo({"main": phi4}),
        PHI3_ONNX: HubRepo({"main": {**variants, "README.md": b"# onnx", "LICENSE": b"MIT"}}),
        "someone/gated-model": HubRepo({"main": phi3}, gated=True),
    }


class HubFetcher:
    """fetch.resolve and fetch_model's checks, in one fresh process that takes requests in turn.

    A process of its own because huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE
    when it is imported; one process for all requests because importing the stack is the slow part.
    """

    CODE = """
import json, sys
from pathlib import Path
from phi3flow import fetch
for line in sys.stdin:
    model_id, revision = json.loads(line)
    source = fetch.resolve(model_id, revision, Path("."))
    fetch.check_model_files(source.path)
    result = {"path": str(source.path), "sha": source.resolved_revision, "files": fetch.manifest_of(source.path)}
    print("RESULT " + json.dumps(result), flush=True)
"""

    def __init__(self, hub: FakeHub, hf_home: Path):
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        self.log = hf_home / "fetcher.log"
        self.proc = subprocess.Popen([sys.executable, "-c", self.CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log.open("w"), text=True, cwd=REPO, env=env)

    def fetch(self, model_id: str, revision: str = "main") -> dict:
        self.proc.stdin.write(json.dumps([model_id, revision]) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line.removeprefix("RESULT "))
        raise AssertionError(f"the fetch of {model_id}@{revision} failed:\n{self.log.read_text()[-3000:]}")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def hub_fetcher(fake_hub, tmp_path_factory):
    fetcher = HubFetcher(fake_hub, tmp_path_factory.mktemp("hf-home"))
    yield fetcher
    fetcher.close()


@pytest.mark.parametrize(
    ("model_id", "expected"),
    [
        # Phi-4-mini's BPE tokenizer files come along (vocab.json, merges.txt)
        (PHI4_MINI, {"config.json", "generation_config.json", "model-00001-of-00002.safetensors",
                     "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json",
                     "added_tokens.json", "vocab.json", "merges.txt", "LICENSE"}),
        # one variant of an -onnx repo: that subfolder only (made by phi3flow's conversion, which keeps
        # the checkpoint's config.json beside the ONNX files)
        (f"{PHI3_ONNX}/{ONNX_VARIANT}", {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json",
                                         "tokenizer_config.json", "chat_template.jinja", "config.json"}),
    ],
)
def test_hub_repo_layouts_fetch_exactly_the_files_the_steps_need(model_id, expected, fake_hub, hub_fetcher):
    fake_hub.requests.clear()
    fetched = hub_fetcher.fetch(model_id)
    assert set(fetched["files"]) == expected
    repo_id = "/".join(model_id.split("/")[:2])
    assert fetched["sha"] == fake_hub.sha(repo_id, "main")
    downloaded = {path.split(f"/resolve/{fetched['sha']}/")[1] for path in fake_hub.downloads()}
    prefix = model_id[len(repo_id) + 1 :]
    assert downloaded == {f"{prefix}/{name}" if prefix else name for name in expected}  # nothing else crossed the wire


def test_hub_revision_resolves_to_its_commit_reruns_hit_the_cache_and_a_dropped_download_resumes(fake_hub, hub_fetcher):
    shard = "model-00001-of-00002.safetensors"
    content = fake_hub.repos[PHI3_MINI].revisions["main"][shard]
    main_sha = fake_hub.sha(PHI3_MINI, "main")
    fake_hub.requests.clear()
    fake_hub.interrupt.add(shard)  # the connection drops halfway through this file
    first = hub_fetcher.fetch(PHI3_MINI)
    assert first["sha"] == main_sha
    assert set(first["files"]) == {"config.json", "generation_config.json", shard, "model-00002-of-00002.safetensors",
                                   "model.safetensors.index.json", "special_tokens_map.json", "tokenizer.json",
                                   "tokenizer_config.json", "added_tokens.json", "LICENSE"}
    shard_gets = [rng for method, path, rng in fake_hub.requests if method == "GET" and path.endswith(shard)]
    assert len(shard_gets) == 2 and shard_gets[0] is None
    resumed_at = int(shard_gets[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= fake_hub.cut_at(content)  # resumed from what it had, not restarted
    assert (Path(first["path"]) / shard).read_bytes() == content

    fake_hub.requests.clear()
    again = hub_fetcher.fetch(PHI3_MINI)
    assert (again["sha"], again["path"], again["files"]) == (first["sha"], first["path"], first["files"])
    assert fake_hub.downloads() == []  # a rerun of the same commit downloads nothing

    fake_hub.requests.clear()
    tagged = hub_fetcher.fetch(PHI3_MINI, revision="v1.0")
    assert tagged["sha"] == fake_hub.sha(PHI3_MINI, "v1.0") != main_sha
    assert json.loads((Path(tagged["path"]) / "generation_config.json").read_text()) == {"max_length": 1024}
    # only the file that differs is downloaded: the cache shares the others' blobs
    assert fake_hub.downloads() == [f"/{PHI3_MINI}/resolve/{tagged['sha']}/generation_config.json"]
