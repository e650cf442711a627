"""Real servers for the tests, on free loopback ports: `mlflow server`, a throwaway PostgreSQL, and a
Hugging Face Hub that serves the files of model repos laid out like the real ones."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow_cli
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
        self.proc = start_process(cmd, self.log, cwd=self.root, env=self.env)
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


def start_process(cmd: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen | mlflow_cli.Spawned:
    """cmd in a session of its own, its output appended to log: an `mlflow` command from the fork
    server (tests/mlflow_cli.py: its seconds of imports paid once), anything else as a new process."""
    if cmd[0] == str(BIN / "mlflow"):
        return mlflow_cli.spawn(cmd[1:], log, env, cwd)
    return local_server.spawn(cmd, log, cwd=cwd, env=env)


@contextmanager
def serving_process(cmd_for_port, log: Path, cwd: Path, env: dict[str, str], health_path: str,
                    timeout_s: float) -> Iterator[tuple[str, subprocess.Popen]]:
    """A model server (`mlflow models serve`, `serve`) started on a free port with its output in log:
    (its URL, its process) once health_path answers; the test fails with the log's tail if it never
    does. Stopped (its whole session) however the test ends."""
    port = local_server.free_port()
    process = start_process(cmd_for_port(port), log, cwd, env)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            local_server.wait_until_up(process, f"{url}{health_path}", log, timeout_s=timeout_s)
        except local_server.ServerFailed as exc:
            pytest.fail(str(exc))
        yield url, process
    finally:
        local_server.stop(process, grace_s=15)


def _postgres_bin(name: str) -> str:
    """A PostgreSQL server program: on PATH, or where Debian's packages put it."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        pytest.fail(f"PostgreSQL is not installed ('{name}' is neither on PATH nor in /usr/lib/postgresql/*/bin); "
                    f"install it with: {POSTGRES_INSTALL}")
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
        started = subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60",
                                  "start"], capture_output=True, text=True, timeout=120)
        assert started.returncode == 0, (f"pg_ctl start failed:\n{started.stderr}\n"
                                         f"{log.read_text(errors='replace')[-3000:] if log.exists() else ''}")
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            conn.cursor().execute("CREATE DATABASE mlflow")
            conn.close()
            yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
        finally:
            subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                           timeout=120)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- a Hugging Face Hub on loopback (HF_ENDPOINT) -------------------------------------------------

@dataclass
class HubRepo:
    """A model repo: its files at each revision (branch or tag name -> path -> content)."""

    revisions: dict[str, dict[str, bytes]]
    gated: bool = False  # every request answered 401 GatedRepo, as the Hub does without an accepted licence


# Weights are stored with Git LFS on the Hub: their ETag is the content's sha256, not a git blob id.
_LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".onnx", ".onnx.data", ".model")


def commit_sha(repo_id: str, revision: str, files: dict[str, bytes]) -> str:
    """A stable 40-hex commit id for a revision's content."""
    digest = hashlib.sha1(f"{repo_id}@{revision}".encode())
    for path in sorted(files):
        digest.update(path.encode() + hashlib.sha1(files[path]).digest())
    return digest.hexdigest()


@dataclass
class FakeHub:
    """The routes of the Hub that huggingface_hub's `HfApi.model_info` and `snapshot_download` call
    (revision info, recursive tree listing, HEAD/GET of `resolve/` with byte ranges), with the Hub's
    error headers (X-Error-Code: RepoNotFound, RevisionNotFound, GatedRepo).

    The real client talks to it over HTTP, so everything between the project and the Hub is real;
    only the Hub is small. `requests` records (method, path, Range header) of every request;
    a path in `interrupt` has its next full GET cut off halfway, as a dropped connection does.
    A repo id containing "slow" is never answered (a Hub that hangs).
    """

    repos: dict[str, HubRepo]
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    interrupt: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeHub:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def sha(self, repo_id: str, revision: str) -> str:
        return commit_sha(repo_id, revision, self.repos[repo_id].revisions[revision])

    @staticmethod
    def cut_at(content: bytes) -> int:
        """Where an interrupted GET of content stops: for a file bigger than huggingface_hub's 10 MB
        read chunk, past the first chunk, so the client has kept some of it."""
        return len(content) * 3 // 4

    def downloads(self) -> list[str]:
        """The file paths fetched with GET (not HEAD), in order."""
        return [path for method, path, _ in self.requests if method == "GET" and "/resolve/" in path]

    def _files(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """(commit sha, files) of a branch, tag or commit sha of repo_id."""
        for name, files in self.repos[repo_id].revisions.items():
            sha = commit_sha(repo_id, name, files)
            if revision in (name, sha):
                return sha, files
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
                self._answer(send_body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(send_body=True)

            def _error(self, status: int, code: str, message: str) -> None:
                body = json.dumps({"error": message}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", message)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body)

            def _json(self, data: object) -> None:
                body = json.dumps(data).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _answer(self, send_body: bool) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                if "slow" in path:
                    time.sleep(120)
                    return
                api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                repo_id = (api or resolve).group(1) if (api or resolve) else None
                if repo_id not in hub.repos:
                    return self._error(404, "RepoNotFound", "Repository not found")
                if hub.repos[repo_id].gated:
                    return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                                                         "access to it and be authenticated to access "
                                                         "it. Please log in.")
                found = hub._files(repo_id, (api or resolve).group(3 if api else 2))
                if found is None:
                    return self._error(404, "RevisionNotFound", "Invalid rev id")
                sha, files = found
                if api and api.group(2) == "revision":
                    return self._json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                                       "siblings": [{"rfilename": p} for p in sorted(files)]})
                if api:  # tree: every file, recursive (one page: these repos are small)
                    return self._json([self._entry(p, files[p]) for p in sorted(files)])
                if resolve.group(3) not in files:
                    return self._error(404, "EntryNotFound", "Entry not found")
                self._file(resolve.group(3), files[resolve.group(3)], sha, send_body)

            @staticmethod
            def _entry(path: str, content: bytes) -> dict:
                entry = {"type": "file", "oid": hashlib.sha1(content).hexdigest(), "size": len(content), "path": path}
                if path.endswith(_LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content),
                                    "pointerSize": 134}
                return entry

            def _file(self, path: str, content: bytes, sha: str, send_body: bool) -> None:
                lfs = path.endswith(_LFS_SUFFIXES)
                etag = hashlib.sha256(content).hexdigest() if lfs else hashlib.sha1(content).hexdigest()
                start = int(m.group(1)) if (m := re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")) else 0
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", sha)
                self.send_header("ETag", f'"{etag}"')
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(content) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
                self.end_headers()
                if not send_body:
                    return
                if path in hub.interrupt and not start:
                    hub.interrupt.discard(path)
                    self.wfile.write(content[: hub.cut_at(content)])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
                    return
                self.wfile.write(content[start:])

        return Handler
