"""Aggregate decode throughput of the served int4 ONNX model at 1, 4 and 8 concurrent clients.

Builds a model (default: benchmarks/phi3_mini_shaped.py's Phi-3-mini-shaped checkpoint, 4 layers;
`--model tiny`: the embedded tiny model, a quick run), converts it to int4 with the project's
converter, logs it with the project's `log_onnx_model` in a tracking store under --workdir, serves
it with `mlflow models serve --env-manager local` on a free port, and has N client threads each
send --rounds greedy chat requests (`max_tokens` each, distinct prompts) one after the other.

Reported per N: requests, completion tokens (from each answer's usage), aggregate tokens/s (all
tokens over the wall time from the first request to the last answer), mean latency, and the
speed-up over N=1. Goal: at least 2.5x at 8 clients over 1.

    python benchmarks/serve_throughput.py                     # Phi-3-mini-shaped, 4 layers
    python benchmarks/serve_throughput.py --model tiny --rounds 20
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from phi3flow import local_server  # noqa: E402

BIN = Path(sys.executable).parent
GOAL = 2.5


def build_onnx(model: str, workdir: Path, num_layers: int) -> Path:
    """The int4 onnxruntime-genai folder of the chosen model, built once per workdir."""
    out = workdir / f"{model}-{num_layers}L-int4" if model == "phi3-mini-shaped" else workdir / "tiny-int4"
    if (out / "genai_config.json").is_file():
        return out
    from phi3flow.onnx_convert import convert

    src = workdir / out.name.replace("-int4", "-src")
    if model == "tiny":
        from phi3flow import tiny

        tiny.build(src)
    else:
        import phi3_mini_shaped

        if not (src / "config.json").is_file():
            print(f"building a Phi-3-mini-shaped checkpoint with {num_layers} layers in {src} ...", flush=True)
            phi3_mini_shaped.build(src, num_layers=num_layers, dtype="float32")
    print(f"converting to int4 in {out} ...", flush=True)
    return convert(src, out, precision="int4")


def log_model(onnx_dir: Path, workdir: Path) -> tuple[str, str]:
    """Log the pyfunc as the log_onnx_wrapper step does; returns (tracking URI, model URI)."""
    import mlflow

    from phi3flow import onnx_model

    tracking_uri = f"sqlite:///{workdir}/mlflow.db"
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name("serve-throughput")
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(
        "serve-throughput", artifact_location=(workdir / "artifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment_id):
        info = onnx_model.log_onnx_model(onnx_dir, "chat", onnx_dir.name)
    return tracking_uri, info.model_uri


def serve(model_uri: str, tracking_uri: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    port = local_server.free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, HF_HUB_OFFLINE="1")
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "-h", "127.0.0.1", "-p", str(port), "--env-manager", "local"]
    proc = local_server.spawn(cmd, workdir / "server.log", cwd=workdir, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        local_server.wait_until_up(proc, f"{url}/ping", workdir / "server.log", timeout_s=300)
    except local_server.ServerFailed as exc:
        raise SystemExit(str(exc)) from None
    return proc, url


def load(url: str, clients: int, rounds: int, max_tokens: int) -> dict:
    """N clients each sending `rounds` requests back to back; totals from first send to last answer."""
    stats = {"requests": 0, "tokens": 0, "latency": 0.0, "errors": 0}
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(rounds):
            body = {"messages": [{"role": "user", "content": f"Client {k}, question {i}: tell me about the number {k * 1000 + i}."}],
                    "max_tokens": max_tokens}
            t0 = time.monotonic()
            response = requests.post(f"{url}/invocations", json=body, timeout=600)
            with lock:
                if response.status_code != 200:
                    stats["errors"] += 1
                    continue
                stats["requests"] += 1
                stats["tokens"] += response.json()[0]["usage"]["completion_tokens"]
                stats["latency"] += time.monotonic() - t0

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats["wall"] = time.monotonic() - start
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("phi3-mini-shaped", "tiny"), default="phi3-mini-shaped")
    parser.add_argument("--num-layers", type=int, default=4, help="Layers of the Phi-3-mini-shaped model.")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=3, help="Requests each client sends, one after the other.")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/serve-throughput"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    onnx_dir = build_onnx(args.model, args.workdir, args.num_layers)
    tracking_uri, model_uri = log_model(onnx_dir, args.workdir)
    proc, url = serve(model_uri, tracking_uri, args.workdir)
    try:
        load(url, 2, 1, args.max_tokens)  # warm-up
        rows = []
        for clients in [int(c) for c in args.clients.split(",")]:
            s = load(url, clients, args.rounds, args.max_tokens)
            rate = s["tokens"] / s["wall"]
            rows.append((clients, s, rate))
            print(f"{clients:2d} clients: {s['requests']:4d} requests, {s['tokens']:6d} tokens, {rate:7.1f} tok/s, "
                  f"mean latency {s['latency'] / max(1, s['requests']):.2f} s, errors {s['errors']}", flush=True)
    finally:
        local_server.stop(proc, grace_s=15)
    base = rows[0][2]
    print(f"\nmodel: {onnx_dir.name}, greedy, max_tokens={args.max_tokens}, {args.rounds} requests per client, {os.cpu_count()} CPUs")
    print("| clients | tokens/s | speed-up |\n|---|---|---|")
    for clients, _, rate in rows:
        print(f"| {clients} | {rate:.1f} | {rate / base:.2f}x |")
    last = rows[-1]
    verdict = "meets" if last[2] / base >= GOAL else "misses"
    print(f"\n{last[0]} clients vs 1: {last[2] / base:.2f}x ({verdict} the {GOAL}x goal)")


if __name__ == "__main__":
    main()
