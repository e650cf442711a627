"""onnxruntime-genai against llama.cpp (and transformers) on the same Phi-3-mini-shaped checkpoint.

One checkpoint (benchmarks.phi3_mini_shaped: full Phi-3-mini widths, --num-layers layers, bf16, random
weights from a fixed seed), four formats of it:

  onnxruntime-genai int4  converted by the project (phi3flow.onnx_convert.convert, as log_onnx_wrapper
                          does), run with 1 thread (what onnxruntime-genai does when genai_config.json
                          names no count) and with --threads (what log_onnx_wrapper now writes);
                          also converted with int4_block_size=128
  llama.cpp Q4_0, Q4_K_M  GGUF written by the converter llama-cpp-python's source distribution ships
                          (vendor/llama.cpp/convert_hf_to_gguf.py), quantized by llama_model_quantize
  transformers bf16       the checkpoint itself

Every runtime gets the same prompt token ids (no tokenizer is involved in the timing) and greedy
decoding that ignores end-of-text, so all produce exactly --new-tokens tokens. Measured: time to
first token at batch 1, decode tokens/s at batch 1 after the first token, aggregate tokens/s at
batch 8 (8 rows x new tokens / the whole generation, prefill included). Rounds are interleaved:
each round runs every configuration once, each in a fresh process that times --repeats generations
after a warm-up and keeps their median; the load average is recorded before each; the table reports
medians over rounds.

The tiny tokenizer has no tokenizer.model (sentencepiece), which the converter's Phi-3 class
requires. It is a Llama-layout BPE tokenizer.json with byte fallback, which the converter reads for
Llama models without tokenizer.model (`_set_vocab_llama_hf`); the Phi-3 class is pointed at that
same function. This changes only how the vocabulary is written; the weights, hyperparameters and
token ids are what the converter writes for any Phi-3.

Needs the `peer` extra (llama-cpp-python, built from source) and the sdist's converter, which
writes with the gguf-py it ships (the converter puts it first on its import path):

    pip install -e '.[peer]'      # compiles llama.cpp from the sdist
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/sdist
    tar xzf /tmp/sdist/*.tar.gz -C /tmp/sdist
    python -m benchmarks.peer --llama-cpp-src /tmp/sdist/llama_cpp_python-0.3.36 --rounds 3

On 2 busy cores the full compile takes about an hour. Only the four libraries the bindings load
(llama, ggml, ggml-base, ggml-cpu: 78 of 193 compile steps) can be built from the same sdist
(`pip install` with `CMAKE_ARGS=-DLLAVA_BUILD=OFF`, `--config-settings=build.targets=llama;ggml;ggml-base;ggml-cpu`
and `--config-settings=build-dir=DIR`: its install step then fails on the skipped common library)
and used in place with `PYTHONPATH=<sdist> LLAMA_CPP_LIB_PATH=DIR/bin`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import phi3_mini_shaped

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

PROMPT_TOKENS = 32
BATCH = 8
# (name, runtime, format file under the workdir, threads: None = --threads)
CONFIGS = [
    ("onnxruntime-genai int4, 1 thread (no count in genai_config.json)", "ort", "onnx-int4", 1),
    ("onnxruntime-genai int4, --threads", "ort", "onnx-int4", None),
    ("onnxruntime-genai int4 block 128, --threads", "ort", "onnx-int4-b128", None),
    ("llama.cpp Q4_0", "llama", "model-Q4_0.gguf", None),
    ("llama.cpp Q4_K_M", "llama", "model-Q4_K_M.gguf", None),
    ("transformers bf16", "hf", "checkpoint-bf16", None),
]
OURS = {CONFIGS[1][0]: "block 32", CONFIGS[2][0]: "block 128"}  # the project's int4 with every thread
GOALS = {  # each of OURS against llama.cpp Q4_0 (reported, never assumed)
    "decode_b1_vs_q4_0": ("decode_tok_s_b1", ">=", 1.0),
    "ttft_b1_vs_q4_0": ("ttft_s_b1", "<=", 1.2),
    "aggregate_b8_vs_q4_0": ("aggregate_tok_s_b8", ">=", 1.5),
}


# ---- preparing the formats ---------------------------------------------------------------------

def prompt_ids(checkpoint: Path) -> list[int]:
    """PROMPT_TOKENS ids of ordinary text, from the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    text = "Please explain in plain words how a river carries sand and stones down to the sea " * 4
    ids = AutoTokenizer.from_pretrained(checkpoint)(text, add_special_tokens=False)["input_ids"]
    return ids[:PROMPT_TOKENS]


def convert_gguf(checkpoint: Path, out: Path, llama_cpp_src: Path) -> None:
    """The sdist's convert_hf_to_gguf.py, run as a library so that Phi-3 reads tokenizer.json (see above)."""
    converter_dir = llama_cpp_src / "vendor" / "llama.cpp"
    code = f"""
import sys
sys.path.insert(0, {str(converter_dir)!r})
sys.argv = ["convert_hf_to_gguf.py", {str(checkpoint)!r}, "--outfile", {str(out)!r}, "--outtype", "bf16"]
import convert_hf_to_gguf
import gguf
from conversion.phi import Phi3MiniModel

def set_vocab(self):
    # No tokenizer.model: read tokenizer.json with the converter's LlamaHfVocab, as its Llama path
    # (_set_vocab_llama_hf) does, then pad to the embedding's rows as its Phi-3 path does.
    tokens, scores, types = map(list, zip(*gguf.LlamaHfVocab(self.dir_model).all_tokens()))
    for i in range(len(tokens), self.hparams["vocab_size"]):
        tokens.append(f"[PAD{{i}}]".encode()); scores.append(-10000.0); types.append(gguf.TokenType.UNUSED)
    self.gguf_writer.add_tokenizer_model("llama")
    self.gguf_writer.add_tokenizer_pre("default")
    self.gguf_writer.add_token_list(tokens)
    self.gguf_writer.add_token_scores(scores)
    self.gguf_writer.add_token_types(types)
    gguf.SpecialVocab(self.dir_model, n_vocab=len(tokens)).add_to_gguf(self.gguf_writer)

Phi3MiniModel.set_vocab = set_vocab
convert_hf_to_gguf.main()
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def quantize_gguf(src: Path, out: Path, ftype: int, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
        raise SystemExit(f"llama_model_quantize failed for {out}")


def prepare(workdir: Path, num_layers: int, llama_cpp_src: Path | None, threads: int, files: set[str]) -> None:
    """Build the checkpoint and those of its formats (file names under workdir) that are not there yet."""
    from phi3flow.onnx_convert import DEFAULT_INT4_BLOCK_SIZE, convert

    checkpoint = workdir / "checkpoint-bf16"
    if phi3_mini_shaped.ensure_built(checkpoint, num_layers, "bfloat16", log=workdir / "build.log"):
        # a new checkpoint (none yet, or another config): the formats made from the old one go
        for old in workdir.glob("onnx-int4*"):
            shutil.rmtree(old)
        for old in workdir.glob("model-*.gguf"):
            old.unlink()
    for folder, block_size in (("onnx-int4", DEFAULT_INT4_BLOCK_SIZE), ("onnx-int4-b128", 128)):
        if folder in files and not (workdir / folder / "genai_config.json").is_file():
            print(f"== converting to onnxruntime-genai int4 as log_onnx_wrapper does, block size {block_size}",
                  flush=True)
            convert(checkpoint, workdir / folder, "int4", int4_block_size=block_size)
    quantized = [name for name in ("Q4_0", "Q4_K_M") if f"model-{name}.gguf" in files]
    if not quantized:
        return
    gguf = workdir / "model-bf16.gguf"
    if not gguf.is_file() and llama_cpp_src is None:
        raise SystemExit("--llama-cpp-src is needed to write the GGUF files (see this script's docstring)")
    if not gguf.is_file():
        print("== converting to GGUF (bf16)", flush=True)
        convert_gguf(checkpoint, gguf, llama_cpp_src)
    import llama_cpp

    for name in quantized:
        out = workdir / f"model-{name}.gguf"
        if not out.is_file():
            print(f"== quantizing {out.name}", flush=True)
            quantize_gguf(gguf, out, getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}"), threads)


# ---- one configuration, in its own process ------------------------------------------------------

def run_ort(path: Path, ids: list[int], new_tokens: int, batch: int, threads: int,
            options: dict) -> tuple[float, float]:
    """(seconds to the first token, seconds to the last) of one greedy generation."""
    import onnxruntime_genai as og

    global _ort_model
    if "_ort_model" not in globals():
        config = og.Config(str(path))
        session_options = {"intra_op_num_threads": threads, **options}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": session_options}}}))
        _ort_model = og.Model(config)
    rows = [ids[i:] + ids[:i] for i in range(batch)]  # different rows, equal lengths: no padding
    params = og.GeneratorParams(_ort_model)
    length = len(ids) + new_tokens
    params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=batch)
    generator = og.Generator(_ort_model, params)
    t0 = time.perf_counter()
    generator.append_tokens(rows)
    generator.generate_next_token()
    first = time.perf_counter() - t0
    while not generator.is_done():
        generator.generate_next_token()
    return first, time.perf_counter() - t0


def run_llama(path: Path, ids: list[int], new_tokens: int, batch: int, threads: int,
              options: dict) -> tuple[float, float]:
    """The same with llama.cpp's C API: one sequence per row, greedy, end-of-text ignored."""
    import llama_cpp as L
    import numpy as np

    global _llama_model
    if "_llama_model" not in globals():
        L.llama_backend_init()
        _llama_model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(_llama_model))
    cparams = L.llama_context_default_params()
    cparams.n_ctx = batch * (len(ids) + new_tokens)
    cparams.n_batch = cparams.n_ubatch = batch * len(ids)
    cparams.n_seq_max = batch
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = L.llama_init_from_model(_llama_model, cparams)
    llama_batch = L.llama_batch_init(batch * len(ids), 0, 1)

    def decode(tokens: list[list[int]], start: int) -> list[int]:
        """Append tokens[row] to each row's sequence at position start; the greedy next token of each."""
        k = 0
        for row, row_tokens in enumerate(tokens):
            for i, token in enumerate(row_tokens):
                llama_batch.token[k], llama_batch.pos[k] = token, start + i
                llama_batch.n_seq_id[k], llama_batch.seq_id[k][0] = 1, row
                llama_batch.logits[k] = i == len(row_tokens) - 1
                k += 1
        llama_batch.n_tokens = k
        if L.llama_decode(ctx, llama_batch) != 0:
            raise RuntimeError("llama_decode failed")
        ends = np.cumsum([len(t) for t in tokens]) - 1
        return [int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, int(e)), shape=(n_vocab,))))
                for e in ends]

    rows = [ids[i:] + ids[:i] for i in range(batch)]
    t0 = time.perf_counter()
    nxt = decode(rows, 0)
    first = time.perf_counter() - t0
    for step in range(1, new_tokens):
        nxt = decode([[t] for t in nxt], len(ids) + step - 1)
    total = time.perf_counter() - t0
    L.llama_batch_free(llama_batch)
    L.llama_free(ctx)
    return first, total


def run_hf(path: Path, ids: list[int], new_tokens: int, batch: int, threads: int, options: dict) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    global _hf_model
    if "_hf_model" not in globals():
        torch.set_num_threads(threads)
        _hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    rows = torch.tensor([ids[i:] + ids[:i] for i in range(batch)])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = _hf_model(rows, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        first = time.perf_counter() - t0
        for _ in range(1, new_tokens):
            out = _hf_model(nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return first, time.perf_counter() - t0


RUNNERS = {"ort": run_ort, "llama": run_llama, "hf": run_hf}


def worker(runtime: str, path: Path, ids: list[int], new_tokens: int, threads: int, batch8: bool, options: dict,
           repeats: int) -> dict:
    """Medians over `repeats` generations in this one process, after one that loads and warms up."""
    def run(batch: int, tokens: int = new_tokens) -> tuple[float, float]:
        return RUNNERS[runtime](path, ids, tokens, batch, threads, options)

    t0 = time.perf_counter()
    run(1, 4)  # load and warm up
    load_s = time.perf_counter() - t0
    firsts, decodes, cpus = [], [], []
    for _ in range(repeats):
        before = os.times()
        first, total = run(1)
        cpu = os.times()
        firsts.append(first)
        decodes.append((new_tokens - 1) / (total - first))
        cpus.append((cpu.user - before.user + cpu.system - before.system) / total)
    result = {
        "load_s": load_s,
        "ttft_s_b1": statistics.median(firsts),
        "decode_tok_s_b1": statistics.median(decodes),
        "cpu_per_wall_b1": statistics.median(cpus),
    }
    if batch8:
        run(BATCH, 4)  # warm up the batch shapes
        result["aggregate_tok_s_b8"] = statistics.median(BATCH * new_tokens / run(BATCH)[1] for _ in range(repeats))
    return result


# ---- rounds and the report ---------------------------------------------------------------------

def measure(workdir: Path, configs: list[tuple], rounds: int, threads: int, new_tokens: int,
            repeats: int) -> list[dict]:
    ids = prompt_ids(workdir / "checkpoint-bf16")
    runs = []
    for r in range(rounds):
        for name, runtime, file, config_threads, *options in configs:
            load = os.getloadavg()
            out = workdir / "worker-result.json"
            out.unlink(missing_ok=True)
            spec = json.dumps({"runtime": runtime, "path": str(workdir / file), "ids": ids, "new_tokens": new_tokens,
                               "threads": config_threads or threads, "batch8": runtime != "hf", "repeats": repeats,
                               "options": options[0] if options else {}, "out": str(out)})
            proc = subprocess.run([sys.executable, "-m", "benchmarks.peer", "--worker", spec], capture_output=True,
                                  text=True, timeout=1800, cwd=REPO)
            if proc.returncode != 0 or not out.is_file():
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(out.read_text())
            runs.append({"round": r, "name": name, "loadavg_1m_before": load[0], **result})
            shown = ", ".join(f"{k} {v:.3f}" for k, v in result.items())
            print(f"round {r + 1}/{rounds}  load {load[0]:.2f}  {name}: {shown}", flush=True)
    return runs


def summarize(runs: list[dict], configs: list[tuple]) -> dict[str, dict]:
    table = {}
    for name, *_ in configs:
        mine = [r for r in runs if r["name"] == name]
        keys = [k for k in mine[0] if k not in ("round", "name")]
        table[name] = {k: statistics.median(r[k] for r in mine if k in r) for k in keys}
    return table


def goals(table: dict[str, dict]) -> dict[str, dict]:
    peer = table.get("llama.cpp Q4_0")
    out = {}
    for name, block in OURS.items():
        ours = table.get(name)
        if not (ours and peer):  # a run with --only
            continue
        for goal, (metric, sense, target) in GOALS.items():
            ratio = ours[metric] / peer[metric]
            met = ratio >= target if sense == ">=" else ratio <= target
            out[f"{goal} ({block})"] = {"ratio": ratio, "target": f"{sense} {target}", "met": met}
    return out


def markdown(report: dict) -> str:
    lines = [
        f"Phi-3-mini-shaped checkpoint, {report['num_layers']} layers; {report['threads']} threads;"
        f" prompt {PROMPT_TOKENS} tokens, {report['new_tokens']} new tokens; median of {report['rounds']}"
        f" interleaved rounds of {report['repeats']} generations each;"
        f" load average (1 min) {report['loadavg_min']:.2f} to {report['loadavg_max']:.2f} before the runs.",
        "",
        "| runtime | TTFT b1 (s) | decode tok/s b1 | aggregate tok/s b8 | CPU-s per s b1 |",
        "|---|---|---|---|---|",
    ]
    for name, row in report["table"].items():
        agg = f"{row['aggregate_tok_s_b8']:.1f}" if "aggregate_tok_s_b8" in row else "–"
        lines.append(f"| {name} | {row['ttft_s_b1']:.3f} | {row['decode_tok_s_b1']:.1f} | {agg} | "
                     f"{row['cpu_per_wall_b1']:.2f} |")
    if report["goals"]:
        lines += ["", "| goal (onnxruntime-genai, --threads, / llama.cpp Q4_0) | ratio | target | met |",
                  "|---|---|---|---|"]
    for goal, g in report["goals"].items():
        lines.append(f"| {goal} | {g['ratio']:.2f} | {g['target']} | {'yes' if g['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def llama_cpp_version() -> str:
    """The bindings' version: also when they are used in place from the sdist (not installed)."""
    try:
        import llama_cpp
    except ImportError:  # a run with --only that leaves llama.cpp out
        return "not installed"
    return llama_cpp.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/phi3flow-peer"))
    parser.add_argument("--llama-cpp-src", type=Path,
                        help="the extracted llama-cpp-python sdist (for its GGUF converter)")
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3,
                        help="generations per configuration in each round's process; the median is kept")
    parser.add_argument("--ort-option", action="append", default=[], metavar="KEY=VALUE",
                        help="also run onnxruntime-genai with this session option (e.g. "
                             "session.intra_op.allow_spinning=0)")
    parser.add_argument("--only", action="append",
                        help="run only the configurations whose name contains this text (repeatable)")
    parser.add_argument("--results-name", default="peer", help="results go to <results-dir>/<name>.json and .md")
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        result = worker(spec["runtime"], Path(spec["path"]), spec["ids"], spec["new_tokens"], spec["threads"],
                        spec["batch8"], spec["options"], spec["repeats"])
        Path(spec["out"]).write_text(json.dumps(result))
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    args.workdir.mkdir(parents=True, exist_ok=True)
    configs = CONFIGS + [(f"onnxruntime-genai int4, --threads, {option}", "ort", "onnx-int4", None,
                          dict([option.split("=", 1)]))
                         for option in args.ort_option]
    configs = [c for c in configs if args.only is None or any(text in c[0] for text in args.only)]
    prepare(args.workdir, args.num_layers, args.llama_cpp_src, args.threads, {c[2] for c in configs})
    runs = measure(args.workdir, configs, args.rounds, args.threads, args.new_tokens, args.repeats)
    table = summarize(runs, configs)
    loads = [r["loadavg_1m_before"] for r in runs]
    from importlib.metadata import version

    report = {
        "num_layers": args.num_layers, "threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
        "new_tokens": args.new_tokens,
        "prompt_tokens": PROMPT_TOKENS, "batch": BATCH, "cpu": platform.processor() or platform.machine(),
        "nproc": os.cpu_count(), "loadavg_min": min(loads), "loadavg_max": max(loads),
        "versions": {**{d: version(d) for d in ("onnxruntime-genai", "onnxruntime", "transformers", "torch")},
                     "llama-cpp-python": llama_cpp_version()},
        "table": table, "goals": goals(table), "runs": runs,
    }
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / f"{args.results_name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.results_dir / f"{args.results_name}.md").write_text(markdown(report))
    print("\n" + markdown(report))


if __name__ == "__main__":
    main()
