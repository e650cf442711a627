"""`serve` (the OpenAI-compatible server) against raw onnxruntime-genai on the same files.

Builds benchmarks.phi3_mini_shaped's Phi-3-mini-shaped model (--num-layers layers, int4, via
benchmarks.int4_model), starts `python -m steps.serve` on it, and measures
in alternating rounds, each number with the machine's load average at that moment:

  1 client    one greedy chat request through the official `openai` client (wall time of the
              request, tokens from its usage) vs the raw onnxruntime-genai loop generating the same
              number of tokens from the same prompt (wall time including the prompt). Goal >= 0.95x.
  8 clients   8 concurrent clients, 8 different prompts, aggregate tokens/s (all completion tokens
              over the wall time from the first send to the last answer) vs raw onnxruntime-genai's
              own batch of the same 8 prompts (batch_size=8, padded, each row counted until its
              end-of-text or max_tokens, as the server's batcher does). Goal >= 0.8x.

Raw and served read the same ONNX files (the logged model's artifacts) with whatever session options
their genai_config.json holds. Writes serve_openai.json and serve_openai.md to --results-dir.

    python -m benchmarks.serve_openai                       # 2 layers, about 10 minutes on 2 cores
    python -m benchmarks.serve_openai --model tiny --rounds 2   # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np

from .int4_model import MODELS, build_onnx, log_model
from .server import openai_serve, serving

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GOALS = {"one_client": 0.95, "eight_clients": 0.80}
CLIENTS = 8


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Client {k}: please explain how rivers carry sand to the sea and "
                                         "why deltas form."}] for k in range(n)]


class Raw:
    """The onnxruntime-genai loop (model-qa.py's shape) on the served model's own ONNX folder."""

    def __init__(self, onnx_dir: Path) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(onnx_dir))
        self.tokenizer = og.Tokenizer(self.model)
        config = json.loads((onnx_dir / "genai_config.json").read_text())["model"]
        eos = config["eos_token_id"]
        self.eos = set(eos) if isinstance(eos, list) else {eos}
        self.pad = int(config.get("pad_token_id", min(self.eos)))

    def ids(self, messages: list[dict]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
        return [int(i) for i in self.tokenizer.encode(prompt)]

    def one(self, messages: list[dict], tokens: int) -> tuple[int, float]:
        """Exactly `tokens` greedy tokens; (tokens, seconds)."""
        ids = self.ids(messages)
        start = time.perf_counter()
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + tokens, min_length=len(ids) + tokens, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.array([ids], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            generator.get_next_tokens()
        return tokens, time.perf_counter() - start

    def batch(self, conversations: list[list[dict]], max_tokens: int) -> tuple[int, float]:
        """One batch of all conversations, greedy; each row counted until its end or max_tokens."""
        rows = [self.ids(m) for m in conversations]
        start = time.perf_counter()
        width = max(map(len, rows))
        ids = np.full((len(rows), width), self.pad, dtype=np.int32)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(batch_size=len(rows), max_length=width + max_tokens, do_sample=False)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        counts, done = [0] * len(rows), [False] * len(rows)
        while not all(done) and not generator.is_done():
            generator.generate_next_token()
            for i, token in enumerate(generator.get_next_tokens()):
                if not done[i]:
                    counts[i] += 1
                    done[i] = int(token) in self.eos or counts[i] == max_tokens
        return sum(counts), time.perf_counter() - start


def served_one(client, model_id: str, messages: list[dict], max_tokens: int) -> tuple[int, float]:
    start = time.perf_counter()
    answer = client.chat.completions.create(model=model_id, messages=messages, max_tokens=max_tokens, temperature=0)
    return answer.usage.completion_tokens, time.perf_counter() - start


def served_many(clients: list, model_id: str, conversations: list[list[dict]], max_tokens: int) -> tuple[int, float]:
    tokens = [0] * len(conversations)

    def ask(i: int) -> None:
        tokens[i] = served_one(clients[i], model_id, conversations[i], max_tokens)[0]  # an error leaves 0

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(conversations))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not all(tokens):
        raise SystemExit(f"{tokens.count(0)} of {len(tokens)} concurrent requests failed: see the server log")
    return sum(tokens), time.perf_counter() - start


def measured(tokens: int, seconds: float) -> dict:
    return {"tokens": tokens, "seconds": round(seconds, 3), "tok_s": round(tokens / seconds, 2),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="phi3-mini-shaped")
    parser.add_argument("--num-layers", type=int, default=2, help="Layers of the Phi-3-mini-shaped model.")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/serve-openai"))
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    import mlflow
    import openai

    built = build_onnx(args.model, args.workdir, args.num_layers)
    tracking_uri, model_uri = log_model(built, args.workdir, "serve-openai")
    # The files the server loads: the logged model's copy of the ONNX folder (pyfunc artifacts/<name>).
    logged = mlflow.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    onnx_dir = Path(mlflow.artifacts.download_artifacts(f"{logged}/artifacts/{built.name}",
                                                        dst_path=str(args.workdir / "logged")))
    # A long request timeout: on a loaded machine a batch of 8 can take longer than the default 60 s.
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
               MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT="900")
    with serving(openai_serve(model_uri), "/health", args.workdir / "serve.log", cwd=REPO, env=env) as server:
        clients = [openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=600)
                   for _ in range(CLIENTS)]
        model_id = clients[0].models.list().data[0].id
        raw = Raw(onnx_dir)
        conversations = prompts(CLIENTS)
        served_one(clients[0], model_id, conversations[0], 8)  # warm-up, both paths
        raw.one(conversations[0], 8)
        rounds = []
        for r in range(args.rounds):
            tokens, seconds = served_one(clients[0], model_id, conversations[0], args.max_tokens)
            one_served = measured(tokens, seconds)
            one_raw = measured(*raw.one(conversations[0], tokens))  # the same number of tokens
            many_raw = measured(*raw.batch(conversations, args.max_tokens))
            many_served = measured(*served_many(clients, model_id, conversations, args.max_tokens))
            rounds.append({"one_client": {"served": one_served, "raw": one_raw},
                           "eight_clients": {"served": many_served, "raw_batch8": many_raw}})
            print(f"round {r + 1}: 1 client {one_served['tok_s']} vs raw {one_raw['tok_s']} tok/s; "
                  f"8 clients {many_served['tok_s']} vs raw batch-8 {many_raw['tok_s']} tok/s "
                  f"(load average {many_served['loadavg_1m']})", flush=True)

    def ratio(key: str, served: str, raw_key: str) -> float:
        return statistics.median(r[key][served]["tok_s"] / r[key][raw_key]["tok_s"] for r in rounds)

    ratios = {"one_client": ratio("one_client", "served", "raw"),
              "eight_clients": ratio("eight_clients", "served", "raw_batch8")}
    report = {
        "model": "tiny-int4" if args.model == "tiny" else f"phi3-mini-shaped-{args.num_layers}L-int4",
        "max_tokens": args.max_tokens, "rounds": rounds, "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "goals": GOALS, "nproc": os.cpu_count(),
        "session_options": json.loads((onnx_dir / "genai_config.json").read_text())["model"]["decoder"]
        .get("session_options", {}),
        "note": "the 1-minute load average beside each number says how busy the machine was (2 CPUs: above 2, "
                "other work competed)",
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "serve_openai.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| round | 1 client served | raw | ratio | load | 8 clients served | raw batch-8 | ratio | load |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rounds, 1):
        one, many = r["one_client"], r["eight_clients"]
        lines.append(f"| {i} | {one['served']['tok_s']} | {one['raw']['tok_s']} | "
                     f"{one['served']['tok_s'] / one['raw']['tok_s']:.2f}x | {one['served']['loadavg_1m']} "
                     f"| {many['served']['tok_s']} | {many['raw_batch8']['tok_s']} | "
                     f"{many['served']['tok_s'] / many['raw_batch8']['tok_s']:.2f}x | {many['served']['loadavg_1m']} |")
    summary = "\n".join(
        f"- {key.replace('_', ' ')}: {value:.2f}x (median; goal >= {GOALS[key]}x: "
        f"{'met' if value >= GOALS[key] else 'missed'})" for key, value in ratios.items()
    )
    (args.results_dir / "serve_openai.md").write_text(
        f"# serve vs raw onnxruntime-genai ({report['model']}, greedy, max_tokens={args.max_tokens}, "
        f"{os.cpu_count()} CPUs)\n\n"
        + "\n".join(lines) + f"\n\n{summary}\n\n{report['note']}.\n"
    )
    print("\n".join(lines) + "\n\n" + summary)


if __name__ == "__main__":
    main()
