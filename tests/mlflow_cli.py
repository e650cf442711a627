"""The `mlflow` command line, run in a fresh process without paying for its imports each time.

`mlflow run` spends about 7 s of CPU importing MLflow's command line before it starts a step, and
the suite calls it dozens of times on two cores. Here a multiprocessing fork server imports
`mlflow.cli` once per test process; each call is a process forked from it that takes the caller's
environment, working directory and argv and runs MLflow's own click command, with stdout and stderr
in files: what `mlflow ARGS` does, exit status, output and the step's own process included. The fork
server imports nothing else and never opens a tracking store, so every child starts clean.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(["mlflow.cli"])


def _cli_main(argv: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """In the forked child: become `mlflow argv` in cwd with env, then exit with its status."""
    os.setsid()  # one process group with the step it starts, so a timeout ends both
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((0, os.devnull), (1, stdout), (2, stderr)):
        opened = os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_TRUNC)
        os.dup2(opened, fd)
        os.close(opened)
    from mlflow.cli import cli

    try:
        cli.main(argv, prog_name="mlflow")
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:  # what the interpreter prints for an uncaught exception, and its status
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run(argv: list[str], env: dict[str, str], cwd: Path | None, timeout: float) -> subprocess.CompletedProcess:
    """`mlflow argv` as subprocess.run(..., capture_output=True, text=True, timeout=timeout) runs it."""
    with tempfile.TemporaryDirectory(prefix="mlflow-cli-") as tmp:
        stdout, stderr = Path(tmp, "stdout"), Path(tmp, "stderr")
        stdout.touch()
        stderr.touch()
        child = _context.Process(target=_cli_main, args=(argv, env, str(cwd or Path.cwd()), str(stdout), str(stderr)))
        child.start()
        child.join(timeout)
        if child.exitcode is None:
            with contextlib.suppress(ProcessLookupError):  # its group may have ended meanwhile
                os.killpg(child.pid, signal.SIGKILL)
            child.join()
            raise subprocess.TimeoutExpired(["mlflow", *argv], timeout, stdout.read_text(), stderr.read_text())
        return subprocess.CompletedProcess(["mlflow", *argv], child.exitcode, stdout.read_text(), stderr.read_text())
