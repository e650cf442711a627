"""A server process on 127.0.0.1 (`mlflow server`, `mlflow models serve`): start, wait until up, stop.

The tests and benchmarks start real MLflow servers; this is the one place that knows how.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


class ServerFailed(RuntimeError):
    """The server exited or did not answer in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(cmd: list[str], log: Path, *, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start cmd with its output appended to log, in a session of its own so that stop() also ends
    the workers it forks (uvicorn, gunicorn)."""
    with log.open("ab") as out:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def wait_until_up(proc: subprocess.Popen, health_url: str, log: Path, timeout_s: float) -> None:
    """Poll health_url until it answers 200; ServerFailed (and the server stopped) otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"{proc.args[1:3]} exited with status {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:  # refused while it starts, or an HTTP error
            pass
        time.sleep(0.25)
    stop(proc)
    raise ServerFailed(f"{health_url} did not answer within {timeout_s:.0f} s:\n{_tail(log)}")


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the server's whole session, SIGKILL after grace_s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the session has already ended
        proc.wait()
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)
