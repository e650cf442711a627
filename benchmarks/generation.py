"""Generation speed and memory of phi3flow's models on a Phi-3-mini-shaped model, in one run.

Builds the model of benchmarks.phi3_mini_shaped (full Phi-3-mini widths, --num-layers layers, random
weights from a fixed seed, the embedded tokenizer), puts it through the project's own steps
(fetch_model of the local folder, log_pipeline, log_onnx_wrapper int4 and fp32; each step's peak
RSS is measured), then measures, one process at a time, on the same 32-token chat prompt and
128 new tokens:

  raw int4 / raw fp32   the onnxruntime-genai loop on the logged ONNX files (min_length forced)
  pyfunc int4           `phi3-onnx` in-process: predict_stream timed per token, and predict()
  served int4           `phi3-onnx` behind `mlflow models serve`, over HTTP
  pipeline fp32         `phi3-pipeline` (transformers) in-process, min_new_tokens forced

For each: load time, time to first token, decode tokens/s after the first token, peak RSS. Plus
the memory-bandwidth bound: measured read bandwidth / bytes of weights (and KV cache) read per
generated token. Writes benchmark.json, benchmark.md and benchmark.png to --results-dir and
logs them, with the numbers as metrics, to MLflow as one run.

    python -m benchmarks.generation                      # 4 layers, about 10 minutes on 2 cores
    python -m benchmarks.generation --skip-build         # reuse the built model folder
    python -m benchmarks.generation --smoke              # the tiny model, 16 tokens: under 2 minutes

Everything large (models, tracking store, artifacts, logs) goes under --workdir (default
/tmp/phi3flow-bench); only the three result files go to --results-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

from . import phi3_mini_shaped
from .probe import WARMUP_TOKENS, http_asker, median_of, requested
from .project_steps import child_env, ensure_experiment, run_step
from .rss import TreeSampler, run_measured
from .server import mlflow_models_serve, serving
from .step_memory import LIMIT

HERE = Path(__file__).resolve().parent

# Targets the numbers are reported against (never assumed met).
GOALS = {
    "pyfunc_vs_raw": 0.97,  # phi3-onnx pyfunc decode rate / raw onnxruntime-genai decode rate
    "served_vs_raw": 0.90,  # phi3-onnx over HTTP / raw
    "int4_vs_transformers": 4.0,  # phi3-onnx pyfunc (int4) / phi3-pipeline pyfunc (fp32)
    "raw_vs_bound": 0.75,  # raw int4 decode rate / memory-bandwidth bound
    "log_pipeline_rss_vs_weights": LIMIT,  # at most
}
PROMPT_WORDS = ("Please explain in plain words how a river carries sand and stones down to the sea "
                "and why deltas form where it meets the tide, with two short examples").split()
SERVER_START_TIMEOUT_S = 600
GB = 1e9


# ---- machine and model -------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor()
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "nproc": os.cpu_count(),
            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "python": platform.python_version()}


def build_model(model_dir: Path, num_layers: int, smoke: bool, workdir: Path, env: dict, rebuild: bool) -> None:
    if not smoke:
        phi3_mini_shaped.ensure_built(model_dir, num_layers, "float32", workdir / "logs" / "build.log", env,
                                      rebuild=rebuild)
    elif rebuild or not (model_dir / "config.json").is_file():
        from phi3flow import tiny

        print(f"== building {model_dir}", flush=True)
        tiny.build(model_dir)


def chat_messages(model_dir: Path, prompt_tokens: int) -> list[dict]:
    """A user message whose chat-templated prompt is exactly prompt_tokens tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def count(content: str) -> int:
        text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                       add_generation_prompt=True)
        return len(tok(text, add_special_tokens=False)["input_ids"])

    for n in range(1, len(PROMPT_WORDS) + 1):
        for tail in ("", ".", "..", "...", "...."):  # each dot is about one more token
            content = " ".join(PROMPT_WORDS[:n]) + tail
            if count(content) == prompt_tokens:
                return [{"role": "user", "content": content}]
    raise SystemExit(f"no prompt of exactly {prompt_tokens} tokens found")


def weights_read_per_token_onnx(onnx_dir: Path, mean_position: float) -> dict:
    """Bytes a decode step reads: every initializer except the ones only looked up by index
    (the embedding table, the rotary cos/sin caches), plus the KV cache at mean_position."""
    import onnx

    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    weights = skipped = 0
    for init in model.graph.initializer:
        nbytes = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        for d in init.dims:
            nbytes *= d
        if consumers.get(init.name, set()) <= {"Gather", "GroupQueryAttention"} and init.dims and len(init.dims) == 2:
            skipped += nbytes
        else:
            weights += nbytes
    config = json.loads((onnx_dir / "genai_config.json").read_text())["model"]["decoder"]
    kv_type = next(i.type.tensor_type.elem_type for i in model.graph.input if i.name.startswith("past_key_values"))
    kv_item = onnx.helper.tensor_dtype_to_np_dtype(kv_type).itemsize
    kv = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_size"] * kv_item * mean_position
    return {"weights": weights, "kv_cache": int(kv), "total": int(weights + kv), "not_read_lookup_tables": skipped}


def weights_read_per_token_safetensors(model_dir: Path, mean_position: float) -> dict:
    """The same for the transformers checkpoint: all tensors but the embedding table, plus fp32 KV cache."""
    from safetensors import safe_open

    weights = skipped = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as fh:
            for name in fh.keys():
                t = fh.get_slice(name)
                nbytes = {"F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
                for d in t.get_shape():
                    nbytes *= d
                if "embed_tokens" in name:
                    skipped += nbytes
                else:
                    weights += nbytes
    config = json.loads((model_dir / "config.json").read_text())
    head = config["hidden_size"] // config["num_attention_heads"]
    kv = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head * 4 * mean_position
    return {"weights": weights, "kv_cache": int(kv), "total": int(weights + kv), "not_read_lookup_tables": skipped}


# ---- measurements ------------------------------------------------------------------------------

def run_probe(name: str, args_: list[str], workdir: Path, env: dict) -> dict:
    """benchmarks.probe in its own process: its result file, with the process's peak RSS."""
    print(f"\n== {name}", flush=True)
    log, out = workdir / "logs" / f"probe-{name}.log", workdir / "logs" / f"probe-{name}.json"
    out.unlink(missing_ok=True)
    m = run_measured([sys.executable, "-m", "benchmarks.probe", *args_, "--out", str(out)], cwd=workdir / "cwd",
                     env=env,
                     log_path=log, echo=False)
    if m.returncode != 0 or not out.is_file():
        raise SystemExit(f"{name} failed (exit {m.returncode}); see {log}")
    result = json.loads(out.read_text())
    result["peak_rss_bytes"] = m.ru_maxrss_bytes
    return result


def served(url: str, load_s: float, sampler: TreeSampler, messages: list[dict], new_tokens: int, repeats: int) -> dict:
    """The served model alone: ttft = a 1-token request, decode from a new_tokens request."""
    print("\n== served", flush=True)
    ask = http_asker(url, messages)
    prompt_tokens = ask(WARMUP_TOKENS)[1]["usage"]["prompt_tokens"]
    runs = []
    for i in range(repeats):
        runs.append(requested(ask, new_tokens))
        print(f"served {i + 1}/{repeats}: {runs[-1]}", flush=True)
    # The server is several processes: their summed RSS.
    return {"load_s": load_s, "prompt_tokens": prompt_tokens, "runs": runs, "peak_rss_bytes": sampler.peak_rss}


def bandwidth(workdir: Path, env: dict) -> dict:
    return run_probe("bandwidth", ["bandwidth"], workdir, env)


# ---- the run -----------------------------------------------------------------------------------

def row(name: str, model: str, method: str, result: dict, runs_key: str = "runs") -> dict:
    runs = result[runs_key]
    return {
        "name": name, "model": model, "method": method,
        "load_s": result["load_s"],
        "ttft_s": median_of(runs, "ttft_s"),
        "decode_tok_s": median_of(runs, "decode_tok_s"),
        "tokens": min(r["tokens"] for r in runs),
        "prompt_tokens": result["prompt_tokens"],
        "peak_rss_bytes": result["peak_rss_bytes"],
        "runs": runs,
    }


COMPARED = {"raw": "raw int4", "pyfunc_stream": "pyfunc int4 (stream)", "pyfunc_predict": "pyfunc int4 (predict)",
            "served": "served int4"}


def interleaved(rounds: list[dict], int4_bytes_per_token: int) -> dict:
    """Medians over the compare probe's rounds: each path's rates, its ratio to the raw loop of the
    same round, and the raw loop's fraction of that round's bandwidth bound."""
    def med(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def vs_raw(r: dict, key: str) -> float | None:
        a, b = r[key]["decode_tok_s"], r["raw"]["decode_tok_s"]
        return a / b if a and b else None

    paths = {key: {"name": name,
                   "decode_tok_s": med([r[key]["decode_tok_s"] for r in rounds]),
                   "ttft_s": med([r[key]["ttft_s"] for r in rounds]),
                   "vs_raw": med([vs_raw(r, key) for r in rounds])} for key, name in COMPARED.items()}
    return {
        "rounds": len(rounds),
        "paths": paths,
        "read_gb_s": med([r["read_gb_s"] for r in rounds]),
        "raw_vs_bound": med([r["raw"]["decode_tok_s"] / (r["read_gb_s"] * GB / int4_bytes_per_token) for r in rounds]),
    }


def goals(rows: dict[str, dict], compared: dict, steps: dict, weight_bytes: int) -> list[dict]:
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    measured = {
        "pyfunc_vs_raw": compared["paths"]["pyfunc_stream"]["vs_raw"],
        "served_vs_raw": compared["paths"]["served"]["vs_raw"],
        "int4_vs_transformers": ratio(rows["pyfunc int4 (stream)"]["decode_tok_s"],
                                      rows["pipeline fp32"]["decode_tok_s"]),
        "raw_vs_bound": compared["raw_vs_bound"],
        "log_pipeline_rss_vs_weights": ratio(steps["log_pipeline"]["peak_rss_bytes"], weight_bytes),
    }
    out = []
    for key, target in GOALS.items():
        value = measured[key]
        at_most = key.endswith("_rss_vs_weights")
        met = None if value is None else (value <= target if at_most else value >= target)
        out.append({"goal": key, "measured": value, "target": target, "at_most": at_most, "met": met})
    out.append({"goal": "log_onnx_wrapper_rss_vs_weights",
                "measured": ratio(steps["log_onnx_wrapper int4"]["peak_rss_bytes"], weight_bytes),
                "target": None, "at_most": True, "met": None})
    return out


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    m, model = report["machine"], report["model"]
    load = report["loadavg"]
    lines = [
        f"Machine: {m['cpu']}, {m['nproc']} CPUs, {m['mem_total_bytes'] / GB:.1f} GB RAM; load average "
        f"{load['start'][0]:.2f} at the start, {load['end'][0]:.2f} at the end (1-minute averages, the benchmark's own "
        "processes included). "
        f"{report['time']}.",
        f"Model: Phi-3-mini-shaped, {model['num_layers']} layers, {model['weight_bytes'] / GB:.2f} GB of "
        "float32 weights; "
        f"prompt {report['prompt_tokens']} tokens, {report['new_tokens']} new tokens, median of {report['repeats']}.",
        "",
        "| path | load (s) | time to first token (s) | decode (tok/s) | tokens | peak RSS (GB) | measured by |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lines.append(f"| {r['name']} | {fmt(r['load_s'], 1)} | {fmt(r['ttft_s'], 3)} | {fmt(r['decode_tok_s'], 1)} | "
                     f"{r['tokens']} | {fmt(r['peak_rss_bytes'] / GB)} | {r['method']} |")
    c, b = report["interleaved"], report["bandwidth"]
    lines += [
        "",
        f"Interleaved in one process, {c['rounds']} rounds (the ratio to the raw loop of the same round, "
        "median over rounds):",
        "",
        "| path | decode (tok/s) | time to first token (s) | decode / raw |",
        "|---|---|---|---|",
    ]
    for p in c["paths"].values():
        lines.append(f"| {p['name']} | {fmt(p['decode_tok_s'], 1)} | {fmt(p['ttft_s'], 3)} | {fmt(p['vs_raw'])} |")
    lines += [
        "",
        f"Memory-bandwidth bound: read bandwidth {b['read_gb_s']:.1f} GB/s (alone; {fmt(c['read_gb_s'], 1)} "
        "GB/s median in "
        f"the interleaved rounds) / {report['bytes_per_token']['int4']['total'] / GB:.3f} GB read per int4 token = "
        f"{report['bound_tok_s']['int4']:.1f} tok/s (fp32 ONNX: {report['bound_tok_s']['fp32']:.1f} tok/s, "
        "transformers fp32: "
        f"{report['bound_tok_s']['transformers fp32']:.1f} tok/s).",
        "",
        "| goal | measured | target | met |",
        "|---|---|---|---|",
    ]
    for g in report["goals"]:
        target = "report" if g["target"] is None else ("<= " if g["at_most"] else ">= ") + fmt(g["target"])
        met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
        lines.append(f"| {g['goal']} | {fmt(g['measured'])} | {target} | {met} |")
    if report["smoke"]:
        lines += ["", "Smoke run on the tiny model: these numbers show the benchmark works, not how fast anything is."]
    lines += ["", "| step | peak RSS (GB) | peak RSS / weights | wall (s) |", "|---|---|---|---|"]
    for name, s in report["steps"].items():
        lines.append(f"| {name} | {fmt(s['peak_rss_bytes'] / GB)} | {fmt(s['peak_rss_bytes'] / model['weight_bytes'])} "
                     f"| {s['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in report["rows"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax1.barh(names, [r["decode_tok_s"] or 0 for r in report["rows"]], color="tab:blue")
    ax1.axvline(report["bound_tok_s"]["int4"], color="tab:red", linestyle="--", label="int4 bandwidth bound")
    ax1.set_xlabel("decode tokens/s")
    ax1.legend(loc="lower right")
    ax1.invert_yaxis()
    ax2.barh(names, [r["peak_rss_bytes"] / GB for r in report["rows"]], color="tab:orange")
    ax2.axvline(report["model"]["weight_bytes"] / GB, color="gray", linestyle="--", label="fp32 weight bytes")
    ax2.set_xlabel("peak RSS (GB)")
    ax2.legend(loc="lower right")
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    fig.suptitle(f"Phi-3-mini-shaped, {report['model']['num_layers']} layers, {report['machine']['nproc']} CPUs "
                 f"(load {report['loadavg']['start'][0]:.1f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_to_mlflow(report: dict, files: list[Path], experiment_id: str) -> str:
    import mlflow

    with mlflow.start_run(experiment_id=experiment_id, run_name="generation-benchmark") as run:
        mlflow.log_params({"num_layers": report["model"]["num_layers"], "prompt_tokens": report["prompt_tokens"],
                           "new_tokens": report["new_tokens"], "repeats": report["repeats"], "smoke": report["smoke"],
                           "cpu": report["machine"]["cpu"][:250], "nproc": report["machine"]["nproc"]})
        metrics = {"loadavg_start": report["loadavg"]["start"][0], "read_gb_s": report["bandwidth"]["read_gb_s"],
                   "bound_int4_tok_s": report["bound_tok_s"]["int4"]}
        for r in report["rows"]:
            key = re.sub(r"[^a-z0-9]+", "_", r["name"].lower()).strip("_")
            for field in ("load_s", "ttft_s", "decode_tok_s"):
                if r[field] is not None:
                    metrics[f"{key}.{field}"] = r[field]
            metrics[f"{key}.peak_rss_gb"] = r["peak_rss_bytes"] / GB
        for key, path in report["interleaved"]["paths"].items():
            if path["vs_raw"] is not None:
                metrics[f"interleaved.{key}.vs_raw"] = path["vs_raw"]
        for g in report["goals"]:
            if g["measured"] is not None:
                metrics[f"goal.{g['goal']}"] = g["measured"]
        for name, s in report["steps"].items():
            metrics[f"step.{re.sub(r'[^a-z0-9]+', '_', name)}.peak_rss_gb"] = s["peak_rss_bytes"] / GB
        mlflow.log_metrics(metrics)
        for f in files:
            mlflow.log_artifact(str(f))
        return run.info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (16 with --smoke)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="measured generations per path; default 4 (1 with --smoke)")
    parser.add_argument("--serve-workers", type=int, default=1, help="uvicorn workers of `mlflow models serve`")
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny model instead: checks the benchmark works, in seconds")
    parser.add_argument("--skip-build", action="store_true",
                        help="reuse the model folder of an earlier run if there is one")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/phi3flow-bench"))
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="default benchmarks/results (<workdir>/results with --smoke)")
    parser.add_argument("--tracking-uri", default=None, help="default $MLFLOW_TRACKING_URI, else sqlite:///<workdir>/mlflow.db")
    parser.add_argument("--experiment", default="phi3flow-benchmarks")
    args = parser.parse_args()
    new_tokens = args.new_tokens or (16 if args.smoke else 128)
    repeats = args.repeats or (1 if args.smoke else 4)

    load_start = os.getloadavg()
    workdir = args.workdir.resolve()
    for sub in ("cwd", "logs", "tmp", "models", "artifacts", "onnx"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    results_dir = (args.results_dir or (workdir / "results" if args.smoke else HERE / "results")).resolve()
    results_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workdir / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    experiment_id = ensure_experiment(tracking_uri, args.experiment, workdir / "artifacts")
    env = child_env(workdir, tracking_uri, experiment_id)

    # 1. the model, and the project's steps on it (each step's peak RSS measured)
    model_dir = workdir / "models" / ("tiny-phi3" if args.smoke else f"phi3-mini-shaped-{args.num_layers}L-float32")
    build_model(model_dir, args.num_layers, args.smoke, workdir, env, rebuild=not args.skip_build)
    weight_bytes = phi3_mini_shaped.weight_bytes(model_dir)
    steps: dict[str, dict] = {}
    fetch = run_step("fetch_model", ["--model-id", str(model_dir)], workdir, env)
    steps["fetch_model"], fetch_run_id = fetch.record, fetch.run_id
    uris = {}
    for name, step, extra in (("log_pipeline", "log_pipeline", []),
                              ("log_onnx_wrapper int4", "log_onnx_wrapper", ["--precision", "int4"]),
                              ("log_onnx_wrapper fp32", "log_onnx_wrapper", ["--precision", "fp32"])):
        logged = run_step(step, ["--fetch-run-id", fetch_run_id, *extra], workdir, env, name.replace(" ", "-"))
        steps[name], uris[name] = logged.record, logged.model_uri
    for s in steps.values():  # keep the JSON small: the phase list, not every sample
        s.pop("samples", None)

    # The logged ONNX files, as the raw loop reads them
    import mlflow

    onnx_dirs = {}
    for precision in ("int4", "fp32"):
        dst = workdir / "onnx" / precision
        logged = mlflow.get_logged_model(uris["log_onnx_wrapper " + precision].removeprefix("models:/"))
        onnx_dirs[precision] = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{logged.artifact_location}/artifacts/onnx", dst_path=str(dst)))

    # 2. the generation measurements, one process at a time
    messages = chat_messages(model_dir, args.prompt_tokens)
    common = ["--messages", json.dumps(messages), "--new-tokens", str(new_tokens), "--repeats", str(repeats)]
    results = {
        "raw int4": run_probe("raw-int4", ["raw", str(onnx_dirs["int4"]), *common], workdir, env),
        "raw fp32": run_probe("raw-fp32", ["raw", str(onnx_dirs["fp32"]), *common], workdir, env),
        "pyfunc int4": run_probe("pyfunc-int4", ["pyfunc", uris["log_onnx_wrapper int4"], *common], workdir, env),
    }
    print(f"\n== mlflow models serve ({args.serve_workers} worker)", flush=True)
    with serving(mlflow_models_serve(uris["log_onnx_wrapper int4"], args.serve_workers), "/ping",
                 workdir / "logs" / "served.log",
                 cwd=workdir / "cwd", env=env, timeout_s=SERVER_START_TIMEOUT_S, sample_rss=True) as server:
        results["served int4"] = served(server.url, server.start_s, server.rss, messages, new_tokens, repeats)
        compared = run_probe("compare",
                             ["compare", str(onnx_dirs["int4"]), uris["log_onnx_wrapper int4"], server.url, *common],
                             workdir, env)
    results["pipeline fp32"] = run_probe("pipeline-fp32", ["pipeline", uris["log_pipeline"], *common], workdir, env)
    per_token, per_request = "per-token timestamps", "1-token and N-token requests"
    rows = [
        row("raw int4", "onnxruntime-genai loop, int4 ONNX", per_token, results["raw int4"]),
        row("raw fp32", "onnxruntime-genai loop, fp32 ONNX", per_token, results["raw fp32"]),
        row("pyfunc int4 (stream)", "phi3-onnx, predict_stream in-process", per_token, results["pyfunc int4"]),
        row("served int4", "phi3-onnx, mlflow models serve, HTTP", per_request, results["served int4"]),
        row("pipeline fp32", "phi3-pipeline (transformers), predict in-process", per_request, results["pipeline fp32"]),
    ]

    # 3. the memory-bandwidth bound
    bw = bandwidth(workdir, env)
    mean_position = args.prompt_tokens + new_tokens / 2
    bytes_per_token = {
        "int4": weights_read_per_token_onnx(onnx_dirs["int4"], mean_position),
        "fp32": weights_read_per_token_onnx(onnx_dirs["fp32"], mean_position),
        "transformers fp32": weights_read_per_token_safetensors(model_dir, mean_position),
    }
    bound = {k: bw["read_gb_s"] * GB / v["total"] for k, v in bytes_per_token.items()}

    report = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "loadavg": {"start": load_start, "end": os.getloadavg()},
        "smoke": args.smoke,
        "model": {"dir": str(model_dir),
                  "num_layers": json.loads((model_dir / "config.json").read_text())["num_hidden_layers"],
                  "weight_bytes": weight_bytes},
        "prompt_tokens": args.prompt_tokens, "new_tokens": new_tokens, "repeats": repeats,
        "messages": messages,
        "tracking_uri": tracking_uri, "fetch_run_id": fetch_run_id, "model_uris": uris,
        "rows": rows,
        "interleaved": {**interleaved(compared["rounds"], bytes_per_token["int4"]["total"]),
                        "runs": compared["rounds"]},
        "bandwidth": bw, "bytes_per_token": bytes_per_token, "bound_tok_s": bound,
        "steps": steps,
    }
    report["goals"] = goals({r["name"]: r for r in rows}, report["interleaved"], {"log_pipeline": steps["log_pipeline"],
                                                         "log_onnx_wrapper int4": steps["log_onnx_wrapper int4"]},
                            weight_bytes)
    files = [results_dir / "benchmark.json", results_dir / "benchmark.md", results_dir / "benchmark.png"]
    files[0].write_text(json.dumps(report, indent=1) + "\n")
    files[1].write_text(markdown(report))
    chart(report, files[2])
    run_id = log_to_mlflow(report, files, experiment_id)
    print("\n" + markdown(report))
    print(f"wrote {', '.join(str(f) for f in files)}; MLflow run {run_id} in {tracking_uri}")


if __name__ == "__main__":
    main()
