"""Shared fixtures: a temporary tracking store, `mlflow run` as users call it, the tiny model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow_cli
import pytest

from phi3flow import settings

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's `mlflow` and `python`


@dataclass
class StepResult:
    returncode: int
    stdout: str
    stderr: str
    run_id: str | None

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]


def step_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # `--env-manager local` runs `python` from PATH: make it this environment's.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    # The steps' local cache of fetched model files: a temporary one, never the user's (tracking_uri
    # sets the session's, for steps run in-process too).
    env.setdefault("PHI3FLOW_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"phi3flow-test-cache-{os.getpid()}"))
    env.update(extra)
    return env


def mlflow_run(entry_point: str, params: dict[str, str], tracking_uri: str, timeout: float = 900,
               project: Path = REPO, cwd: Path | None = None, **env: str) -> StepResult:
    """`mlflow run . -e ENTRY -P k=v --env-manager local`, exactly as a user types it (from cwd), in a
    process forked with MLflow's command line already imported (tests/mlflow_cli.py)."""
    argv = ["run", str(project), "-e", entry_point, "--env-manager", "local"]
    for key, value in params.items():
        argv += ["-P", f"{key}={value}"]
    proc = mlflow_cli.run(argv, step_env(tracking_uri, **env), cwd, timeout)
    found = re.search(r"Run \(ID '([0-9a-f]+)'\)", proc.stderr)
    return StepResult(proc.returncode, proc.stdout, proc.stderr, found.group(1) if found else None)


def assert_ok(result: StepResult) -> str:
    assert result.returncode == 0, f"step failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert result.run_id
    return result.run_id


def assert_failed_with(result: StepResult, message: str) -> None:
    """A user mistake: non-zero exit, exactly one `error:` line holding message, no traceback, a FAILED run."""
    assert result.returncode != 0
    assert len(result.error_lines) == 1, result.stderr
    assert message in result.error_lines[0]
    assert "Traceback" not in result.stderr
    assert mlflow.MlflowClient().get_run(result.run_id).info.status == "FAILED"


def run_seconds(run_id: str) -> float:
    """How long a step's run lasted as MLflow recorded it: from `mlflow run` creating it to the step ending
    it, so the CLI's own start (seconds of imports, more with other tests running beside) is left out."""
    info = mlflow.MlflowClient().get_run(run_id).info
    return (info.end_time - info.start_time) / 1000


def wait_for(what: str, found: Callable[[], object], timeout: float = 300) -> object:
    """Poll found() until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := found():
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules marked `long` first, each keeping pytest-randomly's shuffled order (it has run by now).

    pytest-xdist gives each worker whole files in this order (`--no-loadscope-reorder` in pyproject.toml;
    by default it hands out the files with the most tests first): a module of several minutes started
    last would leave the other workers idle while it runs alone.
    """
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(scope="session")
def tracking_uri(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("tracking")
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    # sqlite's default artifact root is ./mlruns of the current directory: keep it in the temp dir.
    experiment_id = mlflow.create_experiment("tests", artifact_location=str(root / "artifacts"))
    mlflow.set_experiment(experiment_id=experiment_id)
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id  # for `mlflow run` and fresh processes
    # the steps' cache of fetched files, in-process and in `mlflow run`
    os.environ["PHI3FLOW_CACHE_DIR"] = str(root / "cache")
    return uri


@pytest.fixture(scope="session")
def tracking_server(tracking_uri, tmp_path_factory):
    """A real `mlflow server` on the session's tracking store, as a team's tracking server: what machines
    without a shared lock talk to, and what a stopped client cannot lock (a process stopped inside a
    sqlite transaction of its own would lock the store for every other process)."""
    from servers import MlflowServer  # servers imports this module

    with MlflowServer(tmp_path_factory.mktemp("server"), tracking_uri) as running:
        yield running


@pytest.fixture(scope="session")
def fetch_run_id(tracking_uri: str) -> str:
    """One fetch_model run of builtin:tiny-phi3, shared by the tests that build on it."""
    return assert_ok(mlflow_run("fetch_model", {"model_id": "builtin:tiny-phi3"}, tracking_uri))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from phi3flow import tiny

    return tiny.build(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_onnx_fp32(tiny_dir: Path, tmp_path_factory) -> Path:
    from phi3flow.onnx_convert import convert

    return convert(tiny_dir, tmp_path_factory.mktemp("onnx") / "fp32", precision="fp32")


def bundled_rows(path: Path, rows: int) -> str:
    """The first rows of the bundled evaluation set written to path: evaluate's cost grows with every row."""
    lines = (REPO / settings.BUNDLED_EVAL_FILE).read_text().splitlines()[:rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def model_uri_of(result: StepResult) -> str:
    """The models:/ URI a logging step prints on its last line."""
    found = re.search(r"(models:/\S+)", result.stdout)
    assert found, result.stdout
    return found.group(1)


def in_fresh_process(code: str, tracking_uri: str) -> object:
    """Run code in a new Python process; it prints one JSON document as its last line."""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
        env=step_env(tracking_uri, HF_HUB_OFFLINE="1"), cwd="/", stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ask_champion(tracking_uri: str, name: str) -> None:
    """A process in another directory loads `models:/NAME@champion` through tracking_uri (a server:
    the model is downloaded afresh through it) and asks it the seed question."""
    answer = in_fresh_process(
        f"""
import json, mlflow
model = mlflow.pyfunc.load_model("models:/{name}@{settings.CHAMPION_ALIAS}")
print(json.dumps(model.predict({{"messages": [{{"role": "user", "content": "{settings.SEED_QUESTION}"}}], """
        '"max_tokens": 8})))\n',
        tracking_uri,
    )
    assert answer[0]["object"] == "chat.completion"
    assert answer[0]["model"] == settings.BUILTIN_TINY
    assert 1 <= answer[0]["usage"]["completion_tokens"] <= 8


def succeeded(entry_point: str, params: dict[str, str], tracking_uri: str) -> StepResult:
    """A step run the tests build on: it must succeed."""
    result = mlflow_run(entry_point, params, tracking_uri)
    assert_ok(result)
    return result


# The logged models the tests share, each logged once per test process.
@pytest.fixture(scope="session")
def pipeline_run(fetch_run_id: str, tracking_uri: str) -> StepResult:
    # float32: the fp32 ONNX model answers token for token like it (the tiny checkpoint is bf16)
    return succeeded("log_pipeline", {"fetch_run_id": fetch_run_id, "dtype": "float32",
                                      "registered_model_name": "phi3-pipeline-test"}, tracking_uri)


@pytest.fixture(scope="session")
def onnx_fp32_run(fetch_run_id: str, tracking_uri: str) -> StepResult:
    return succeeded("log_onnx_wrapper", {"fetch_run_id": fetch_run_id, "precision": "fp32"}, tracking_uri)


@pytest.fixture(scope="session")
def pipeline_auto_run(fetch_run_id: str, tracking_uri: str) -> StepResult:
    """The default dtype (the tiny checkpoint's own bfloat16), sampling by default: it answers differently
    from the float32 one."""
    return succeeded("log_pipeline", {"fetch_run_id": fetch_run_id, "sampling": "true"}, tracking_uri)


@pytest.fixture(scope="session")
def onnx_int4_run(fetch_run_id: str, tracking_uri: str) -> StepResult:
    """The default precision (int4), in blocks of 128."""
    return succeeded("log_onnx_wrapper", {"fetch_run_id": fetch_run_id, "int4_block_size": "128"}, tracking_uri)


@pytest.fixture(scope="session")
def onnx_prompt_run(fetch_run_id: str, tracking_uri: str) -> StepResult:
    """fp32 with the prompt interface (the seed's {"prompt": ...} requests), registered."""
    return succeeded("log_onnx_wrapper", {"fetch_run_id": fetch_run_id, "precision": "fp32", "interface": "prompt",
                                          "registered_model_name": "phi3-onnx-prompt-test"}, tracking_uri)


@pytest.fixture(scope="session")
def onnx_fp32_model(onnx_fp32_run: StepResult):
    return mlflow.pyfunc.load_model(model_uri_of(onnx_fp32_run))


def invoke_step(command, args: list[str]) -> tuple[BaseException | None, mlflow.entities.Run]:
    """A step's click command run in-process (its error checked without starting `mlflow run`): the
    exception it ended with and the run it opened."""
    from click.testing import CliRunner

    result = CliRunner().invoke(command, args)
    return result.exception, mlflow.MlflowClient().get_run(mlflow.last_active_run().info.run_id)


def assert_step_fails_with(command, args: list[str], message: str) -> None:
    """The in-process twin of assert_failed_with: the step's click command ends with a UserError (the
    one line `run_step` prints) holding message, and the run it opened is FAILED. Each step keeps one
    real `mlflow run` case for the exit status and the printed line; the other messages are checked
    here, in seconds."""
    from phi3flow.errors import UserError

    error, run = invoke_step(command, args)
    assert isinstance(error, UserError), error
    assert message in str(error)
    assert "\n" not in str(error)
    assert run.info.status == "FAILED"
