"""The steps against real tracking servers: proxied artifacts, a restart, basic auth, PostgreSQL.

Steps run one by one go through `mlflow run`, each from its own empty directory that is deleted
before the next step starts: steps hand each other nothing but run IDs.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import psycopg2
import pytest
from conftest import REPO, assert_ok, in_fresh_process, mlflow_run, step_env
from mlflow.server import get_app_client
from servers import MlflowServer, postgres

from phi3flow import settings

# minutes of main chains, servers or benchmarks: started first (tests/conftest.py)
pytestmark = pytest.mark.long

ALICE, ALICE_PASSWORD = "alice", "alice-" + secrets.token_urlsafe(16)
ADMIN, ADMIN_PASSWORD = "admin", "admin-" + secrets.token_urlsafe(16)
ADMINS_MODEL = "phi3-onnx-admins"  # registered by the admin: other users may only read it


@contextmanager
def as_user(user: str, password: str) -> Iterator[None]:
    """MLflow calls in this process authenticate as user (MLflow reads the variables per request)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", user)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", password)
        yield


def step_elsewhere(entry_point: str, params: dict[str, str], url: str, env: dict[str, str], tmp_path_factory) -> str:
    """Run a step from a fresh empty directory, check it left nothing there, then delete it."""
    workdir = tmp_path_factory.mktemp(f"cwd-{entry_point}")
    run_id = assert_ok(mlflow_run(entry_point, params, url, cwd=workdir, **env))
    assert not list(workdir.iterdir()), f"{entry_point} left local files behind"
    shutil.rmtree(workdir)
    return run_id


@dataclass(frozen=True)
class Experiment:
    env: dict[str, str]  # what the steps run with: MLFLOW_EXPERIMENT_ID and maybe credentials

    @property
    def experiment_id(self) -> str:
        return self.env["MLFLOW_EXPERIMENT_ID"]


@dataclass(frozen=True)
class Flow(Experiment):
    fetch: str  # run IDs
    onnx: str


@dataclass(frozen=True)
class Scheduled(Experiment):
    project: Path  # the copy of the project that `main` runs


def fetch_and_wrap(url: str, env: dict[str, str], tmp_path_factory, registered_model_name: str) -> Flow:
    """fetch_model, then log_onnx_wrapper (fp32: the quickest conversion) registering its model."""
    fetch = step_elsewhere("fetch_model", {"model_id": settings.BUILTIN_TINY}, url, env, tmp_path_factory)
    onnx = step_elsewhere(
        "log_onnx_wrapper",
        {"fetch_run_id": fetch, "precision": "fp32", "registered_model_name": registered_model_name},
        url, env, tmp_path_factory,
    )
    return Flow(env, fetch, onnx)


def ask_champion(url: str, name: str) -> None:
    """A process in another directory loads `models:/NAME@champion` through the server and asks it."""
    answer = in_fresh_process(  # cwd="/", the model downloaded afresh through the server
        f"""
import json, mlflow
model = mlflow.pyfunc.load_model("models:/{name}@{settings.CHAMPION_ALIAS}")
print(json.dumps(model.predict({{"messages": [{{"role": "user", "content": "{settings.SEED_QUESTION}"}}], """
        '"max_tokens": 8})))\n',
        url,
    )
    assert answer[0]["object"] == "chat.completion"
    assert answer[0]["model"] == settings.BUILTIN_TINY
    assert 1 <= answer[0]["usage"]["completion_tokens"] <= 8


def snapshot(url: str, experiment_id: str) -> dict:
    """Everything a user can read back: runs with params, tags and artifact files; the registry."""
    client = mlflow.MlflowClient(url)

    def files(run_id: str, path: str | None = None) -> list[tuple[str, int | None]]:
        found = []
        for info in client.list_artifacts(run_id, path):
            found += files(run_id, info.path) if info.is_dir else [(info.path, info.file_size)]
        return found

    return {
        "runs": {
            run.info.run_id: (run.info.status, run.data.params, run.data.tags, files(run.info.run_id))
            for run in client.search_runs([experiment_id])
        },
        "versions": {(v.name, v.version): (v.run_id, v.source, v.status) for v in client.search_model_versions()},
        "aliases": {m.name: m.aliases for m in client.search_registered_models()},
    }


# --- a plain `mlflow server` on sqlite, and `main` through it -------------------------------------

@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("sqlite-server")
    with MlflowServer(root, f"sqlite:///{root}/mlflow.db") as server:
        yield server


@pytest.fixture(scope="module")
def scheduled(sqlite_server, tmp_path_factory) -> Scheduled:
    """What a scheduler has: a copy of the project and an experiment. The copy has no .git, so
    main keys its cache by a hash of the code files (a dirty development tree would disable it)."""
    project = tmp_path_factory.mktemp("scheduled") / "phi3flow"
    shutil.copytree(REPO, project, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache", "mlruns", "mlartifacts", "*.db"))
    env = {"MLFLOW_EXPERIMENT_ID": mlflow.MlflowClient(sqlite_server.url).create_experiment("scheduled")}
    return Scheduled(env, project)


def run_main(url: str, scheduled: Scheduled, tmp_path_factory) -> tuple[str, str]:
    """`mlflow run <project> -e main` from an empty directory; the main run's ID and its output."""
    result = mlflow_run("main", {"model_id": settings.BUILTIN_TINY}, url, project=scheduled.project,
                        cwd=tmp_path_factory.mktemp("cwd-main"), **scheduled.env)
    assert_ok(result)
    return re.findall(r"Run \(ID '([0-9a-f]+)'\)", result.stderr)[-1], result.stdout  # main's is named last


def steps_of(client: mlflow.MlflowClient, main_run_id: str) -> dict[str, str]:
    tags = client.get_run(main_run_id).data.tags
    return {entry_point: tags[settings.TAG_STEP_RUN.format(entry_point)] for entry_point in settings.MAIN_STEPS}


@pytest.fixture(scope="module")
def first_main(sqlite_server, scheduled, tmp_path_factory) -> str:
    return run_main(sqlite_server.url, scheduled, tmp_path_factory)[0]


def test_main_runs_through_the_server_and_its_champion_loads_elsewhere(sqlite_server, scheduled, first_main):
    client = mlflow.MlflowClient(sqlite_server.url)
    experiment_id = scheduled.experiment_id
    for run_id in (first_main, *steps_of(client, first_main).values()):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri == f"mlflow-artifacts:/{experiment_id}/{run_id}/artifacts"
    # The files went through the server into its --artifacts-destination.
    fetched = sqlite_server.artifacts / experiment_id / steps_of(client, first_main)["fetch_model"] / "artifacts"
    assert (fetched / settings.MANIFEST_FILE).is_file()
    assert (fetched / settings.MODEL_ARTIFACT_DIR / "model.safetensors").is_file()
    name, version = client.get_run(steps_of(client, first_main)["evaluate"]).data.tags[settings.TAG_CHAMPION].split("/")
    assert client.get_model_version_by_alias(name, settings.CHAMPION_ALIAS).version == version
    ask_champion(sqlite_server.url, name)


def test_server_restart_between_runs_loses_nothing_and_the_rerun_duplicates_nothing(sqlite_server, scheduled,
                                                                                     first_main, tmp_path_factory):
    url, experiment_id = sqlite_server.url, scheduled.experiment_id
    before = snapshot(url, experiment_id)
    assert len(before["runs"]) >= 5 and before["aliases"]  # main, its 4 steps (and evaluate's own runs)

    sqlite_server.stop()
    sqlite_server.start()  # same port, same sqlite file, same artifact folder
    assert snapshot(url, experiment_id) == before

    # The scheduled rerun finds every step's run from before the restart and reruns none.
    rerun, output = run_main(url, scheduled, tmp_path_factory)
    assert f"main run {rerun}: 0 steps run, 4 reused" in output
    client = mlflow.MlflowClient(url)
    assert steps_of(client, rerun) == steps_of(client, first_main)
    after = snapshot(url, experiment_id)
    assert set(after["runs"]) == set(before["runs"]) | {rerun}
    assert {k: v for k, v in after["runs"].items() if k != rerun} == before["runs"]
    assert after["versions"] == before["versions"] and after["aliases"] == before["aliases"]


# --- `mlflow server --app-name basic-auth` ---------------------------------------------------------

@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[MlflowServer]:
    root = tmp_path_factory.mktemp("auth-server")
    # The first start creates the admin; the users database is ./basic_auth.db of the server's cwd.
    env = {"MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    with MlflowServer(root, f"sqlite:///{root}/mlflow.db", "--app-name", "basic-auth", env=env) as server:
        with as_user(ADMIN, ADMIN_PASSWORD):
            get_app_client("basic-auth", tracking_uri=server.url).create_user(ALICE, ALICE_PASSWORD)
            mlflow.MlflowClient(server.url).create_registered_model(ADMINS_MODEL)
        yield server


@pytest.fixture(scope="module")
def alice(auth_server, tmp_path_factory) -> Flow:
    """Alice's own experiment, her step runs in it, and the environment her steps run with."""
    with as_user(ALICE, ALICE_PASSWORD):
        experiment_id = mlflow.MlflowClient(auth_server.url).create_experiment("alice")
    env = {"MLFLOW_TRACKING_USERNAME": ALICE, "MLFLOW_TRACKING_PASSWORD": ALICE_PASSWORD,
           "MLFLOW_EXPERIMENT_ID": experiment_id}
    return fetch_and_wrap(auth_server.url, env, tmp_path_factory, "phi3-onnx-alice")


def _alice_runs(url: str, experiment_id: str) -> list:
    with as_user(ALICE, ALICE_PASSWORD):
        return mlflow.MlflowClient(url).search_runs([experiment_id])


def test_steps_run_with_credentials_and_the_password_is_stored_nowhere(auth_server, alice):
    # Her two step runs (the other tests of this module add refused and failed runs of hers).
    runs = [r for r in _alice_runs(auth_server.url, alice.experiment_id) if r.info.run_id in (alice.fetch, alice.onnx)]
    assert {r.info.run_id: r.info.status for r in runs} == {alice.fetch: "FINISHED", alice.onnx: "FINISHED"}
    with as_user(ALICE, ALICE_PASSWORD):
        versions = mlflow.MlflowClient(auth_server.url).search_model_versions("name='phi3-onnx-alice'")
    assert [v.run_id for v in versions] == [alice.onnx]
    recorded = [value for r in runs for value in (*r.data.params.values(), *r.data.tags.values(), r.info.run_name)]
    recorded += [value for v in versions for value in (*v.tags.values(), v.source)]
    assert not [value for value in recorded if ALICE_PASSWORD in value]
    # And not a byte of the tracking store or of any artifact the server holds.
    stored = [p for p in [auth_server.root / "mlflow.db", *auth_server.artifacts.rglob("*")] if p.is_file()]
    assert len(stored) > 10  # model files, manifest, the ONNX model, MLmodel, requirements ...
    assert not [p for p in stored if ALICE_PASSWORD.encode() in p.read_bytes()]


@pytest.mark.parametrize("password", ["", "wrong-password"])
def test_mlflow_run_without_valid_credentials_is_refused_before_any_run(auth_server, alice, password):
    env = {**alice.env, "MLFLOW_TRACKING_USERNAME": ALICE if password else "", "MLFLOW_TRACKING_PASSWORD": password}
    before = len(_alice_runs(auth_server.url, alice.experiment_id))
    result = mlflow_run("fetch_model", {"model_id": settings.BUILTIN_TINY}, auth_server.url, timeout=300, **env)
    assert result.returncode != 0
    # `mlflow run` itself creates the run, so MLflow's CLI reports the refusal (with its traceback).
    assert "runs/create failed with error code 401" in result.stderr.splitlines()[-1]
    assert "You are not authenticated" in result.stderr
    assert len(_alice_runs(auth_server.url, alice.experiment_id)) == before  # nothing was created


def test_step_command_without_credentials_prints_one_line(auth_server, alice):
    # The entry point's own command, as MLproject runs it: our code reports the refusal.
    env = step_env(auth_server.url, MLFLOW_TRACKING_USERNAME="", MLFLOW_TRACKING_PASSWORD="",
                   MLFLOW_EXPERIMENT_ID=alice.experiment_id)
    proc = subprocess.run([sys.executable, "-m", "steps.fetch_model", "--model-id", settings.BUILTIN_TINY],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    assert (f"the tracking server {auth_server.url} needs credentials: "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") in errors[0]


def test_permission_denied_inside_a_step_is_one_line_and_a_failed_run(auth_server, alice):
    # Alice may read the admins' registered model but not add versions to it.
    params = {"fetch_run_id": alice.fetch, "precision": "fp32", "registered_model_name": ADMINS_MODEL}
    result = mlflow_run("log_onnx_wrapper", params, auth_server.url, **alice.env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.error_lines) == 1, result.stderr
    assert f"user '{ALICE}' lacks a permission on the tracking server {auth_server.url}" in result.error_lines[0]
    assert "model-versions/create failed with error code 403" in result.error_lines[0]
    with as_user(ALICE, ALICE_PASSWORD):
        assert mlflow.MlflowClient(auth_server.url).get_run(result.run_id).info.status == "FAILED"


# --- PostgreSQL as the backend store ---------------------------------------------------------------

@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory) -> Iterator[tuple[MlflowServer, str]]:
    root = tmp_path_factory.mktemp("postgres-server")
    with postgres() as database_uri:
        # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver installed is psycopg2.
        with MlflowServer(root, database_uri.replace("postgresql://", "postgresql+psycopg2://")) as server:
            yield server, database_uri


def test_steps_hand_over_run_ids_only_and_postgres_holds_the_runs(postgres_server, tmp_path_factory):
    server, database_uri = postgres_server
    client = mlflow.MlflowClient(server.url)
    env = {"MLFLOW_EXPERIMENT_ID": client.create_experiment("postgres")}
    flow = fetch_and_wrap(server.url, env, tmp_path_factory, settings.ONNX_MODEL_NAME)
    assert client.get_run(flow.onnx).data.tags[settings.TAG_FETCH_RUN_ID] == flow.fetch
    for run_id in (flow.fetch, flow.onnx):
        assert client.get_run(run_id).info.artifact_uri == f"mlflow-artifacts:/{flow.experiment_id}/{run_id}/artifacts"
    # The runs really are rows of the PostgreSQL database.
    with psycopg2.connect(database_uri) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT run_uuid, status FROM runs WHERE experiment_id = %s", (int(flow.experiment_id),))
        assert dict(cursor.fetchall()) == {flow.fetch: "FINISHED", flow.onnx: "FINISHED"}
    conn.close()
    # Register + alias by hand (main's evaluate step does it otherwise); load it by alias elsewhere.
    [version] = [v.version for v in client.search_model_versions(f"name='{settings.ONNX_MODEL_NAME}'")]
    client.set_registered_model_alias(settings.ONNX_MODEL_NAME, settings.CHAMPION_ALIAS, version)
    ask_champion(server.url, settings.ONNX_MODEL_NAME)
