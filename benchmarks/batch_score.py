"""Rows/s of batch_score on Spark with 1 and 2 executor cores, against a plain in-process loop.

Same machine, same process, same rows: the embedded tiny model (default) or the Phi-3-mini-shaped
model with --layers layers, converted to int4 and logged as `log_onnx_wrapper` logs it, then
- loop: `mlflow.pyfunc.load_model` once and `predict` on each row, one after the other;
- spark local[1] and local[2]: `phi3flow.batch.batch_score` twice in a session with that master
  (the time of the scoring job: the workers' start and model loads, every row, the Parquet output;
  the second, warm job reuses the first one's Python workers).
Each measurement records the 1-minute load average before and after it: on a shared machine the
numbers move with the neighbours' work. Writes benchmarks/results/batch_score.{json,md}.

    python -m benchmarks.batch_score                        # tiny model, 400 rows, 32 tokens each
    python -m benchmarks.batch_score --model phi3-mini-shaped --layers 2 --rows 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from phi3flow.batch import batch_score, spark_session

from .int4_model import MODELS, build_onnx, log_model

RESULTS = Path(__file__).resolve().parent / "results"


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def requests(rows: int, max_tokens: int) -> list[dict]:
    return [{"id": i, "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
             "max_tokens": max_tokens} for i in range(rows)]


def loop(model_uri: str, rows: list[dict]) -> dict:
    import mlflow

    before = load1()
    start = time.monotonic()
    model = mlflow.pyfunc.load_model(model_uri)
    loaded = time.monotonic()
    tokens = 0
    for row in rows:
        answer = model.predict({"messages": row["messages"], "max_tokens": row["max_tokens"]})[0]
        tokens += answer["usage"]["completion_tokens"]
    end = time.monotonic()
    return {"path": "in-process loop", "load_s": loaded - start, "score_s": end - loaded, "rows": len(rows),
            "completion_tokens": tokens, "rows_per_s": len(rows) / (end - loaded),
            "rows_per_s_with_load": len(rows) / (end - start), "loadavg_before": before, "loadavg_after": load1()}


def spark(model_uri: str, source: Path, cores: int, max_tokens: int, workdir: Path) -> list[dict]:
    """Two scoring jobs in one session: cold (the first: Spark starts its Python workers, which
    import MLflow and onnxruntime-genai and load the model) and warm (the workers are reused;
    they load the model again from the job's own download, a fraction of a second here)."""
    session = spark_session(f"local[{cores}]")
    measured = []
    try:
        for kind in ("cold", "warm"):
            before = load1()
            result = batch_score(model_uri, str(source), f"local[{cores}]", max_tokens, workdir / kind, spark=session)
            measured.append({"path": f"batch_score local[{cores}], {kind}", "load_s": None, "score_s": result.seconds,
                             "rows": result.rows, "errors": result.errors,
                             "completion_tokens": result.completion_tokens, "model_loads": result.model_loads,
                             "rows_per_s": result.rows / result.seconds,
                             "loadavg_before": before, "loadavg_after": load1()})
    finally:
        session.stop()
    return measured


def markdown(report: dict) -> str:
    lines = [
        f"Machine: {report['machine']['nproc']} CPUs, {platform.processor() or platform.machine()}; shared "
        "with other work: "
        f"the 1-minute load average is given with every number. {report['time']}.",
        f"Model: {report['model']}; {report['rows']} rows, max_tokens {report['max_tokens']}, greedy.",
        "",
        "| path | rows/s | scoring (s) | model load (s) | completion tokens | model loads | load avg before / after |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in report["measurements"]:
        load = f"{m['load_s']:.1f}" if m["load_s"] is not None else "in the job"
        lines.append(f"| {m['path']} | {m['rows_per_s']:.1f} | {m['score_s']:.1f} | {load} | "
                     f"{m['completion_tokens']} | "
                     f"{m.get('model_loads', 1)} | {m['loadavg_before']} / {m['loadavg_after']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="tiny")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/phi3flow-bench-batch"))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir.mkdir(parents=True, exist_ok=True)

    onnx_dir = build_onnx(args.model, args.workdir, args.layers)
    tracking_uri, model_uri = log_model(onnx_dir, args.workdir, "batch-score")
    rows = requests(args.rows, args.max_tokens)
    source = args.workdir / "requests.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))

    measurements = [loop(model_uri, rows)]
    for cores in (1, 2):
        measurements.extend(spark(model_uri, source, cores, args.max_tokens,
                                  args.workdir / f"spark-{cores}-{time.time_ns()}"))
    for m in measurements:
        print(f"{m['path']}: {m['rows_per_s']:.1f} rows/s (load average {m['loadavg_before']} -> {m['loadavg_after']})",
              flush=True)

    report = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version()},
        "model": f"{args.model}" + (f", {args.layers} layers" if args.model != "tiny" else "")
                 + ", int4 ONNX (phi3-onnx pyfunc)",
        "model_uri": model_uri,
        "tracking_uri": tracking_uri,
        "rows": args.rows,
        "max_tokens": args.max_tokens,
        "measurements": measurements,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "batch_score.json").write_text(json.dumps(report, indent=1))
    (args.results / "batch_score.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
