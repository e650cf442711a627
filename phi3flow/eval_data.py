"""The evaluation set: the bundled JSONL, or a user's JSONL, CSV or Parquet by path or artifact URI.

Every format holds the same fields: `prompt` (the user message), `reference` (the expected answer)
and, optionally, `system` (a system message). A malformed file is refused with its line or column.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from phi3flow import settings
from phi3flow.errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FORMATS = (".jsonl", ".csv", ".parquet")
FIELDS = (settings.EVAL_PROMPT_COLUMN, settings.EVAL_REFERENCE_COLUMN)


@dataclass(frozen=True)
class EvalRow:
    prompt: str
    reference: str
    system: str | None = None

    @property
    def messages(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class EvalData:
    rows: list[EvalRow]
    source: str  # what the user passed
    digest: str  # sha256 of the file: tells whether two evaluations used the same set


def _local_file(source: str, workdir: Path) -> Path:
    """The file behind source: the bundled set, a local path, or an artifact URI downloaded."""
    if source == settings.BUNDLED_EVAL_DATA:
        return PROJECT_ROOT / settings.BUNDLED_EVAL_FILE
    scheme = urlparse(source).scheme
    if len(scheme) > 1 and scheme != "file":  # runs:/, models:/, s3://, http(s)://, ... (not C:\)
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(workdir)))
        except (MlflowException, OSError) as exc:
            raise UserError(f"cannot download eval_data '{source}': {str(exc).splitlines()[0]}") from None
    path = Path(urlparse(source).path if scheme == "file" else source).expanduser()
    if not path.is_file():
        raise UserError(f"eval_data '{source}' is not a file")
    return path


def _text(value: object, where: str, field: str, required: bool) -> str | None:
    if value is None or (isinstance(value, float) and value != value):  # absent, or NaN from pandas
        value = None
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise UserError(f"{where}: '{field}' is missing or empty")
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: '{field}' must be a string, got {type(value).__name__}")
    return value


def _row(record: dict, where: str) -> EvalRow:
    return EvalRow(
        prompt=_text(record.get(settings.EVAL_PROMPT_COLUMN), where, settings.EVAL_PROMPT_COLUMN, True),
        reference=_text(record.get(settings.EVAL_REFERENCE_COLUMN), where, settings.EVAL_REFERENCE_COLUMN, True),
        system=_text(record.get(settings.EVAL_SYSTEM_COLUMN), where, settings.EVAL_SYSTEM_COLUMN, False),
    )


def _read_jsonl(path: Path) -> list[EvalRow]:
    rows = []
    # Bytes, split at line ends only: a file in another encoding, or no text at all, is refused at its
    # first bad line, and a U+2028 inside a JSON string does not end a line.
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        where = f"{path.name} line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UserError(f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                            "save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise UserError(f"{where}: not valid JSON (nested too deeply)") from None
        if not isinstance(record, dict):
            raise UserError(f"{where}: expected an object with '{FIELDS[0]}' and '{FIELDS[1]}'")
        rows.append(_row(record, where))
    return rows


def _read_table(path: Path) -> list[EvalRow]:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False) if path.suffix == ".csv" else pd.read_parquet(path)
    except Exception as exc:  # pandas and pyarrow raise many types for unreadable files
        raise UserError(f"{path.name}: cannot read it as {path.suffix[1:]} ({str(exc).splitlines()[0]})") from None
    missing = [field for field in FIELDS if field not in frame.columns]
    if missing:
        raise UserError(f"{path.name}: missing column '{missing[0]}' "
                        f"(columns are {', '.join(map(str, frame.columns))})")
    # CSV: name the file line (the header is line 1); Parquet: the row number.
    where = "line {}" if path.suffix == ".csv" else "row {}"
    offset = 2 if path.suffix == ".csv" else 1
    return [_row(record, f"{path.name} {where.format(i + offset)}")
            for i, record in enumerate(frame.to_dict(orient="records"))]


def load_eval_data(source: str, workdir: Path, max_rows: int = settings.EVAL_MAX_ROWS) -> EvalData:
    """The rows of source; a set of more than max_rows rows is refused (each row is a request to each model)."""
    if max_rows < 1:
        raise UserError(f"max_rows must be at least 1, not {max_rows}")
    path = _local_file(source, workdir)
    if path.suffix not in FORMATS:
        raise UserError(f"eval_data must be a {', '.join(FORMATS)} file, not '{path.name}'")
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_table(path)
    if not rows:
        raise UserError(f"eval_data '{source}' holds no rows")
    if len(rows) > max_rows:
        raise UserError(f"eval_data '{source}' holds {len(rows)} rows, more than max_rows={max_rows}: "
                        "evaluate a sample of it, or raise max_rows (each row is one request to each model)")
    return EvalData(rows=rows, source=source, digest=hashlib.sha256(path.read_bytes()).hexdigest())
