"""User mistakes become one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import mlflow
from mlflow.exceptions import MlflowException


class UserError(Exception):
    """Bad input from the person running a step: reported as one line, exit status 1."""


# MLflow error codes of a tracking server that refuses the caller (HTTP 401 and 403).
AUTH_ERROR_CODES = {"UNAUTHENTICATED", "PERMISSION_DENIED"}


def auth_error_message(exc: MlflowException) -> str:
    """One line for a request the tracking server refused: who asked, where, and what to fix."""
    server = mlflow.get_tracking_uri()
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
    detail = " ".join(exc.message.split())  # the server's answer names the endpoint; keep it on one line
    if exc.error_code == "PERMISSION_DENIED":
        return f"user '{user}' lacks a permission on the tracking server {server}: {detail}"
    if user:
        return f"the tracking server {server} refused the credentials of '{user}': {detail}"
    return f"the tracking server {server} needs credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD ({detail})"


def run_step(main: Callable[[], None]) -> None:
    """Run a step's main function; a user's mistake is printed as one line on stderr and exits 1.

    The mistakes: a UserError, or a tracking server refusing the user's credentials or
    permissions. Steps open their MLflow run with `with mlflow.start_run()`, so the run is
    already marked FAILED when the error reaches this point (when the server lets us).
    """
    try:
        main()
    except UserError as exc:
        _fail(str(exc))
    except MlflowException as exc:
        refusal = _auth_refusal(exc)
        if refusal is None:
            raise
        _fail(auth_error_message(refusal))


def _auth_refusal(exc: BaseException | None) -> MlflowException | None:
    """The server's 401/403 behind exc: MLflow re-raises some (a refused experiment lookup
    becomes "experiment does not exist"), keeping the refusal as the cause."""
    while exc is not None:
        if isinstance(exc, MlflowException) and exc.error_code in AUTH_ERROR_CODES:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)
