"""batch_score: score a file of chat requests (or prompts) with a logged model on Spark.

Why not `mlflow.pyfunc.spark_udf`: it binds columns by signature order, needs an explicit struct
result type for the chat pyfunc, cannot feed the transformers chat model (messages arrive as numpy
arrays) and fails the whole task on one bad row. Here a `mapInPandas` function loads the pyfunc
once per Python worker (Spark reuses its workers across tasks), turns each row into a request and
catches errors per row, so one output row comes back for every input row, with an `error` column.

The driver downloads the model once and hands the folder to the executors (its local path on a
`local[...]` master, `SparkContext.addFile` on a cluster), so executors need the model's Python
environment but no access to the tracking server.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from phi3flow import settings
from phi3flow.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FORMATS = (".jsonl", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
NUMBER_FIELDS = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int}
CHAT_FIELDS = {"messages", "stop", *NUMBER_FIELDS}
PROMPT_FIELD = "prompt"
OUTPUT_COLUMNS = ("answer", "completion", "completion_tokens", "error")
OUTPUT_SCHEMA = "answer string, completion string, completion_tokens long, error string"
LINE_COLUMN = "_phi3_line"  # JSONL: the raw line, parsed in the worker so JSON types stay exact


class RowError(ValueError):
    """A row that cannot be a request: reported in its `error` column."""


@dataclass(frozen=True)
class BatchResult:
    rows: int
    errors: int
    completion_tokens: int
    seconds: float
    model_loads: int  # how many Python workers loaded the model
    output_dir: Path

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0


# ---- rows to requests (runs in the Python workers) -----------------------------------------------


def _plain(value: Any) -> Any:
    """Arrow hands nested columns to pandas as numpy arrays and numpy scalars: make them JSON-like."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Any, name: str, kind: type) -> int | float:
    if isinstance(value, str):  # CSV cells are text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(f"'{name}' must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowError(f"'{name}' must be a finite number, got {value!r}")
    if kind is int:
        if value != int(value):
            raise RowError(f"'{name}' must be a whole number, got {value}")
        return int(value)
    return float(value)


def _messages(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str):  # CSV (and Parquet written from CSV): the messages as a JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise RowError(f"'messages' is not valid JSON ({exc.msg})") from None
    if not isinstance(value, list) or not value:
        raise RowError("'messages' must be a non-empty list of {role, content} objects")
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(f"messages[{i}] must be an object with 'role' and 'content'")
        if message.get("role") not in ROLES:
            raise RowError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise RowError(f"messages[{i}].content must be a string, got {type(message.get('content')).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def chat_request(row: dict[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """The llm/v1/chat request of one row, checked the same way for both flavors.

    Checked here rather than left to the model: the transformers flavor's chat template drops
    unknown roles silently and transformers treats a negative max_new_tokens as "no limit".
    """
    request: dict[str, Any] = {"messages": _messages(row.get("messages"))}
    for name, kind in NUMBER_FIELDS.items():
        if not _absent(row.get(name)):
            request[name] = _number(row[name], name, kind)
    request.setdefault("max_tokens", default_max_tokens)
    if request["max_tokens"] < 1:
        raise RowError(f"'max_tokens' must be at least 1, got {request['max_tokens']}")
    if not _absent(row.get("stop")):
        request["stop"] = row["stop"]
    return request


def prompt_params(row: dict[str, Any], default_max_tokens: int) -> tuple[str, dict[str, Any]]:
    """A prompt-interface row: its prompt and its decoding options (passed as params)."""
    prompt = row.get(PROMPT_FIELD)
    if _absent(prompt) or prompt == "":
        raise RowError("'prompt' is missing or empty")
    if not isinstance(prompt, str):
        raise RowError(f"'prompt' must be a string, got {type(prompt).__name__}")
    params = {name: _number(row[name], name, kind) for name, kind in NUMBER_FIELDS.items()
              if not _absent(row.get(name))}
    params.setdefault("max_tokens", default_max_tokens)
    if params["max_tokens"] < 1:
        raise RowError(f"'max_tokens' must be at least 1, got {params['max_tokens']}")
    return prompt, params


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, (RowError, MlflowException)) else text


def score_row(model: Any, row: dict[str, Any], interface: str,
              default_max_tokens: int) -> tuple[str | None, str | None, int | None, str | None]:
    """(answer, completion JSON, completion tokens, error) of one row; never raises for a bad row."""
    try:
        if LINE_COLUMN in row:
            try:
                row = json.loads(row[LINE_COLUMN])
            except json.JSONDecodeError as exc:
                raise RowError(f"not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise RowError("a JSONL line must be an object")
        if interface == "prompt":
            prompt, params = prompt_params(row, default_max_tokens)
            answer = model.predict([{PROMPT_FIELD: prompt}], params=params)[0]
            return answer, json.dumps(answer), None, None
        completion = _plain(model.predict(chat_request(row, default_max_tokens)))[0]
        answer = completion["choices"][0]["message"]["content"]
        return answer, json.dumps(completion), int(completion["usage"]["completion_tokens"]), None
    except Exception as exc:  # a bad row must never fail the job: report it in its row
        return None, None, None, _one_line(exc)


# One loaded model per Python worker process, by folder: Spark reuses workers across tasks.
_LOADED: dict[str, Any] = {}


def _model(folder: str, on_load: Any) -> Any:
    if folder not in _LOADED:
        _LOADED.clear()  # a reused worker keeps one model: the previous job's is not needed again
        _LOADED[folder] = mlflow.pyfunc.load_model(folder)
        on_load.add(1)
    return _LOADED[folder]


def _scorer(model_ref: str, distributed: bool, interface: str, default_max_tokens: int, loads: Any):
    """The mapInPandas function: every input column, plus the output columns."""

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from pyspark import SparkFiles

        model = _model(SparkFiles.get(model_ref) if distributed else model_ref, loads)
        for batch in batches:
            records = [{k: _plain(v) for k, v in record.items()} for record in batch.to_dict(orient="records")]
            scored = [score_row(model, record, interface, default_max_tokens) for record in records]
            out = batch.drop(columns=[LINE_COLUMN], errors="ignore")
            for i, name in enumerate(OUTPUT_COLUMNS):
                out[name] = pd.Series([s[i] for s in scored], index=batch.index,
                                      dtype="Int64" if name == "completion_tokens" else object)
            yield out

    return score


# ---- the driver -------------------------------------------------------------------------------


def _local_input(input_path: str, workdir: Path) -> Path:
    """A local path, or an artifact URI (runs:/, models:/, s3://, ...) downloaded to workdir."""
    scheme = urlparse(input_path).scheme
    if len(scheme) > 1 and scheme != "file":
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=input_path, dst_path=str(workdir)))
        except (MlflowException, OSError) as exc:
            raise UserError(f"cannot download input_path '{input_path}': {str(exc).splitlines()[0]}") from None
    path = Path(urlparse(input_path).path if scheme == "file" else input_path).expanduser().resolve()
    if not path.exists():
        raise UserError(f"input_path '{input_path}' does not exist")
    return path


def input_format(path: Path) -> str:
    """.jsonl, .csv or .parquet: of the file, or of the files in a folder (a Spark or pandas dataset)."""
    suffixes = {path.suffix} if path.is_file() else {p.suffix for p in path.iterdir()
                                                     if p.is_file() and not p.name.startswith(("_", "."))}
    if len(suffixes) != 1 or not suffixes <= set(FORMATS):
        raise UserError(f"input_path must be a {', '.join(FORMATS)} file (or a folder of them), not '{path.name}' "
                        f"({', '.join(sorted(suffixes)) or 'no files'})")
    return suffixes.pop()


def model_interface(model_uri: str) -> str:
    """'prompt' if the model's signature takes a `prompt` column, else 'chat'; a bad URI is a UserError."""
    try:
        info = mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as exc:
        raise UserError(f"cannot find model '{model_uri}': {str(exc).splitlines()[0]}") from None
    inputs = info.signature.inputs.input_names() if info.signature and info.signature.inputs else []
    return "prompt" if PROMPT_FIELD in inputs else "chat"


def spark_session(master: str, app_name: str = "phi3flow-batch_score"):
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.master(master).appName(app_name)
    if master.startswith("local"):
        # Workers run this very interpreter; nothing listens beyond the loopback, no UI port to collide.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        builder = (builder.config("spark.driver.bindAddress", "127.0.0.1").config("spark.driver.host", "127.0.0.1")
                   .config("spark.ui.enabled", "false"))
    # The step prints its own progress lines; Spark's console bar would interleave with them.
    builder = builder.config("spark.ui.showConsoleProgress", "false")
    try:
        spark = builder.getOrCreate()
    except Exception as exc:  # py4j / JVM start-up errors: a bad master URL, no Java
        raise UserError(f"cannot start Spark with master '{master}': {str(exc).splitlines()[0]}") from None
    spark.sparkContext.setLogLevel("WARN")
    return spark


def read_input(spark, path: Path, fmt: str):
    """A DataFrame of the input rows. JSONL keeps each raw line too, so JSON types reach the row checks
    exactly (Spark's JSON reader turns a number into a string where the column's inferred type is string)."""
    from pyspark.sql import functions as F

    if fmt == ".jsonl":
        lines = spark.read.text(str(path)).where(F.trim("value") != "")
        schema = spark.read.json(str(path)).schema  # the columns as Spark infers them, kept in the output
        schema_fields = [f for f in schema.fields if f.name != "_corrupt_record"]
        if not schema_fields:
            return lines.withColumnRenamed("value", LINE_COLUMN)
        from pyspark.sql.types import StructType

        parsed = F.from_json("value", StructType(schema_fields))
        return lines.select(parsed.alias("r"), F.col("value").alias(LINE_COLUMN)).select("r.*", LINE_COLUMN)
    if fmt == ".csv":
        return spark.read.csv(str(path), header=True, multiLine=True, escape='"')
    return spark.read.parquet(str(path))


def _progress(spark, stop: threading.Event, total_tasks_hint: int) -> None:
    """Print a progress line whenever the share of finished tasks changes (every few seconds)."""
    tracker = spark.sparkContext.statusTracker()
    last = None
    while not stop.wait(settings.BATCH_PROGRESS_EVERY_S):
        stages = [tracker.getStageInfo(s) for s in tracker.getActiveStageIds()]
        done = sum(s.numCompletedTasks for s in stages if s)
        total = sum(s.numTasks for s in stages if s) or total_tasks_hint
        if stages and (done, total) != last:
            last = (done, total)
            print(f"progress: {done}/{total} partitions scored", flush=True)


def batch_score(model_uri: str, input_path: str, spark_master: str, max_tokens: int, workdir: Path,
                spark=None) -> BatchResult:
    """Score every row of input_path with model_uri on Spark; the predictions go to workdir/predictions.

    spark: an open session to use (and leave open); by default one is started on spark_master and stopped.
    """
    if max_tokens < 1:
        raise UserError(f"max_tokens must be at least 1, got {max_tokens}")
    path = _local_input(input_path, workdir / "input")
    fmt = input_format(path)
    interface = model_interface(model_uri)
    own_session = spark is None
    spark = spark_session(spark_master) if own_session else spark
    spark_master = spark.sparkContext.master
    try:
        frame = read_input(spark, path, fmt)
        needed = PROMPT_FIELD if interface == "prompt" else "messages"
        if fmt != ".jsonl" and needed not in frame.columns:
            raise UserError(f"input_path has no '{needed}' column (columns are {', '.join(frame.columns)}); the "
                            f"model's interface is {interface}")
        if clash := sorted(set(frame.columns) & set(OUTPUT_COLUMNS)):
            raise UserError(f"input column(s) {', '.join(clash)} would be overwritten by the output; rename them")
        rows = frame.count()
        if rows == 0:
            raise UserError(f"input_path '{input_path}' holds no rows")
        partitions = max(spark.sparkContext.defaultParallelism, math.ceil(rows / settings.BATCH_ROWS_PER_PARTITION))
        frame = frame.repartition(partitions)

        # The model: downloaded once here, then handed to the workers.
        model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(workdir / "model")))
        distributed = not spark_master.startswith("local")
        if distributed:
            spark.sparkContext.addFile(str(model_dir), recursive=True)
            # The workers import this module (the scoring function lives here): ship the package.
            package = shutil.make_archive(str(workdir / "phi3flow"), "zip", root_dir=PROJECT_ROOT, base_dir="phi3flow")
            spark.sparkContext.addPyFile(package)
        model_ref = model_dir.name if distributed else str(model_dir)
        loads = spark.sparkContext.accumulator(0)

        output_schema = ", ".join(f"`{f.name}` {f.dataType.simpleString()}" for f in frame.schema.fields
                                  if f.name != LINE_COLUMN)
        output_schema = f"{output_schema}, {OUTPUT_SCHEMA}" if output_schema else OUTPUT_SCHEMA
        scored = frame.mapInPandas(_scorer(model_ref, distributed, interface, max_tokens, loads), schema=output_schema)

        output_dir = workdir / "predictions"
        print(f"scoring {rows} rows ({interface} interface) in {partitions} partitions on {spark_master} ...",
              flush=True)
        stop = threading.Event()
        progress = threading.Thread(target=_progress, args=(spark, stop, partitions), daemon=True)
        progress.start()
        start = time.monotonic()
        try:
            scored.write.parquet(str(output_dir))
        finally:
            stop.set()
            progress.join()
        seconds = time.monotonic() - start
        print(f"progress: {partitions}/{partitions} partitions scored; the model was loaded {loads.value} time(s)",
              flush=True)

        from pyspark.sql import functions as F

        totals = spark.read.parquet(str(output_dir)).agg(
            F.count("*").alias("rows"), F.count("error").alias("errors"), F.sum("completion_tokens").alias("tokens")
        ).first()
    finally:
        if own_session:
            spark.stop()
    for crc in output_dir.glob(".*.crc"):  # Hadoop's checksums: noise in the artifacts
        crc.unlink()
    shutil.rmtree(workdir / "model", ignore_errors=True)
    return BatchResult(totals["rows"], totals["errors"], int(totals["tokens"] or 0), seconds, loads.value, output_dir)
