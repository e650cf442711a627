"""A model server for a benchmark: started on a free port, waited for, measured, stopped.

`mlflow models serve` (the `/invocations` scoring server) and the project's `serve` step (the
OpenAI-compatible server) both start through `serving`, on top of phi3flow.local_server.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from phi3flow import local_server

from .rss import TreeSampler

MLFLOW = str(Path(sys.executable).parent / "mlflow")


@dataclass
class Server:
    url: str  # http://127.0.0.1:<port>
    start_s: float  # seconds from the start of the process until its health URL answered
    rss: TreeSampler | None  # the RSS of its process tree since it started, if asked for


def mlflow_models_serve(model_uri: str, workers: int = 1) -> Callable[[int], list[str]]:
    """The `mlflow models serve` command line for a port."""
    return lambda port: [MLFLOW, "models", "serve", "-m", model_uri, "--env-manager", "local",
                         "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)]


def openai_serve(model_uri: str) -> Callable[[int], list[str]]:
    """The project's `serve` step (OpenAI-compatible) command line for a port."""
    return lambda port: [sys.executable, "-m", "steps.serve", "--model-uri", model_uri, "--port", str(port)]


@contextlib.contextmanager
def serving(command: Callable[[int], list[str]], health_path: str, log: Path, *, cwd: Path, env: dict[str, str],
            timeout_s: float = 600, grace_s: float = 30, sample_rss: bool = False) -> Iterator[Server]:
    """Start command(port) on a free port, wait until health_path answers, yield it; stop it after.

    With sample_rss the process tree's RSS (the CLI, uvicorn and its workers) is sampled from the
    start: loading the model is part of its peak."""
    port = local_server.free_port()
    # `mlflow models serve` starts `uvicorn` by name: the interpreter's own, also from an unactivated venv
    env = {**env, "PATH": os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))}
    t0 = time.monotonic()
    proc = local_server.spawn(command(port), log, cwd=cwd, env=env)
    sampler = TreeSampler(proc.pid).start() if sample_rss else None
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            local_server.wait_until_up(proc, url + health_path, log, timeout_s)
        except local_server.ServerFailed as exc:
            raise SystemExit(str(exc)) from None
        yield Server(url, time.monotonic() - t0, sampler)
    finally:
        local_server.stop(proc, grace_s)
        if sampler:
            sampler.stop()
