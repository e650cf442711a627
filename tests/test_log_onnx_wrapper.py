"""log_onnx_wrapper: conversion, the models-from-code pyfunc, and its behaviour on the tiny model."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import onnx
import pandas as pd
import pytest
import torch
import yaml
from conftest import (
    assert_failed_with,
    assert_step_fails_with,
    in_fresh_process,
    invoke_step,
    mlflow_run,
    model_uri_of,
)
from mlflow.exceptions import MlflowException
from transformers import Phi3Config, Phi3ForCausalLM

from phi3flow import onnx_model, settings, step_process
from phi3flow.errors import UserError
from phi3flow.eval_data import PROJECT_ROOT
from phi3flow.evaluation import forget_last_code_model
from phi3flow.onnx_convert import builder_cache, convert, convert_in_child
from steps import fetch_model as fetch_model_step
from steps import log_onnx_wrapper as log_onnx_wrapper_step

SEED = {"messages": [{"role": "user", "content": settings.SEED_QUESTION}]}


def _content(answer: list[dict]) -> str:
    return answer[0]["choices"][0]["message"]["content"]


def test_run_holds_a_code_logged_pyfunc_with_the_onnx_folder(onnx_fp32_run, fetch_run_id, tmp_path):
    run = mlflow.MlflowClient().get_run(onnx_fp32_run.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[settings.TAG_FETCH_RUN_ID] == fetch_run_id
    assert run.data.tags[settings.TAG_MODEL_ID] == "builtin:tiny-phi3"
    assert run.data.tags[settings.TAG_ONNX_SOURCE] == "converted"
    assert run.data.params["precision"] == "fp32"
    local = Path(mlflow.artifacts.download_artifacts(model_uri_of(onnx_fp32_run), dst_path=str(tmp_path)))
    pyfunc = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert pyfunc["model_code_path"] == "onnx_pyfunc.py"  # models from code
    # No path of the logging machine (its temporary folder, the project checkout) in what is logged:
    # the ONNX folder is known by its place inside the model.
    assert pyfunc["artifacts"] == {"onnx": {"path": "artifacts/onnx", "uri": "onnx"}}
    mlmodel = (local / "MLmodel").read_text()
    assert str(step_process.tmp_root()) not in mlmodel and str(PROJECT_ROOT) not in mlmodel
    assert not list(local.rglob("*.pkl"))  # no pickled instance
    onnx_files = {p.name for p in local.rglob("*") if p.is_file()}
    assert {"genai_config.json", "model.onnx", "tokenizer.json"} <= onnx_files
    assert all("==" in r for r in (local / "requirements.txt").read_text().split())
    assert (local / "input_example.json").is_file()


def test_fp32_onnx_answers_exactly_like_the_transformers_pipeline(onnx_fp32_run, pipeline_run, tracking_uri):
    # Both reloaded in a fresh process; greedy decoding, the seed's question.
    pipeline_answer, onnx_answer = in_fresh_process(
        f"""
import json, mlflow
request = {{**{SEED!r}, "max_tokens": 32}}
print(json.dumps([mlflow.pyfunc.load_model(uri).predict(request)
                  for uri in ("{model_uri_of(pipeline_run)}", "{model_uri_of(onnx_fp32_run)}")]))
""",
        tracking_uri,
    )
    assert _content(onnx_answer) == _content(pipeline_answer)
    assert onnx_answer[0]["usage"] == pipeline_answer[0]["usage"]
    assert onnx_answer[0]["choices"][0]["finish_reason"] == pipeline_answer[0]["choices"][0]["finish_reason"]
    assert onnx_answer[0]["object"] == "chat.completion"
    assert onnx_answer[0]["model"] == "builtin:tiny-phi3"


def test_int4_conversion_runs_and_answers(onnx_int4_run, tmp_path):
    result = onnx_int4_run
    assert "converting to ONNX (int4, block size 128, cpu)" in result.stdout
    params = mlflow.MlflowClient().get_run(result.run_id).data.params
    assert params["precision"] == "int4" and params["int4_block_size"] == "128"
    local = Path(mlflow.artifacts.download_artifacts(model_uri_of(result), dst_path=str(tmp_path)))
    graph = onnx.load(str(next(local.rglob("model.onnx"))), load_external_data=False).graph
    int4_matmuls = [node for node in graph.node if node.op_type == "MatMulNBits"]
    assert int4_matmuls
    assert {onnx.helper.get_node_attr_value(node, "block_size") for node in int4_matmuls} == {128}
    # the LM head computes one row of logits per sequence, not one per prompt position (onnx_convert.prune_lm_head;
    # that every row still gets its own next token: test_prompt_interface_takes_every_documented_input_form)
    logits = next(output for output in graph.output if output.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_value == 1
    answer = mlflow.pyfunc.load_model(model_uri_of(result)).predict({**SEED, "max_tokens": 8})
    assert answer[0]["object"] == "chat.completion"
    assert isinstance(_content(answer), str)
    assert 1 <= answer[0]["usage"]["completion_tokens"] <= 8


def test_prompt_interface_takes_the_seed_request(onnx_prompt_run):
    model = mlflow.pyfunc.load_model(model_uri_of(onnx_prompt_run))
    assert [spec.name for spec in model.metadata.get_input_schema().inputs] == ["prompt"]
    prompts = [settings.SEED_PROMPT, "<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"]
    single = [model.predict({"prompt": p}, params={"max_tokens": 12}) for p in prompts]
    assert all(isinstance(s, list) and len(s) == 1 and isinstance(s[0], str) for s in single)
    batch = model.predict([{"prompt": p} for p in prompts], params={"max_tokens": 12})
    assert batch == [s[0] for s in single]  # one string per row, in order


def test_stop_sequence_ends_the_answer_before_it(onnx_fp32_model):
    full = _content(onnx_fp32_model.predict({**SEED, "max_tokens": 24}))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    answer = onnx_fp32_model.predict({**SEED, "max_tokens": 24, "stop": [stop]})
    assert _content(answer) == full[: full.index(stop)]
    assert answer[0]["choices"][0]["finish_reason"] == "stop"


def test_temperature_samples_and_zero_is_greedy(onnx_fp32_model):
    greedy = {_content(onnx_fp32_model.predict({**SEED, "max_tokens": 16, "temperature": 0.0})) for _ in range(3)}
    assert len(greedy) == 1
    assert greedy == {_content(onnx_fp32_model.predict({**SEED, "max_tokens": 16}))}
    sampled = {_content(onnx_fp32_model.predict({**SEED, "max_tokens": 16, "temperature": 1.5})) for _ in range(4)}
    assert len(sampled) > 1  # random weights: sampling at 1.5 over 16 tokens never repeats 4 times


def test_stream_yields_chunks_that_add_up_to_the_answer(onnx_fp32_model):
    request = {**SEED, "max_tokens": 10}
    chunks = list(onnx_fp32_model.predict_stream(request))
    assert len(chunks) == 10
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == _content(onnx_fp32_model.predict(request))
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 9 + ["length"]


def test_eight_threads_get_the_serial_answers(onnx_fp32_model):
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]
    requests = [{"messages": [{"role": "user", "content": q}], "max_tokens": 12} for q in questions]
    serial = [_content(onnx_fp32_model.predict(r)) for r in requests]
    assert len(set(serial)) > 1  # the requests really differ
    work = requests * 3
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda r: _content(onnx_fp32_model.predict(r)), work))
    assert parallel == serial * 3


def test_requests_that_reach_an_idle_model_together_share_one_batch(onnx_fp32_model):
    """Concurrent requests arrive one after another: the first must not start a batch alone."""
    batcher = onnx_fp32_model.unwrap_python_model().batcher
    sizes: list[int] = []
    generate, windows = batcher._generate, (batcher.gather_s, batcher.burst_s)

    def recorded(rows):
        sizes.append(len(rows))
        return generate(rows)

    requests = [{"messages": [{"role": "user", "content": f"Question {i}"}], "max_tokens": 4} for i in range(8)]
    together = threading.Barrier(len(requests))

    def ask(request):
        together.wait()
        return onnx_fp32_model.predict(request)

    # Windows wide enough for the arrival gaps of 8 threads on a busy 2-core machine: the policy is
    # tested here; whether the default 10 ms suffices is the serving benchmark's question.
    batcher._generate, (batcher.gather_s, batcher.burst_s) = recorded, (2.0, 0.5)
    try:
        time.sleep(0.1)  # idle: the batcher has stopped waiting for the clients of its last batch
        with ThreadPoolExecutor(max_workers=len(requests)) as pool:
            answers = list(pool.map(ask, requests))
    finally:
        batcher._generate, (batcher.gather_s, batcher.burst_s) = generate, windows
    assert sizes == [8]
    assert all(_content(a) for a in answers)


def test_a_model_let_go_ends_its_generation_thread(onnx_fp32_run):
    """evaluate scores one model after the other: the first one's weights must not stay behind."""
    def generation_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "phi3-onnx-batcher"}

    before = generation_threads()
    model = mlflow.pyfunc.load_model(model_uri_of(onnx_fp32_run))
    assert _content(model.predict({**SEED, "max_tokens": 2}))
    [thread] = generation_threads() - before  # this model's (models loaded earlier may end meanwhile)
    del model
    forget_last_code_model()  # as evaluate does after each model
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.parametrize(
    ("request_body", "message"),
    [
        ({"messages": []}, "'messages' must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role must be one of system, user, assistant"),
        ({"messages": [{"role": "user", "content": "word " * 5000}]}, "the model's context is 4096 tokens"),
        ({**SEED, "max_tokens": 0}, "'max_tokens' must be at least 1"),
        ({**SEED, "max_tokens": 100000}, "only 4078 tokens fit in the context"),
        ({**SEED, "temperature": -0.5}, "'temperature' must be 0 (greedy) or positive"),
        ({**SEED, "top_p": 1.5}, "'top_p' must be in (0, 1]"),
        ({**SEED, "n": 2}, "only n=1 is supported"),
    ],
)
def test_bad_requests_raise_clear_errors(onnx_fp32_model, request_body, message):
    with pytest.raises(MlflowException, match=re.escape(message)) as info:
        onnx_fp32_model.predict(request_body)
    assert info.value.error_code == "INVALID_PARAMETER_VALUE"


def test_non_string_content_is_refused(onnx_fp32_model):
    with pytest.raises(MlflowException, match="content"):
        onnx_fp32_model.predict({"messages": [{"role": "user", "content": 3}]})


def test_bad_step_input_fails_with_one_line(fetch_run_id, tracking_uri):
    result = mlflow_run("log_onnx_wrapper", {"fetch_run_id": fetch_run_id, "precision": "int3"}, tracking_uri,
                        timeout=300)
    assert_failed_with(result, "precision must be one of int4, fp32, not 'int3'")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--execution-provider", "cuda"], "execution_provider must be one of cpu, not 'cuda'"),
        (["--interface", "rest"], "interface must be one of chat, prompt, not 'rest'"),
        (["--int4-block-size", "100"], "int4_block_size must be one of 16, 32, 64, 128, 256, not '100'"),
        (["--int4-block-size", "big"], "int4_block_size must be one of 16, 32, 64, 128, 256, not 'big'"),
        (["--fetch-run-id", "0123456789abcdef"], "no run with ID '0123456789abcdef'"),
    ],
)
def test_each_bad_step_input_has_its_message(options, message, fetch_run_id):
    assert_step_fails_with(log_onnx_wrapper_step.main, ["--fetch-run-id", fetch_run_id, *options], message)


# ---- prebuilt folders, a model that cannot run, the input forms MLflow documents -----------------

def _fetched(folder: Path) -> str:
    """A fetch_model run of a local folder, in-process."""
    error, run = invoke_step(fetch_model_step.main, ["--model-id", str(folder)])
    assert error is None, error
    return run.info.run_id


@pytest.mark.parametrize(("asked", "held"), [("int4", "fp32"), ("fp32", "int4")])
def test_precision_that_does_not_match_a_prebuilt_folder_is_one_line(asked, held, tiny_onnx_fp32, tiny_dir,
                                                                     tmp_path_factory, tracking_uri):
    folder = tiny_onnx_fp32 if held == "fp32" else convert(tiny_dir, tmp_path_factory.mktemp("onnx") / "int4", "int4")
    assert onnx_model.folder_precision(folder) == held
    error, run = invoke_step(log_onnx_wrapper_step.main, ["--fetch-run-id", _fetched(folder), "--precision", asked])
    assert isinstance(error, UserError)
    assert str(error) == (f"precision={asked}, but the fetched onnxruntime-genai folder holds {held} weights "
                          f"(it is logged as it is, not converted): run with precision={held}")
    assert run.info.status == "FAILED"
    assert not run.outputs.model_outputs


def test_a_model_that_converts_but_cannot_run_is_never_logged(tiny_dir, tmp_path, tracking_uri):
    # head_size 12: the builder converts it, onnxruntime-genai's attention kernel refuses it at run time
    folder = shutil.copytree(tiny_dir, tmp_path / "head12")
    config = json.loads((folder / "config.json").read_text())
    torch.manual_seed(0)
    Phi3ForCausalLM(Phi3Config(**{**config, "hidden_size": 48})).save_pretrained(folder)
    error, run = invoke_step(log_onnx_wrapper_step.main, [
        "--fetch-run-id", _fetched(folder), "--precision", "fp32", "--registered-model-name", "phi3-onnx-unrunnable"])
    assert isinstance(error, UserError)
    assert str(error).startswith("the ONNX model does not run in onnxruntime-genai, nothing was logged: ")
    assert "head_size must be a multiple of 8" in str(error)
    assert run.info.status == "FAILED"
    assert not run.outputs.model_outputs
    assert not mlflow.MlflowClient().list_artifacts(run.info.run_id)
    assert not mlflow.MlflowClient().search_registered_models("name = 'phi3-onnx-unrunnable'")


@pytest.fixture(scope="module")
def models_by_interface(tiny_onnx_fp32, tracking_uri) -> dict:
    """The pyfunc of both interfaces, logged in-process from the tiny fp32 folder."""
    models = {}
    for interface in onnx_model.INTERFACES:
        with mlflow.start_run():
            info = onnx_model.log_onnx_model(tiny_onnx_fp32, interface, "tiny")
        models[interface] = mlflow.pyfunc.load_model(info.model_uri)
    return models


def test_prompt_interface_takes_every_documented_input_form(models_by_interface):
    model, prompts = models_by_interface["prompt"], ["Tell me a joke", "What is the capital of Spain?"]
    alone = [model.predict({"prompt": p}, params={"max_tokens": 6})[0] for p in prompts]  # single dict
    assert len(set(alone)) == 2
    forms = {
        "dict of lists": {"prompt": prompts},
        "DataFrame": pd.DataFrame({"prompt": prompts}),
        "list of dicts": [{"prompt": p} for p in prompts],
    }
    for form, model_input in forms.items():
        assert model.predict(model_input, params={"max_tokens": 6}) == alone, form
    with pytest.raises(MlflowException, match="'prompt' is an empty list"):
        model.predict({"prompt": []})


def test_chat_interface_takes_every_documented_input_form(models_by_interface):
    model = models_by_interface["chat"]
    requests = [{"messages": [{"role": "user", "content": q}], "max_tokens": 6}
                for q in ("Tell me a joke", settings.SEED_QUESTION)]
    alone = [_content(model.predict(r)) for r in requests]  # single dict
    assert len(set(alone)) == 2
    forms = {"DataFrame": pd.DataFrame(requests), "list of dicts": requests}
    for form, model_input in forms.items():
        assert [a["choices"][0]["message"]["content"] for a in model.predict(model_input)] == alone, form


def test_a_conversion_killed_by_the_system_is_one_clear_error_and_leaves_nothing(tiny_dir, tmp_path):
    out = tmp_path / "onnx"
    others = set(multiprocessing.active_children())  # servers that other tests of this process left running
    with ThreadPoolExecutor(max_workers=1) as pool:
        converting = pool.submit(convert_in_child, tiny_dir, out, "int4")
        deadline = time.monotonic() + 60
        while not builder_cache(out).exists() and time.monotonic() < deadline:  # the builder has started
            time.sleep(0.01)
        (child,) = set(multiprocessing.active_children()) - others
        os.kill(child.pid, signal.SIGKILL)  # what the out-of-memory killer does
        with pytest.raises(UserError, match="conversion process was killed before it finished, most likely by the "
                                            "system's out-of-memory killer"):
            converting.result(timeout=60)
    assert not builder_cache(out).exists()
