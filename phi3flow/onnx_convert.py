"""Convert a Phi-3 checkpoint folder to an onnxruntime-genai folder with the model builder."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from phi3flow import output
from phi3flow.errors import UserError

PRECISIONS = ("int4", "fp32")
EXECUTION_PROVIDERS = ("cpu",)
# Microsoft's published cpu-int4-rtn-block-32-acc-level-4 variant. The builder silently ignores
# the older `int4_`-prefixed spellings of these options.
INT4_OPTIONS = {"block_size": "32", "accuracy_level": "4", "algo_config": "rtn"}
BUILDER_LAYER_LINE = re.compile(r"Reading layer \d+")  # the builder prints one per layer (32 for Phi-3-mini)


def check_options(precision: str, execution_provider: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    if execution_provider not in EXECUTION_PROVIDERS:
        raise UserError(f"execution_provider must be one of {', '.join(EXECUTION_PROVIDERS)}, not '{execution_provider}'")


def convert(src: Path, out: Path, precision: str = "int4", execution_provider: str = "cpu") -> Path:
    """Build the ONNX model, genai_config.json and tokenizer files of src into out."""
    check_options(precision, execution_provider)
    # The builder reads config and tokenizer through transformers, which asks the Hub about a
    # local folder unless told it is offline.
    os.environ["HF_HUB_OFFLINE"] = "1"
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    extra = [f"{k}={v}" for k, v in INT4_OPTIONS.items()] if precision == "int4" else []
    window = sliding_window(src)
    if window is not None:
        extra.append("windowed_kv_cache=false")
    cache = out.parent / f"{out.name}.builder-cache"
    options = parse_extra_options(None, str(src), str(out), precision, execution_provider, str(cache), extra)
    # In a log, the builder's phase lines stay; its per-tensor progress (a bar while saving, and
    # the quantizer's own carriage-return bar, which no switch turns off) shows as its last state,
    # and one "Reading layer N" line per layer as the first and last. Error output stays whole.
    with output.bounded(merge=BUILDER_LAYER_LINE):
        create_model(None, str(src), str(out), precision, execution_provider, str(cache), **options)
    shutil.rmtree(cache, ignore_errors=True)
    if window is not None:
        apply_sliding_window(out / "model.onnx", window)
    # The checkpoint's config travels with the ONNX files: the pyfunc reads LongRoPE's switch point
    # (original_max_position_embeddings) from it, which genai_config.json cannot hold (its parser
    # refuses unknown keys).
    shutil.copyfile(src / "config.json", out / "config.json")
    return out


def sliding_window(src: Path) -> int | None:
    """The checkpoint's attention window when it is shorter than its context, else None.

    Phi-3-mini-4k and Phi-3-medium-4k attend to the last 2047 positions of a 4096 context; the
    LongRoPE models name a window twice their context, which never applies.
    """
    config = json.loads((src / "config.json").read_text())
    window = config.get("sliding_window")
    if window is None or window >= config["max_position_embeddings"]:
        return None
    return int(window)


def apply_sliding_window(model_file: Path, window: int) -> None:
    """Make every GroupQueryAttention node attend to the last `window` positions, as transformers does.

    Why this post-processing: with its default windowed KV cache the builder (onnxruntime-genai
    0.18) sizes the cache to the window while the attention still sees the whole sequence, so
    every request past about window + 16 tokens fails inside GroupQueryAttention (onnxruntime-genai
    issue 2603). `windowed_kv_cache=false` keeps a full-length cache but then also drops the
    window from the graph (local_window_size=-1), so answers past the window differ from
    transformers'. Restoring local_window_size on the full-length cache gives transformers' window
    (measured token for token on prompts and answers past it).
    """
    import onnx

    # The weights stay in model.onnx.data: only the graph is read and rewritten.
    model = onnx.load(str(model_file), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            for attribute in node.attribute:
                if attribute.name == "local_window_size":
                    attribute.i = window
    onnx.save(model, str(model_file))
