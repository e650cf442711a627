"""Aggregate decode throughput of the served int4 ONNX model at 1, 4 and 8 concurrent clients.

Builds a model (default: benchmarks.phi3_mini_shaped's Phi-3-mini-shaped checkpoint, 4 layers;
`--model tiny`: the embedded tiny model, a quick run), converts it to int4 with the project's
converter, logs it with the project's `log_onnx_model` in a tracking store under --workdir, serves
it with `mlflow models serve --env-manager local` on a free port, and has N client threads each
send --rounds greedy chat requests (`max_tokens` each, distinct prompts) one after the other.

Reported per N: requests, completion tokens (from each answer's usage), aggregate tokens/s (all
tokens over the wall time from the first request to the last answer), mean latency, and the
speed-up over N=1. Goal: at least 2.5x at 8 clients over 1.

    python -m benchmarks.serve_throughput                     # Phi-3-mini-shaped, 4 layers
    python -m benchmarks.serve_throughput --model tiny --rounds 20
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import requests

from .int4_model import MODELS, build_onnx, log_model
from .server import mlflow_models_serve, serving

GOAL = 2.5


def load(url: str, clients: int, rounds: int, max_tokens: int) -> dict:
    """N clients each sending `rounds` requests back to back; totals from first send to last answer."""
    stats = {"requests": 0, "tokens": 0, "latency": 0.0, "errors": 0}
    lock = threading.Lock()

    def client(k: int) -> None:
        for i in range(rounds):
            body = {"messages": [{"role": "user",
                                  "content": f"Client {k}, question {i}: tell me about the number {k * 1000 + i}."}],
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
    parser.add_argument("--model", choices=MODELS, default="phi3-mini-shaped")
    parser.add_argument("--num-layers", type=int, default=4, help="Layers of the Phi-3-mini-shaped model.")
    parser.add_argument("--clients", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=3, help="Requests each client sends, one after the other.")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/serve-throughput"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    onnx_dir = build_onnx(args.model, args.workdir, args.num_layers)
    tracking_uri, model_uri = log_model(onnx_dir, args.workdir, "serve-throughput")
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, HF_HUB_OFFLINE="1")
    with serving(mlflow_models_serve(model_uri), "/ping", args.workdir / "server.log", cwd=args.workdir, env=env,
                 timeout_s=300, grace_s=15) as server:
        load(server.url, 2, 1, args.max_tokens)  # warm-up
        rows = []
        for clients in [int(c) for c in args.clients.split(",")]:
            s = load(server.url, clients, args.rounds, args.max_tokens)
            rate = s["tokens"] / s["wall"]
            rows.append((clients, s, rate))
            print(f"{clients:2d} clients: {s['requests']:4d} requests, {s['tokens']:6d} tokens, {rate:7.1f} tok/s, "
                  f"mean latency {s['latency'] / max(1, s['requests']):.2f} s, errors {s['errors']}", flush=True)
    base = rows[0][2]
    print(f"\nmodel: {onnx_dir.name}, greedy, max_tokens={args.max_tokens}, {args.rounds} requests per client, "
          f"{os.cpu_count()} CPUs")
    print("| clients | tokens/s | speed-up |\n|---|---|---|")
    for clients, _, rate in rows:
        print(f"| {clients} | {rate:.1f} | {rate / base:.2f}x |")
    last = rows[-1]
    verdict = "meets" if last[2] / base >= GOAL else "misses"
    print(f"\n{last[0]} clients vs 1: {last[2] / base:.2f}x ({verdict} the {GOAL}x goal)")


if __name__ == "__main__":
    main()
