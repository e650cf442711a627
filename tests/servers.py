"""Real servers for the tests, on free loopback ports: `mlflow server` and a throwaway PostgreSQL."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import pytest

from conftest import BIN
from phi3flow import local_server

POSTGRES_INSTALL = "apt-get update && apt-get install -y postgresql"
START_TIMEOUT_S = 180  # a server on a busy 2-core machine takes 15-30 s to answer /health


class MlflowServer:
    """`mlflow server` with proxied artifact storage (`--artifacts-destination`), on 127.0.0.1.

    stop() then start() restarts it on the same port and the same stores.
    """

    def __init__(self, root: Path, backend_store_uri: str, *extra_args: str, env: dict[str, str] | None = None):
        self.root = root
        self.backend_store_uri = backend_store_uri
        self.artifacts = root / "artifacts"
        self.log = root / "server.log"
        self.port = local_server.free_port()
        self.extra_args = list(extra_args)
        self.env = {
            **os.environ,
            # The server's background job runner is for MLflow features this project does not use.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            **(env or {}),
        }
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        cmd = [
            str(BIN / "mlflow"), "server",
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", str(self.artifacts),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            *self.extra_args,
        ]
        self.proc = local_server.spawn(cmd, self.log, cwd=self.root, env=self.env)
        try:
            local_server.wait_until_up(self.proc, f"{self.url}/health", self.log, START_TIMEOUT_S)
        except local_server.ServerFailed as exc:
            pytest.fail(str(exc))
        return self

    def stop(self) -> None:
        if self.proc is not None:
            local_server.stop(self.proc)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, or where Debian's packages put it."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        pytest.fail(f"PostgreSQL is not installed ('{name}' is neither on PATH nor in /usr/lib/postgresql/*/bin); install it with: {POSTGRES_INSTALL}")
    return found


@contextmanager
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port; yields the URI of an empty database."""
    initdb, pg_ctl = _postgres_bin("initdb"), _postgres_bin("pg_ctl")
    # PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user that
    # Debian's package creates, in a folder that user can reach (pytest's tmp folders are 0700 root).
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="phi3flow-postgres-"))
    if as_owner:
        shutil.chown(root, "postgres")
    data, log, port = root / "data", root / "postgres.log", local_server.free_port()
    try:
        subprocess.run([*as_owner, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"],
                                 capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, f"pg_ctl start failed:\n{started.stderr}\n{log.read_text(errors='replace')[-3000:] if log.exists() else ''}"
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            conn.cursor().execute("CREATE DATABASE mlflow")
            conn.close()
            yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
        finally:
            subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, timeout=120)
    finally:
        shutil.rmtree(root, ignore_errors=True)
