"""Every name and default the steps share, in one place."""

from __future__ import annotations

import os
from pathlib import Path

# fetch_model
DEFAULT_MODEL_ID = "microsoft/Phi-3-mini-4k-instruct"
DEFAULT_REVISION = "main"
BUILTIN_TINY = "builtin:tiny-phi3"
# The embedded family (phi3flow/tiny.py): one tiny model per configuration class of the real models.
BUILTINS = ("builtin:tiny-phi3", "builtin:tiny-phi3-medium", "builtin:tiny-phi3.5", "builtin:tiny-phi4-mini")
# The Hub's timeout per request is huggingface_hub's own HF_HUB_ETAG_TIMEOUT (10 s unless set, for a slow
# proxy say): a Hub that does not answer fails the step, it never hangs (phi3flow/fetch.py).

# Files the later steps need. Duplicate weight formats (.bin, .pt, .gguf) and remote code are left out.
# The real repos: Phi-3/3.5 ship config.json, generation_config.json, model-0000N-of-0000M.safetensors
# with model.safetensors.index.json, and tokenizer.json, tokenizer.model (sentencepiece),
# tokenizer_config.json, special_tokens_map.json, added_tokens.json; Phi-4-mini ships vocab.json and
# merges.txt (BPE) instead of tokenizer.model; the -onnx repos hold one variant per subfolder with
# genai_config.json, <name>.onnx, <name>.onnx.data and the tokenizer files.
HUB_ALLOW_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer.model",
    "merges.txt",
    "*.jinja",
    "LICENSE",
    # An onnxruntime-genai folder (e.g. microsoft/Phi-3-mini-4k-instruct-onnx/<variant>)
    "*.onnx",
    "*.onnx.data",
]
# What fetch_model checks before it logs anything: one of these tokenizer files must exist
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
SAFETENSORS_INDEX = "model.safetensors.index.json"  # tensor -> file of sharded weights
PHI3_ARCHITECTURES = {"Phi3ForCausalLM"}
PHI3_GENAI_TYPES = {"phi3"}

# Artifact layout of a fetch run
MODEL_ARTIFACT_DIR = "model"
MANIFEST_FILE = "manifest.json"

# The local cache of fetched model files (phi3flow/artifacts.py): the steps of one machine that read
# the same fetch run, or two fetch runs with the same manifest, download its files once. Default:
# $XDG_CACHE_HOME/phi3flow, else ~/.cache/phi3flow. It keeps the builtin models too (phi3flow/fetch.py,
# builtin_folder). Removing it while no step runs is always safe.
CACHE_DIR_ENV = "PHI3FLOW_CACHE_DIR"

# Logged model names
PIPELINE_MODEL_NAME = "phi3-pipeline"
ONNX_MODEL_NAME = "phi3-onnx"

# Run tags: lineage between steps
TAG_MODEL_ID = "phi3.model_id"
TAG_REVISION = "phi3.resolved_revision"
TAG_TOTAL_BYTES = "phi3.total_bytes"
TAG_ARCHITECTURE = "phi3.architecture"
TAG_FETCH_RUN_ID = "phi3.fetch_run_id"
TAG_DTYPE = "phi3.dtype"  # on a log_pipeline run: the dtype the pipeline was logged in (what "auto" resolved to)
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
# How long an idle batcher keeps gathering after each new request before it starts (milliseconds):
# concurrent clients arrive a few milliseconds apart and belong in one batch.
SERVE_BATCH_BURST_MS = 10

# Threads of the ONNX model's onnxruntime session (log_onnx_wrapper's `threads`). "auto": the CPUs
# the loading process may run on (affinity and cgroup quota). Fewer suit a shared machine or
# several replicas per host. At load time, model_config {"threads": ...} and then the environment
# variable override the logged value.
ONNX_THREADS_AUTO = "auto"
ONNX_THREADS_ENV = "PHI3_ONNX_THREADS"
TAG_ONNX_THREADS = "phi3.onnx_threads"  # the logged value: "auto" or a number

# serve: the OpenAI-compatible server (phi3flow/server.py)
SERVE_DEFAULT_MODEL_URI = "models:/phi3-onnx@champion"
SERVE_DEFAULT_HOST = "127.0.0.1"
SERVE_DEFAULT_PORT = 8000
SERVE_API_KEY_ENV = "PHI3FLOW_API_KEY"  # when set, every /v1 and /invocations request needs it as a Bearer key
SERVE_MAX_BODY_BYTES_ENV = "PHI3FLOW_MAX_BODY_BYTES"
SERVE_MAX_BODY_BYTES = 1 << 20  # a request body above this is refused (413) before it is parsed
# The request timeout (504) is MLflow's MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT (default 60 s), as for
# `mlflow models serve`.
SERVE_SHUTDOWN_GRACE_S = 30  # after SIGTERM, in-flight requests get this long before they are cancelled
SERVE_MAX_STOP = 4  # stop sequences per request, as OpenAI's API allows

# evaluate
BUNDLED_EVAL_DATA = "bundled"  # the eval_data value that means data/eval_bundled.jsonl
BUNDLED_EVAL_FILE = "data/eval_bundled.jsonl"  # relative to the project root
EVAL_MAX_TOKENS = 64  # short answers: the bundled set asks short questions
EVAL_PROMPT_COLUMN = "prompt"
EVAL_REFERENCE_COLUMN = "reference"
EVAL_SYSTEM_COLUMN = "system"  # optional
# pipeline_run_id of evaluate for a source that has no pipeline model (a prebuilt ONNX folder):
# the ONNX model is evaluated alone. Distinct from an empty value.
NO_PIPELINE_RUN = "none"
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
TAG_OWNER = "phi3.owner"  # on a main or step run: "<host>:<pid>", to tell a live run from one left by a hard kill
TAG_STALE = "phi3.stale"  # on a run found RUNNING after its process died: why it was marked KILLED
TAG_ENV_MANAGER = "phi3.env_manager"  # on a main run: the env manager its steps ran with
SUMMARY_FILE = "summary.json"
# What the steps' results depend on when the project is not a git checkout: hashed for the cache.
CODE_FILES = ("MLproject", "python_env.yaml", "conda.yaml", "pyproject.toml")
CODE_DIRS = ("steps", "phi3flow", "data")

# Reliability: one main at a time per tracking server and experiment, steps that do not outlive
# their caller, bounded tracking-server retries, and temporary folders a later run can clean up.
TMP_ROOT_ENV = "PHI3FLOW_TMP_ROOT"  # default: $TMPDIR/phi3flow; each process works in <root>/<host>-<pid>
RUN_LOCK_ENV = "PHI3FLOW_RUN_LOCK"  # set by main for its steps: the lock file they share with it
RUN_LOCK_PID_ENV = "PHI3FLOW_RUN_LOCK_PID"  # set by main for its steps: main's process id
# MLflow's own defaults (7 retries, exponential backoff from 2 s, 120 s timeout) keep a step
# retrying for minutes when the server is down. Values the user sets in the environment win.
TRACKING_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
}

# Output: third-party progress bars only on a terminal. Where a step's stderr is not one (a log
# file, a pipe, CI) these switches turn them off (phi3flow/output.py); values set in the
# environment win. The bars without a switch (MLflow's "Evaluating", the onnxruntime-genai
# builder's) are reduced to their last state there.
PROGRESS_BARS_OFF = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub's, and transformers' (Loading weights, Writing model shards)
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # MLflow's "Downloading artifacts"
}


# What the MLflow UI shows: run names, the default experiment, descriptions, the promotion's compare-and-set
# where `mlflow run .` lands unless MLFLOW_EXPERIMENT_NAME/_ID or --experiment-name say otherwise
DEFAULT_EXPERIMENT_NAME = "phi3flow"
# on a trace and an evaluation child run: which model answered ("onnx", "pipeline", "champion")
TAG_MODEL_LABEL = "phi3.model"
# on a trace and an evaluation child run: the evaluated "<name>/<version>" or models:/ URI
TAG_MODEL_VERSION = "phi3.model_version"
# on an evaluate run and the versions it scored: the champion it measured against
TAG_COMPARED_CHAMPION = "phi3.compared_champion"
PROMOTION_ATTEMPTS = 3  # how often evaluate re-measures a champion that moved meanwhile before it gives up
# Before deciding again, a random wait of up to this many seconds: two evaluations whose alias moves crossed
# (each took the other's alias off) would otherwise retry in lockstep and cross again every time.
PROMOTION_RETRY_MAX_WAIT_S = 3.0
# The final check of a promotion comes this long after the alias moved. Another evaluation that found no
# move in its own first check moves the alias within a few requests of it; on a loaded machine those few
# requests took longer than the promotion's own move and checks, and both promotions then passed. Waiting
# makes that need a stall of more than this between two requests of one evaluation.
PROMOTION_SETTLE_S = 2.0
EVAL_MAX_ROWS = 1000  # evaluate refuses larger sets unless max_rows is raised: each row is one request per model
EVAL_PROGRESS_EVERY_S = 10.0  # how often evaluate prints its progress and the time it expects to need
COMPARISON_DIGITS = 4  # significant digits of the numbers in descriptions and the comparison tables
# batch_score: Spark batch scoring
BATCH_MODEL_URI = "models:/phi3-onnx@champion"
BATCH_SPARK_MASTER = "local[*]"
BATCH_MAX_TOKENS = DEFAULT_MAX_TOKENS  # for rows that do not set max_tokens
# Rows per Spark partition (one task each): small enough that a lost task costs little and that
# progress moves, large enough that per-task overhead (about 0.1 s) stays small next to generating
# (tens of ms to seconds per row). The job uses at least one partition per core.
BATCH_ROWS_PER_PARTITION = 64
BATCH_PROGRESS_EVERY_S = 5.0
BATCH_OUTPUT_DIR = "predictions"  # artifact folder of the Parquet dataset


def cache_dir() -> Path:
    """Where the local cache of fetched model files lives (CACHE_DIR_ENV, read when called)."""
    if configured := os.environ.get(CACHE_DIR_ENV):
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "phi3flow"


def pinned(*distributions: str) -> list[str]:
    """`name==version` of installed distributions: the explicit pip requirements of a logged model."""
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in distributions]
