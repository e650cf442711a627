"""User mistakes become one clear line and a non-zero exit, never a traceback.

MLflow is imported where it is used, not here: the ONNX conversion's own process imports this
module (for UserError) and would otherwise spend 2 s importing MLflow it never calls.
"""

from __future__ import annotations

import gc
import os
import re
import sys
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    import click
    from mlflow.exceptions import MlflowException


class UserError(Exception):
    """Bad input from the person running a step: reported as one line, exit status 1."""


# MLflow error codes of a tracking server that refuses the caller (HTTP 401 and 403).
AUTH_ERROR_CODES = {"UNAUTHENTICATED", "PERMISSION_DENIED"}


def auth_error_message(exc: MlflowException) -> str:
    """One line for a request the tracking server refused: who asked, where, and what to fix."""
    import mlflow

    server = mlflow.get_tracking_uri()
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    detail = " ".join(exc.message.split())  # the server's answer names the endpoint; keep it on one line
    if exc.error_code == "PERMISSION_DENIED":
        return f"user '{user}' lacks a permission on the tracking server {server}: {detail}"
    if user:
        return f"the tracking server {server} refused the credentials of '{user}': {detail}"
    return (f"the tracking server {server} needs credentials: "
            f"set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD ({detail})")


def run_step(main: click.Command) -> None:
    """Run a step's click command; a user's mistake is printed as one line on stderr and exits 1.

    The process ends right after: its heap is frozen first (gc.freeze), so that Python's shutdown does
    not walk the objects of torch, transformers and MLflow looking for cycles to collect (about 1.7 s
    of every step's end). Exit handlers still run (MLflow's included); only cyclic garbage is left to the OS.

    The mistakes: a UserError, an interrupt, a tracking server refusing the user's credentials or
    permissions, or one that does not answer. Before main, the process is set up (step_process.start).
    Steps open their MLflow run with `with mlflow.start_run()`, so the run is already marked FAILED
    when the error reaches this point (when the server lets us).
    """
    import click
    from mlflow.exceptions import MlflowException

    from phi3flow import step_process  # it raises UserError: imported here, not in a cycle

    try:
        step_process.start()
        # Not click's standalone mode: it would print "Aborted!" for an interrupt and exit by itself, and
        # an interrupt that came before the step's `with mlflow.start_run()` would leave the run RUNNING.
        exit_code = main.main(standalone_mode=False)
    except click.ClickException as exc:  # a bad option: click's own usage message and exit status
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        _fail(str(exc))
    except (KeyboardInterrupt, click.Abort):  # click raises Abort for the KeyboardInterrupt it caught
        _end_run_failed()
        _fail("interrupted (Ctrl-C, SIGTERM, or the process that started this step ended): the run was marked FAILED")
    except MlflowException as exc:
        refusal, outage = _auth_refusal(exc), outage_message(exc)
        if refusal is not None:
            _fail(auth_error_message(refusal))
        if outage is None:
            raise
        _fail(outage)
    finally:
        gc.freeze()
    sys.exit(exit_code or 0)  # --help, or a command that ends with ctx.exit(n)


def _auth_refusal(exc: BaseException | None) -> MlflowException | None:
    """The server's 401/403 behind exc: MLflow re-raises some (a refused experiment lookup
    becomes "experiment does not exist"), keeping the refusal as the cause."""
    from mlflow.exceptions import MlflowException

    while exc is not None:
        if isinstance(exc, MlflowException) and exc.error_code in AUTH_ERROR_CODES:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


# What MLflow's http_request raises once its retries are spent (mlflow/utils/rest_utils.py).
_REQUEST_FAILED = re.compile(r"API request to (\S+) failed with (?:timeout )?exception (.*)", re.DOTALL)


def outage_message(exc: BaseException | None) -> str | None:
    """One line for a tracking-server request that got no usable answer: the server, the call, why.

    The first failed request is the cause; the FAILED status MLflow then tries to set fails too,
    with the first failure as its context.
    """
    from mlflow.exceptions import MlflowException

    first = None
    while exc is not None:
        if isinstance(exc, MlflowException) and (found := _REQUEST_FAILED.search(exc.message)):
            first = found
        exc = exc.__cause__ or exc.__context__
    if first is None:
        return None
    url = urlparse(first.group(1))
    detail = first.group(2)
    reason = re.search(r"\[Errno -?\d+\] ([^'\")]+)|(Read timed out)|(too many \d+ error responses)", detail)
    why = next(group for group in reason.groups() if group) if reason else " ".join(detail.split())[:200]
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "")
    return (f"the tracking server {url.scheme}://{url.netloc} failed the call {url.path} after {retries} "
            f"retries ({why}); "
            f"MLFLOW_HTTP_REQUEST_MAX_RETRIES and MLFLOW_HTTP_REQUEST_TIMEOUT set how long a step waits")


def _end_run_failed() -> None:
    """End the run `mlflow run` made for this process FAILED, if it is still RUNNING.

    The step's `with mlflow.start_run()` does that for an interrupt inside it; one that arrives before
    (while the process starts, or while start_run resumes the run) would leave the run RUNNING when
    `mlflow run` itself is gone (killed with its main) and cannot end it. Best effort: with the
    tracking server down, the next main's sweep of stale runs ends it instead, and the one-line
    message still comes first.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from phi3flow import step_process

    run_id = step_process.started_run_id()
    if not run_id:
        return

    client = mlflow.MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    except MlflowException:
        pass


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)
