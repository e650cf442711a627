"""Killed processes and tracking-server outages: one main at a time for real, no stragglers, one line.

The kills are real signals to real `mlflow run` processes; the outage is a real `mlflow server`
stopped while a step works. docs/reliability.md lists what is guaranteed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import mlflow_cli
import pytest
from conftest import REPO, StepResult, assert_failed_with, mlflow_run, step_env, wait_for
from servers import MlflowServer

from phi3flow import chain, settings, step_process
from phi3flow.errors import UserError, outage_message

SCRIPT = REPO / "scripts" / "scheduled_run.sh"


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


def _ended(pid: int) -> bool:
    """Gone or a zombie: either way it holds no lock and does no work."""
    return not step_process._alive(pid)


def _step_pid(experiment_id: str, entry_point: str) -> int:
    """The process of the RUNNING entry_point run, once it has recorded itself as the run's owner."""
    client = mlflow.MlflowClient()

    def owner() -> str | None:
        runs = client.search_runs([experiment_id], f"tags.`mlflow.project.entryPoint` = '{entry_point}' and "
                                                   "attributes.status = 'RUNNING'",
                                  max_results=1)
        return runs[0].data.tags.get(settings.TAG_OWNER) if runs else None

    return int(wait_for(f"the {entry_point} step at work", owner).rpartition(":")[2])


def _newest_run(experiment_id: str, entry_point: str) -> mlflow.entities.Run:
    return mlflow.MlflowClient().search_runs([experiment_id], f"tags.`mlflow.project.entryPoint` = '{entry_point}'",
                                             order_by=["attributes.start_time DESC"], max_results=1)[0]


@pytest.fixture
def experiment_id(tracking_uri, tmp_path, request) -> str:
    """An experiment of its own: main's lock is per tracking server and experiment. (Named after the test:
    a passing test's tmp_path is removed at once, so its numbered name comes back.)"""
    return mlflow.create_experiment(f"reliability-{request.node.name}", artifact_location=str(tmp_path / "artifacts"))


def test_a_killed_scheduled_run_keeps_the_lock_until_all_of_it_has_ended(experiment_id, tracking_server, tmp_path):
    # Through a tracking server: the step is stopped wherever it is, inside a request included.
    env = step_env(tracking_server.url, MLFLOW_EXPERIMENT_ID=experiment_id, PHI3FLOW_LOG_DIR=str(tmp_path / "logs"),
                   PHI3FLOW_TMP_ROOT=str(tmp_path / "tmp"))

    def scheduled(model_id: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), "-P", f"model_id={model_id}"], env=env, capture_output=True,
                              text=True, timeout=600, stdin=subprocess.DEVNULL)

    first = subprocess.Popen(["bash", str(SCRIPT), "-P", f"model_id={settings.BUILTIN_TINY}"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    step = _step_pid(experiment_id, "fetch_model")
    main = _parent(step)  # MLflow's `bash -c` execs the step's command: its parent is main
    cli = _parent(main)
    assert _parent(cli) == first.pid and "mlflow" in Path(f"/proc/{cli}/cmdline").read_text()
    first_main = _newest_run(experiment_id, "main").info.run_id
    os.kill(step, signal.SIGSTOP)  # the step stays at work whatever it is sent, like a long write would
    try:
        os.kill(cli, signal.SIGKILL)  # a scheduler's timeout or the OOM killer picks the CLI
        first.wait(timeout=60)  # the script ends with its CLI, and its own lock with it
        second = scheduled(settings.BUILTIN_TINY)
        print(second.stderr)
        assert second.returncode == 75, second.stderr
        assert "error: another run of main is in progress" in second.stderr
        os.kill(main, signal.SIGKILL)  # main gone as well: the step alone still holds the lock
        wait_for("main to end", lambda: _ended(main), 60)
        third = scheduled(settings.BUILTIN_TINY)
        assert third.returncode == 75, third.stderr
    finally:
        os.kill(step, signal.SIGCONT)
    wait_for("the step to end", lambda: _ended(step), 120)  # main's SIGTERM and its death signal stop it
    # Nothing of the first run is left: the next run starts (and fails at once on a missing model folder).
    fourth = scheduled("/nonexistent/phi3")
    assert fourth.returncode == 1, fourth.stderr
    assert "error: local model folder '/nonexistent/phi3' does not exist" in fourth.stderr
    client = mlflow.MlflowClient()
    assert client.get_run(first_main).info.status == "KILLED"  # the sweep of the fourth run
    assert client.get_run(_newest_run(experiment_id, "fetch_model").info.run_id).info.status == "FAILED"


# Where a SIGTERM can land in a step: the body of a step's click command, run by run_step.
INTERRUPTS = {
    # while the step resumes the run `mlflow run` made for it, before its `with mlflow.start_run()`
    "before the run context": "raise KeyboardInterrupt  # what the step's SIGTERM handler raises",
    # inside start_run itself, which has already taken MLFLOW_RUN_ID out of the environment
    "while start_run resumes the run": """
    get_run = mlflow.MlflowClient.get_run
    def interrupted(self, run_id):
        mlflow.MlflowClient.get_run = get_run
        raise KeyboardInterrupt
    mlflow.MlflowClient.get_run = interrupted
    with mlflow.start_run():
        time.sleep(600)""",
    # inside a weakref callback (SQLAlchemy's, during garbage collection), where Python ignores exceptions
    "inside a weakref callback": """
    class Thing: pass
    def callback(ref):
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(100_000))  # the handler runs here, and its KeyboardInterrupt is "ignored"
    thing = Thing()
    ref = weakref.ref(thing, callback)
    with mlflow.start_run():
        del thing
        time.sleep(600)  # a step at work""",
}


@pytest.mark.parametrize("where", INTERRUPTS)
def test_an_interrupt_anywhere_in_a_step_ends_its_run_failed_with_one_line(where, experiment_id, tracking_uri):
    """A SIGTERM ends the step and its run FAILED with run_step's one line (not click's "Aborted!"), wherever
    it lands: before the step's `with mlflow.start_run()`, inside it, or where Python drops exceptions."""
    client = mlflow.MlflowClient()
    run_id = client.create_run(experiment_id).info.run_id
    code = ("import os, signal, time, weakref\nimport click, mlflow\nfrom phi3flow.errors import run_step\n"
            f"@click.command()\ndef main():\n    {INTERRUPTS[where].strip()}\nrun_step(main)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=step_env(tracking_uri, MLFLOW_RUN_ID=run_id, PYTHONPATH=str(REPO)),
                          stdin=subprocess.DEVNULL)
    assert time.monotonic() - start < 120, "the step worked on after the interrupt"
    result = StepResult(proc.returncode, proc.stdout, proc.stderr, run_id)
    assert result.returncode == 1, result.stderr
    assert [line.startswith("error: interrupted") for line in result.error_lines] == [True], result.stderr
    assert "Aborted" not in result.stderr and "Traceback" not in result.stderr
    assert "Exception ignored" not in result.stderr
    assert client.get_run(run_id).info.status == "FAILED"


def test_a_step_stops_with_its_cli_and_a_hard_kill_is_swept(experiment_id, tracking_uri, tmp_path):
    tmp_root = tmp_path / "tmp"
    env = step_env(tracking_uri, MLFLOW_EXPERIMENT_ID=experiment_id, PHI3FLOW_TMP_ROOT=str(tmp_root))
    argv = ["run", str(REPO), "-e", "fetch_model", "--env-manager", "local", "-P", f"model_id={settings.BUILTIN_TINY}"]
    client = mlflow.MlflowClient()

    def start() -> tuple[mlflow_cli.Spawned, int]:
        cli = mlflow_cli.spawn(argv, tmp_path / "cli.log", env, REPO)
        return cli, _step_pid(experiment_id, "fetch_model")

    # SIGTERM to the CLI alone (`kill <pid>` of `mlflow run`): the step stops too and ends its run FAILED.
    cli, step = start()
    stopped = _newest_run(experiment_id, "fetch_model").info.run_id
    cli.terminate()
    cli.wait(timeout=60)
    wait_for("the step to stop with its CLI", lambda: _ended(step), 120)
    wait_for("its run to end", lambda: client.get_run(stopped).info.status == "FAILED", 60)
    # SIGKILL to the CLI and the step: the run is left RUNNING with its owner, and so is its temporary folder ...
    cli, step = start()
    killed = _newest_run(experiment_id, "fetch_model").info.run_id
    folder = tmp_root / f"{socket.gethostname()}-{step}"
    assert folder.is_dir()
    os.killpg(cli.pid, signal.SIGKILL)
    cli.wait(timeout=60)
    wait_for("the step to end", lambda: _ended(step), 60)
    assert client.get_run(killed).info.status == "RUNNING"
    # ... until the next main's sweep (a step started by hand included) and the next run's clean-up.
    assert chain.mark_stale_runs(client, experiment_id) == [killed]
    assert client.get_run(killed).info.status == "KILLED"
    assert step_process.remove_dead_tmp(tmp_root) == [folder] and not folder.exists()


def test_a_tracking_server_outage_ends_a_step_with_one_line(tmp_path):
    """The server stops while fetch_model builds the model: the upload fails after bounded retries."""
    (tmp_path / "server").mkdir()
    with MlflowServer(tmp_path / "server", f"sqlite:///{tmp_path}/server.db") as server:
        experiment_id = mlflow.MlflowClient(server.url).create_experiment("outage")
        env = {**step_env(server.url, MLFLOW_EXPERIMENT_ID=experiment_id, PHI3FLOW_TMP_ROOT=str(tmp_path / "tmp")),
               "PYTHONPATH": str(REPO)}
        for name in settings.TRACKING_HTTP_DEFAULTS:
            env.pop(name, None)  # the project's defaults, not the caller's
        out, err = tmp_path / "step.out", tmp_path / "step.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            # The step's own process, without the `mlflow run` CLI around it: the CLI keeps MLflow's
            # default retries for the status it sets afterwards.
            step = subprocess.Popen([sys.executable, "-m", "steps.fetch_model", "--model-id", settings.BUILTIN_TINY],
                                    cwd=REPO, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
        # Its run exists: the step has talked to the server and is now building the model.
        wait_for("the step's run", lambda: mlflow.MlflowClient(server.url).search_runs([experiment_id]))
        step.send_signal(signal.SIGSTOP)
    step.send_signal(signal.SIGCONT)  # the server is stopped: the step's next call finds nobody
    resumed = time.monotonic()
    step.wait(timeout=600)
    seconds = time.monotonic() - resumed
    print(f"the step ended {seconds:.1f} s after the server stopped")
    result = StepResult(step.returncode, out.read_text(), err.read_text(), None)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert len(result.error_lines) == 1, result.stderr
    line = result.error_lines[0]
    print(line)
    assert f"the tracking server {server.url} failed the call /api/2.0/" in line
    assert "after 3 retries (Connection refused)" in line
    assert seconds < 120  # MLflow's own defaults retry for minutes


def test_outage_message_names_the_first_failed_call():
    from mlflow.exceptions import MlflowException

    try:
        try:
            raise MlflowException("API request to "
                                  "http://tracking.example:5000/api/2.0/mlflow/runs/log-batch failed with "
                                  "exception HTTPConnectionPool(host='tracking.example', port=5000): Max "
                                  "retries exceeded "
                                  "(Caused by NewConnectionError(\"...: [Errno 111] Connection refused\"))")
        except MlflowException:
            # not "from": an implicit __context__ is what MLflow's retries leave, and what is tested here
            raise MlflowException("API request to http://tracking.example:5000/api/2.0/mlflow/runs/update "  # noqa: B904
                                  "failed with exception ...")
    except MlflowException as exc:
        line = outage_message(exc)
    assert line.startswith("the tracking server http://tracking.example:5000 failed the call "
                           "/api/2.0/mlflow/runs/log-batch")
    assert "(Connection refused)" in line and "\n" not in line
    assert outage_message(MlflowException("RESOURCE_DOES_NOT_EXIST: run 'x' not found")) is None


def test_main_refuses_what_a_later_step_cannot_take_before_any_step_runs(experiment_id, tracking_uri, tmp_path):
    good = {"precision": "int4", "interface": "chat", "int4_block_size": "32", "threads": "auto"}
    chain.check_parameters(good, "bundled", tmp_path)
    for bad, eval_data, message in [
        ({"precision": "int8"}, "bundled", "precision must be one of int4, fp32, not 'int8'"),
        ({"interface": "html"}, "bundled", "interface must be one of chat, prompt, not 'html'"),
        ({"int4_block_size": "100"}, "bundled", "int4_block_size must be one of 16, 32, 64, 128, 256, not '100'"),
        ({"threads": "-1"}, "bundled", "threads must be 'auto' or a positive whole number, not '-1'"),
        ({}, str(tmp_path / "missing.jsonl"), "is not a file"),
    ]:
        with pytest.raises(UserError, match=re.escape(message)):
            chain.check_parameters(good | bad, eval_data, tmp_path)
    result = mlflow_run("main", {"model_id": settings.BUILTIN_TINY, "interface": "prompt"}, tracking_uri,
                        MLFLOW_EXPERIMENT_ID=experiment_id)
    assert_failed_with(result,
                       "main evaluates the ONNX model with chat messages, so it needs interface=chat, not 'prompt'")
    entry_points = {r.data.tags.get("mlflow.project.entryPoint")
                    for r in mlflow.MlflowClient().search_runs([experiment_id])}
    assert entry_points == {"main"}  # no step ran


def test_main_hands_log_onnx_wrapper_the_int4_block_size_for_int4_only():
    """The step's parameters are its cache key: a block size an fp32 conversion never uses must not rerun it."""
    onnx = {"precision": "int4", "interface": "chat", "int4_block_size": "128", "threads": "1"}
    assert chain.onnx_step_params("f1", onnx) == {"fetch_run_id": "f1", **onnx}
    fp32 = {"fetch_run_id": "f1", "precision": "fp32", "interface": "chat", "threads": "1"}
    for block_size in ("32", "128"):
        assert chain.onnx_step_params("f1", onnx | {"precision": "fp32", "int4_block_size": block_size}) == fp32
