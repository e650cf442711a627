"""The `main` entry point: chained step runs, the cache for scheduled reruns, faults, the cron wrapper.

The tests share one clean git copy of the project and one experiment on a team's tracking server (a
real `mlflow server`, its artifacts proxied, restarted between two reruns), like successive scheduled
runs of the same flow. The runs they examine are stages, module fixtures that each build on the one
before (first run, changed parameter, forced and interrupted, rerun, hard kill), so the runs happen in
that order whatever order the tests run in, and each test also runs alone. Each stage records the step
runs it created.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import mlflow_cli
import pytest
from conftest import BIN, REPO, StepResult, ask_champion, assert_ok, bundled_rows, mlflow_run, step_env, wait_for
from servers import MlflowServer

from phi3flow import settings
from phi3flow.chain import code_version

# minutes of main chains, servers or benchmarks: started first (tests/conftest.py)
pytestmark = pytest.mark.long

def _git(cwd: Path, *args: str) -> str:
    # An explicit identity: CI machines may have none configured.
    cmd = ["git", "-c", "user.name=phi3flow tests", "-c", "user.email=tests@phi3flow.invalid", *args]
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A clean git checkout of the project's files (a development tree is usually dirty)."""
    root = tmp_path_factory.mktemp("project")
    for name in _git(REPO, "ls-files", "--cached", "--others", "--exclude-standard").splitlines():
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "snapshot")
    return root


@pytest.fixture(scope="module")
def params(tmp_path_factory) -> dict[str, str]:
    """The parameters of main in the scheduled reruns below."""
    return {"model_id": settings.BUILTIN_TINY,
            "eval_data": bundled_rows(tmp_path_factory.mktemp("eval") / "two.jsonl", 2),
            # handed to log_onnx_wrapper as they are
            "int4_block_size": "128", "threads": "1"}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[MlflowServer]:
    """The team's tracking server: a sqlite store behind `mlflow server`, artifacts through it."""
    root = tmp_path_factory.mktemp("main-server")
    with MlflowServer(root, f"sqlite:///{root}/mlflow.db") as running:
        yield running


@pytest.fixture(scope="module", autouse=True)
def tracking_uri(tracking_uri, server) -> Iterator[str]:
    """This module's MLflow calls and runs go to the server; the session's store comes back after it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", server.url)
        mlflow.set_tracking_uri(server.url)
        yield server.url
    mlflow.set_tracking_uri(tracking_uri)


@pytest.fixture(scope="module")
def experiment_id(tracking_uri) -> str:
    """An experiment of its own, so that counting step runs counts only this flow's."""
    return mlflow.create_experiment("main-flow")


def snapshot(experiment_id: str) -> dict:
    """Everything a user can read back: runs with params, tags and artifact files; the registry."""
    client = mlflow.MlflowClient()

    def files(run_id: str, path: str | None = None) -> list[tuple[str, int | None]]:
        found = []
        for info in client.list_artifacts(run_id, path):
            found += files(run_id, info.path) if info.is_dir else [(info.path, info.file_size)]
        return found

    return {
        "runs": {
            run.info.run_id: (run.info.status, run.data.params, run.data.tags, files(run.info.run_id))
            for run in client.search_runs([experiment_id], max_results=1000)
        },
        "versions": {(v.name, v.version): (v.run_id, v.source, v.status) for v in client.search_model_versions()},
        "aliases": _aliases(),
    }


@pytest.fixture(scope="module")
def run_main(project, experiment_id, tracking_uri) -> Callable[..., StepResult]:
    def run(params: dict[str, str], **env: str) -> StepResult:
        result = mlflow_run("main", params, tracking_uri, project=project, MLFLOW_EXPERIMENT_ID=experiment_id, **env)
        # The step runs report their IDs first; `mlflow run` names the main run last.
        return dataclasses.replace(result, run_id=re.findall(r"Run \(ID '([0-9a-f]+)'\)", result.stderr)[-1])

    return run


def _aliases() -> dict[str, dict[str, str]]:
    """Registered model -> its aliases (alias -> version)."""
    return {model.name: model.aliases for model in mlflow.MlflowClient().search_registered_models()}


def _runs(experiment_id: str) -> list[mlflow.entities.Run]:
    return mlflow.MlflowClient().search_runs([experiment_id], max_results=1000)


def _step_runs(experiment_id: str) -> dict[str, mlflow.entities.Run]:
    """Runs of the four steps (evaluate's own nested evaluation runs are not steps)."""
    return {r.info.run_id: r for r in _runs(experiment_id)
            if r.data.tags.get("mlflow.project.entryPoint") in settings.MAIN_STEPS}


def _steps_of(main_run_id: str) -> dict[str, str]:
    """Entry point -> run ID, as the main run's tags name them."""
    tags = mlflow.MlflowClient().get_run(main_run_id).data.tags
    return {ep: tags[settings.TAG_STEP_RUN.format(ep)] for ep in settings.MAIN_STEPS
            if settings.TAG_STEP_RUN.format(ep) in tags}


class Background:
    """`mlflow run <project> -e main` in its own process group, to be interrupted or killed."""

    def __init__(self, project: Path, experiment_id: str, tracking_uri: str, log: Path, params: dict[str, str]):
        self.experiment_id, self.log = experiment_id, log
        argv = ["run", str(project), "-e", "main", "--env-manager", "local"]
        for key, value in params.items():
            argv += ["-P", f"{key}={value}"]
        self.started = time.time() * 1000
        self.proc = mlflow_cli.spawn(argv, log, step_env(tracking_uri, MLFLOW_EXPERIMENT_ID=experiment_id), REPO)

    def main_run_id(self) -> str:
        def newest_main():
            mains = [r for r in _runs(self.experiment_id) if r.data.tags.get("mlflow.project.entryPoint") == "main"
                     and r.info.start_time >= self.started]
            return mains[0].info.run_id if mains else None
        return wait_for("the main run", newest_main)

    def wait_for_output(self, text: str) -> None:
        wait_for(f"'{text}' in the output of main", lambda: text in self.log.read_text())

    def child(self, entry_point: str) -> mlflow.entities.Run:
        main = self.main_run_id()
        return wait_for(f"a {entry_point} run of main", lambda: next(
            (r for r in _runs(self.experiment_id) if r.data.tags.get("mlflow.parentRunId") == main
             and r.data.tags.get("mlflow.project.entryPoint") == entry_point), None))

    def signal(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)
        self.proc.wait(timeout=60)


@dataclasses.dataclass(frozen=True)
class Stage:
    result: StepResult  # the main run
    new_step_runs: set[str]  # the step runs it created
    aliases: dict[str, dict[str, str]]  # the registry's aliases when it ended (later stages may move them)


def _run_stage(run_main, experiment_id: str, params: dict[str, str]) -> Stage:
    existing = set(_step_runs(experiment_id))
    result = run_main(params)
    assert_ok(result)
    return Stage(result, set(_step_runs(experiment_id)) - existing, _aliases())


@pytest.fixture(scope="module")
def first_main(run_main, params, experiment_id) -> Stage:
    return _run_stage(run_main, experiment_id, params)


def test_main_runs_each_step_as_its_own_run_linked_to_main(first_main, project, experiment_id, server):
    client = mlflow.MlflowClient()
    result, created = first_main.result, first_main.new_step_runs
    main = client.get_run(result.run_id)
    steps = _steps_of(result.run_id)
    assert list(steps) == list(settings.MAIN_STEPS)
    assert created == set(steps.values())  # nothing else ran
    commit = _git(project, "rev-parse", "HEAD")
    runs = {ep: client.get_run(run_id) for ep, run_id in steps.items()}
    assert main.info.run_name == "main"
    for ep, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.info.run_name == ep
        assert run.info.artifact_uri == f"mlflow-artifacts:/{experiment_id}/{run.info.run_id}/artifacts"
        assert run.data.tags["mlflow.project.entryPoint"] == ep
        assert run.data.tags["mlflow.parentRunId"] == result.run_id
        assert run.data.tags["mlflow.source.git.commit"] == commit
        assert run.data.tags[settings.TAG_CODE_VERSION] == code_version(project)
        assert settings.TAG_CACHE_KEY in run.data.tags
        # each step records its own process
        assert run.data.tags[settings.TAG_OWNER] != main.data.tags[settings.TAG_OWNER]
    # Each step is handed its upstream steps' run IDs.
    assert runs["log_pipeline"].data.params["fetch_run_id"] == steps["fetch_model"]
    assert runs["log_onnx_wrapper"].data.params["fetch_run_id"] == steps["fetch_model"]
    onnx_params = runs["log_onnx_wrapper"].data.params
    assert (onnx_params["precision"], onnx_params["int4_block_size"], onnx_params["threads"]) == ("int4", "128", "1")
    assert runs["log_onnx_wrapper"].data.tags[settings.TAG_ONNX_THREADS] == "1"
    assert runs["evaluate"].data.params["pipeline_run_id"] == steps["log_pipeline"]
    assert runs["evaluate"].data.params["onnx_run_id"] == steps["log_onnx_wrapper"]
    # The caller's --env-manager (local: MLflow sets no mlflow.project.env tag) reached the steps.
    assert main.data.tags[settings.TAG_ENV_MANAGER] == "local"
    assert all("mlflow.project.env" not in run.data.tags for run in runs.values())
    assert main.data.tags[settings.TAG_REVISION] == runs["fetch_model"].data.tags[settings.TAG_REVISION]
    summary = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/{settings.SUMMARY_FILE}")
    assert [(s["entry_point"], s["run_id"], s["reused"]) for s in summary["steps"]] == [
        (ep, steps[ep], False) for ep in settings.MAIN_STEPS
    ]
    assert f"main run {result.run_id}: 4 steps run, 0 reused" in result.stdout
    # The files went through the server into its --artifacts-destination.
    fetched = server.artifacts / experiment_id / steps["fetch_model"] / "artifacts"
    assert (fetched / settings.MANIFEST_FILE).is_file()
    assert (fetched / settings.MODEL_ARTIFACT_DIR / "model.safetensors").is_file()
    # The champion is registered on the server and loads by alias in a process elsewhere.
    name, version = runs["evaluate"].data.tags[settings.TAG_CHAMPION].split("/")
    assert first_main.aliases[name][settings.CHAMPION_ALIAS] == version
    ask_champion(server.url, name)


@dataclasses.dataclass(frozen=True)
class Interrupted:
    before: dict[str, str]  # the steps of the main run before the interruption
    main_id: str
    onnx_run_id: str  # the step that was at work
    output: str


@pytest.fixture(scope="module")
def changed_parameter_main(first_main, run_main, params, experiment_id, tmp_path_factory) -> Stage:
    """main again with a one-row evaluation set instead of two."""
    return _run_stage(run_main, experiment_id,
                      {**params, "eval_data": bundled_rows(tmp_path_factory.mktemp("one") / "one.jsonl", 1)})


def test_changed_parameter_reruns_only_the_steps_that_use_it(first_main, changed_parameter_main):
    previous, steps = _steps_of(first_main.result.run_id), _steps_of(changed_parameter_main.result.run_id)
    assert {ep: steps[ep] for ep in ("fetch_model", "log_pipeline", "log_onnx_wrapper")} == {
        ep: previous[ep] for ep in ("fetch_model", "log_pipeline", "log_onnx_wrapper")
    }
    assert changed_parameter_main.new_step_runs == {steps["evaluate"]}


@pytest.fixture(scope="module")
def interrupted_forced_main(changed_parameter_main, first_main, params, project, experiment_id, tracking_uri,
                            tmp_path_factory) -> Interrupted:
    """main with force=true, stopped by SIGTERM while log_onnx_wrapper converts."""
    before = _steps_of(first_main.result.run_id)
    bg = Background(project, experiment_id, tracking_uri, tmp_path_factory.mktemp("forced") / "main.log",
                    {**params, "force": "true"})
    onnx = bg.child("log_onnx_wrapper")
    bg.wait_for_output("converting to ONNX")  # the step is at work
    bg.signal(signal.SIGTERM)  # what cron's timeout, systemd or `kill` send to the whole group
    client = mlflow.MlflowClient()
    main_id = bg.main_run_id()
    # The step finishes the Python call it is in before SIGTERM ends it: minutes on a loaded machine.
    wait_for("main to end", lambda: client.get_run(main_id).info.status != "RUNNING")
    return Interrupted(before, main_id, onnx.info.run_id, bg.log.read_text())


def test_force_reruns_steps_and_an_interrupted_step_ends_failed(interrupted_forced_main, experiment_id):
    client = mlflow.MlflowClient()
    main_id = interrupted_forced_main.main_id
    assert client.get_run(main_id).info.status == "FAILED"
    assert client.get_run(interrupted_forced_main.onnx_run_id).info.status in {"FAILED", "KILLED"}
    # Nothing of the interrupted run is left RUNNING.
    assert [r.info.run_id for r in _runs(experiment_id) if r.info.status == "RUNNING"
            and main_id in (r.info.run_id, r.data.tags.get("mlflow.parentRunId"))] == []
    output = interrupted_forced_main.output
    assert "error: interrupted" in output and "Traceback" not in output
    # force=true ran fetch_model and log_pipeline again although FINISHED runs matched.
    forced = _steps_of(main_id)
    for ep in ("fetch_model", "log_pipeline"):
        assert forced[ep] != interrupted_forced_main.before[ep]
        assert client.get_run(forced[ep]).info.status == "FINISHED"
    assert "log_onnx_wrapper" not in forced  # main names only the steps that finished


@pytest.fixture(scope="module")
def rerun_after_a_kill(interrupted_forced_main, run_main, params, experiment_id) -> Stage:
    """main as scheduled after the interrupted run."""
    return _run_stage(run_main, experiment_id, params)


def test_rerun_after_a_kill_reruns_the_killed_step_and_its_dependents_only(interrupted_forced_main, rerun_after_a_kill):
    client = mlflow.MlflowClient()
    forced = _steps_of(interrupted_forced_main.main_id)
    result = rerun_after_a_kill.result
    steps = _steps_of(result.run_id)
    # The newest FINISHED fetch_model and log_pipeline runs (the forced ones) are reused ...
    assert steps["fetch_model"] == forced["fetch_model"]
    assert steps["log_pipeline"] == forced["log_pipeline"]
    # ... the killed log_onnx_wrapper is not: it and evaluate, which depends on it, run again.
    assert rerun_after_a_kill.new_step_runs == {steps["log_onnx_wrapper"], steps["evaluate"]}
    assert all(client.get_run(run_id).info.status == "FINISHED" for run_id in rerun_after_a_kill.new_step_runs)
    assert f"main run {result.run_id}: 2 steps run, 2 reused" in result.stdout


@dataclasses.dataclass(frozen=True)
class HardKilled:
    statuses: dict[str, str]  # run ID -> status right after the kill: main and its fetch_model run


@pytest.fixture(scope="module")
def hard_killed_main(rerun_after_a_kill, project, params, experiment_id, tracking_uri, tmp_path_factory) -> HardKilled:
    """main on a tree with an uncommitted code change, SIGKILLed with its step while fetch_model runs."""
    settings_file = project / "phi3flow" / "settings.py"
    settings_file.write_text(settings_file.read_text() + "\n# an uncommitted edit\n")
    try:
        bg = Background(project, experiment_id, tracking_uri, tmp_path_factory.mktemp("killed") / "main.log", params)
        fetch = bg.child("fetch_model")  # a FINISHED fetch_model run with these params exists
        bg.wait_for_output("[1/4] fetch_model: running (the project has uncommitted changes)")
        bg.signal(signal.SIGKILL)  # a hard kill: nobody is left to end the runs
    finally:
        _git(project, "checkout", "phi3flow/settings.py")
    client = mlflow.MlflowClient()
    return HardKilled({run_id: client.get_run(run_id).info.status for run_id in (bg.main_run_id(), fetch.info.run_id)})


def test_dirty_tree_never_reuses_and_a_hard_kill_leaves_runs_running(hard_killed_main):
    assert list(hard_killed_main.statuses.values()) == ["RUNNING", "RUNNING"]


def test_server_restart_then_a_scheduled_noop_rerun_reuses_every_step_and_ends_stale_runs(
        hard_killed_main, rerun_after_a_kill, project, params, experiment_id, tracking_uri, server, tmp_path):
    client = mlflow.MlflowClient()
    stale = list(hard_killed_main.statuses)
    existing = set(_step_runs(experiment_id))
    before = snapshot(experiment_id)
    server.stop()
    server.start()  # same port, same sqlite file, same artifact folder
    assert snapshot(experiment_id) == before
    start = time.monotonic()
    proc = _scheduled(project, tracking_uri, experiment_id, tmp_path, *(f"-P{k}={v}" for k, v in params.items()))
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    print(f"no-op scheduled rerun of main: {seconds:.1f} s")  # for the log: speed is not asserted here
    assert set(_step_runs(experiment_id)) == existing  # no step ran
    log = Path(proc.stdout.split("output in ")[1].split()[0])
    assert log.parent == tmp_path / "logs"
    main_id = re.search(r"^main run ([0-9a-f]+): ", log.read_text(), re.MULTILINE).group(1)
    assert _steps_of(main_id) == _steps_of(rerun_after_a_kill.result.run_id)
    assert f"main run {main_id}: 0 steps run, 4 reused" in proc.stdout
    for run_id in stale:
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and settings.TAG_STALE in run.data.tags
    # The rerun added its main run and changed nothing else but the stale runs' status.
    after = snapshot(experiment_id)
    assert set(after["runs"]) == set(before["runs"]) | {main_id}
    assert {k: v for k, v in after["runs"].items() if k not in (main_id, *stale)} == {
        k: v for k, v in before["runs"].items() if k not in stale}
    assert after["versions"] == before["versions"] and after["aliases"] == before["aliases"]


def _scheduled(project: Path, tracking_uri: str, experiment_id: str, tmp_path: Path,
               *args: str) -> subprocess.CompletedProcess:
    env = step_env(tracking_uri, MLFLOW_EXPERIMENT_ID=experiment_id, PHI3FLOW_LOG_DIR=str(tmp_path / "logs"))
    return subprocess.run(["bash", str(project / "scripts" / "scheduled_run.sh"), *args], capture_output=True,
                          text=True,
                          env=env, timeout=900, stdin=subprocess.DEVNULL)


def test_scheduled_run_refuses_to_overlap(project, experiment_id, tracking_uri, tmp_path):
    (tmp_path / "logs").mkdir()
    before = len(_runs(experiment_id))
    with (tmp_path / "logs" / "scheduled_run.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a run in progress holds it
        start = time.monotonic()
        proc = _scheduled(project, tracking_uri, experiment_id, tmp_path, "-P", f"model_id={settings.BUILTIN_TINY}")
    assert proc.returncode == 75
    assert time.monotonic() - start < 5
    assert proc.stderr.startswith("error: another scheduled run of main holds")
    assert len(_runs(experiment_id)) == before


def test_scheduled_run_propagates_failure(project, experiment_id, tracking_uri, tmp_path):
    proc = _scheduled(project, tracking_uri, experiment_id, tmp_path, "-P", "model_id=/nonexistent/phi3")
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: main failed with exit status 1; output in ")
    assert lines[1:] == ["error: local model folder '/nonexistent/phi3' does not exist"]
    log = Path(lines[0].split("output in ")[1])
    assert "Traceback" not in log.read_text()
    failed = next(r for r in _runs(experiment_id) if r.data.params.get("model_id") == "/nonexistent/phi3")
    assert failed.info.status == "FAILED"
    # A mistyped parameter: main's options refuse it before main prints anything; the log's error line shows.
    typo = _scheduled(project, tracking_uri, experiment_id, tmp_path, "-P", "model_idd=/nonexistent/phi3")
    assert typo.returncode == 1
    assert typo.stderr.splitlines()[1:] == ["Error: No such option '--model_idd'. Did you mean '--model-id'?"]


def test_code_version_outside_git_hashes_the_code_files(project, tmp_path):
    from phi3flow.chain import code_version

    copy = tmp_path / "copy"
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns(".git"))
    first = code_version(copy)
    assert first.startswith("sha256:") and code_version(copy) == first
    (copy / "README.md").write_text("documentation is not code\n")
    assert code_version(copy) == first
    (copy / "steps" / "main.py").write_text((copy / "steps" / "main.py").read_text() + "\n# changed\n")
    assert code_version(copy) != first


def test_code_version_in_git_follows_the_code_paths_only(project, tmp_path):
    """A docs-only commit keeps the code version (every step is reused); a change in phi3flow/ moves it."""
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(project), str(clone))
    first = code_version(clone)
    assert first.startswith("git:")
    readme = clone / "README.md"
    readme.write_text(readme.read_text() + "\nmore documentation\n")
    assert code_version(clone) == first  # uncommitted docs: not dirty
    _git(clone, "commit", "-qam", "docs only")
    assert code_version(clone) == first
    chain_file = clone / "phi3flow" / "chain.py"
    chain_file.write_text(chain_file.read_text() + "\n# changed\n")
    assert code_version(clone).startswith("dirty:")
    _git(clone, "commit", "-qam", "code")
    changed = code_version(clone)
    assert changed.startswith("git:") and changed != first
    (clone / "data" / "extra.jsonl").write_text("{}\n")  # untracked files under a code path count
    assert code_version(clone).startswith("dirty:")


def test_a_new_revision_of_the_model_reruns_fetch_model(project, experiment_id, tiny_dir, tmp_path, monkeypatch):
    """main keys fetch_model on the revision it resolves first: here a local folder's content hash."""
    from phi3flow.chain import Chain, code_version
    from phi3flow.fetch import resolve_revision

    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")  # the steps' `python`
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)

    def fetch(flow: Chain):
        revision = resolve_revision(str(model), "main", tmp_path)
        return flow.step("fetch_model", {"model_id": str(model), "revision": "main"},
                         input_tags={settings.TAG_REVISION: revision})

    with mlflow.start_run(experiment_id=experiment_id):
        flow = Chain(project, experiment_id, "local", code_version(project))
        first, again = fetch(flow), fetch(flow)
        config = model / "generation_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "max_length": 64}))
        moved = fetch(flow)
    assert (first.reused, again.reused, moved.reused) == (False, True, False)
    assert again.run_id == first.run_id != moved.run_id
    tags = [mlflow.MlflowClient().get_run(r.run_id).data.tags[settings.TAG_REVISION] for r in (first, moved)]
    assert tags[0] != tags[1]
