"""Score logged chat models with `mlflow.genai.evaluate` and code scorers that need no network.

Quality: exact match and containment of the reference, ROUGE-L F1 (computed here). Cost: completion
tokens, latency per request (from each row's trace), output tokens per second. Agreement: how often
two models' greedy answers are identical, and their token overlap. Every scorer is plain code, so
none of them can vanish offline; a scorer that produced no value fails the evaluation.
"""

from __future__ import annotations

import gc
import json
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import SpanType
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.genai.scorers import Scorer, scorer

from phi3flow import output, registry, report, settings
from phi3flow.errors import UserError
from phi3flow.eval_data import EvalData, EvalRow

PEER_ANSWER = "peer_answer"  # expectation key: the other model's answer to the same row


def p50(values: list[float]) -> float:
    return float(np.percentile(values, 50))


def p95(values: list[float]) -> float:
    return float(np.percentile(values, 95))


# ---- text measures ---------------------------------------------------------------------------

def words(text: str) -> list[str]:
    """Lowercase word tokens without punctuation: 'The capital is Madrid.' -> [the, capital, is, madrid]."""
    return re.findall(r"\w+", text.casefold())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (the core of ROUGE-L), O(len(a) * len(b))."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def f1(common: int, predicted: int, expected: int) -> float:
    if common == 0:
        return 0.0
    precision, recall = common / predicted, common / expected
    return 2 * precision * recall / (precision + recall)


def rouge_l_f1(answer: str, reference: str) -> float:
    a, r = words(answer), words(reference)
    return f1(lcs_length(a, r), len(a), len(r))


def token_overlap_f1(a: str, b: str) -> float:
    """Bag-of-words F1 between two texts (1.0 for two empty answers: they agree)."""
    wa, wb = words(a), words(b)
    if not wa and not wb:
        return 1.0
    return f1(sum((Counter(wa) & Counter(wb)).values()), len(wa), len(wb))


# ---- scorers: `outputs` is the model's chat.completion dict ------------------------------------

def content(outputs: dict[str, Any]) -> str:
    return outputs["choices"][0]["message"]["content"]


@scorer
def exact_match(outputs, expectations) -> bool:
    return words(content(outputs)) == words(expectations["expected_response"])


@scorer
def contains_reference(outputs, expectations) -> bool:
    answer, reference = " ".join(words(content(outputs))), " ".join(words(expectations["expected_response"]))
    return bool(reference) and f" {reference} " in f" {answer} "


@scorer
def rouge_l(outputs, expectations) -> float:
    return rouge_l_f1(content(outputs), expectations["expected_response"])


@scorer(aggregations=["mean", "max"])
def completion_tokens(outputs) -> int:
    return int(outputs["usage"]["completion_tokens"])


def _seconds(trace) -> float:
    """Duration of the root span, which wraps exactly one predict call (nanoseconds, not the ms of trace.info)."""
    root = next(span for span in trace.data.spans if span.parent_id is None)
    return (root.end_time_ns - root.start_time_ns) / 1e9


@scorer(aggregations=["mean", p50, p95])
def latency_s(trace) -> float:
    return _seconds(trace)


@scorer(aggregations=["mean", p50])
def tokens_per_second(outputs, trace) -> float:
    return int(outputs["usage"]["completion_tokens"]) / max(_seconds(trace), 1e-6)


@scorer
def agreement_exact(outputs, expectations) -> bool:
    return content(outputs) == expectations[PEER_ANSWER]


@scorer
def agreement_token_overlap(outputs, expectations) -> float:
    return token_overlap_f1(content(outputs), expectations[PEER_ANSWER])


QUALITY_SCORERS: list[Scorer] = [exact_match, contains_reference, rouge_l]
COST_SCORERS: list[Scorer] = [completion_tokens, latency_s, tokens_per_second]
AGREEMENT_SCORERS: list[Scorer] = [agreement_exact, agreement_token_overlap]


def metric_names(scorers: list[Scorer]) -> list[str]:
    """The metrics mlflow.genai.evaluate logs for these scorers: '<scorer>/<aggregation>'."""
    return [f"{s.name}/{a if isinstance(a, str) else a.__name__}" for s in scorers
            for a in (s.aggregations or ["mean"])]


# ---- one model ---------------------------------------------------------------------------------

@dataclass
class ModelScores:
    label: str  # "pipeline", "onnx" or "champion"
    model_uri: str
    run_id: str  # the child run holding this model's evaluation and traces
    metrics: dict[str, float]
    answers: list[str] = field(default_factory=list)  # one per eval row, in order


# The insert that fails when two evaluations of one new set add it to the experiment at the same moment:
# MLflow's SqlAlchemyStore.log_inputs looks for the dataset (experiment, name, digest), then inserts it,
# and the table's primary key refuses the second insert (sqlite: "UNIQUE constraint failed"; through a
# server: BAD_REQUEST with the same text). SQLAlchemy's error names the statement, whatever the database.
_DATASET_INSERT_RACE = re.compile(r"\[SQL: INSERT INTO datasets\b")


def genai_evaluate(label: str, **kwargs: Any) -> Any:
    """mlflow.genai.evaluate, tried once more when it lost the race to add the evaluation set to the experiment.

    genai.evaluate logs the set as an input of its run before it answers any row (after one untraced
    check of predict_fn). Two evaluations of a set new to the experiment that start together (two
    machines, one tracking server) both insert it, and the store refuses the second with a traceback.
    By the second try the dataset is there, and the store only links it to the run.
    """
    try:
        return mlflow.genai.evaluate(**kwargs)
    except MlflowException as exc:
        if not _DATASET_INSERT_RACE.search(str(exc)):
            raise
    print(f"[{label}] another evaluation added the same evaluation set to the experiment at the same moment: "
          "trying again", flush=True)
    return mlflow.genai.evaluate(**kwargs)


def evaluate_model(
    label: str,
    model_uri: str,
    rows: list[EvalRow],
    max_tokens: int,
    *,
    logged_model_id: str | None = None,
    peer_answers: list[str] | None = None,
    detail: str = "",
) -> ModelScores:
    """Run mlflow.genai.evaluate on one model in a child run named after label (and detail, what tells
    the model apart: its precision, or its version); greedy decoding.

    peer_answers (another model's answers to the same rows) adds the agreement scorers.
    """
    print(f"[{label}] loading {model_uri} ...", flush=True)
    model = mlflow.pyfunc.load_model(model_uri)
    # Two warnings of the pipeline model (MLflow's transformers flavor) that are harmless here:
    # top_k=1 below is ignored by a pipeline logged greedy (sampling=false), which answers greedily
    # anyway; and the flavor decodes with clean_up_tokenization_spaces=True, which transformers
    # rightly skips for a BPE tokenizer (the clean-up would remove spaces before punctuation).
    output.drop_log_message("transformers.generation.configuration_utils",
                            "The following generation flags are not valid and may be ignored: ['top_k']")
    output.drop_log_message("transformers.tokenization_utils_tokenizers", "Ignoring clean_up_tokenization_spaces=True")
    answers: dict[str, str] = {}
    failures: list[str] = []
    lock = threading.Lock()
    progress = Progress(label, len(rows))
    model_tags = {settings.TAG_MODEL_LABEL: label, settings.TAG_MODEL_VERSION: detail or model_uri}

    @mlflow.trace(name=label, span_type=SpanType.CHAT_MODEL)
    def predict(messages: list[dict[str, str]]) -> dict[str, Any]:
        try:
            # Greedy, so two models' answers can be compared token for token. top_k=1 is greedy in both
            # runtimes whatever the model's logged defaults; temperature 0 is refused by transformers
            # for a pipeline logged with sampling=true.
            answer = model.predict({"messages": messages, "max_tokens": max_tokens, "top_k": 1})[0]
        except Exception as exc:
            with lock:
                failures.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        with lock:
            answers[json.dumps(messages)] = content(answer)
        # MLflow first calls predict once untraced, to check it: that call is not a row of the evaluation.
        if mlflow.get_current_active_span() is not None:
            mlflow.update_current_trace(tags=model_tags)  # the traces of both models can be told apart anywhere
            with lock:
                progress.row_done()
        return answer

    data = []
    for i, row in enumerate(rows):
        expectations = {"expected_response": row.reference}
        if peer_answers is not None:
            expectations[PEER_ANSWER] = peer_answers[i]
        data.append({"inputs": {"messages": row.messages}, "expectations": expectations})
    scorers = QUALITY_SCORERS + COST_SCORERS + (AGREEMENT_SCORERS if peer_answers is not None else [])

    # One request at a time: the latencies measure the model, not contention between requests.
    os.environ["MLFLOW_GENAI_EVAL_MAX_WORKERS"] = "1"
    with mlflow.start_run(run_name=f"{label} · {detail}" if detail else label, nested=True, tags=model_tags) as child:
        print(f"[{label}] answering {len(rows)} prompts (max_tokens={max_tokens}, greedy) ...", flush=True)
        try:
            with output.bounded():  # MLflow's "Evaluating" bar has no switch: in a log, its last state
                result = genai_evaluate(label, data=data, predict_fn=predict, scorers=scorers,
                                        model_id=logged_model_id)
        except Exception:
            if not failures:
                raise
        finally:
            # One model in memory at a time: the next one loads only after this one's weights are
            # freed (the ONNX model's generation thread ends with it, see onnx_pyfunc.py).
            model = None  # predict, which refers to it, is not called again
            forget_last_code_model()
            gc.collect()
    if failures:  # the model refused a request (e.g. max_tokens beyond its context): the user's to fix
        raise UserError(f"the {label} model failed to answer: {failures[0]}")
    missing = [name for name in metric_names(scorers) if name not in result.metrics]
    if missing:
        raise RuntimeError(f"{label}: scorers produced no value for {', '.join(missing)}; see the traces of run "
                           f"{child.info.run_id}")
    ordered = [answers[json.dumps(row.messages)] for row in rows]
    return ModelScores(label, model_uri, child.info.run_id, dict(result.metrics), ordered)


def forget_last_code_model() -> None:
    """Drop MLflow's own reference to the last model loaded from code, so it can be freed.

    Loading a models-from-code model (phi3-onnx) leaves the model object in
    `mlflow.models.model.__mlflow_model__` until the next such load (mlflow/models/utils.py,
    `_load_model_code_path`); MLflow has no call to clear it.
    """
    mlflow.models.model.__mlflow_model__ = None


class Progress:
    """A line every settings.EVAL_PROGRESS_EVERY_S: rows answered and the time the rest should take."""

    def __init__(self, label: str, total: int):
        self.label, self.total, self.done = label, total, 0
        self.started = self.last_print = time.monotonic()

    def row_done(self) -> None:
        self.done += 1
        now = time.monotonic()
        if now - self.last_print >= settings.EVAL_PROGRESS_EVERY_S and self.done < self.total:
            self.last_print = now
            left = (now - self.started) / self.done * (self.total - self.done)
            print(f"[{self.label}] {self.done}/{self.total} prompts in {now - self.started:.0f} s, about "
                  f"{left:.0f} s left", flush=True)


# ---- the evaluate step: both models, the comparison, the champion -------------------------------

@dataclass(frozen=True)
class Outcome:
    scores: list[ModelScores]
    decision: registry.Decision


def _candidate(scores: ModelScores, version: ModelVersion) -> registry.Candidate:
    return registry.Candidate(scores.label, version, scores.metrics[settings.QUALITY_METRIC],
                              scores.metrics[settings.THROUGHPUT_METRIC])


def evaluate_and_promote(
    pipeline_run_id: str,
    onnx_run_id: str,
    data: EvalData,
    max_tokens: int,
    pipeline_model_name: str,
    onnx_model_name: str,
    tolerance: float,
    workdir: Path,
) -> Outcome:
    """Evaluate both runs' models on data, log the comparison, and move the champion alias by the rule.

    Runs inside the active (parent) run; each model's evaluation and traces go to a child run.
    """
    if max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, not {max_tokens}")
    if tolerance < 0:
        raise UserError(f"tolerance must be 0 or positive, not {tolerance}")
    pipeline = (None if pipeline_run_id == settings.NO_PIPELINE_RUN
                else registry.logged_model_of(pipeline_run_id, settings.PIPELINE_MODEL_NAME, "log_pipeline"))
    onnx = registry.logged_model_of(onnx_run_id, settings.ONNX_MODEL_NAME, "log_onnx_wrapper")
    upstream = (pipeline or onnx).run.data.tags
    mlflow.set_tags({
        settings.TAG_PIPELINE_RUN_ID: pipeline_run_id,
        settings.TAG_ONNX_RUN_ID: onnx_run_id,
        settings.TAG_PIPELINE_MODEL_ID: pipeline.model_id if pipeline else settings.NO_PIPELINE_RUN,
        settings.TAG_ONNX_MODEL_ID: onnx.model_id,
        settings.TAG_MODEL_ID: upstream.get(settings.TAG_MODEL_ID, ""),
        settings.TAG_REVISION: upstream.get(settings.TAG_REVISION, ""),
    })
    mlflow.log_params({"eval_rows": len(data.rows), "eval_data_sha256": data.digest})
    names = [pipeline_model_name, onnx_model_name]
    champion_before = registry.current_champion(names)  # read before this run registers anything

    # ONNX first: it refuses a max_tokens that does not fit the context at once, where transformers
    # would generate on. The pipeline then scores its agreement with the ONNX answers.
    onnx_scores = evaluate_model("onnx", onnx.uri, data.rows, max_tokens, logged_model_id=onnx.model_id,
                                 detail=onnx.run.data.params.get("precision", ""))
    scores, registered = [onnx_scores], [(onnx, onnx_model_name)]
    if pipeline is None:
        print("no pipeline model (a prebuilt ONNX source): the ONNX model is evaluated alone", flush=True)
    else:
        pipeline_scores = evaluate_model("pipeline", pipeline.uri, data.rows, max_tokens,
                                         logged_model_id=pipeline.model_id,
                                         peer_answers=onnx_scores.answers,
                                         detail=pipeline.run.data.tags.get(settings.TAG_DTYPE)
                                         or pipeline.run.data.params.get("dtype", ""))
        share_agreement(pipeline_scores, onnx_scores)
        scores.insert(0, pipeline_scores)
        registered.insert(0, (pipeline, pipeline_model_name))
    versions = [registry.register(model, name) for model, name in registered]
    candidates = [_candidate(s, v) for s, v in zip(scores, versions, strict=True)]

    decision, champion, compared = promote(candidates, champion_before, scores, data, max_tokens, tolerance, names)
    client = mlflow.MlflowClient()
    run = mlflow.active_run()
    mlflow.set_tag(settings.TAG_COMPARED_CHAMPION, registry.ref_of(compared))
    link_traces(scores, run.info.run_id)
    for version in versions:
        client.set_model_version_tag(version.name, version.version, settings.TAG_EVAL_RUN_ID, run.info.run_id)
        client.set_model_version_tag(version.name, version.version, settings.TAG_COMPARED_CHAMPION,
                                     registry.ref_of(compared))

    log_comparison(scores, candidates, champion, decision, workdir)
    describe(run.info, scores, candidates, champion, decision, compared, data)
    return Outcome(scores, decision)


def share_agreement(compared: ModelScores, peer: ModelScores) -> None:
    """Agreement is symmetric (identical answers, bag-of-words F1): the peer gets the same values, on
    its run too, so that comparing the two runs compares every metric."""
    client = mlflow.MlflowClient()
    for name in metric_names(AGREEMENT_SCORERS):
        peer.metrics[name] = compared.metrics[name]
        client.log_metric(peer.run_id, name, compared.metrics[name])


def measure_champion(held: ModelVersion | None, candidates: list[registry.Candidate], scores: list[ModelScores],
                     data: EvalData, max_tokens: int) -> registry.Candidate | None:
    """The champion as a candidate, measured in this evaluation: one of the candidates, or re-measured
    now on the same data and machine (its scores replace an earlier re-measure in scores)."""
    if held is None:
        return None
    champion = next((c for c in candidates if registry.same_version(c.version, held)), None)
    if champion is not None:
        return champion
    ref = registry.ref_of(held)
    measured = evaluate_model("champion", f"models:/{ref}", data.rows, max_tokens, detail=ref)
    scores[:] = [s for s in scores if s.label != "champion"] + [measured]
    return _candidate(measured, held)


def promote(candidates: list[registry.Candidate], champion_before: ModelVersion | None, scores: list[ModelScores],
            data: EvalData, max_tokens: int, tolerance: float, names: list[str],
            ) -> tuple[registry.Decision, registry.Candidate | None, ModelVersion | None]:
    """Decide against the champion and move the alias only if it still points there (compare-and-set);
    when another evaluation moved it meanwhile, measure the new champion and decide again.

    Returns the decision, the champion as measured, and the version it was (None: there was none).
    """
    expected = champion_before
    for _ in range(settings.PROMOTION_ATTEMPTS):
        champion = measure_champion(expected, candidates, scores, data, max_tokens)
        decision = registry.decide(candidates, champion, tolerance)
        try:
            registry.apply(decision, names, expected)
            return decision, champion, expected
        except registry.ChampionMoved as moved:
            time.sleep(random.uniform(0, settings.PROMOTION_RETRY_MAX_WAIT_S))
            expected = registry.current_champion(names)  # whoever holds it after the wait
            print(f"{moved}: measuring {registry.ref_of(expected)} and deciding again", flush=True)
    raise UserError(f"the champion alias moved {settings.PROMOTION_ATTEMPTS} times while this evaluation ran "
                    f"(now {registry.ref_of(registry.current_champion(names))}): nothing promoted, run it again")


def link_traces(scores: list[ModelScores], run_id: str) -> None:
    """Link every model's traces (logged in its child run) to the evaluate run, so its Traces tab lists them."""
    client = mlflow.MlflowClient()
    experiment_id = mlflow.active_run().info.experiment_id
    for s in scores:
        traces = mlflow.search_traces(locations=[experiment_id], run_id=s.run_id, return_type="list")
        ids = [t.info.trace_id for t in traces]
        for start in range(0, len(ids), 100):  # the tracking API links at most 100 per request
            client.link_traces_to_run(ids[start:start + 100], run_id)


def describe(run: mlflow.entities.RunInfo, scores: list[ModelScores], candidates: list[registry.Candidate],
             champion: registry.Candidate | None, decision: registry.Decision, compared: ModelVersion | None,
             data: EvalData) -> None:
    """The descriptions the MLflow UI shows: the evaluate run's, and each registered version's."""
    children = {s.label: (mlflow.MlflowClient().get_run(s.run_id).info.run_name, s.run_id) for s in scores}
    note = report.evaluation_note(
        run.experiment_id, decision.action, decision.reason, decision.champion.ref, registry.ref_of(compared),
        [c.ref for c in candidates], _table(scores, candidates, champion),
        {name: scores[0].metrics[name] for name in metric_names(AGREEMENT_SCORERS) if name in scores[0].metrics},
        children,
        f"{len(data.rows)} prompts from `{data.source}` (sha256 {data.digest[:12]})",
    )
    mlflow.set_tag(report.NOTE_TAG, note)
    client = mlflow.MlflowClient()
    for c, s in zip(candidates, scores, strict=False):  # scores may end with the re-measured champion's
        is_champion = registry.same_version(c.version, decision.champion.version)
        client.update_model_version(c.version.name, c.version.version, report.version_note(
            run.experiment_id, run.run_id, run.run_name, s.metrics, is_champion, decision.reason,
            registry.ref_of(compared)))


def _table(scores: list[ModelScores], candidates: list[registry.Candidate], champion: registry.Candidate | None):
    """The comparison table: one row per evaluated model, with its version and every quality and cost metric."""
    refs = {c.label: c.ref for c in candidates}
    if champion is not None:
        refs.setdefault("champion", champion.ref)
    return report.comparison_table([
        {"model": s.label, "version": refs[s.label],
         **{name: s.metrics[name] for name in metric_names(QUALITY_SCORERS + COST_SCORERS)}}
        for s in scores
    ])


def log_comparison(
    scores: list[ModelScores],
    candidates: list[registry.Candidate],
    champion: registry.Candidate | None,
    decision: registry.Decision,
    workdir: Path,
) -> None:
    """Metrics named `<model>/<scorer>/<aggregation>`, the tables, the charts and the decision."""
    for s in scores:
        mlflow.log_metrics({f"{s.label}/{name}": value for name, value in s.metrics.items()})
    compared = next((s.metrics for s in scores if "agreement_exact/mean" in s.metrics), None)
    if compared is not None:  # None: one model evaluated alone, nothing to agree with
        mlflow.log_metrics({
            "agreement/exact": compared["agreement_exact/mean"],
            "agreement/token_overlap": compared["agreement_token_overlap/mean"],
        })
    table = _table(scores, candidates, champion)
    mlflow.log_text(report.split_markdown(table), "comparison/comparison.md")
    mlflow.log_text(table.to_csv(), "comparison/comparison.csv")
    mlflow.log_artifact(str(report.speed_chart(table, workdir / "speed.png")), "comparison")
    mlflow.log_artifact(str(report.quality_chart(table, workdir / "quality.png")), "comparison")
    mlflow.set_tags({
        settings.TAG_CHAMPION: decision.champion.ref,
        settings.TAG_CHAMPION_DECISION: decision.action,
        settings.TAG_CHAMPION_REASON: decision.reason[:5000],  # tag values are limited in size
    })
    mlflow.log_dict({"action": decision.action, "champion": decision.champion.ref, "reason": decision.reason,
                     "rule": {"quality": settings.QUALITY_METRIC, "tie_break": settings.THROUGHPUT_METRIC}},
                    "comparison/decision.json")
    print(report.to_markdown(table), flush=True)
    print(f"champion: {decision.action}: {decision.reason}", flush=True)
