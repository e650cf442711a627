"""Chain the steps as MLflow Projects runs, reusing the finished run of a step that has not changed.

A step is reused only when a FINISHED run exists with the same cache key - entry point, parameters
(which hold the upstream run IDs) and code version - and, where given, the same input tags (the
fetch run's resolved revision). FAILED, KILLED and RUNNING runs never match. The key is written on
a step run only after it finished, by the main run that started it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow.entities import Run
from mlflow.exceptions import ExecutionException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_PROJECT_ENTRY_POINT, MLFLOW_PROJECT_ENV

from phi3flow import fetch, settings
from phi3flow.errors import UserError
from phi3flow.eval_data import load_eval_data
from phi3flow.onnx_convert import check_options
from phi3flow.onnx_model import check_interface
from phi3flow.step_process import owner_is_gone
from phi3flow.threads import parse_threads


def code_version(project_dir: Path) -> str:
    """The identity of what determines the steps' results (settings.CODE_FILES and CODE_DIRS), never
    docs or tests: in a git checkout `git:<hash>` of those paths' git object ids at HEAD, or
    `dirty:<hash>` when any of them has uncommitted changes (never reused); outside git
    `sha256:<hash>` of their files. A docs-only commit keeps it; a change in phi3flow/ moves it."""
    paths = [*settings.CODE_FILES, *settings.CODE_DIRS]
    try:
        # One line per path: mode, type, object id (a folder's tree id covers every file in it).
        listing = _git(project_dir, "ls-tree", "HEAD", "--", *paths)
    except (OSError, subprocess.CalledProcessError):  # no git, not a checkout, or no commit yet
        return _files_hash(project_dir)
    # Untracked files under those paths count as changes too; ignored ones (__pycache__) do not.
    dirty = _git(project_dir, "status", "--porcelain", "--", *paths)
    return f"{'dirty' if dirty else 'git'}:{hashlib.sha256(listing.encode()).hexdigest()}"


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _files_hash(project_dir: Path) -> str:
    files = [project_dir / name for name in settings.CODE_FILES]
    for folder in settings.CODE_DIRS:
        files += (project_dir / folder).rglob("*")
    digest = hashlib.sha256()
    for path in sorted(p for p in files if p.is_file() and "__pycache__" not in p.parts):
        digest.update(f"{path.relative_to(project_dir).as_posix()}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return f"sha256:{digest.hexdigest()}"


def cache_key(entry_point: str, params: dict[str, str], code: str, inputs: dict[str, str]) -> str:
    """The identity of a step's result; inputs are what the params do not name (file contents)."""
    document = {"entry_point": entry_point, "params": params, "code": code, "inputs": inputs}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def file_inputs(name: str, value: str) -> dict[str, str]:
    """The content hash of a parameter that names a local file, which the parameter alone does not pin."""
    path = Path(value).expanduser()
    return {f"{name}_sha256": hashlib.sha256(path.read_bytes()).hexdigest()} if path.is_file() else {}


def caller_env_manager(run: Run) -> str:
    """The `--env-manager` this run was started with.

    MLflow Projects tags a run `mlflow.project.env` when it builds an environment (virtualenv, uv,
    conda, docker) and sets no tag for `local`. Child runs started with `mlflow.projects.run` do not
    inherit it (MLflow issue 6611), so main passes it on explicitly.
    """
    return run.data.tags.get(MLFLOW_PROJECT_ENV, "local")


def mark_stale_runs(client: mlflow.MlflowClient, experiment_id: str) -> list[str]:
    """Mark KILLED the runs a hard kill left RUNNING: runs (main, or a step started by main or by
    hand) whose owner process on this host is gone, and runs without an owner (evaluate's nested
    runs, a step killed before it recorded its owner) whose parent run is stale or has ended."""
    running = client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000)
    stale: dict[str, str] = {}
    for run in running:
        if owner_is_gone(run.data.tags.get(settings.TAG_OWNER)):
            stale[run.info.run_id] = f"its process {run.data.tags[settings.TAG_OWNER]} is gone"
    for run in running:
        parent_id = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
        # A run with an owner is judged by its owner alone: it may still be at work.
        if not parent_id or run.info.run_id in stale or settings.TAG_OWNER in run.data.tags:
            continue
        if parent_id in stale:
            stale[run.info.run_id] = f"its parent run {parent_id} was left by a dead process"
            continue
        parent = client.get_run(parent_id)
        if settings.TAG_OWNER in parent.data.tags and parent.info.status != "RUNNING":
            stale[run.info.run_id] = f"its parent run {parent_id} is {parent.info.status}"
    for run_id, reason in stale.items():
        print(f"marking run {run_id} KILLED: it was left RUNNING and {reason}", flush=True)
        client.set_tag(run_id, settings.TAG_STALE, reason)
        client.set_terminated(run_id, "KILLED")
    return sorted(stale)


def run_id_or_newest(run_id: str, entry_point: str, parameter: str) -> str:
    """run_id as given; when empty, the newest FINISHED run of entry_point in the active run's
    experiment (told apart by the entry-point tag MLflow Projects sets), printed with its model and time."""
    if run_id:  # any value, "none" included, is the caller's to interpret
        return run_id
    experiment_id = mlflow.active_run().info.experiment_id
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], f"tags.`{MLFLOW_PROJECT_ENTRY_POINT}` = '{entry_point}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        raise UserError(f"{parameter} is empty and experiment {experiment_id} has no FINISHED {entry_point} run: "
                        f"run fetch_model or main first, or pass -P {parameter}=<run id>")
    found = runs[0]
    started = datetime.fromtimestamp(found.info.start_time / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    print(f"{parameter} not given: using the newest FINISHED {entry_point} run {found.info.run_id} "
          f"({found.data.tags.get(settings.TAG_MODEL_ID, 'model unknown')}, started {started})", flush=True)
    return found.info.run_id


def check_parameters(onnx_params: dict[str, str], eval_data: str, workdir: Path) -> None:
    """Refuse, before any step runs, what a later step would refuse after the earlier ones had run.

    onnx_params: the parameters main hands log_onnx_wrapper (precision, interface, int4_block_size, threads).
    """
    check_options(onnx_params["precision"], "cpu", onnx_params["int4_block_size"])
    parse_threads(onnx_params["threads"])
    interface = onnx_params["interface"]
    check_interface(interface)
    if interface != "chat":
        raise UserError(f"main evaluates the ONNX model with chat messages, so it needs interface=chat, not "
                        f"'{interface}'; log a {interface} model on its own with `mlflow run . -e log_onnx_wrapper "
                        f"-P interface={interface}`")
    load_eval_data(eval_data, workdir)  # exists, has a known format and holds valid rows


@dataclass(frozen=True)
class StepRun:
    entry_point: str
    run_id: str
    reused: bool
    params: dict[str, str]


@dataclass
class Chain:
    """Runs entry points of the project in project_dir as child runs of the active (main) run."""

    project_dir: Path
    experiment_id: str
    env_manager: str
    code: str  # code_version(project_dir)
    force: bool = False
    client: mlflow.MlflowClient = field(default_factory=mlflow.MlflowClient)
    runs: list[StepRun] = field(default_factory=list)  # the steps so far, reused or run
    skipped: list[str] = field(default_factory=list)  # entry points this model has no use for

    def step(self, entry_point: str, params: dict[str, str], inputs: dict[str, str] | None = None,
             input_tags: dict[str, str] | None = None) -> StepRun:
        """Reuse or run one step. input_tags: tags the step itself sets that a reused run must carry."""
        key = cache_key(entry_point, params, self.code, inputs or {})
        reusable = not self.code.startswith("dirty:")
        found = self._finished_run(key, input_tags or {}) if reusable and not self.force else None
        progress = self._progress(entry_point)
        if found:
            print(f"{progress}: reusing FINISHED run {found} (same parameters, upstream runs and code)", flush=True)
            return self._record(StepRun(entry_point, found, True, params))
        why = "force=true" if self.force else ("the project has uncommitted changes" if not reusable
                                               else "no matching FINISHED run")
        print(f"{progress}: running ({why}) with --env-manager {self.env_manager} ...", flush=True)
        try:
            submitted = mlflow.projects.run(
                str(self.project_dir), entry_point, parameters=params, experiment_id=self.experiment_id,
                env_manager=self.env_manager, synchronous=True, run_name=entry_point,
            )
        except ExecutionException as exc:  # the step has printed its own error; its run is FAILED
            raise UserError(f"step {entry_point} failed: {exc}") from None
        except KeyboardInterrupt:
            # MLflow marks the step FAILED when the interrupt reaches it while waiting for the step;
            # one that lands while the step's run is being created would leave that run RUNNING.
            self._end_running_children()
            raise
        tags = {settings.TAG_CODE_VERSION: self.code}
        if reusable:  # a dirty tree's runs never get a key, so nothing ever matches them
            tags[settings.TAG_CACHE_KEY] = key
        for name, value in tags.items():
            self.client.set_tag(submitted.run_id, name, value)
        return self._record(StepRun(entry_point, submitted.run_id, False, params))

    def skip(self, entry_point: str, why: str) -> None:
        print(f"{self._progress(entry_point)}: skipped: {why}", flush=True)
        self.skipped.append(entry_point)

    def _progress(self, entry_point: str) -> str:
        return f"[{len(self.runs) + len(self.skipped) + 1}/{len(settings.MAIN_STEPS)}] {entry_point}"

    def _end_running_children(self) -> None:
        parent = mlflow.active_run().info.run_id
        for run in self.client.search_runs(
            [self.experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}' and attributes.status = 'RUNNING'"
        ):
            self.client.set_terminated(run.info.run_id, "KILLED")

    def _record(self, step: StepRun) -> StepRun:
        """Name the step's run on the main run as soon as it is known, so a later failure loses nothing."""
        self.runs.append(step)
        mlflow.set_tag(settings.TAG_STEP_RUN.format(step.entry_point), step.run_id)
        return step

    def summary(self) -> dict:
        return {
            "code_version": self.code,
            "env_manager": self.env_manager,
            "force": self.force,
            "steps": [vars(step) for step in self.runs],
        }

    def _finished_run(self, key: str, input_tags: dict[str, str]) -> str | None:
        clauses = [f"tags.`{settings.TAG_CACHE_KEY}` = '{key}'", "attributes.status = 'FINISHED'"]
        clauses += [f"tags.`{name}` = '{value}'" for name, value in input_tags.items()]
        runs = self.client.search_runs(
            [self.experiment_id], " and ".join(clauses), order_by=["attributes.start_time DESC"], max_results=1
        )
        return runs[0].info.run_id if runs else None


def onnx_step_params(fetch_run_id: str, onnx_params: dict[str, str]) -> dict[str, str]:
    """log_onnx_wrapper's parameters, which are its cache key: int4_block_size only for int4 (it shapes the
    int4 weights alone), so that a changed block size does not rerun an fp32 conversion."""
    params = {"fetch_run_id": fetch_run_id, **onnx_params}
    if params["precision"] != "int4":
        del params["int4_block_size"]
    return params


def run_flow(flow: Chain, model_id: str, revision: str, onnx_params: dict[str, str], eval_data: str,
             workdir: Path) -> None:
    """fetch_model -> log_pipeline and log_onnx_wrapper -> evaluate, each reused when unchanged."""
    print(f"resolving {model_id} @ {revision} ...", flush=True)
    resolved = fetch.resolve_revision(model_id, revision, workdir)
    mlflow.set_tag(settings.TAG_REVISION, resolved)
    fetched = flow.step("fetch_model", {"model_id": model_id, "revision": revision},
                        input_tags={settings.TAG_REVISION: resolved})
    architecture = flow.client.get_run(fetched.run_id).data.tags.get(settings.TAG_ARCHITECTURE, "")
    if fetch.is_prebuilt_onnx(architecture):
        # The champion rule then applies to the ONNX model alone.
        flow.skip("log_pipeline", f"{model_id} is a prebuilt onnxruntime-genai folder ({architecture}), "
                  "which has no transformers checkpoint to log")
        pipeline_run_id = settings.NO_PIPELINE_RUN
    else:
        pipeline_run_id = flow.step("log_pipeline", {"fetch_run_id": fetched.run_id}).run_id
    onnx = flow.step("log_onnx_wrapper", onnx_step_params(fetched.run_id, onnx_params))
    flow.step("evaluate", {"pipeline_run_id": pipeline_run_id, "onnx_run_id": onnx.run_id, "eval_data": eval_data},
              inputs=file_inputs("eval_data", eval_data))
