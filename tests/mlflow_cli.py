"""The `mlflow` command line, run in a fresh process without paying for its imports each time.

Every `mlflow` command spends about 4 s of CPU importing MLflow's command line before it does
anything, and the suite starts dozens of them (steps, servers, `mlflow models serve`) on two cores.
Here a multiprocessing fork server imports `mlflow.cli` once per test process; each command is a
process forked from it that takes the caller's environment, working directory and argv (sys.argv as
the `mlflow` script would have it) and runs MLflow's own click command, with its output in files:
what `mlflow ARGS` does, exit status, signals, output and the processes it starts included. The fork
server imports nothing else and never opens a tracking store, so every child starts clean.

run() waits for the command, as subprocess.run does; spawn() starts a server or a run in the
background and returns what subprocess.Popen would, for the parts the tests use.
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
    os.setsid()  # a session of its own with the processes it starts, so that one killpg ends them all
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # the `mlflow` script beside this Python: what MLflow and the project read of their command line
    sys.argv = [str(Path(sys.executable).parent / "mlflow"), *argv]
    for fd, path in ((0, os.devnull), (1, stdout), (2, stderr)):
        opened = os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_APPEND | os.O_CREAT)
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


class Spawned:
    """`mlflow argv` running in the background, its stdout and stderr appended to one log: the parts
    of subprocess.Popen that the tests and phi3flow.local_server use. Its pid is its session's id."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str], cwd: Path):
        self.args = ["mlflow", *argv]
        self._child = _context.Process(target=_cli_main, args=(argv, env, str(cwd), str(log), str(log)))
        self._child.start()
        self.pid = self._child.pid

    @property
    def returncode(self) -> int | None:
        return self._child.exitcode

    def poll(self) -> int | None:
        return self._child.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._child.join(timeout)
        if self._child.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._child.exitcode

    def send_signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def spawn(argv: list[str], log: Path, env: dict[str, str], cwd: Path) -> Spawned:
    """`mlflow argv` started in the background, as subprocess.Popen(..., start_new_session=True) starts it."""
    return Spawned(argv, log, env, cwd)
