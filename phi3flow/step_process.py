"""What a step process sets up before its work (errors.run_step calls start()), so that a run can be
stopped and cleaned up whoever started it and whichever of its processes was killed.

- It stops when the process that started it ends (its `mlflow run` CLI, or main), and SIGTERM ends
  its run FAILED like Ctrl-C does, wherever the interrupt lands.
- Its owner ("<host>:<pid>") is recorded on its run, so a later main marks it KILLED if it was
  left RUNNING by a hard kill.
- Tracking-server requests give up after a bounded number of retries (settings.TRACKING_HTTP_DEFAULTS).
- Its temporary files live in <tmp root>/<host>-<pid>; folders of dead processes are removed.
- Third-party progress bars show only on a terminal (output.quiet_progress_bars).
- main holds the run lock of its tracking server and experiment for its whole life; the steps it
  starts share it, so the lock is free only once every process of the run has ended.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from phi3flow import output, settings
from phi3flow.errors import UserError

LOCK_REFUSED = "another run of main is in progress"  # the start of main's one line when the lock is held
_held_locks: list[int] = []  # open file descriptors: a flock lasts as long as its descriptor is open
_started = False
# The run `mlflow run` made for this process (MLFLOW_RUN_ID): mlflow.start_run() takes the variable out
# of the environment before the run is active, so an interrupt in between would leave nothing to end.
_run_id: str | None = None


def owner() -> str:
    """Who runs this process, to recognise a RUNNING run whose process is gone."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_is_gone(tag: str | None) -> bool:
    """True only for an owner on this host whose process no longer exists; other hosts are unknowable."""
    host, _, pid = (tag or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    return not _alive(int(pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:  # no /proc (not Linux): the signal test is all there is
        return True
    return state != "Z"  # a zombie (ended, not yet reaped) holds no lock and does no work


def start() -> None:
    """Everything above, once per process."""
    global _started, _run_id
    if _started:
        return
    _started = True
    for name, value in settings.TRACKING_HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    output.quiet_progress_bars()
    die_with_parent()
    signal.signal(signal.SIGTERM, _interrupt)
    sys.unraisablehook = _raise_swallowed_interrupt
    share_run_lock()
    use_private_tmp()
    _run_id = os.environ.get("MLFLOW_RUN_ID")  # set by `mlflow run` and mlflow.projects.run
    if _run_id:
        import mlflow  # here: the conversion process imports this module for die_with_parent alone

        mlflow.MlflowClient().set_tag(_run_id, settings.TAG_OWNER, owner())


def started_run_id() -> str | None:
    """The run `mlflow run` made for this step process, if start() found one."""
    return _run_id


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM (cron timeouts, systemd, kill, the parent's death) takes the same path as Ctrl-C: the
    # step's `with mlflow.start_run()` ends its run FAILED instead of leaving it RUNNING.
    if _in_unraisable_hook:  # raised here, it would be dropped as well
        _interrupt_soon()
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not interrupt the clean-up
    raise KeyboardInterrupt


_in_unraisable_hook = False


def _raise_swallowed_interrupt(unraisable: sys.UnraisableHookArgs) -> None:
    """sys.unraisablehook: raise again an interrupt that Python swallowed.

    An exception raised inside a weakref callback or a __del__ is printed as "Exception ignored" and
    dropped, and garbage collection runs those anywhere (SQLAlchemy's, while a step talks to its
    tracking store). A SIGTERM that lands there would be lost: the step would work on to the end with
    the process that started it gone. The signal is sent to the main thread again.
    """
    global _in_unraisable_hook
    interrupt = isinstance(unraisable.exc_value, KeyboardInterrupt)
    if not interrupt or threading.current_thread() is not threading.main_thread():
        sys.__unraisablehook__(unraisable)
        return
    _in_unraisable_hook = True
    try:
        signal.signal(signal.SIGTERM, _interrupt)
        _interrupt_soon()
    finally:
        _in_unraisable_hook = False


def _interrupt_soon() -> None:
    """SIGTERM to the main thread, from another thread in a moment: a real signal, so that a blocking call
    of the main thread is interrupted too."""
    sender = threading.Timer(0.01, signal.pthread_kill, (threading.main_thread().ident, signal.SIGTERM))
    sender.daemon = True
    sender.start()


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent ends (prctl PR_SET_PDEATHSIG).

    `mlflow run` stops only its own process on SIGTERM, and a killed main cannot stop its step:
    without this the step would work on as an orphan. Python's standard library has no prctl.
    """
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


def lock_path(tracking_uri: str, experiment_id: str) -> Path:
    """One lock file per tracking server and experiment on this host."""
    key = hashlib.sha256(f"{tracking_uri}\0{experiment_id}".encode()).hexdigest()[:16]
    return tmp_root() / "locks" / f"main-{key}.lock"


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def hold_run_lock(tracking_uri: str, experiment_id: str) -> Path:
    """main's lock, held (shared with its steps) until this process exits; UserError if a run holds it.

    Every process of a run holds the lock file shared. A new main takes it exclusively for an
    instant to prove that nobody holds it, then turns that into a shared hold; a second file (the
    gate) keeps other new mains out while it does, because Linux releases a flock before converting it.
    """
    path = lock_path(tracking_uri, experiment_id)
    gate = _open(path.with_suffix(".gate"))
    try:
        fcntl.flock(gate, fcntl.LOCK_EX)
        lock = _open(path)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise UserError(f"{LOCK_REFUSED} on {tracking_uri}, experiment {experiment_id} "
                            f"(lock {path}): not starting") from None
        fcntl.flock(lock, fcntl.LOCK_SH)
    finally:
        os.close(gate)
    _held_locks.append(lock)
    # The steps main starts get no inherited descriptors (MLflow starts them with close_fds=True):
    # they open the lock themselves.
    os.environ[settings.RUN_LOCK_ENV] = str(path)
    os.environ[settings.RUN_LOCK_PID_ENV] = str(os.getpid())
    return path


def share_run_lock() -> None:
    """A step started by main holds main's lock shared for its whole life."""
    path = os.environ.get(settings.RUN_LOCK_ENV)
    if not path:
        return
    lock = _open(Path(path))
    fcntl.flock(lock, fcntl.LOCK_SH)
    _held_locks.append(lock)
    main_pid = int(os.environ[settings.RUN_LOCK_PID_ENV])
    if not _alive(main_pid):  # main was killed before this step held the lock: another run may have started
        raise UserError(f"main (process {main_pid}) ended before this step started: not running it")


def tmp_root() -> Path:
    return Path(os.environ.get(settings.TMP_ROOT_ENV) or Path(tempfile.gettempdir()) / "phi3flow")


def use_private_tmp() -> Path:
    """Point this process and its children at <tmp root>/<host>-<pid>, removed at exit, after removing
    the folders of processes on this host that are gone (a kill leaves a conversion's gigabytes)."""
    root = tmp_root()
    remove_dead_tmp(root)
    mine = root / owner().replace(":", "-")
    mine.mkdir(parents=True, exist_ok=True)
    os.environ[settings.TMP_ROOT_ENV] = str(root)  # steps main starts make their own folders beside this one
    os.environ["TMPDIR"] = str(mine)
    tempfile.tempdir = str(mine)
    atexit.register(shutil.rmtree, mine, ignore_errors=True)
    return mine


def remove_dead_tmp(root: Path) -> list[Path]:
    removed = []
    for folder in sorted(root.glob("*-*")):
        found = re.fullmatch(r"(.+)-(\d+)", folder.name)
        if folder.is_dir() and found and owner_is_gone(f"{found.group(1)}:{found.group(2)}"):
            size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
            shutil.rmtree(folder, ignore_errors=True)
            print(f"removed {folder} ({size / 1e9:.2f} GB), left by a process that is gone", flush=True)
            removed.append(folder)
    return removed
