"""The project's steps run as the benchmarks run them: one process each, memory measured, and
their runs (run ID, logged model) read back from MLflow Tracking.

Each step runs as `python -m steps.<name>` with cwd <workdir>/cwd and PYTHONPATH=<repo>, into an
experiment whose artifacts live under the workdir (never the repository's ./mlruns).
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow

from .rss import Measurement, run_measured

REPO = Path(__file__).resolve().parent.parent


def child_env(workdir: Path, tracking_uri: str, experiment_id: str | None) -> dict[str, str]:
    """The environment of a measured child: the tracking store, offline Hub, the repository importable."""
    env = dict(os.environ)
    env.update({
        "MLFLOW_TRACKING_URI": tracking_uri,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")])),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TMPDIR": str(workdir / "tmp"),
    })
    env.pop("MLFLOW_RUN_ID", None)
    if experiment_id:
        env["MLFLOW_EXPERIMENT_ID"] = experiment_id
    return env


def ensure_experiment(tracking_uri: str, name: str, artifact_root: Path) -> str:
    """An experiment whose artifacts live under artifact_root, or where a tracking server puts them."""
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if tracking_uri.startswith(("http://", "https://")):  # the server's own artifact store (proxied or not)
        return client.create_experiment(name)
    return client.create_experiment(name, artifact_location=artifact_root.as_uri())


# Progress bars and blank lines are not phase boundaries: their samples go to the line before.
_NOISE = re.compile(r"^\s*$|\d+%\||it/s\]|s/it\]|^Progress:|^Saving |^\s+color_warning\(")


def phases(m: Measurement) -> list[dict]:
    """Each printed line with the RSS then, and the peak RSS until the next line (phase boundaries)."""
    kept = [line for line in m.lines if not _NOISE.search(line[3])] or m.lines[:1]
    rows = []
    for i, (t, rss, anon, text) in enumerate(kept):
        t_next = kept[i + 1][0] if i + 1 < len(kept) else m.wall_s
        peak, peak_anon = m.peak_between(t, t_next)
        rows.append({"t_s": round(t, 2), "rss": rss, "anon": anon, "peak_until_next": max(peak, rss),
                     "peak_anon_until_next": max(peak_anon, anon), "line": text[:160]})
    return rows


@dataclass
class StepRun:
    run_id: str
    model_uri: str | None  # models:/<logged model id>, for the steps that log a model
    measurement: Measurement
    record: dict  # what the benchmarks' JSON reports hold for the step


def _finished_run(tracking_uri: str, experiment_id: str, step: str, started_ms: int) -> mlflow.entities.Run:
    """The one run of `step` that started after started_ms: the run the measured process made."""
    runs = mlflow.MlflowClient(tracking_uri).search_runs(
        [experiment_id], f"tags.mlflow.runName = '{step}' and attributes.start_time >= {started_ms}")
    if len(runs) != 1:
        raise SystemExit(f"{step}: expected 1 new run in experiment {experiment_id}, found {len(runs)}")
    return runs[0]


def _logged_model_uri(tracking_uri: str, run: mlflow.entities.Run) -> str | None:
    models = mlflow.MlflowClient(tracking_uri).search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    return f"models:/{models[0].model_id}" if models else None


def run_step(step: str, step_args: list[str], workdir: Path, env: dict[str, str],
             log_name: str | None = None) -> StepRun:
    """Run `python -m steps.<step>` measured; its run and logged model from the tracking store."""
    log_path = workdir / "logs" / f"{log_name or step}.log"
    print(f"\n== {step} {' '.join(step_args)}", flush=True)
    cmd = [sys.executable, "-m", f"steps.{step}", *step_args]
    started_ms = int(time.time() * 1000)
    m = run_measured(cmd, cwd=workdir / "cwd", env=env, log_path=log_path, echo=False)
    if m.returncode != 0:
        raise SystemExit(f"{step} failed with exit status {m.returncode}; see {log_path}")
    tracking_uri = env["MLFLOW_TRACKING_URI"]
    run = _finished_run(tracking_uri, env["MLFLOW_EXPERIMENT_ID"], step, started_ms)
    record = {
        "cmd": " ".join(cmd),
        "wall_s": round(m.wall_s, 1),
        "peak_rss_bytes": m.ru_maxrss_bytes,
        "sampled_peak_tree_rss_bytes": m.sampled_peak_tree_rss,
        "sampled_peak_tree_anon_bytes": m.sampled_peak_tree_anon,
        "phases": phases(m),
        "samples": [list(s) for s in m.samples],
    }
    return StepRun(run.info.run_id, _logged_model_uri(tracking_uri, run), m, record)
