"""Benchmark fixture: a Phi-3-mini-shaped checkpoint (real widths, few layers, random weights).

Same layer widths, vocabulary size and context as microsoft/Phi-3-mini-4k-instruct, but only
`num_layers` decoder layers (default 4: about 0.65 G parameters, 2.6 GB in float32, 1.3 GB in
bfloat16). The tokenizer files are those of the project's tiny model (`phi3flow.tiny.build`), and
config.json / generation_config.json take their bos/eos/pad ids from it, so every id is a real
token of the tokenizer and below vocab_size.

The weights are generated one tensor at a time (each from its own seeded generator) and written
in safetensors shards of at most `max_shard_bytes`; building never holds more than one shard
(default 1 GB) in memory, never the whole model and never two copies of it. Two builds with the
same arguments are byte-identical. config.json is written last: a folder that has it holds a
whole build.

    python -m benchmarks.phi3_mini_shaped /tmp/bench/models/phi3-4L-fp32 --num-layers 4 --dtype float32

The benchmarks call `ensure_built`, which builds in a child process (the caller's own peak RSS
stays its own) unless the folder already holds this build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path

from .rss import Measurement, run_measured

SEED = 20240423
INITIALIZER_RANGE = 0.02  # Phi-3's own; the values only need to be finite and reproducible
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
DTYPES = ("float32", "bfloat16")

# microsoft/Phi-3-mini-4k-instruct's config.json, except num_hidden_layers
PHI3_MINI = dict(
    hidden_size=3072,
    intermediate_size=8192,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    sliding_window=2047,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    hidden_act="silu",
)


def _param_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of Phi3ForCausalLM's state dict, from a model built on the meta device (no memory)."""
    import torch
    from transformers import Phi3ForCausalLM

    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def _tensor(name: str, shape: tuple[int, ...], dtype):
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(SEED + zlib.crc32(name.encode()))
    t = torch.empty(shape, dtype=torch.float32).normal_(0.0, INITIALIZER_RANGE, generator=gen)
    return t if dtype == torch.float32 else t.to(dtype)


def _tokenizer_files(out_dir: Path) -> dict:
    """Copy the tiny model's tokenizer files (built by phi3flow.tiny.build) into out_dir; return its config.json."""
    from phi3flow import tiny

    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as tmp:
        tiny_dir = tiny.build(Path(tmp) / "tiny")
        for name in TOKENIZER_FILES:
            shutil.copyfile(tiny_dir / name, out_dir / name)
        return json.loads((tiny_dir / "config.json").read_text())


def build(out_dir: Path | str, num_layers: int = 4, dtype: str = "float32", max_shard_bytes: int = 1 << 30) -> Path:
    """Write a Phi-3-mini-shaped model folder (config, safetensors shards, tokenizer) into out_dir."""
    import torch
    from safetensors.torch import save_file
    from transformers import Phi3Config

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    torch_dtype = getattr(torch, dtype)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("model*.safetensors*"):
        old.unlink()

    tiny_config = _tokenizer_files(out_dir)
    config = Phi3Config(
        **PHI3_MINI,
        num_hidden_layers=num_layers,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=tiny_config["bos_token_id"],
        eos_token_id=tiny_config["eos_token_id"],
        pad_token_id=tiny_config["pad_token_id"],
        architectures=["Phi3ForCausalLM"],
    )
    config.dtype = dtype

    # Group tensors into shards in state-dict order, each at most max_shard_bytes (a lone larger
    # tensor gets its own shard).
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    shard_bytes = 0
    total = 0
    for name, shape in _param_shapes(config):
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append((name, shape))
        shard_bytes += nbytes
        total += nbytes

    n = len(shards)
    weight_map = {}
    for i, entries in enumerate(shards, start=1):
        filename = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = {name: _tensor(name, shape, torch_dtype) for name, shape in entries}
        save_file(tensors, str(out_dir / filename), metadata={"format": "pt"})
        del tensors
        weight_map.update({name: filename for name, _ in entries})
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.save_pretrained(out_dir)  # last: it marks a whole build
    return out_dir


def is_built(model_dir: Path, num_layers: int, dtype: str) -> bool:
    """Whether model_dir holds a whole build with these arguments and the current PHI3_MINI config."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return False
    config = json.loads(config_file.read_text())
    wanted = {**PHI3_MINI, "num_hidden_layers": num_layers, "dtype": dtype}
    return all(config.get(key) == value for key, value in wanted.items())


def ensure_built(model_dir: Path, num_layers: int, dtype: str, log: Path, env: dict[str, str] | None = None,
                 rebuild: bool = False) -> Measurement | None:
    """Build model_dir in a child process unless it already holds this build; the build's
    measurement (wall time, peak RSS), or None when the folder was reused."""
    if is_built(model_dir, num_layers, dtype) and not rebuild:
        return None
    print(f"== building {model_dir} ({num_layers} layers, {dtype})", flush=True)
    repo = str(Path(__file__).resolve().parent.parent)
    env = dict(env or os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH", "")]))
    log.parent.mkdir(parents=True, exist_ok=True)
    m = run_measured([sys.executable, "-m", "benchmarks.phi3_mini_shaped", str(model_dir), "--num-layers",
                      str(num_layers),
                      "--dtype", dtype], cwd=repo, env=env, log_path=log, echo=False)
    if m.returncode != 0:
        raise SystemExit(f"building {model_dir} failed; see {log}")
    return m


def weight_bytes(model_dir: Path | str) -> int:
    """Sum of the sizes of the *.safetensors files in model_dir."""
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--max-shard-mb", type=int, default=1024, help="Shard size limit in MiB.")
    args = parser.parse_args()
    out = build(args.out_dir, args.num_layers, args.dtype, args.max_shard_mb << 20)
    print(f"{out}: {weight_bytes(out) / 1e9:.3f} GB of safetensors weights")


if __name__ == "__main__":
    main()
