"""log_pipeline: the transformers flavor with task llm/v1/chat, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml
from conftest import assert_failed_with, assert_step_fails_with, in_fresh_process, mlflow_run, model_uri_of
from transformers import AutoTokenizer

from phi3flow import settings
from steps import log_pipeline as log_pipeline_step

SEED_MESSAGES = [{"role": "user", "content": settings.SEED_QUESTION}]


def test_run_holds_a_transformers_chat_model_with_lineage(pipeline_run, fetch_run_id, tmp_path):
    client = mlflow.MlflowClient()
    run = client.get_run(pipeline_run.run_id)
    assert run.info.status == "FINISHED"
    fetch_tags = client.get_run(fetch_run_id).data.tags
    assert run.data.tags[settings.TAG_FETCH_RUN_ID] == fetch_run_id
    assert run.data.tags[settings.TAG_MODEL_ID] == "builtin:tiny-phi3"
    assert run.data.tags[settings.TAG_REVISION] == fetch_tags[settings.TAG_REVISION]
    assert run.data.params["max_tokens"] == "256" and run.data.params["sampling"] == "false"

    local = mlflow.artifacts.download_artifacts(model_uri_of(pipeline_run), dst_path=str(tmp_path))
    mlmodel = yaml.safe_load(open(f"{local}/MLmodel"))
    assert mlmodel["flavors"]["transformers"]["inference_task"] == "llm/v1/chat"
    assert mlmodel["metadata"]["task"] == "llm/v1/chat"
    assert mlmodel["flavors"]["transformers"]["instance_type"] == "TextGenerationPipeline"
    requirements = open(f"{local}/requirements.txt").read().split()
    assert all("==" in r for r in requirements)
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "transformers", "torch"}
    assert not any(r.startswith("torchvision") for r in requirements)
    # The seed's question is the input example, saved without MLflow's reload-and-generate check.
    assert "What is the capital of Spain?" in open(f"{local}/input_example.json").read()
    assert client.get_registered_model("phi3-pipeline-test").latest_versions


def test_default_dtype_is_the_checkpoints_own(pipeline_auto_run, tiny_dir, tmp_path):
    """dtype=auto: the bf16 tiny checkpoint is logged in bf16, no bigger on disk than the checkpoint."""
    result = pipeline_auto_run
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.params["dtype"] == "auto" and run.data.tags[settings.TAG_DTYPE] == "bfloat16"
    assert "dtype auto: the checkpoint's bfloat16" in result.stdout
    local = Path(mlflow.artifacts.download_artifacts(model_uri_of(result), dst_path=str(tmp_path)))
    logged = sum(f.stat().st_size for f in local.rglob("*.safetensors"))
    checkpoint = sum(f.stat().st_size for f in Path(tiny_dir).glob("*.safetensors"))
    assert 0 < logged <= 1.05 * checkpoint


def test_reloaded_model_answers_in_openai_chat_format(pipeline_run, tiny_dir, tracking_uri):
    # A fresh process, through the registry, as a user would load it.
    answers = in_fresh_process(
        f"""
import json, mlflow
model = mlflow.pyfunc.load_model("models:/phi3-pipeline-test/1")
request = {{"messages": {SEED_MESSAGES!r}, "max_tokens": 16}}
print(json.dumps([model.predict(request), model.predict(request)]))
""",
        tracking_uri,
    )
    first, second = answers
    assert isinstance(first, list) and len(first) == 1
    answer = first[0]
    assert set(answer) >= {"id", "object", "created", "model", "choices", "usage"}
    assert answer["object"] == "chat.completion"
    assert isinstance(answer["created"], int)
    assert answer["model"] == "builtin:tiny-phi3"
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in {"stop", "length"}
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompt = tok.apply_chat_template(SEED_MESSAGES, tokenize=False, add_generation_prompt=True)
    usage = answer["usage"]
    assert usage["prompt_tokens"] == len(tok.encode(prompt, add_special_tokens=False))
    assert 1 <= usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # Greedy by default: the same request gives the same answer.
    assert second[0]["choices"][0]["message"]["content"] == choice["message"]["content"]


def test_bad_input_fails_with_one_line(fetch_run_id, tracking_uri):
    result = mlflow_run("log_pipeline", {"fetch_run_id": fetch_run_id, "dtype": "int3"}, tracking_uri, timeout=300)
    assert_failed_with(result, "dtype must be one of auto, float32, bfloat16, float16, not 'int3'")


@pytest.mark.parametrize("case", ["unknown-run", "run-without-model"])
def test_each_bad_run_id_has_its_message(case):
    if case == "run-without-model":
        with mlflow.start_run() as other:
            mlflow.log_param("unrelated", 1)
        run_id = other.info.run_id
    else:
        run_id = "0123456789abcdef"
    expected = {
        "unknown-run": "no run with ID '0123456789abcdef'",
        "run-without-model": "is it a fetch_model run?",
    }[case]
    assert_step_fails_with(log_pipeline_step.main, ["--fetch-run-id", run_id], expected)


def test_checksum_mismatch_fails_the_step(fetch_run_id, tracking_uri, tmp_path):
    """A fetch run whose stored files no longer match its manifest fails the step that downloads them.

    The step starts with an empty cache: an entry already holding the manifest's files (verified)
    would be used instead, and those are the right files.
    """
    import shutil

    from phi3flow.artifacts import download_fetched_model

    entry = download_fetched_model(fetch_run_id, tmp_path / "cache").path
    src = shutil.copytree(entry, tmp_path / "files", copy_function=shutil.copyfile)  # a writable copy
    manifest = mlflow.artifacts.load_dict(f"runs:/{fetch_run_id}/manifest.json")
    with (src / "model.safetensors").open("r+b") as fh:  # flip one byte of the weights
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with mlflow.start_run() as tampered:
        mlflow.log_artifacts(str(src), "model")
        mlflow.log_dict(manifest, "manifest.json")
    cold_cache = tmp_path / "cold-cache"
    result = mlflow_run("log_pipeline", {"fetch_run_id": tampered.info.run_id}, tracking_uri, timeout=300,
                        PHI3FLOW_CACHE_DIR=str(cold_cache))
    assert_failed_with(result, "checksum mismatch=['model.safetensors']")
    assert not [p for p in (cold_cache / "fetched").iterdir() if p.is_dir()]  # the bad download never became an entry
