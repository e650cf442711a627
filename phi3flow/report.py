"""The comparison of an evaluation: tables (markdown and CSV), charts, and the descriptions (markdown)
that the MLflow UI shows on the evaluate run and on each registered version."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: works on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE  # noqa: E402

from phi3flow import settings  # noqa: E402

NOTE_TAG = MLFLOW_RUN_NOTE  # a run's description in the MLflow UI (markdown)

# The comparison in two narrow tables, so each fits MLflow's artifact viewer: column -> short header.
QUALITY_COLUMNS = {"exact_match/mean": "exact_match", "contains_reference/mean": "contains_reference",
                   "rouge_l/mean": "rouge_l"}
SPEED_COLUMNS = {
    "completion_tokens/mean": "tokens mean", "completion_tokens/max": "tokens max",
    "latency_s/mean": "latency s mean", "latency_s/p50": "p50", "latency_s/p95": "p95",
    "tokens_per_second/mean": "tokens/s mean", "tokens_per_second/p50": "tokens/s p50",
}
# The key numbers of a description
KEY_COLUMNS = {"rouge_l/mean": "rouge_l", "contains_reference/mean": "contains_reference",
               "tokens_per_second/p50": "tokens/s p50", "latency_s/p50": "latency s p50"}


def comparison_table(rows: list[dict[str, object]]) -> pd.DataFrame:
    """One row per model: `model`, `version` and one column per metric."""
    return pd.DataFrame(rows).set_index("model")


def number(value: object) -> str:
    """A metric as people read it: settings.COMPARISON_DIGITS significant digits."""
    return f"{value:.{settings.COMPARISON_DIGITS}g}" if isinstance(value, float) else str(value)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub markdown table (numbers to settings.COMPARISON_DIGITS significant digits)."""
    cell = number
    header = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, row in table.iterrows():
        lines.append("| " + " | ".join([str(name), *map(cell, row.tolist())]) + " |")
    return "\n".join(lines) + "\n"


def speed_chart(table: pd.DataFrame, path: Path) -> Path:
    """Latency (p50, p95) and output tokens per second (p50), one bar group per model."""
    models = list(table.index)
    x = range(len(models))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.38
    left.bar([i - width / 2 for i in x], table["latency_s/p50"], width, label="p50")
    left.bar([i + width / 2 for i in x], table["latency_s/p95"], width, label="p95")
    left.set(title="Latency per request", ylabel="seconds", xticks=list(x), xticklabels=models)
    left.legend()
    right.bar(list(x), table["tokens_per_second/p50"], color="tab:green")
    right.set(title="Output tokens per second (p50)", ylabel="tokens / s", xticks=list(x), xticklabels=models)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def split_markdown(table: pd.DataFrame) -> str:
    """The comparison as two narrow markdown tables, quality and speed, rounded."""
    quality = table[["version", *QUALITY_COLUMNS]].rename(columns=QUALITY_COLUMNS)
    speed = table[list(SPEED_COLUMNS)].rename(columns=SPEED_COLUMNS)
    return (f"## Quality (0 to 1, higher is better)\n\n{to_markdown(quality)}\n"
            f"## Speed (tokens per answer, seconds per request, output tokens per second)\n\n{to_markdown(speed)}")


def quality_chart(table: pd.DataFrame, path: Path) -> Path:
    """The quality metrics side by side: one group per metric, one bar per model."""
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(table)
    for i, (model, row) in enumerate(table.iterrows()):
        x = [j + (i - (len(table) - 1) / 2) * width for j in range(len(QUALITY_COLUMNS))]
        ax.bar(x, [row[c] for c in QUALITY_COLUMNS], width, label=f"{model} ({row['version']})")
    ax.set(title="Quality per model", ylabel="mean over the prompts", ylim=(0, 1.05),
           xticks=range(len(QUALITY_COLUMNS)), xticklabels=list(QUALITY_COLUMNS.values()))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- descriptions: markdown with links into the MLflow UI (its hash routes, relative to the page) -----

def run_link(experiment_id: str, run_id: str, text: str) -> str:
    return f"[{text}](#/experiments/{experiment_id}/runs/{run_id})"


def version_link(ref: str) -> str:
    """'<name>/<version>' as a link to that registered model version."""
    name, _, version = ref.rpartition("/")
    return f"[{ref}](#/models/{name}/versions/{version})" if name else ref


def evaluation_note(experiment_id: str, action: str, reason: str, champion: str, compared: str, registered: list[str],
                    table: pd.DataFrame, agreement: dict[str, float], children: dict[str, tuple[str, str]],
                    data: str) -> str:
    """The evaluate run's description: verdict, reason, versions as links, key numbers, where the traces are."""
    key = table[["version", *KEY_COLUMNS]].rename(columns=KEY_COLUMNS)
    key["version"] = key["version"].map(version_link)
    runs = ", ".join(run_link(experiment_id, run_id, name) for name, run_id in children.values())
    return "\n".join([
        f"### Champion: {version_link(champion)} ({action})",
        "",
        reason,
        "",
        f"Compared against the champion before this evaluation: {version_link(compared)}. "
        f"Registered or scored here: {', '.join(map(version_link, registered))}.",
        "",
        to_markdown(key),
        ("Agreement of the two models' greedy answers: identical on "
         f"{number(agreement['agreement_exact/mean'])} of the "
         f"prompts, token overlap (F1) {number(agreement['agreement_token_overlap/mean'])}." if agreement
         else "One model evaluated alone (a prebuilt ONNX source): no agreement to report."),
        "",
        f"Data: {data}. Full tables and charts: the `comparison/` artifacts. Each model's answers, scores and traces: "
        f"the child runs {runs}; every trace is also linked to this run (its Traces tab), tagged "
        f"`{settings.TAG_MODEL_LABEL}` with the model that answered.",
    ])


def version_note(experiment_id: str, run_id: str, run_name: str, metrics: dict[str, float], is_champion: bool,
                 reason: str, compared: str) -> str:
    """A registered version's description: the evaluation that scored it (a link), its scores, the verdict."""
    scores = ", ".join(f"{label} {number(metrics[name])}" for name, label in KEY_COLUMNS.items())
    verdict = "**Champion**" if is_champion else "Not the champion"
    return "\n".join([
        f"Scored by the evaluation {run_link(experiment_id, run_id, run_name)}: {scores}.",
        "",
        f"{verdict} after that evaluation (compared against {version_link(compared)}): {reason}",
    ])
