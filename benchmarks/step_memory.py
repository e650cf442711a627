"""Peak RSS of main's steps on a Phi-3-mini-shaped model.

Builds benchmarks.phi3_mini_shaped's model (default 4 layers, float32), logs it with fetch_model as
a local folder, then runs log_pipeline, log_onnx_wrapper (int4) and evaluate (on the first
--eval-rows rows of the bundled set, --eval-max-tokens tokens each) each as its own process
(`python -m steps.X`, one at a time) and reports, per step: peak RSS (ru_maxrss from os.wait4),
the peak RSS of its process tree sampled every 0.2 s, the larger as a ratio to the weight bytes
(sum of *.safetensors sizes), the peak anonymous RSS, wall time, and the RSS at every line the
step printed. Each step's run ID and logged model come from the tracking store.

Requirement checked: every step's peak RSS <= 1.5 x the weight bytes. With --check the exit status
says whether it is met (1: a step is over), on the marginal ratio below when there is a baseline.

With --baseline-layers N the same steps first run on the same checkpoint with N (fewer) layers.
Each step is then also reported as (peak - its peak at N layers) / (weight bytes - the weight bytes
at N layers): the memory each byte of decoder layers costs, the ratio the plain one approaches as
the layers grow. On a checkpoint of a few layers the plain ratio measures something else: the fixed
cost of the step's processes (Python, torch, transformers, MLflow, onnxruntime: 0.4 to 1.4 GB) and
of the layer-independent tensors (the embedding and the output head: 0.39 GB in bf16 at full width)
weigh more than the layers do. The difference cancels both, measured on the same step, so the
full-size 1.5x bound applies to it.

Everything it writes (model, tracking store, artifacts, logs) goes under --workdir
(default /tmp/bench); the children run with cwd there and PYTHONPATH=<repo>.

    python -m benchmarks.step_memory                        # 4 layers, float32
    python -m benchmarks.step_memory --dtype bfloat16 --steps log_pipeline
    python -m benchmarks.step_memory --num-layers 3 --dtype bfloat16 --baseline-layers 1 --check   # the scaled gate
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import phi3_mini_shaped
from .project_steps import REPO, StepRun, child_env, ensure_experiment, run_step

LIMIT = 1.5
STEPS = ("log_pipeline", "log_onnx_wrapper", "evaluate")


def gb(n: int | float) -> str:
    return f"{n / 1e9:.2f}"


def run_steps(model_dir: Path, steps: list[str], args: argparse.Namespace, workdir: Path, env: dict[str, str],
              label: str = "") -> dict[str, StepRun]:
    """fetch_model of model_dir, then `steps` in order, each measured (logs named <label><step>.log)."""
    done = {"fetch_model": run_step("fetch_model", ["--model-id", str(model_dir)], workdir, env, label + "fetch_model")}
    fetch_run_id = done["fetch_model"].run_id
    for step in steps:
        if step == "log_pipeline":
            step_args = ["--fetch-run-id", fetch_run_id, "--dtype", args.dtype]
        elif step == "log_onnx_wrapper":
            step_args = ["--fetch-run-id", fetch_run_id, "--precision", args.precision]
        else:
            rows = (REPO / "data" / "eval_bundled.jsonl").read_text().splitlines()[: args.eval_rows]
            eval_file = workdir / "eval.jsonl"
            eval_file.write_text("\n".join(rows) + "\n")
            step_args = ["--pipeline-run-id", done["log_pipeline"].run_id, "--onnx-run-id",
                         done["log_onnx_wrapper"].run_id,
                         "--eval-data", str(eval_file), "--max-tokens", str(args.eval_max_tokens)]
        done[step] = run_step(step, step_args, workdir, env, label + step)
    return done


def shaped_model(workdir: Path, num_layers: int, dtype: str, env: dict[str, str], rebuild: bool) -> tuple[Path, dict]:
    """The Phi-3-mini-shaped checkpoint (built in its own process, so this one stays small), and its build's cost."""
    model_dir = workdir / "models" / f"phi3-mini-shaped-{num_layers}L-{dtype}"
    build = phi3_mini_shaped.ensure_built(model_dir, num_layers, dtype, workdir / "logs" / f"build-{num_layers}L.log",
                                          env, rebuild=rebuild)
    if build:
        print(f"   built in {build.wall_s:.0f} s, peak RSS {gb(build.ru_maxrss_bytes)} GB", flush=True)
    weights = phi3_mini_shaped.weight_bytes(model_dir)
    print(f"   weights: {weights} bytes ({gb(weights)} GB) in {model_dir}", flush=True)
    return model_dir, {"wall_s": round(build.wall_s, 1), "peak_rss_bytes": build.ru_maxrss_bytes} if build else {}


def peak(record: dict) -> int:
    """A step that converts runs the builder in a child process: ru_maxrss is the larger of the two
    processes, the sampled tree RSS their sum at the same moment; the check takes the larger."""
    return max(record["peak_rss_bytes"], record["sampled_peak_tree_rss_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--dtype", choices=phi3_mini_shaped.DTYPES, default="float32",
                        help="dtype of the stored weights and of log_pipeline's --dtype")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    parser.add_argument("--precision", default="int4", help="log_onnx_wrapper --precision")
    parser.add_argument("--eval-rows", type=int, default=2, help="evaluate: rows of the bundled set")
    parser.add_argument("--eval-max-tokens", type=int, default=8, help="evaluate --max-tokens")
    parser.add_argument("--baseline-layers", type=int, default=None,
                        help="also run the steps with this many layers and report each step's peak difference "
                             "per weight byte")
    parser.add_argument("--check", action="store_true",
                        help=f"exit with status 1 when a step's ratio (the marginal one with --baseline-layers) is "
                             f"over {LIMIT}")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--tracking-uri", default=None, help="default sqlite:///<workdir>/mlflow.db")
    parser.add_argument("--experiment", default="step-memory")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model even if its folder exists")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench/step_memory.json"))
    args = parser.parse_args()

    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}")
    if args.baseline_layers is not None and not 0 < args.baseline_layers < args.num_layers:
        parser.error("--baseline-layers must be between 0 and --num-layers, both excluded")
    if "evaluate" in steps and not {"log_pipeline", "log_onnx_wrapper"} <= set(steps[: steps.index("evaluate")]):
        parser.error("evaluate needs log_pipeline and log_onnx_wrapper in --steps before it")
    workdir = args.workdir.resolve()
    for sub in ("cwd", "logs", "tmp", "models", "artifacts"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    experiment_id = ensure_experiment(tracking_uri, args.experiment, workdir / "artifacts")
    env = child_env(workdir, tracking_uri, experiment_id)

    # 1. the model(s)
    model_dir, built = shaped_model(workdir, args.num_layers, args.dtype, env, args.rebuild)
    weights = phi3_mini_shaped.weight_bytes(model_dir)

    # 2. fetch_model of the local folder and the measured steps, one process each; the baseline first
    baseline: dict | None = None
    if args.baseline_layers is not None:
        base_dir, _ = shaped_model(workdir, args.baseline_layers, args.dtype, env, args.rebuild)
        print(f"== baseline: the same steps with {args.baseline_layers} layers", flush=True)
        base_runs = run_steps(base_dir, steps, args, workdir, env, f"baseline-{args.baseline_layers}L-")
        baseline = {"num_layers": args.baseline_layers, "weight_bytes": phi3_mini_shaped.weight_bytes(base_dir),
                    "steps": {step: run.record for step, run in base_runs.items()}}
    runs = run_steps(model_dir, steps, args, workdir, env)
    results = {step: run.record for step, run in runs.items()}
    if baseline:
        for step, record in results.items():
            record["baseline_peak_bytes"] = peak(baseline["steps"][step])
            record["marginal_ratio"] = ((peak(record) - record["baseline_peak_bytes"])
                                        / (weights - baseline["weight_bytes"]))

    report = {
        "machine": {"nproc": os.cpu_count(),
                    "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "model": {"dir": str(model_dir), "num_layers": args.num_layers, "dtype": args.dtype,
                  "weight_bytes": weights, "build": built},
        "tracking_uri": tracking_uri,
        "fetch_run_id": runs["fetch_model"].run_id,
        "limit_ratio": LIMIT,
        "steps": results,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if baseline:
        report["baseline"] = baseline
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"\nmachine: {report['machine']['nproc']} CPUs, {gb(report['machine']['mem_total_bytes'])} GB RAM; "
          f"model: {args.num_layers} layers {args.dtype}, weights {weights} bytes ({gb(weights)} GB)\n")
    extra_head = (f" peak at {args.baseline_layers} layers (GB) | peak difference / weight difference |"
                  if baseline else "")
    print("| step | peak RSS (GB) | peak tree RSS, sampled (GB) | peak / weights | peak anon RSS, sampled (GB) | wall "
          f"(s) | <= 1.5x |{extra_head}")
    print("|---|---|---|---|---|---|---|" + ("---|---|" if baseline else ""))
    for step, r in results.items():
        ratio = peak(r) / weights
        ok = "yes" if ratio <= LIMIT else "**no**"
        extra = f" (dtype={args.dtype})" if step == "log_pipeline" else (f" ({args.precision})"
                                                                         if step == "log_onnx_wrapper" else "")
        above = f" {gb(r['baseline_peak_bytes'])} | {r['marginal_ratio']:.2f} |" if baseline else ""
        print(f"| {step}{extra} | {gb(r['peak_rss_bytes'])} | {gb(r['sampled_peak_tree_rss_bytes'])} | {ratio:.2f} "
              f"| {gb(r['sampled_peak_tree_anon_bytes'])} | {r['wall_s']:.0f} | {ok} |{above}")
    for step in steps:
        print(f"\n{step}: RSS at each printed line (peak until the next line), GB")
        for p in results[step]["phases"]:
            print(f"  {p['t_s']:7.1f}s  rss {gb(p['rss'])}  anon {gb(p['anon'])}  "
                  f"peak {gb(p['peak_until_next'])} (anon {gb(p['peak_anon_until_next'])})  | {p['line'][:100]}")
    print(f"\nwrote {args.out}")
    if args.check:
        sys.exit(check(results, weights, bool(baseline)))


def check(results: dict[str, dict], weights: int, marginal: bool) -> int:
    """One verdict line per step; 1 when one is over the limit (the exit status of --check)."""
    which = "peak difference / weight difference" if marginal else "peak / weights"
    missed = 0
    for step, record in results.items():
        ratio = record["marginal_ratio"] if marginal else peak(record) / weights
        over = ratio > LIMIT
        missed |= over
        print(f"check {step}: {which} {ratio:.2f} {'>' if over else '<='} {LIMIT}: {'MISSED' if over else 'met'}")
    return int(missed)


if __name__ == "__main__":
    main()
