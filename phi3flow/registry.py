"""Find a step's logged model by run ID, register it, and move the `champion` alias by a declared rule.

The rule (names in settings.py): the candidate with the best QUALITY_METRIC wins, THROUGHPUT_METRIC
breaks ties. The alias moves to the winner only if the winner's quality is at least the current
champion's minus the tolerance, both measured in the same evaluation, so a scheduled rerun never
silently promotes a worse model. One alias across all the given registered names: exactly one
version of one of them is the champion.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import mlflow
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from phi3flow import settings
from phi3flow.artifacts import finished_run
from phi3flow.errors import UserError


@dataclass(frozen=True)
class StepModel:
    run: Run
    model_id: str  # the logged model, m-...

    @property
    def uri(self) -> str:
        return f"models:/{self.model_id}"


def logged_model_of(run_id: str, model_name: str, step: str) -> StepModel:
    """The model named model_name that run_id logged (a `log_pipeline` or `log_onnx_wrapper` run)."""
    client = mlflow.MlflowClient()
    run = finished_run(run_id)
    for output in run.outputs.model_outputs if run.outputs else []:
        if client.get_logged_model(output.model_id).name == model_name:
            return StepModel(run, output.model_id)
    raise UserError(f"run '{run_id}' logged no model named '{model_name}': is it a {step} run?")


def register(model: StepModel, name: str) -> ModelVersion:
    """The version of `name` holding this logged model; registered now unless an earlier run did."""
    client = mlflow.MlflowClient()
    try:
        existing = client.search_model_versions(f"name = '{name}' and run_id = '{model.run.info.run_id}'")
    except MlflowException:  # no such registered model yet
        existing = []
    for version in existing:
        if version.source == model.uri:  # registered from this logged model before
            return version
    return mlflow.register_model(model.uri, name)


# What the registry answers for a missing registered model (RESOURCE_DOES_NOT_EXIST) and for a missing
# alias (INVALID_PARAMETER_VALUE: "Registered model alias champion not found"), over REST and in-process.
NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}


def current_champion(names: list[str]) -> ModelVersion | None:
    """The version holding the champion alias among the registered names (the newest if several)."""
    client = mlflow.MlflowClient()
    holders = []
    for name in names:
        try:
            holders.append(client.get_model_version_by_alias(name, settings.CHAMPION_ALIAS))
        except MlflowException as error:
            # Only "no such model" or "no such alias" means no holder here; anything else (a busy or
            # failing tracking server) must not read as "there is no champion", or a promotion would
            # decide against nothing.
            if error.error_code not in NOT_FOUND_CODES:
                raise
    return max(holders, key=lambda v: v.creation_timestamp, default=None)


@dataclass(frozen=True)
class Candidate:
    label: str
    version: ModelVersion
    quality: float
    throughput: float

    @property
    def ref(self) -> str:
        return f"{self.version.name}/{self.version.version}"


@dataclass(frozen=True)
class Decision:
    action: str  # promoted | unchanged | rejected
    champion: Candidate  # holds the alias after the decision
    reason: str


def same_version(a: ModelVersion, b: ModelVersion) -> bool:
    return (a.name, str(a.version)) == (b.name, str(b.version))


def decide(candidates: list[Candidate], champion: Candidate | None, tolerance: float) -> Decision:
    q = settings.QUALITY_METRIC
    winner = max(candidates, key=lambda c: (c.quality, c.throughput))
    others = ", ".join(f"{c.ref} {q}={c.quality:.4f}" for c in candidates if c is not winner)
    why = (f"{winner.ref} wins with {q}={winner.quality:.4f}, {settings.THROUGHPUT_METRIC}={winner.throughput:.1f} "
           f"({f'vs {others}' if others else 'the only candidate'})")
    if champion is None:
        return Decision("promoted", winner, f"{why}; there was no champion")
    if same_version(winner.version, champion.version):
        return Decision("unchanged", champion, f"{why}; it is already the champion")
    if winner.quality >= champion.quality - tolerance:
        return Decision("promoted", winner,
                        f"{why}; champion {champion.ref} has {q}={champion.quality:.4f}, within tolerance {tolerance}")
    return Decision(
        "rejected", champion,
        f"{why}; but it regresses against champion {champion.ref} ({q}={champion.quality:.4f}) by more than "
        f"tolerance {tolerance}: the champion stays",
    )


class ChampionMoved(Exception):
    """The alias no longer points where the evaluation found it: another evaluation promoted meanwhile."""

    def __init__(self, expected: ModelVersion | None, found: ModelVersion | None):
        super().__init__(f"the champion moved from {ref_of(expected)} to {ref_of(found)} while this evaluation ran")
        self.expected, self.found = expected, found


def ref_of(version: ModelVersion | None) -> str:
    """'<name>/<version>', or 'none' for no champion."""
    return f"{version.name}/{version.version}" if version is not None else "none"


def _same_holder(a: ModelVersion | None, b: ModelVersion | None) -> bool:
    return ref_of(a) == ref_of(b)


def apply(decision: Decision, names: list[str], expected: ModelVersion | None) -> None:
    """Compare-and-set: point the alias at the decided champion (and take it off every other registered
    name) only if it still points at expected, the champion this evaluation compared against.

    ChampionMoved when it does not. The registry has no atomic compare-and-set for aliases: the check
    runs just before the move and again PROMOTION_SETTLE_S after it (at once when the alias stays).
    Two promotions whose moves cross both find the alias moved and re-measure; one whose move lands
    after the other's final check still passes unseen, which needs a stall of more than
    PROMOTION_SETTLE_S between its own check and its move.
    """
    client = mlflow.MlflowClient()
    current = current_champion(names)
    if not _same_holder(current, expected):
        raise ChampionMoved(expected, current)
    winner = decision.champion.version
    client.set_registered_model_alias(winner.name, settings.CHAMPION_ALIAS, winner.version)
    for name in names:
        if name != winner.name:
            try:
                client.delete_registered_model_alias(name, settings.CHAMPION_ALIAS)
            except MlflowException:  # that model never held it
                pass
    if not _same_holder(current, winner):
        # a move by another evaluation that checked before ours did lands by now (a move only: keeping
        # the champion leaves nothing that another promotion could have been decided against)
        time.sleep(settings.PROMOTION_SETTLE_S)
    now = current_champion(names)
    if not _same_holder(now, winner):
        raise ChampionMoved(winner, now)
