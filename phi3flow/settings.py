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

# serve: the OpenAI-compatible server (phi3flow/server.py)
SERVE_DEFAULT_MODEL_URI = "models:/phi3-onnx@champion"
SERVE_DEFAULT_HOST = "127.0.0.1"
SERVE_DEFAULT_PORT = 8000
SERVE_API_KEY_ENV = "PHI3FLOW_API_KEY"  # when set, every /v1 and /invocations request needs it as a Bearer key
SERVE_MAX_BODY_BYTES_ENV = "PHI3FLOW_MAX_BODY_BYTES"
SERVE_MAX_BODY_BYTES = 1 << 20  # a request body above this is refused (413) before it is parsed
# The request timeout (504) is MLflow's MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT (default 60 s), as for `mlflow models serve`.
SERVE_SHUTDOWN_GRACE_S = 30  # after SIGTERM, in-flight requests get this long before they are cancelled
SERVE_MAX_STOP = 4  # stop sequences per request, as OpenAI's API allows

# evaluate
BUNDLED_EVAL_DATA = "bundled"  # the eval_data value that means data/eval_bundled.jsonl
BUNDLED_EVAL_FILE = "data/eval_bundled.jsonl"  # relative to the project root
EVAL_MAX_TOKENS = 64  # short answers: the bundled set asks short questions
EVAL_PROMPT_COLUMN = "prompt"
EVAL_REFERENCE_COLUMN = "reference"
EVAL_SYSTEM_COLUMN = "system"  # optional
TAG_PIPELINE_RUN_ID = "phi3.pipeline_run_id"
TAG_ONNX_RUN_ID = "phi3.onnx_run_id"
TAG_PIPELINE_MODEL_ID = "phi3.pipeline_model_id"  # the logged model (m-...) evaluated
TAG_ONNX_MODEL_ID = "phi3.onnx_model_id"
TAG_EVAL_RUN_ID = "phi3.eval_run_id"  # on a registered model version: the evaluate run that scored it

# The champion: the registry alias that serving and scheduled reruns follow. The rule: the best
# QUALITY_METRIC wins, THROUGHPUT_METRIC breaks ties; the alias moves only if the winner's quality is
# at least the current champion's (re-measured on the same data) minus the tolerance.
CHAMPION_ALIAS = "champion"
QUALITY_METRIC = "rouge_l/mean"
THROUGHPUT_METRIC = "tokens_per_second/p50"
DEFAULT_TOLERANCE = 0.02  # absolute, on the quality metric (ROUGE-L F1 in [0, 1])
TAG_CHAMPION = "phi3.champion"  # "<registered name>/<version>" holding the alias after the run
TAG_CHAMPION_DECISION = "phi3.champion_decision"  # promoted | unchanged | rejected
TAG_CHAMPION_REASON = "phi3.champion_reason"

# main: the chain of steps and its cache
MAIN_STEPS = ("fetch_model", "log_pipeline", "log_onnx_wrapper", "evaluate")
TAG_STEP_RUN = "phi3.step_run.{}"  # on a main run: the run ID of each step, by entry point
TAG_CACHE_KEY = "phi3.cache_key"  # on a step run started by main: entry point + params + code
TAG_CODE_VERSION = "phi3.code_version"  # "git:<commit>", "sha256:<hash>" or "dirty:<commit>"
TAG_OWNER = "phi3.owner"  # on a main run: "<host>:<pid>", to tell a live run from one left by a hard kill
TAG_STALE = "phi3.stale"  # on a run found RUNNING after its process died: why it was marked KILLED
TAG_ENV_MANAGER = "phi3.env_manager"  # on a main run: the env manager its steps ran with
SUMMARY_FILE = "summary.json"
# What the steps' results depend on when the project is not a git checkout: hashed for the cache.
CODE_FILES = ("MLproject", "python_env.yaml", "conda.yaml", "pyproject.toml")
CODE_DIRS = ("steps", "phi3flow", "data")


def pinned(*distributions: str) -> list[str]:
    """`name==version` of installed distributions: the explicit pip requirements of a logged model."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in distributions]
