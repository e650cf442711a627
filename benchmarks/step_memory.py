"""Peak RSS of main's steps on a Phi-3-mini-shaped model.

Builds benchmarks/phi3_mini_shaped.py's model (default 4 layers, float32), logs it with
fetch_model as a local folder, then runs log_pipeline, log_onnx_wrapper (int4) and evaluate (on
the first --eval-rows rows of the bundled set, --eval-max-tokens tokens each) each as its own
process (`python -m steps.X`, one at a time) and reports, per step: peak RSS (ru_maxrss from
os.wait4), the peak RSS of its process tree sampled from /proc, the larger as a ratio to the
weight bytes (sum of *.safetensors sizes), the peak anonymous RSS, wall time, and the RSS at
every line the step printed.

Requirement checked: every step's peak RSS <= 1.5 x the weight bytes.

Everything it writes (model, tracking store, artifacts, logs) goes under --workdir
(default /tmp/bench); the children run with cwd there and PYTHONPATH=<repo>.

    python benchmarks/step_memory.py                        # 4 layers, float32
    python benchmarks/step_memory.py --dtype bfloat16 --steps log_pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from rss import Measurement, run_measured  # noqa: E402

LIMIT = 1.5
STEPS = ("log_pipeline", "log_onnx_wrapper", "evaluate")


def gb(n: int | float) -> str:
    return f"{n / 1e9:.2f}"


def child_env(workdir: Path, tracking_uri: str, experiment_id: str | None) -> dict:
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
    """An experiment whose artifacts live under artifact_root (never the repository's ./mlruns), or
    where a tracking server puts them."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if tracking_uri.startswith(("http://", "https://")):  # the server's own artifact store (proxied or not)
        return client.create_experiment(name)
    return client.create_experiment(name, artifact_location=artifact_root.as_uri())


def run_id_from(output: str, step: str) -> str:
    match = re.search(rf"{step} run ([0-9a-f]{{32}})", output)
    if not match:
        raise SystemExit(f"{step}: no run ID in its output")
    return match.group(1)


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


def measure_step(name: str, args_: list[str], workdir: Path, env: dict) -> tuple[Measurement, dict]:
    print(f"\n== {name} {' '.join(args_)}", flush=True)
    cmd = [sys.executable, "-m", f"steps.{name}", *args_]
    m = run_measured(cmd, cwd=workdir / "cwd", env=env, log_path=workdir / "logs" / f"{name}.log", echo=False)
    if m.returncode != 0:
        raise SystemExit(f"{name} failed with exit status {m.returncode}; see {workdir / 'logs' / (name + '.log')}")
    return m, {
        "cmd": " ".join(cmd),
        "wall_s": round(m.wall_s, 1),
        "peak_rss_bytes": m.ru_maxrss_bytes,
        "sampled_peak_tree_rss_bytes": m.sampled_peak_tree_rss,
        "sampled_peak_tree_anon_bytes": m.sampled_peak_tree_anon,
        "phases": phases(m),
        "samples": [list(s) for s in m.samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of the stored weights and of log_pipeline's --dtype")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
    parser.add_argument("--precision", default="int4", help="log_onnx_wrapper --precision")
    parser.add_argument("--eval-rows", type=int, default=2, help="evaluate: rows of the bundled set")
    parser.add_argument("--eval-max-tokens", type=int, default=8, help="evaluate --max-tokens")
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
    workdir = args.workdir.resolve()
    for sub in ("cwd", "logs", "tmp", "models", "artifacts"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}"
    experiment_id = ensure_experiment(tracking_uri, args.experiment, workdir / "artifacts")
    env = child_env(workdir, tracking_uri, experiment_id)

    # 1. the model (built in its own process, so this one stays small)
    model_dir = workdir / "models" / f"phi3-mini-shaped-{args.num_layers}L-{args.dtype}"
    built = {}
    if args.rebuild or not (model_dir / "config.json").is_file():
        print(f"== building {model_dir}", flush=True)
        m = run_measured([sys.executable, str(HERE / "phi3_mini_shaped.py"), str(model_dir),
                          "--num-layers", str(args.num_layers), "--dtype", args.dtype],
                         cwd=workdir / "cwd", env=env, log_path=workdir / "logs" / "build.log", echo=False)
        if m.returncode != 0:
            raise SystemExit(f"model build failed; see {workdir / 'logs' / 'build.log'}")
        built = {"wall_s": round(m.wall_s, 1), "peak_rss_bytes": m.ru_maxrss_bytes}
        print(f"   built in {m.wall_s:.0f} s, peak RSS {gb(m.ru_maxrss_bytes)} GB", flush=True)
    weights = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    print(f"   weights: {weights} bytes ({gb(weights)} GB) in {model_dir}", flush=True)

    # 2. fetch_model of the local folder
    fetch_m, fetch = measure_step("fetch_model", ["--model-id", str(model_dir)], workdir, env)
    fetch_run_id = run_id_from(fetch_m.output, "fetch_model")

    # 3. the measured steps, one process each
    results: dict[str, dict] = {"fetch_model": fetch}
    run_ids: dict[str, str] = {}
    for step in steps:
        if step == "log_pipeline":
            step_args = ["--fetch-run-id", fetch_run_id, "--dtype", args.dtype]
        elif step == "log_onnx_wrapper":
            step_args = ["--fetch-run-id", fetch_run_id, "--precision", args.precision]
        else:
            if set(run_ids) != {"log_pipeline", "log_onnx_wrapper"}:
                parser.error("evaluate needs log_pipeline and log_onnx_wrapper in --steps before it")
            rows = (REPO / "data" / "eval_bundled.jsonl").read_text().splitlines()[: args.eval_rows]
            eval_file = workdir / "eval.jsonl"
            eval_file.write_text("\n".join(rows) + "\n")
            step_args = ["--pipeline-run-id", run_ids["log_pipeline"], "--onnx-run-id", run_ids["log_onnx_wrapper"],
                         "--eval-data", str(eval_file), "--max-tokens", str(args.eval_max_tokens)]
        m, results[step] = measure_step(step, step_args, workdir, env)
        if step != "evaluate":
            run_ids[step] = run_id_from(m.output, step)

    report = {
        "machine": {"nproc": os.cpu_count(), "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")},
        "model": {"dir": str(model_dir), "num_layers": args.num_layers, "dtype": args.dtype,
                  "weight_bytes": weights, "build": built},
        "tracking_uri": tracking_uri,
        "fetch_run_id": fetch_run_id,
        "limit_ratio": LIMIT,
        "steps": results,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")

    print(f"\nmachine: {report['machine']['nproc']} CPUs, {gb(report['machine']['mem_total_bytes'])} GB RAM; "
          f"model: {args.num_layers} layers {args.dtype}, weights {weights} bytes ({gb(weights)} GB)\n")
    # A step that converts runs the builder in a child process: ru_maxrss is the larger of the two
    # processes, the sampled tree RSS their sum at the same moment; the check takes the larger.
    print("| step | peak RSS (GB) | peak tree RSS, sampled (GB) | peak / weights | peak anon RSS, sampled (GB) | wall (s) | <= 1.5x |")
    print("|---|---|---|---|---|---|---|")
    for step, r in results.items():
        peak = max(r["peak_rss_bytes"], r["sampled_peak_tree_rss_bytes"])
        ratio = peak / weights
        ok = "yes" if ratio <= LIMIT else "**no**"
        extra = f" (dtype={args.dtype})" if step == "log_pipeline" else (f" ({args.precision})" if step == "log_onnx_wrapper" else "")
        print(f"| {step}{extra} | {gb(r['peak_rss_bytes'])} | {gb(r['sampled_peak_tree_rss_bytes'])} | {ratio:.2f} "
              f"| {gb(r['sampled_peak_tree_anon_bytes'])} | {r['wall_s']:.0f} | {ok} |")
    for step in steps:
        print(f"\n{step}: RSS at each printed line (peak until the next line), GB")
        for p in results[step]["phases"]:
            print(f"  {p['t_s']:7.1f}s  rss {gb(p['rss'])}  anon {gb(p['anon'])}  "
                  f"peak {gb(p['peak_until_next'])} (anon {gb(p['peak_anon_until_next'])})  | {p['line'][:100]}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
