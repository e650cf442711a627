"""User mistakes become one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the person running a step: reported as one line, exit status 1."""


def run_step(main: Callable[[], None]) -> None:
    """Run a step's main function; a UserError is printed as one line on stderr and exits 1.

    Steps open their MLflow run with `with mlflow.start_run()`, so the run is already marked
    FAILED when the error reaches this point.
    """
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)


def not_implemented(entry_point: str) -> None:
    print(f"error: entry point '{entry_point}' is not implemented yet", file=sys.stderr)
    sys.exit(2)
