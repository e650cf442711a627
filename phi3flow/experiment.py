"""The experiment `mlflow run <this project>` lands in when the user names none: `phi3flow`, not `Default`.

`mlflow run` creates the run before any of the project's code runs, in MLFLOW_EXPERIMENT_NAME or
MLFLOW_EXPERIMENT_ID, `--experiment-name`/`--experiment-id`, or else the experiment a registered
default experiment provider (the `mlflow.default_experiment_provider` entry point group) names.
The project registers this provider there (pyproject.toml), so it answers only when nothing else
chose an experiment, and only for an `mlflow run` of this project's folder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlflow
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking.default_experiment.abstract_context import DefaultExperimentProvider

from phi3flow import settings

PROJECT_NAME = "phi3flow"  # the `name:` of this project's MLproject


def runs_this_project(argv: list[str]) -> bool:
    """True for the command line of `mlflow run ... <a folder whose MLproject is this project> ...`."""
    if len(argv) < 3 or Path(argv[0]).name != "mlflow" or argv[1] != "run":
        return False
    for arg in argv[2:]:
        mlproject = Path(arg).expanduser() / "MLproject"
        try:
            if mlproject.is_file() and yaml.safe_load(mlproject.read_text()).get("name") == PROJECT_NAME:
                return True
        except (OSError, yaml.YAMLError, AttributeError):  # not a project folder, or not ours
            continue
    return False


def experiment_id(name: str = settings.DEFAULT_EXPERIMENT_NAME) -> str:
    """The id of the experiment called name, created if it does not exist yet."""
    client = mlflow.MlflowClient()
    if found := client.get_experiment_by_name(name):
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created by another run in the meantime
        return client.get_experiment_by_name(name).experiment_id


class ProjectExperimentProvider(DefaultExperimentProvider):
    def in_context(self) -> bool:
        return runs_this_project(sys.argv)

    def get_experiment_id(self) -> str:
        return experiment_id()
