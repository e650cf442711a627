"""evaluate: genai evaluation of both tiny models, the comparison artifacts, and the champion rule."""

from __future__ import annotations

import io
import json
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib.image
import mlflow
import pandas as pd
import pytest
import sqlalchemy
from conftest import (
    assert_failed_with,
    assert_ok,
    assert_step_fails_with,
    bundled_rows,
    mlflow_run,
    model_uri_of,
    wait_for,
)
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from phi3flow import settings
from phi3flow.errors import UserError
from phi3flow.eval_data import PROJECT_ROOT, EvalRow, load_eval_data
from phi3flow.evaluation import (
    AGREEMENT_SCORERS,
    COST_SCORERS,
    QUALITY_SCORERS,
    Progress,
    evaluate_model,
    metric_names,
    rouge_l_f1,
    token_overlap_f1,
)
from phi3flow.registry import Candidate, ChampionMoved, Decision, apply, decide
from steps import evaluate as evaluate_step

# minutes of main chains, servers or benchmarks: started first (tests/conftest.py)
pytestmark = pytest.mark.long

BUNDLED_ROWS = len((PROJECT_ROOT / settings.BUNDLED_EVAL_FILE).read_text().splitlines())
SAMPLE_ROWS = 6  # of the bundled set, in the first evaluation
NAMES = {"pipeline_model_name": "eval-pipeline", "onnx_model_name": "eval-onnx"}
# Names of their own: a failed evaluation must not change what the tests of the first evaluation find.
BAD_INPUT_NAMES = {"pipeline_model_name": "bad-input-pipeline", "onnx_model_name": "bad-input-onnx"}


def _alias_holder(names: list[str]) -> list[str]:
    """Every '<name>/<version>' holding the champion alias among the registered names."""
    client = mlflow.MlflowClient()
    holders = []
    for name in names:
        try:
            version = client.get_model_version_by_alias(name, settings.CHAMPION_ALIAS)
        except MlflowException:
            continue
        holders.append(f"{name}/{version.version}")
    return holders


@pytest.fixture(scope="module")
def bundled(pipeline_run, onnx_fp32_run, tracking_uri, tmp_path_factory):
    """One evaluate of the fp32 tiny models on the bundled set's first rows, default max_tokens and tolerance
    (every row is a request to each model; the loading of the whole set: test_max_rows_bounds_the_set)."""
    eval_data = bundled_rows(tmp_path_factory.mktemp("bundled") / "sample.jsonl", SAMPLE_ROWS)
    result = mlflow_run("evaluate", {"pipeline_run_id": pipeline_run.run_id, "onnx_run_id": onnx_fp32_run.run_id,
                                     "eval_data": eval_data, **NAMES}, tracking_uri)
    assert_ok(result)
    return result


def test_every_metric_is_logged_and_sane(bundled, pipeline_run, onnx_fp32_run):
    run = mlflow.MlflowClient().get_run(bundled.run_id)
    metrics, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED"
    assert tags[settings.TAG_PIPELINE_RUN_ID] == pipeline_run.run_id
    assert tags[settings.TAG_ONNX_RUN_ID] == onnx_fp32_run.run_id
    assert tags[settings.TAG_MODEL_ID] == "builtin:tiny-phi3"
    assert tags[settings.TAG_REVISION].startswith("sha256:")
    assert run.data.params["eval_rows"] == str(SAMPLE_ROWS)
    max_tokens = settings.EVAL_MAX_TOKENS
    for label in ("pipeline", "onnx"):
        m = {name: metrics[f"{label}/{name}"] for name in metric_names(QUALITY_SCORERS + COST_SCORERS)}
        for quality in ("exact_match/mean", "contains_reference/mean", "rouge_l/mean"):
            assert 0.0 <= m[quality] <= 1.0
        assert 1 <= m["completion_tokens/mean"] <= m["completion_tokens/max"] <= max_tokens
        assert 0 < m["latency_s/p50"] <= m["latency_s/p95"] < 30
        assert 0 < m["tokens_per_second/p50"]
    # fp32 and greedy: both runtimes produce the same tokens, so they agree on every row.
    assert metrics["agreement/exact"] == 1.0
    assert metrics["agreement/token_overlap"] == 1.0
    assert metrics["pipeline/agreement_exact/mean"] == 1.0
    assert metrics["onnx/agreement_exact/mean"] == 1.0  # agreement is logged for both models
    assert metrics["onnx/agreement_token_overlap/mean"] == 1.0


def test_each_model_has_a_child_run_with_one_trace_per_row(bundled):
    run = mlflow.MlflowClient().get_run(bundled.run_id)
    children = mlflow.search_runs(
        experiment_ids=[run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{bundled.run_id}'",
        output_format="list"
    )
    # Named after the model and its precision (the fixtures log an fp32 ONNX model and a float32 pipeline).
    assert sorted(c.info.run_name for c in children) == ["onnx · fp32", "pipeline · float32"]
    assert run.info.run_name == "evaluate"
    for child in children:
        traces = mlflow.search_traces(locations=[run.info.experiment_id], run_id=child.info.run_id, return_type="list")
        assert len(traces) == SAMPLE_ROWS
        for trace in traces:
            value = {a.name: a.value for a in trace.info.assessments}
            assert {"exact_match", "contains_reference", "rouge_l"} <= set(value)
            # Throughput per row is that row's completion tokens over its traced latency.
            assert value["tokens_per_second"] == pytest.approx(value["completion_tokens"] / value["latency_s"])
            assert value["expected_response"]  # the reference, logged as an expectation
            assert trace.info.tags[settings.TAG_MODEL_LABEL] == child.data.tags[settings.TAG_MODEL_LABEL]
        assert set(metric_names(QUALITY_SCORERS + COST_SCORERS + AGREEMENT_SCORERS)) <= set(child.data.metrics)
    # Every trace is linked to the evaluate run too: its Traces tab lists both models' answers.
    linked = mlflow.search_traces(locations=[run.info.experiment_id], run_id=bundled.run_id, return_type="list")
    assert sorted(t.info.tags[settings.TAG_MODEL_LABEL] for t in linked) == sorted(["onnx", "pipeline"] * SAMPLE_ROWS)


def test_comparison_table_and_chart_are_logged(bundled, tmp_path):
    client = mlflow.MlflowClient()
    metrics = client.get_run(bundled.run_id).data.metrics
    base = f"runs:/{bundled.run_id}/comparison"
    table = pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"{base}/comparison.csv")), index_col="model")
    assert list(table.index) == ["pipeline", "onnx"]
    assert table.loc["onnx", "version"].startswith("eval-onnx/")
    for label in table.index:
        assert table.loc[label, "rouge_l/mean"] == pytest.approx(metrics[f"{label}/rouge_l/mean"])
        assert table.loc[label, "latency_s/p95"] == pytest.approx(metrics[f"{label}/latency_s/p95"])
    # Two narrow tables, rounded, so that MLflow's artifact viewer shows every column.
    markdown = mlflow.artifacts.load_text(f"{base}/comparison.md")
    tables = [line for line in markdown.splitlines() if line.startswith("| model |")]
    assert tables == ["| model | version | exact_match | contains_reference | rouge_l |",
                      "| model | tokens mean | tokens max | latency s mean | p50 | p95 | tokens/s mean "
                      "| tokens/s p50 |"]
    numbers = re.findall(r"\d+\.\d+(?:e-?\d+)?", markdown)
    assert numbers and all(len(n.split("e")[0].replace(".", "").lstrip("0")) <= settings.COMPARISON_DIGITS
                           for n in numbers)
    for chart in ("speed.png", "quality.png"):
        png = Path(mlflow.artifacts.download_artifacts(f"{base}/{chart}", dst_path=str(tmp_path)))
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(png).shape
        assert width > 300 and height > 200


def test_first_evaluation_registers_both_and_crowns_one(bundled):
    tags = mlflow.MlflowClient().get_run(bundled.run_id).data.tags
    assert tags[settings.TAG_CHAMPION_DECISION] == "promoted"
    assert "there was no champion" in tags[settings.TAG_CHAMPION_REASON]
    assert _alias_holder(list(NAMES.values())) == [tags[settings.TAG_CHAMPION]]
    client = mlflow.MlflowClient()
    run = client.get_run(bundled.run_id)
    experiment = run.info.experiment_id
    eval_link = f"](#/experiments/{experiment}/runs/{bundled.run_id})"
    champion = tags[settings.TAG_CHAMPION]
    for name in NAMES.values():
        version = client.get_model_version(name, "1")  # (the gate's challengers below are versions 2)
        assert version.tags[settings.TAG_EVAL_RUN_ID] == bundled.run_id
        assert version.tags[settings.TAG_COMPARED_CHAMPION] == "none"
        # Its description names the evaluation that scored it (a link), its scores and the verdict.
        assert f"[evaluate{eval_link}" in version.description
        assert re.search(r"rouge_l \d", version.description)
        is_champion = f"{name}/{version.version}" == champion
        assert ("**Champion**" in version.description) == is_champion
        assert tags[settings.TAG_CHAMPION_REASON] in version.description
    # The evaluate run's description: verdict, reason, versions and child runs as links, rounded numbers.
    note = tags["mlflow.note.content"]
    champion_name, _, champion_version = champion.rpartition("/")
    assert note.startswith("### Champion: "
                           f"[{champion}](#/models/{champion_name}/versions/{champion_version}) (promoted)")
    assert tags[settings.TAG_CHAMPION_REASON] in note
    assert tags[settings.TAG_COMPARED_CHAMPION] == "none"
    for name in NAMES.values():
        assert f"[{name}/1](#/models/{name}/versions/1)" in note
    for child in client.search_runs([experiment], f"tags.mlflow.parentRunId = '{bundled.run_id}'"):
        assert f"[{child.info.run_name}](#/experiments/{experiment}/runs/{child.info.run_id})" in note
    throughput = run.data.metrics["onnx/tokens_per_second/p50"]
    assert f"{throughput:.{settings.COMPARISON_DIGITS}g}" in note


OWN_ANSWERS_MAX_TOKENS = 16
# Each evaluation answers every row with every model it compares (three with the champion): few rows.
OWN_ANSWERS_ROWS = 4


@pytest.fixture(scope="module")
def own_answers(onnx_fp32_model, tmp_path_factory) -> str:
    """References that are the fp32 models' own greedy answers, so the fp32 models score 1.0 on them."""
    prompts = [json.loads(line)["prompt"]
               for line in (PROJECT_ROOT / settings.BUNDLED_EVAL_FILE).read_text().splitlines()[:OWN_ANSWERS_ROWS]]
    references = [
        onnx_fp32_model.predict({"messages": [{"role": "user", "content": p}],
                                 "max_tokens": OWN_ANSWERS_MAX_TOKENS})[0]["choices"][0]["message"]["content"]
        for p in prompts
    ]
    data = tmp_path_factory.mktemp("own") / "own_answers.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n"
                            for p, r in zip(prompts, references, strict=True)))
    return str(data)


@pytest.fixture(scope="module")
def challengers(pipeline_auto_run, onnx_int4_run) -> dict[str, str]:
    """A bfloat16 pipeline and an int4 ONNX model: they really answer differently from the fp32 ones.
    The pipeline samples by default: evaluation must still decode it greedily."""
    return {"pipeline_run_id": pipeline_auto_run.run_id, "onnx_run_id": onnx_int4_run.run_id}


def test_worse_challengers_do_not_move_the_champion(bundled, own_answers, challengers, tracking_uri):
    """The first evaluation's champion, an fp32 model, against challengers on the fp32 models' own answers."""
    common = {"eval_data": own_answers, "max_tokens": str(OWN_ANSWERS_MAX_TOKENS), **NAMES}
    client = mlflow.MlflowClient()
    champion = client.get_run(bundled.run_id).data.tags[settings.TAG_CHAMPION]
    assert _alias_holder(list(NAMES.values())) == [champion]
    second = mlflow_run("evaluate", {**challengers, **common}, tracking_uri)
    assert_ok(second)
    run = client.get_run(second.run_id)
    best = max(run.data.metrics["pipeline/rouge_l/mean"], run.data.metrics["onnx/rouge_l/mean"])
    # The champion was measured again in this run, on the same data: it still scores 1.0.
    assert run.data.metrics["champion/rouge_l/mean"] == 1.0
    assert best < 1.0 - settings.DEFAULT_TOLERANCE
    assert run.data.tags[settings.TAG_CHAMPION_DECISION] == "rejected"
    assert f"regresses against champion {champion}" in run.data.tags[settings.TAG_CHAMPION_REASON]
    assert run.data.tags[settings.TAG_CHAMPION] == champion
    assert run.data.tags[settings.TAG_COMPARED_CHAMPION] == champion
    assert _alias_holder(list(NAMES.values())) == [champion]  # not moved
    # registered all the same, and told why it is not the champion
    [challenger] = client.search_model_versions(f"name = 'eval-onnx' and run_id = '{challengers['onnx_run_id']}'")
    assert challenger.description.startswith("Scored by the evaluation [evaluate](")
    assert f"Not the champion after that evaluation (compared against [{champion}]" in challenger.description


def test_promotion_is_a_compare_and_set(tracking_server, tracking_uri, monkeypatch):
    mlflow.set_tracking_uri(tracking_server.url)
    try:
        client = mlflow.MlflowClient()
        client.create_registered_model("cas-model")
        with mlflow.start_run() as holder:
            source = f"runs:/{holder.info.run_id}/model"
        first, second = (client.create_model_version("cas-model", source, holder.info.run_id) for _ in range(2))

        def promote(version: ModelVersion, expected: ModelVersion | None) -> None:
            apply(Decision("promoted", Candidate("onnx", version, 1.0, 1.0), "test"), ["cas-model"], expected)

        promote(first, None)
        with pytest.raises(ChampionMoved, match="the champion moved from none to cas-model/1") as moved:
            promote(second, None)  # decided against no champion, but cas-model/1 was crowned meanwhile
        assert moved.value.found.version == first.version
        assert _alias_holder(["cas-model"]) == ["cas-model/1"]  # not moved
        promote(second, first)  # decided against the real champion
        assert _alias_holder(["cas-model"]) == ["cas-model/2"]

        # Another promotion that checked before this one's move (it too found cas-model/2) moves the alias
        # right after it: the final check, PROMOTION_SETTLE_S after the move, sees that.
        monkeypatch.setattr(settings, "PROMOTION_SETTLE_S", 5.0)  # margin for a loaded machine
        third = client.create_model_version("cas-model", source, holder.info.run_id)
        with ThreadPoolExecutor(1) as pool:
            promoting = pool.submit(promote, third, second)
            wait_for("the move to cas-model/3", lambda: _alias_holder(["cas-model"]) == ["cas-model/3"], timeout=60)
            client.set_registered_model_alias("cas-model", settings.CHAMPION_ALIAS, first.version)
            with pytest.raises(ChampionMoved, match="the champion moved from cas-model/3 to cas-model/1"):
                promoting.result()
    finally:
        mlflow.set_tracking_uri(tracking_uri)


def test_an_evaluation_that_loses_the_race_to_add_its_set_to_the_experiment_tries_once_more(onnx_fp32_run, tracking_uri,
                                                                                          capsys):
    """Two evaluations of a new set, started together, both add it to the experiment's datasets: MLflow's
    store looks for it, then inserts it, and refuses the second insert. Here a second connection to the
    store commits the same dataset right before this evaluation's insert, as the other evaluation would."""
    experiment_id = mlflow.create_experiment("dataset-race")
    engine = sqlalchemy.create_engine(tracking_uri)
    store = mlflow.tracking._tracking_service.utils._get_store(tracking_uri)  # this process's store, cached by URI
    won = []

    def other_evaluation_first(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("INSERT INTO datasets") and not won:
            with engine.begin() as other:  # its own connection, committed before this insert runs
                other.exec_driver_sql(statement, (uuid.uuid4().hex, *parameters[1:]))
            won.append(parameters[3])  # the digest

    sqlalchemy.event.listen(store.engine, "before_cursor_execute", other_evaluation_first)
    try:
        with mlflow.start_run(experiment_id=experiment_id):
            scores = evaluate_model("onnx", model_uri_of(onnx_fp32_run), [EvalRow(settings.SEED_QUESTION, "Madrid")], 4)
    finally:
        sqlalchemy.event.remove(store.engine, "before_cursor_execute", other_evaluation_first)
        engine.dispose()
    assert won, "the evaluation logged no dataset"
    assert "another evaluation added the same evaluation set to the experiment at the same moment: trying again" in (
        capsys.readouterr().out)
    [dataset_input] = mlflow.MlflowClient().get_run(scores.run_id).inputs.dataset_inputs
    assert dataset_input.dataset.digest == won[0]  # the one the other evaluation added, linked
    assert len(scores.answers) == 1 and set(metric_names(QUALITY_SCORERS)) <= set(scores.metrics)


def test_racing_evaluations_compare_the_champion_against_its_predecessor(tracking_server, own_answers, challengers,
                                                                         pipeline_run, onnx_fp32_run, tracking_uri):
    """Two evaluations of different models started together on one `mlflow server`, no lock between them:
    the one that promotes second finds the alias moved, measures the new champion, and decides against it.
    (When their alias moves cross, both find it moved and retry after a random wait: one still goes first.)"""
    names = {"pipeline_model_name": "race-pipeline", "onnx_model_name": "race-onnx"}
    common = {"eval_data": own_answers, "max_tokens": str(OWN_ANSWERS_MAX_TOKENS), **names}
    pairs = [{"pipeline_run_id": pipeline_run.run_id, "onnx_run_id": onnx_fp32_run.run_id}, challengers]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(
            lambda pair: mlflow_run("evaluate", {**pair, **common}, tracking_server.url, timeout=600), pairs))
    tags = {assert_ok(r): mlflow.MlflowClient().get_run(r.run_id).data.tags for r in results}
    compared = {run_id: t[settings.TAG_COMPARED_CHAMPION] for run_id, t in tags.items()}
    # exactly one decided against no champion: both outputs say how they promoted when it is not so
    assert list(compared.values()).count("none") == 1, f"{compared}\n" + "\n".join(r.stdout for r in results)
    [first] = [run_id for run_id, champion in compared.items() if champion == "none"]
    [second] = [run_id for run_id in tags if run_id != first]
    first_champion = tags[first][settings.TAG_CHAMPION]
    assert tags[second][settings.TAG_COMPARED_CHAMPION] == first_champion
    [late] = [r for r in results if r.run_id == second]
    assert re.search(r"the champion moved from \S+ to \S+ while this evaluation ran: measuring "
                     rf"{re.escape(first_champion)} and deciding again", late.stdout)
    assert _alias_holder(list(names.values())) == [tags[second][settings.TAG_CHAMPION]]


def _version(name: str, number: int) -> ModelVersion:
    return ModelVersion(name=name, version=str(number), creation_timestamp=number)


def test_rule_quality_first_then_throughput_then_tolerance():
    fast = Candidate("onnx", _version("o", 2), quality=0.50, throughput=90.0)
    slow = Candidate("pipeline", _version("p", 2), quality=0.50, throughput=10.0)
    better = Candidate("pipeline", _version("p", 3), quality=0.60, throughput=10.0)
    assert decide([slow, fast], None, 0.02).champion is fast  # equal quality: throughput decides
    assert decide([better, fast], None, 0.02).champion is better  # quality first
    held = Candidate("champion", _version("o", 1), quality=0.51, throughput=500.0)
    assert decide([slow, fast], held, 0.02).action == "promoted"  # 0.50 >= 0.51 - 0.02
    rejected = decide([slow, fast], held, 0.005)
    assert rejected.action == "rejected" and rejected.champion is held
    assert decide([slow, fast], fast, 0.0).action == "unchanged"


def test_text_measures():
    assert rouge_l_f1("The capital of Spain is Madrid.", "Madrid") == pytest.approx(2 * (1 / 6) / (1 / 6 + 1))
    assert rouge_l_f1("Madrid", "madrid!") == 1.0
    assert rouge_l_f1("", "Madrid") == 0.0
    assert token_overlap_f1("a b c", "c b a") == 1.0
    assert token_overlap_f1("a b", "c d") == 0.0


def _write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_user_files_in_every_format_and_by_artifact_uri(tmp_path):
    rows = [{"prompt": "What is 2 plus 2?", "reference": "4"},
            {"prompt": "Capital of Peru?", "reference": "Lima", "system": "Be brief."}]
    jsonl = _write(tmp_path, "set.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    csv = tmp_path / "set.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    parquet = tmp_path / "set.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    with mlflow.start_run() as holder:
        mlflow.log_artifact(str(parquet), "data")
    loaded = [load_eval_data(str(source), tmp_path / f"dl{i}").rows
              for i, source in enumerate([jsonl, csv, parquet, f"runs:/{holder.info.run_id}/data/set.parquet"])]
    assert all(rows_ == loaded[0] for rows_ in loaded)
    assert loaded[0][1].messages == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Capital of Peru?"}]
    assert loaded[0][0].messages == [{"role": "user", "content": "What is 2 plus 2?"}]
    assert len(load_eval_data("bundled", tmp_path).rows) == BUNDLED_ROWS


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.jsonl", '{"prompt": "a", "reference": "b"}\n{"prompt": "c", "reference": "d"}\n{"prompt": "e", \n',
         "bad.jsonl line 3: not valid JSON"),
        ("bad.jsonl", '{"prompt": "a", "reference": "b"}\n{"prompt": "c"}\n',
         "bad.jsonl line 2: 'reference' is missing or empty"),
        ("bad.jsonl", '["a", "b"]\n', "bad.jsonl line 1: expected an object"),
        ("bad.csv", "prompt,answer\nq,a\n", "bad.csv: missing column 'reference' (columns are prompt, answer)"),
        ("bad.csv", "prompt,reference\nq,a\n,b\n", "bad.csv line 3: 'prompt' is missing or empty"),
        ("empty.jsonl", "\n", "holds no rows"),
        ("set.txt", "prompt,reference\n", "eval_data must be a .jsonl, .csv, .parquet file, not 'set.txt'"),
    ],
)
def test_malformed_files_name_the_line_or_column(tmp_path, name, text, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_eval_data(_write(tmp_path, name, text), tmp_path)


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        # Latin-1 (not UTF-8) on line 2: the byte of "é"
        ("latin1.jsonl", '{"prompt": "a", "reference": "b"}\n{"prompt": "café?", "reference": "d"}\n'.encode("latin-1"),
         "latin1.jsonl line 2: not UTF-8 text (byte 0xe9 at column 16); save the file as UTF-8"),
        ("utf16.jsonl", '{"prompt": "a", "reference": "b"}\n'.encode("utf-16"),
         "utf16.jsonl line 1: not UTF-8 text (byte 0xff at column 1)"),
        ("junk.jsonl", bytes(range(256)) * 4, "junk.jsonl line 1: not valid JSON"),
        ("junk.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00", "junk.jsonl line 1: not UTF-8 text (byte 0x89 at column 1)"),
        ("deep.jsonl", b"[" * 100_000, "deep.jsonl line 1: not valid JSON"),
        ("latin1.csv", "prompt,reference\ncafé?,b\n".encode("latin-1"), "latin1.csv: cannot read it as csv"),
        ("junk.parquet", bytes(range(256)), "junk.parquet: cannot read it as parquet"),
    ],
    ids=["latin1", "utf16", "bytes", "png", "deep", "latin1-csv", "junk-parquet"],
)
def test_every_bad_file_gets_one_line(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(UserError, match=re.escape(message)) as refused:
        load_eval_data(str(tmp_path / name), tmp_path)
    assert "\n" not in str(refused.value)


def test_max_rows_bounds_the_set(tmp_path):
    assert len(load_eval_data("bundled", tmp_path, max_rows=BUNDLED_ROWS).rows) == BUNDLED_ROWS
    with pytest.raises(UserError,
                       match=re.escape(f"eval_data 'bundled' holds {BUNDLED_ROWS} rows, more than max_rows=3: "
                                                  "evaluate a sample of it, or raise max_rows")):
        load_eval_data("bundled", tmp_path, max_rows=3)
    with pytest.raises(UserError, match="max_rows must be at least 1, not 0"):
        load_eval_data("bundled", tmp_path, max_rows=0)


def test_progress_line_estimates_the_time_left(monkeypatch, capsys):
    monkeypatch.setattr(settings, "EVAL_PROGRESS_EVERY_S", 0.0)
    progress = Progress("onnx", 3)
    for _ in range(3):
        progress.row_done()
    lines = capsys.readouterr().out.splitlines()
    # One line per row but the last (the step prints the outcome then), with the time left.
    assert [re.sub(r"\d+ s", "N s", line) for line in lines] == [
        "[onnx] 1/3 prompts in N s, about N s left", "[onnx] 2/3 prompts in N s, about N s left"]


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="eval_data '/nonexistent/set.csv' is not a file"):
        load_eval_data("/nonexistent/set.csv", tmp_path)


def test_bad_step_input_fails_with_one_line(pipeline_run, onnx_fp32_run, tracking_uri, tmp_path):
    eval_data = _write(tmp_path, "set.jsonl", '{"prompt": "a", "reference": "b"}\n{"prompt": 3, "reference": "d"}\n')
    params = {"pipeline_run_id": pipeline_run.run_id, "onnx_run_id": onnx_fp32_run.run_id, "eval_data": eval_data,
              **BAD_INPUT_NAMES}
    result = mlflow_run("evaluate", params, tracking_uri, timeout=300)
    assert_failed_with(result, "set.jsonl line 2: 'prompt' must be a string, got int")


@pytest.mark.parametrize("case", ["too-many-tokens", "wrong-run"])
def test_each_bad_step_input_has_its_message(case, pipeline_run, onnx_fp32_run):
    options = ["--pipeline-run-id", pipeline_run.run_id, "--onnx-run-id", onnx_fp32_run.run_id,
               "--pipeline-model-name", BAD_INPUT_NAMES["pipeline_model_name"],
               "--onnx-model-name", BAD_INPUT_NAMES["onnx_model_name"]]
    if case == "too-many-tokens":
        options += ["--max-tokens", "100000"]
    else:
        options += ["--onnx-run-id", pipeline_run.run_id]  # a run, but not a log_onnx_wrapper run
    expected = {
        "too-many-tokens": "the onnx model failed to answer: 'max_tokens' is 100000 but only 4078 tokens fit",
        "wrong-run": f"run '{pipeline_run.run_id}' logged no model named 'phi3-onnx': is it a log_onnx_wrapper run?",
    }[case]
    assert_step_fails_with(evaluate_step.main, options, expected)
