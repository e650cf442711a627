"""Build and log the `phi3-onnx` pyfunc model (the model itself is onnx_pyfunc.py, logged as code)."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA

from phi3flow import settings
from phi3flow.errors import UserError
from phi3flow.onnx_convert import convert

INTERFACES = ("chat", "prompt")
PYFUNC_FILE = Path(__file__).with_name("onnx_pyfunc.py")


def onnx_folder(model_dir: Path, workdir: Path, precision: str, execution_provider: str) -> tuple[Path, bool]:
    """The onnxruntime-genai folder for model_dir: itself if it already is one, else a conversion."""
    if (model_dir / "genai_config.json").is_file():
        print("the fetched model is already an onnxruntime-genai folder: logging it without conversion", flush=True)
        return model_dir, False
    print(f"converting to ONNX ({precision}, {execution_provider}) with the onnxruntime-genai model builder ...", flush=True)
    return convert(model_dir, workdir / "onnx", precision, execution_provider), True


def signature_and_example(interface: str) -> tuple[ModelSignature, dict]:
    if interface == "chat":
        example = {"messages": [{"role": "user", "content": settings.SEED_QUESTION}], "max_tokens": 16}
        return ModelSignature(inputs=CHAT_MODEL_INPUT_SCHEMA, outputs=CHAT_MODEL_OUTPUT_SCHEMA), example
    params = ParamSchema([
        ParamSpec("max_tokens", "long", settings.DEFAULT_MAX_TOKENS),
        ParamSpec("temperature", "double", 0.0),
        ParamSpec("top_p", "double", 1.0),
        ParamSpec("top_k", "long", 0),
    ])
    signature = ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]), params=params)
    return signature, {"prompt": settings.SEED_PROMPT}


def check_interface(interface: str) -> None:
    if interface not in INTERFACES:
        raise UserError(f"interface must be one of {', '.join(INTERFACES)}, not '{interface}'")


def log_onnx_model(onnx_dir: Path, interface: str, model_name: str, registered_model_name: str | None = None) -> ModelInfo:
    check_interface(interface)
    signature, example = signature_and_example(interface)
    return mlflow.pyfunc.log_model(
        name=settings.ONNX_MODEL_NAME,
        python_model=str(PYFUNC_FILE),
        artifacts={"onnx": str(onnx_dir)},
        model_config={
            "interface": interface,
            "model_name": model_name,
            "max_tokens": settings.DEFAULT_MAX_TOKENS,
            "max_batch_size": settings.SERVE_MAX_BATCH_SIZE,
            "max_batch_tokens": settings.SERVE_MAX_BATCH_TOKENS,
            "batch_gather_ms": settings.SERVE_BATCH_GATHER_MS,
        },
        signature=signature,
        input_example=example,
        pip_requirements=settings.pinned("mlflow", "onnxruntime-genai", "onnxruntime", "numpy", "pandas", "tokenizers"),
        registered_model_name=registered_model_name,
    )
