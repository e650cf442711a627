"""How many threads the ONNX model's onnxruntime session runs on, written into genai_config.json.

onnxruntime-genai 0.18 runs a model whose genai_config.json names no thread count on one core.
`log_onnx_wrapper -P threads=N` writes N into the decoder's `session_options`
(`intra_op_num_threads`, read by onnxruntime-genai's config parser); `threads=auto` writes 0,
onnxruntime's own default (one thread per core it may use), and leaves the choice to the loading
process: the pyfunc (onnx_pyfunc.py) then counts the CPUs it may run on (affinity and cgroup quota).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phi3flow import settings
from phi3flow.errors import UserError


def parse_threads(value: str) -> int:
    """`auto` (0) or a positive whole number of threads; anything else is a user mistake."""
    value = str(value).strip()
    if value == settings.ONNX_THREADS_AUTO:
        return 0
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"threads must be '{settings.ONNX_THREADS_AUTO}' or a positive whole number, not '{value}'")
    return int(value)


def write_session_options(onnx_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Merge options into the decoder's session_options of onnx_dir/genai_config.json; return them all."""
    path = onnx_dir / "genai_config.json"
    genai = json.loads(path.read_text())
    session_options = genai["model"]["decoder"].setdefault("session_options", {})
    session_options.update(options)
    path.write_text(json.dumps(genai, indent=4) + "\n")
    return session_options
