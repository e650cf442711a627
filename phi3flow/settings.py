"""Every name and default the steps share, in one place."""

from __future__ import annotations

# fetch_model
DEFAULT_MODEL_ID = "microsoft/Phi-3-mini-4k-instruct"
DEFAULT_REVISION = "main"
BUILTIN_TINY = "builtin:tiny-phi3"
HUB_TIMEOUT_S = 10.0  # per request; a Hub that does not answer fails the step, it never hangs

# Files the later steps need. Duplicate weight formats (.bin, .pt, .gguf) and remote code are left out.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "*.jinja",
    "LICENSE",
    # An onnxruntime-genai folder (e.g. microsoft/Phi-3-mini-4k-instruct-onnx/<variant>)
    "*.onnx",
    "*.onnx.data",
]
PHI3_ARCHITECTURES = {"Phi3ForCausalLM"}
PHI3_GENAI_TYPES = {"phi3"}

# Artifact layout of a fetch run
MODEL_ARTIFACT_DIR = "model"
MANIFEST_FILE = "manifest.json"

# Logged model names
PIPELINE_MODEL_NAME = "phi3-pipeline"
ONNX_MODEL_NAME = "phi3-onnx"

# Run tags: lineage between steps
TAG_MODEL_ID = "phi3.model_id"
TAG_REVISION = "phi3.resolved_revision"
TAG_TOTAL_BYTES = "phi3.total_bytes"
TAG_ARCHITECTURE = "phi3.architecture"
TAG_FETCH_RUN_ID = "phi3.fetch_run_id"
TAG_ONNX_SOURCE = "phi3.onnx_source"  # "converted" by the model builder, or "as-fetched"
# Entry-point parameters are recorded as run params by MLflow Projects (`mlflow run`); steps log
# only what they derive, as tags.

# The seed's request, used as input example and in tests
SEED_QUESTION = "What is the capital of Spain?"

# The prompt the seed sends to its custom wrapper (interface=prompt)
SEED_PROMPT = "<|system|>You are a stand-up comedian.<|end|><|user|>Tell me a joke about atom<|end|><|assistant|>"

# Generation defaults logged with both models (entry-point parameters override them)
DEFAULT_MAX_TOKENS = 256

# Serving the ONNX model: concurrent requests share onnxruntime-genai batches of at most this many
# rows and this many tokens (rows x padded length: the batch's KV cache). The scoring server runs
# at most min(32, CPUs + 4) predict calls at once (asyncio's default thread pool).
SERVE_MAX_BATCH_SIZE = 8
SERVE_MAX_BATCH_TOKENS = 8192
# How long a new batch waits for the clients of the previous one to come back (milliseconds)
SERVE_BATCH_GATHER_MS = 50


def pinned(*distributions: str) -> list[str]:
    """`name==version` of installed distributions: the explicit pip requirements of a logged model."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in distributions]
