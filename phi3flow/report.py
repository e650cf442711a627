"""The comparison of an evaluation: a table (markdown and CSV) and a latency/throughput chart."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display: works on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def comparison_table(rows: list[dict[str, object]]) -> pd.DataFrame:
    """One row per model: `model`, `version` and one column per metric."""
    return pd.DataFrame(rows).set_index("model")


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub markdown table (numbers to 4 significant digits)."""
    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

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
