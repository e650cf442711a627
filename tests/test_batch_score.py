"""batch_score: Spark batch scoring of both flavors, one output row per input row, bad rows marked."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import assert_failed_with, assert_ok, mlflow_run, model_uri_of

from phi3flow.batch import batch_score, spark_session
from phi3flow.errors import UserError

# 20 distinct (question, max_tokens) requests repeated over 200 good rows: every good row is checked
# against the model's own answer, computed once per distinct request in this process.
QUESTIONS = [f"Question {i}: what is {i} plus {i}?" for i in range(10)]
DEFAULT_MAX_TOKENS = 3  # the max_tokens parameter: for rows without one
BAD_ROWS = {
    "empty messages": {"messages": []},
    "unknown role": {"messages": [{"role": "robot", "content": "hi"}]},
    "negative max_tokens": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
    "non-string content": {"messages": [{"role": "user", "content": 42}]},
}
BAD_REASONS = {
    "empty messages": "'messages' must be a non-empty list",
    "unknown role": "messages[0].role must be one of system, user, assistant, got 'robot'",
    "negative max_tokens": "'max_tokens' must be at least 1, got -1",
    "non-string content": "messages[0].content must be a string, got int",
}


def good_rows() -> list[dict]:
    rows = []
    for i in range(200):
        row = {"id": i, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}
        if i % 20 >= 10:  # the other half takes the max_tokens parameter
            row["max_tokens"] = 2
        rows.append(row)
    return rows


def all_rows() -> list[dict]:
    bad = [{"id": 1000 + i, "case": case, **row} for i, (case, row) in enumerate(BAD_ROWS.items())]
    return [*good_rows(), *bad]


@pytest.fixture(scope="module")
def spark():
    session = spark_session("local[2]")
    yield session
    session.stop()


def expected_answers(model_uri: str) -> dict[tuple[str, int], str]:
    """The model's own greedy answer to each distinct request, in this process."""
    model = mlflow.pyfunc.load_model(model_uri)
    answers = {}
    for question in QUESTIONS:
        for max_tokens in (2, DEFAULT_MAX_TOKENS):
            completion = model.predict({"messages": [{"role": "user", "content": question}],
                                        "max_tokens": max_tokens})[0]
            answers[(question, max_tokens)] = completion["choices"][0]["message"]["content"]
    return answers


def check_predictions(result, model_uri: str) -> pd.DataFrame:
    out = pd.read_parquet(result.output_dir)
    rows = all_rows()
    assert result.rows == len(out) == len(rows) == 204
    assert sorted(out["id"]) == sorted(row["id"] for row in rows)  # one output row per input row
    assert result.errors == len(BAD_ROWS)
    # once per Python worker (local[2]: two), not once per partition (four) or row
    assert 1 <= result.model_loads <= 2

    bad = out[out["id"] >= 1000].set_index("case")
    for case, reason in BAD_REASONS.items():
        assert reason in bad.loc[case, "error"]
        assert pd.isna(bad.loc[case, "answer"]) and pd.isna(bad.loc[case, "completion"])

    good = out[out["id"] < 1000]
    assert good["error"].isna().all(), good["error"].dropna().head()
    expected = expected_answers(model_uri)
    for row in good.itertuples():
        question = QUESTIONS[row.id % len(QUESTIONS)]
        max_tokens = 2 if row.id % 20 >= 10 else DEFAULT_MAX_TOKENS
        assert row.answer == expected[(question, max_tokens)], row.id
        completion = json.loads(row.completion)
        assert completion["object"] == "chat.completion"
        assert completion["choices"][0]["message"]["content"] == row.answer
        assert completion["usage"]["completion_tokens"] == row.completion_tokens
    assert result.completion_tokens == good["completion_tokens"].sum() > 0
    return out


def test_onnx_model_scores_jsonl_rows_and_marks_bad_ones(spark, onnx_fp32_run, tmp_path: Path):
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in all_rows()))
    model_uri = model_uri_of(onnx_fp32_run)
    result = batch_score(model_uri, str(source), "local[2]", DEFAULT_MAX_TOKENS, tmp_path / "work", spark=spark)
    out = check_predictions(result, model_uri)
    # JSONL columns come back as Spark reads them
    assert {"id", "messages", "max_tokens", "case", "answer", "completion", "completion_tokens",
            "error"} == set(out.columns)


def test_pipeline_model_scores_parquet_rows_and_marks_bad_ones(spark, pipeline_run, tmp_path: Path):
    # Parquet with the messages as JSON text (a non-string content cannot be stored in a typed column)
    frame = pd.DataFrame([{**row, "messages": json.dumps(row["messages"])} for row in all_rows()])
    frame.to_parquet(tmp_path / "requests.parquet")
    model_uri = model_uri_of(pipeline_run)
    result = batch_score(model_uri, str(tmp_path / "requests.parquet"), "local[2]", DEFAULT_MAX_TOKENS,
                         tmp_path / "work", spark=spark)
    check_predictions(result, model_uri)


@pytest.mark.parametrize("file_name, content, model, message", [
    ("missing.jsonl", None, "onnx", "input_path '{tmp}/missing.jsonl' does not exist"),
    ("requests.txt", "hi", "onnx",
     "input_path must be a .jsonl, .csv, .parquet file (or a folder of them), not 'requests.txt'"),
    ("requests.jsonl", "{}", "models:/no-such-model/1", "cannot find model 'models:/no-such-model/1'"),
])
def test_bad_parameters_are_one_line_errors(file_name, content, model, message, onnx_fp32_run, tmp_path: Path):
    if content is not None:
        (tmp_path / file_name).write_text(content)
    model_uri = model_uri_of(onnx_fp32_run) if model == "onnx" else model
    with pytest.raises(UserError) as raised:
        batch_score(model_uri, str(tmp_path / file_name), "local[2]", 4, tmp_path / "work")
    assert message.format(tmp=tmp_path) in str(raised.value)
    assert "\n" not in str(raised.value)


def test_mlflow_run_batch_score_logs_predictions_and_metrics(onnx_fp32_run, onnx_fp32_model, tracking_uri: str,
                                                             tmp_path: Path):
    source = tmp_path / "requests.csv"
    pd.DataFrame([
        {"id": 1, "messages": json.dumps([{"role": "user", "content": "What is the capital of Spain?"}]),
         "max_tokens": 4},
        {"id": 2, "messages": json.dumps([{"role": "user", "content": "Name a colour."}]), "max_tokens": ""},
        {"id": 3, "messages": "not json", "max_tokens": 4},
    ]).to_csv(source, index=False)
    result = mlflow_run("batch_score", {"model_uri": model_uri_of(onnx_fp32_run), "input_path": str(source),
                                        "spark_master": "local[1]", "max_tokens": "5"}, tracking_uri, cwd=tmp_path)
    run_id = assert_ok(result)
    assert "progress: " in result.stdout
    predictions = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions",
                                                      dst_path=str(tmp_path / "out"))
    out = pd.read_parquet(predictions).set_index("id")  # CSV cells are text, the ids too
    assert out.loc["3", "error"] == "'messages' is not valid JSON (Expecting value)"
    # the max_tokens parameter fills the empty cell
    expected = onnx_fp32_model.predict({"messages": [{"role": "user", "content": "Name a colour."}],
                                        "max_tokens": 5})[0]
    assert out.loc["2", "answer"] == expected["choices"][0]["message"]["content"]
    metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert (metrics["rows"], metrics["errors"]) == (3, 1)
    assert metrics["completion_tokens"] == out["completion_tokens"].sum() > 0
    assert metrics["tokens_per_second"] > 0


def test_mlflow_run_with_a_missing_input_fails_in_one_line(onnx_fp32_run, tracking_uri: str, tmp_path: Path):
    result = mlflow_run("batch_score", {"model_uri": model_uri_of(onnx_fp32_run),
                                        "input_path": str(tmp_path / "none.csv")}, tracking_uri)
    assert_failed_with(result, f"input_path '{tmp_path / 'none.csv'}' does not exist")


def test_prompt_interface_model_scores_csv_prompts(spark, tiny_onnx_fp32: Path, tracking_uri: str, tmp_path: Path):
    from phi3flow.onnx_model import log_onnx_model

    with mlflow.start_run():
        model_uri = log_onnx_model(tiny_onnx_fp32, "prompt", "tiny-prompt").model_uri
    prompts = [f"<|user|>Question {i}?<|end|><|assistant|>" for i in range(4)]
    pd.DataFrame([{"id": i, "prompt": p, "max_tokens": 2 + i % 2} for i, p in enumerate(prompts)]
                 + [{"id": 8, "prompt": "", "max_tokens": 2}, {"id": 9, "prompt": prompts[0], "max_tokens": -2}]
                 ).to_csv(tmp_path / "prompts.csv", index=False)
    result = batch_score(model_uri, str(tmp_path / "prompts.csv"), "local[2]", DEFAULT_MAX_TOKENS, tmp_path / "work",
                         spark=spark)
    out = pd.read_parquet(result.output_dir).set_index("id")  # CSV: text ids
    assert (result.rows, result.errors) == (6, 2)
    assert out.loc["8", "error"] == "'prompt' is missing or empty"
    assert out.loc["9", "error"] == "'max_tokens' must be at least 1, got -2"
    model = mlflow.pyfunc.load_model(model_uri)
    for i, prompt in enumerate(prompts):
        assert out.loc[str(i), "answer"] == model.predict([{"prompt": prompt}], params={"max_tokens": 2 + i % 2})[0]
        assert json.loads(out.loc[str(i), "completion"]) == out.loc[str(i), "answer"]
