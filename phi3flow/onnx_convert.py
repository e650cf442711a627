"""Convert a Phi-3 checkpoint folder to an onnxruntime-genai folder with the model builder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from phi3flow.errors import UserError

PRECISIONS = ("int4", "fp32")
EXECUTION_PROVIDERS = ("cpu",)
# Microsoft's published cpu-int4-rtn-block-32-acc-level-4 variant. The builder silently ignores
# the older `int4_`-prefixed spellings of these options.
INT4_OPTIONS = {"block_size": "32", "accuracy_level": "4", "algo_config": "rtn"}


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
    cache = out.parent / f"{out.name}.builder-cache"
    options = parse_extra_options(None, str(src), str(out), precision, execution_provider, str(cache), extra)
    create_model(None, str(src), str(out), precision, execution_provider, str(cache), **options)
    shutil.rmtree(cache, ignore_errors=True)
    return out
