"""One generation measurement, run as its own process so its peak RSS is its own.

    python -m benchmarks.probe raw      ONNX_DIR   --messages JSON --new-tokens 128 --repeats 3 --out R.json
    python -m benchmarks.probe pyfunc   MODEL_URI  --messages JSON --new-tokens 128 --repeats 3 --out R.json
    python -m benchmarks.probe pipeline MODEL_URI  --messages JSON --new-tokens 128 --repeats 3 --out R.json
    python -m benchmarks.probe compare  ONNX_DIR MODEL_URI SERVER_URL --messages JSON ... --out R.json
    python -m benchmarks.probe bandwidth --out R.json

Each mode prints progress, then writes its result as JSON to --out: load_s, prompt_tokens, and per
repeat the time to first token (ttft_s), the decode rate after the first token (decode_tok_s) and
how many tokens were generated. One short warm-up generation runs before the measured ones.

- raw: the onnxruntime-genai loop (model-qa.py's shape: generator, append_tokens,
  generate_next_token, a tokenizer stream) on the ONNX folder, with min_length forcing exactly
  new_tokens tokens; each token is timed.
- pyfunc: `phi3-onnx` loaded with mlflow.pyfunc.load_model; predict_stream yields one chunk per
  token, each timed. The wrapper has no minimum-length option: the token count is reported
  (greedy decoding of a fixed prompt is deterministic, so it is the same every time).
- pipeline: `phi3-pipeline` loaded with mlflow.pyfunc.load_model and model_config
  min_new_tokens=new_tokens; it cannot stream, so ttft is a 1-token request and the decode rate
  is (new_tokens - 1) / (time of a new_tokens request - time of a 1-token request). The served
  model is measured the same way over HTTP.
- compare: the raw loop, phi3-onnx's predict_stream and predict, and the served model, in
  alternating rounds in one process, each round with its own read-bandwidth measurement: the
  ratios between them, under the same machine load.
- bandwidth: the best read rate of summing a 1 GiB float32 tensor with all of torch's threads.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
WARMUP_TOKENS = 8


def _log(text: str) -> None:
    print(text, flush=True)


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def token_timing(t_start: float, stamps: list[float]) -> dict:
    """ttft and decode rate from the start time and one timestamp per generated token."""
    decode_s = stamps[-1] - stamps[0]
    return {
        "ttft_s": stamps[0] - t_start,
        "decode_tok_s": (len(stamps) - 1) / decode_s if decode_s > 0 else None,
        "tokens": len(stamps),
        "total_s": stamps[-1] - t_start,
    }


def request_timing(t_one: float, t_full: float, tokens: int) -> dict:
    """ttft and decode rate from a 1-token request and a `tokens`-token request."""
    decode_s = t_full - t_one
    return {
        "ttft_s": t_one,
        "decode_tok_s": (tokens - 1) / decode_s if decode_s > 0 else None,
        "tokens": tokens,
        "total_s": t_full,
    }


class RawLoop:
    """The onnxruntime-genai loop on an ONNX folder, with min_length forcing the token count."""

    def __init__(self, onnx_dir: str, messages: list[dict]) -> None:
        import onnxruntime_genai as og

        self.og = og
        self.load_s, self.model = _timed(lambda: og.Model(onnx_dir))
        self.tokenizer = og.Tokenizer(self.model)
        # The same prompt the pyfunc builds: the model's chat template, then encode.
        self.ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(json.dumps(messages),
                                                                            add_generation_prompt=True))

    def generate(self, n: int) -> dict:
        og, ids = self.og, self.ids
        t0 = time.perf_counter()
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        generator = og.Generator(self.model, params)
        stream = self.tokenizer.create_stream()
        generator.append_tokens(ids)
        stamps = []
        while not generator.is_done():
            generator.generate_next_token()
            stream.decode(int(generator.get_next_tokens()[0]))
            stamps.append(time.perf_counter())
        return token_timing(t0, stamps)


def _chat(messages: list[dict], max_tokens: int) -> dict:
    return {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0}


def streamed(model, messages: list[dict], n: int) -> dict:
    """predict_stream of the phi3-onnx pyfunc: it yields one chunk per generated token."""
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in model.predict_stream(_chat(messages, n))]
    return token_timing(t0, stamps)


def requested(ask: Callable[[int], tuple[float, dict]], n: int) -> dict:
    """A 1-token and an n-token chat request; ask(n) -> (seconds, chat.completion)."""
    t_one, one = ask(1)
    if one["usage"]["completion_tokens"] != 1:
        raise RuntimeError(f"a 1-token request generated {one['usage']['completion_tokens']} tokens")
    t_full, out = ask(n)
    return request_timing(t_one, t_full, out["usage"]["completion_tokens"])


def pyfunc_asker(model, messages: list[dict]) -> Callable[[int], tuple[float, dict]]:
    return lambda n: _timed(lambda: model.predict(_chat(messages, n))[0])


def http_asker(url: str, messages: list[dict]) -> Callable[[int], tuple[float, dict]]:
    import urllib.request

    def ask(n: int) -> tuple[float, dict]:
        body = json.dumps(_chat(messages, n)).encode()
        request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
        t0 = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
        return time.perf_counter() - t0, answer[0] if isinstance(answer, list) else answer

    return ask


def raw(onnx_dir: str, messages: list[dict], new_tokens: int, repeats: int) -> dict:
    loop = RawLoop(onnx_dir, messages)
    loop.generate(WARMUP_TOKENS)
    runs = []
    for i in range(repeats):
        runs.append(loop.generate(new_tokens))
        _log(f"raw {i + 1}/{repeats}: {runs[-1]}")
    return {"load_s": loop.load_s, "prompt_tokens": len(loop.ids), "runs": runs}


def pyfunc(model_uri: str, messages: list[dict], new_tokens: int, repeats: int) -> dict:
    import mlflow

    load_s, model = _timed(lambda: mlflow.pyfunc.load_model(model_uri))
    prompt_tokens = model.predict(_chat(messages, WARMUP_TOKENS))[0]["usage"]["prompt_tokens"]  # also the warm-up
    runs = []
    for i in range(repeats):
        runs.append(streamed(model, messages, new_tokens))
        _log(f"pyfunc {i + 1}/{repeats}: {runs[-1]}")
    return {"load_s": load_s, "prompt_tokens": prompt_tokens, "runs": runs}


def pipeline(model_uri: str, messages: list[dict], new_tokens: int, repeats: int) -> dict:
    import mlflow

    # model_config given at load time is merged into the generation kwargs of every request
    # (request params are dropped: the llm/v1/chat signature has no params schema). A 1-token
    # request still stops after 1 token: max_new_tokens wins over min_new_tokens.
    load_s, model = _timed(lambda: mlflow.pyfunc.load_model(model_uri, model_config={"min_new_tokens": new_tokens}))
    ask = pyfunc_asker(model, messages)
    prompt_tokens = ask(1)[1]["usage"]["prompt_tokens"]  # also the warm-up
    runs = []
    for i in range(repeats):
        runs.append(requested(ask, new_tokens))
        _log(f"pipeline {i + 1}/{repeats}: {runs[-1]}")
    return {"load_s": load_s, "prompt_tokens": prompt_tokens, "runs": runs}


def compare(onnx_dir: str, model_uri: str, url: str, messages: list[dict], new_tokens: int, repeats: int) -> dict:
    """Rounds of: read bandwidth, raw loop, pyfunc stream, pyfunc predict, served - alternating in
    one process, so that each round's ratios see the same machine load (the machine is shared)."""
    import mlflow

    loop = RawLoop(onnx_dir, messages)
    model = mlflow.pyfunc.load_model(model_uri)
    local, remote = pyfunc_asker(model, messages), http_asker(url, messages)
    loop.generate(WARMUP_TOKENS)
    streamed(model, messages, WARMUP_TOKENS)
    remote(WARMUP_TOKENS)
    paths = {
        "raw": lambda: loop.generate(new_tokens),
        "pyfunc_stream": lambda: streamed(model, messages, new_tokens),
        "pyfunc_predict": lambda: requested(local, new_tokens),
        "served": lambda: requested(remote, new_tokens),
    }
    order = list(paths)
    rounds = []
    for i in range(repeats):
        # Each round starts with a different path: going first (or right after the bandwidth
        # measurement) was seen to cost up to 30%, which would bias a fixed order.
        this_round = {key: paths[key]() for key in order[i % len(order):] + order[: i % len(order)]}
        this_round["read_gb_s"] = bandwidth()["read_gb_s"]
        rounds.append(this_round)
        # decode_tok_s is None when a request-timed rate is lost in noise (the tiny model)
        _log(f"compare {i + 1}/{repeats}: " + ", ".join(
            f"{k} {v['decode_tok_s']} tok/s" if isinstance(v, dict) else f"{k} {v:.1f}" for k, v in rounds[-1].items()))
    return {"rounds": rounds}


def bandwidth(gib: int = 1, repeats: int = 10) -> dict:
    import torch

    x = torch.ones(gib << 28, dtype=torch.float32)  # gib GiB, written once so every page is real
    best = min(_timed(lambda: float(x.sum()))[0] for _ in range(repeats))
    return {"bytes": x.numel() * 4, "best_s": best, "read_gb_s": x.numel() * 4 / best / 1e9,
            "torch_threads": torch.get_num_threads()}


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("raw", "pyfunc", "pipeline", "compare", "bandwidth"))
    parser.add_argument("target", nargs="*", help="ONNX folder (raw), model URI (pyfunc, pipeline), "
                        "or ONNX folder, model URI and server URL (compare)")
    parser.add_argument("--messages", help="chat messages as JSON")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True, help="the JSON file the result is written to")
    args = parser.parse_args()
    if args.mode == "bandwidth":
        result = bandwidth()
    else:
        if not args.target or not args.messages:
            parser.error(f"{args.mode} needs a target and --messages")
        fn = {"raw": raw, "pyfunc": pyfunc, "pipeline": pipeline, "compare": compare}[args.mode]
        result = fn(*args.target, json.loads(args.messages), args.new_tokens, args.repeats)
    args.out.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
