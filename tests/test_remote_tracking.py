"""The steps against a team's tracking server: `mlflow server --app-name basic-auth` on PostgreSQL,
artifacts proxied (tests/test_main.py runs `main` through a plain `mlflow server` and restarts it).

Steps run one by one go through `mlflow run`, each from its own empty directory that is deleted
before the next step starts: steps hand each other nothing but run IDs.
"""

from __future__ import annotations

import configparser
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
from conftest import REPO, ask_champion, assert_ok, mlflow_run, step_env
from mlflow.server import get_app_client
from servers import MlflowServer, postgres

from phi3flow import settings

# minutes of main chains, servers or benchmarks: started first (tests/conftest.py)
pytestmark = pytest.mark.long

ALICE, ALICE_PASSWORD = "alice", "alice-" + secrets.token_urlsafe(16)
ADMIN, ADMIN_PASSWORD = "admin", "admin-" + secrets.token_urlsafe(16)
ADMINS_MODEL = "phi3-onnx-admins"  # registered by the admin: other users may only read it
ALICES_MODEL = "phi3-onnx-alice"  # registered by her log_onnx_wrapper run
AUTH_CONFIG = "tracking-server/basic_auth.ini"


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


def fetch_and_wrap(url: str, env: dict[str, str], tmp_path_factory, registered_model_name: str) -> Flow:
    """fetch_model, then log_onnx_wrapper (fp32: the quickest conversion) registering its model."""
    fetch = step_elsewhere("fetch_model", {"model_id": settings.BUILTIN_TINY}, url, env, tmp_path_factory)
    onnx = step_elsewhere(
        "log_onnx_wrapper",
        {"fetch_run_id": fetch, "precision": "fp32", "registered_model_name": registered_model_name},
        url, env, tmp_path_factory,
    )
    return Flow(env, fetch, onnx)


# --- `mlflow server --app-name basic-auth` ---------------------------------------------------------

@dataclass(frozen=True)
class AuthServer:
    server: MlflowServer
    database_uri: str  # its PostgreSQL backend store, for psycopg2

    @property
    def url(self) -> str:
        return self.server.url


def test_the_auth_settings_are_mlflows_defaults_with_the_credential_cache_on():
    def settings_of(path: Path) -> dict[str, str]:
        parser = configparser.ConfigParser()
        assert parser.read(path) == [str(path)]
        return dict(parser["mlflow"])

    ours = settings_of(REPO / AUTH_CONFIG)
    mlflows = settings_of(Path(mlflow.__file__).parent / "server" / "auth" / "basic_auth.ini")
    assert ours.pop("auth_cache_ttl_seconds") == "60"
    assert ours == {key: mlflows[key] for key in ours}
    assert {"default_permission", "database_uri", "admin_username"} <= ours.keys()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[AuthServer]:
    root = tmp_path_factory.mktemp("auth-server")
    # The project's auth settings, as the README starts the server: the first start creates the admin,
    # the users database is ./basic_auth.db of the server's cwd, credentials are cached for a minute.
    env = {"MLFLOW_AUTH_CONFIG_PATH": str(REPO / AUTH_CONFIG), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; the driver installed is psycopg2.
    with postgres() as database_uri, MlflowServer(root, database_uri.replace("postgresql://", "postgresql+psycopg2://"),
                                                  "--app-name", "basic-auth", env=env) as server:
        with as_user(ADMIN, ADMIN_PASSWORD):
            get_app_client("basic-auth", tracking_uri=server.url).create_user(ALICE, ALICE_PASSWORD)
            mlflow.MlflowClient(server.url).create_registered_model(ADMINS_MODEL)
        yield AuthServer(server, database_uri)


@pytest.fixture(scope="module")
def alice(auth_server, tmp_path_factory) -> Flow:
    """Alice's own experiment, her step runs in it, and the environment her steps run with."""
    with as_user(ALICE, ALICE_PASSWORD):
        experiment_id = mlflow.MlflowClient(auth_server.url).create_experiment("alice")
    env = {"MLFLOW_TRACKING_USERNAME": ALICE, "MLFLOW_TRACKING_PASSWORD": ALICE_PASSWORD,
           "MLFLOW_EXPERIMENT_ID": experiment_id}
    return fetch_and_wrap(auth_server.url, env, tmp_path_factory, ALICES_MODEL)


def _alice_runs(url: str, experiment_id: str) -> list:
    with as_user(ALICE, ALICE_PASSWORD):
        return mlflow.MlflowClient(url).search_runs([experiment_id])


def test_steps_run_with_credentials_and_the_password_is_stored_nowhere(auth_server, alice):
    # Her two step runs (the other tests of this module add refused and failed runs of hers).
    runs = [r for r in _alice_runs(auth_server.url, alice.experiment_id) if r.info.run_id in (alice.fetch, alice.onnx)]
    assert {r.info.run_id: r.info.status for r in runs} == {alice.fetch: "FINISHED", alice.onnx: "FINISHED"}
    with as_user(ALICE, ALICE_PASSWORD):
        versions = mlflow.MlflowClient(auth_server.url).search_model_versions(f"name='{ALICES_MODEL}'")
    assert [v.run_id for v in versions] == [alice.onnx]
    recorded = [value for r in runs for value in (*r.data.params.values(), *r.data.tags.values(), r.info.run_name)]
    recorded += [value for v in versions for value in (*v.tags.values(), v.source)]
    assert not [value for value in recorded if ALICE_PASSWORD in value]
    # And not a byte of the tracking database, the users database or any artifact the server holds.
    assert ALICE_PASSWORD not in database_text(auth_server.database_uri)
    server = auth_server.server
    stored = [p for p in [server.root / "basic_auth.db", *server.artifacts.rglob("*")] if p.is_file()]
    assert len(stored) > 10  # the users, model files, manifest, the ONNX model, MLmodel, requirements ...
    assert not [p for p in stored if ALICE_PASSWORD.encode() in p.read_bytes()]


def database_text(database_uri: str) -> str:
    """Every row of every table of the PostgreSQL database, as text."""
    with psycopg2.connect(database_uri) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        rows = []
        for (table,) in cursor.fetchall():
            cursor.execute(f'SELECT t::text FROM "{table}" t')
            rows += [row for (row,) in cursor.fetchall()]
    conn.close()
    assert any(ALICE in row for row in rows)  # her runs and experiment are there
    return "\n".join(rows)


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
    params = {"fetch_run_id": alice.fetch, "registered_model_name": ADMINS_MODEL}
    result = mlflow_run("log_pipeline", params, auth_server.url, **alice.env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert len(result.error_lines) == 1, result.stderr
    assert f"user '{ALICE}' lacks a permission on the tracking server {auth_server.url}" in result.error_lines[0]
    assert "model-versions/create failed with error code 403" in result.error_lines[0]
    with as_user(ALICE, ALICE_PASSWORD):
        assert mlflow.MlflowClient(auth_server.url).get_run(result.run_id).info.status == "FAILED"


def test_steps_hand_over_run_ids_only_postgres_holds_the_runs_and_the_champion_loads_elsewhere(auth_server, alice):
    with as_user(ALICE, ALICE_PASSWORD):
        client = mlflow.MlflowClient(auth_server.url)
        assert client.get_run(alice.onnx).data.tags[settings.TAG_FETCH_RUN_ID] == alice.fetch
        for run_id in (alice.fetch, alice.onnx):
            assert client.get_run(run_id).info.artifact_uri == (
                f"mlflow-artifacts:/{alice.experiment_id}/{run_id}/artifacts")
        # The runs really are rows of the PostgreSQL database.
        with psycopg2.connect(auth_server.database_uri) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT run_uuid, status FROM runs WHERE run_uuid IN (%s, %s)", (alice.fetch, alice.onnx))
            assert dict(cursor.fetchall()) == {alice.fetch: "FINISHED", alice.onnx: "FINISHED"}
        conn.close()
        # Register + alias by hand (main's evaluate step does it otherwise); load it by alias elsewhere.
        [version] = [v.version for v in client.search_model_versions(f"name='{ALICES_MODEL}'")]
        client.set_registered_model_alias(ALICES_MODEL, settings.CHAMPION_ALIAS, version)
        ask_champion(auth_server.url, ALICES_MODEL)
