"""Build and log the `phi3-onnx` pyfunc model (the model itself is onnx_pyfunc.py, logged as code)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
from mlflow.models import ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME, MODEL_CODE_PATH, Model, ModelInfo
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA

from phi3flow import settings
from phi3flow.errors import UserError
from phi3flow.fetch import first_line
from phi3flow.onnx_convert import DEFAULT_INT4_BLOCK_SIZE, convert_in_child
from phi3flow.threads import parse_threads, write_session_options

INTERFACES = ("chat", "prompt")
PYFUNC_FILE = Path(__file__).with_name("onnx_pyfunc.py")
# The one module PYFUNC_FILE imports from here, logged with it as the model's code_paths: MLflow puts
# the model's copy first on sys.path before it runs PYFUNC_FILE, so no phi3flow is needed where it loads.
ENGINE_FILE = Path(__file__).with_name("onnx_engine.py")


def onnx_folder(model_dir: Path, workdir: Path, precision: str, execution_provider: str,
                int4_block_size: int = DEFAULT_INT4_BLOCK_SIZE) -> tuple[Path, bool]:
    """The onnxruntime-genai folder for model_dir, in workdir: a working copy if it already is one, else a conversion.

    model_dir is read, never written: it is a cache entry other steps share, and logging writes the
    session options into the folder's genai_config.json.
    """
    from phi3flow.artifacts import working_copy

    if (model_dir / "genai_config.json").is_file():
        found = folder_precision(model_dir)
        if found != precision:
            raise UserError(f"precision={precision}, but the fetched onnxruntime-genai folder holds {found} "
                            f"weights (it is logged as it is, not converted): run with precision={found}")
        ignored = "" if int4_block_size == DEFAULT_INT4_BLOCK_SIZE else "; int4_block_size applies to conversions only"
        print(f"the fetched model is already an onnxruntime-genai folder ({found}): logging it without conversion"
              f"{ignored}", flush=True)
        return working_copy(model_dir, workdir / "onnx"), False
    layout = f", block size {int4_block_size}" if precision == "int4" else ""
    print(f"converting to ONNX ({precision}{layout}, {execution_provider}) with the onnxruntime-genai model builder"
          " ...", flush=True)
    return convert_in_child(model_dir, workdir / "onnx", precision, execution_provider, int4_block_size), True


def folder_precision(folder: Path) -> str:
    """The precision of an onnxruntime-genai folder's weights, read from its graph (not its name).

    genai_config.json does not record it. The builder writes int4 weights as MatMulNBits nodes and
    otherwise keeps float initializers of the chosen type; only the graph is read, not the weights.
    """
    import onnx

    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    graph = onnx.load(str(folder / decoder), load_external_data=False).graph
    if any(node.op_type == "MatMulNBits" for node in graph.node):
        return "int4"
    types = {init.data_type for init in graph.initializer}
    for onnx_type, name in ((onnx.TensorProto.FLOAT16, "fp16"), (onnx.TensorProto.BFLOAT16, "bf16")):
        if onnx_type in types:
            return name
    return "fp32"


def try_generation(onnx_dir: Path, interface: str, tokens: int = 2) -> str:
    """Greedy-generate a few tokens through the pyfunc model itself; a UserError if it cannot run.

    A folder can convert and still fail in the runtime (e.g. a rotary table the attention kernel
    refuses): this catches it before anything is logged or registered.
    """
    from mlflow.pyfunc import PythonModelContext

    from phi3flow import onnx_pyfunc

    model = onnx_pyfunc.Phi3OnnxModel()
    _, example = signature_and_example(interface)
    try:
        model.load_context(PythonModelContext(artifacts={"onnx": str(onnx_dir)}, model_config={"interface": interface}))
        if interface == "chat":
            answer = model.predict(None, {**example, "max_tokens": tokens})[0]["choices"][0]["message"]["content"]
        else:
            answer = model.predict(None, example, params={"max_tokens": tokens})[0]
    except Exception as exc:  # onnxruntime-genai raises RuntimeError with the kernel's message
        raise UserError(
            f"the ONNX model does not run in onnxruntime-genai, nothing was logged: {first_line(exc)}") from None
    print(f"the ONNX model generates: {tokens} greedy tokens through the pyfunc -> {answer!r}", flush=True)
    return answer


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
    signature = ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                               params=params)
    return signature, {"prompt": settings.SEED_PROMPT}


def check_interface(interface: str) -> None:
    if interface not in INTERFACES:
        raise UserError(f"interface must be one of {', '.join(INTERFACES)}, not '{interface}'")


class PortablePyfunc:
    """mlflow.pyfunc as a Model.log flavor, minus the logging machine's paths in MLmodel.

    MLflow records each artifact's source `uri` (here this machine's temporary folder) and the model
    code's absolute path; neither means anything on another machine. Only the code file's name is read
    back (the pyfunc loader joins its basename to the model folder), and the artifact's own copy is
    `path`, so both keep just the name.
    """

    @staticmethod
    def save_model(path: str, mlflow_model: Model, **kwargs: Any) -> None:
        mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **kwargs)
        flavor = mlflow_model.flavors[mlflow.pyfunc.FLAVOR_NAME]
        flavor[MODEL_CODE_PATH] = Path(flavor[MODEL_CODE_PATH]).name
        for artifact in flavor.get("artifacts", {}).values():
            artifact["uri"] = Path(artifact["uri"]).name
        mlflow_model.save(str(Path(path) / MLMODEL_FILE_NAME))


def log_onnx_model(onnx_dir: Path, interface: str, model_name: str, registered_model_name: str | None = None,
                   threads: str = settings.ONNX_THREADS_AUTO) -> ModelInfo:
    check_interface(interface)
    # Written into the folder too, so it uses the cores it is given without the pyfunc as well.
    thread_count = parse_threads(threads)
    write_session_options(onnx_dir, {"intra_op_num_threads": thread_count})
    signature, example = signature_and_example(interface)
    # Model.log with a flavor is what mlflow.pyfunc.log_model calls; this one leaves out machine paths.
    return Model.log(
        artifact_path=None,  # `name` names the logged model in MLflow 3
        flavor=PortablePyfunc,
        flavor_name="pyfunc.ModelFromCode",  # what mlflow.pyfunc.log_model records for a model from code
        name=settings.ONNX_MODEL_NAME,
        python_model=str(PYFUNC_FILE),
        code_paths=[str(ENGINE_FILE)],
        artifacts={"onnx": str(onnx_dir)},
        model_config={
            "interface": interface,
            "model_name": model_name,
            "max_tokens": settings.DEFAULT_MAX_TOKENS,
            "max_batch_size": settings.SERVE_MAX_BATCH_SIZE,
            "max_batch_tokens": settings.SERVE_MAX_BATCH_TOKENS,
            "batch_gather_ms": settings.SERVE_BATCH_GATHER_MS,
            "batch_burst_ms": settings.SERVE_BATCH_BURST_MS,
            "threads": str(thread_count or settings.ONNX_THREADS_AUTO),  # resolved again at load time
            "threads_env": settings.ONNX_THREADS_ENV,
        },
        signature=signature,
        input_example=example,
        pip_requirements=settings.pinned("mlflow", "onnxruntime-genai", "onnxruntime", "numpy", "pandas", "tokenizers"),
        registered_model_name=registered_model_name,
    )
