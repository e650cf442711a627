"""Build and log the `phi3-pipeline` model: MLflow's transformers flavor with task llm/v1/chat."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
from mlflow.models import Model
from mlflow.models.model import ModelInfo

from phi3flow import output, settings
from phi3flow.errors import UserError

# "auto": the checkpoint's own dtype (config.json), transformers 5's default. Upcasting Phi-3-mini's bf16
# weights to float32 doubles the step's memory and the logged model (15 GB instead of 7.6 GB).
DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {', '.join(DTYPES)}, not '{dtype}'")


def log_pipeline_model(
    model_dir: Path,
    model_id: str,
    *,
    max_new_tokens: int = settings.DEFAULT_MAX_TOKENS,
    do_sample: bool = False,
    dtype: str = "auto",
    registered_model_name: str | None = None,
) -> ModelInfo:
    check_dtype(dtype)
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if (model_dir / "genai_config.json").is_file():
        raise UserError("the fetched model is an onnxruntime-genai folder; "
                        "log_pipeline needs a transformers checkpoint")
    # The files are local: without this transformers and MLflow ask the Hub for the model card and
    # retry for about 30 s when it is unreachable.
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers

    print(f"loading {model_id} as a text-generation pipeline ({dtype}) ...", flush=True)
    pipe = transformers.pipeline("text-generation", model=str(model_dir),
                                 dtype=dtype if dtype == "auto" else getattr(torch, dtype))
    loaded = str(pipe.model.dtype).removeprefix("torch.")
    mlflow.set_tag(settings.TAG_DTYPE, loaded)  # what "auto" resolved to: the evaluation names the model by it
    if dtype == "auto":
        print(f"dtype auto: the checkpoint's {loaded}", flush=True)
    # MLflow records name_or_path as the source model name (the `model` field of every answer);
    # the temporary download folder means nothing to a user, the model id does.
    pipe.model.name_or_path = model_id
    print("logging the pipeline with MLflow's transformers flavor ...", flush=True)
    # MLflow looks up the model card on the Hub by the model's name: offline (above), or for a
    # name that is no Hub id (builtin:..., a folder), it warns that it could not. Harmless: the
    # card is documentation, the logged model is complete without it.
    output.drop_log_message("mlflow.transformers", "The model card could not be retrieved from the hub")
    # Model.log with the transformers flavor is what mlflow.transformers.log_model calls, with one
    # difference: validate_serving_input=False. The validation reloads a second copy of the model
    # from the saved files while this one is still in memory and generates with it (peak RSS 2.1x
    # the weight bytes on a Phi-3-mini-shaped model, most of the step's time). The input example is
    # still saved with the model; the tests load and query the logged model instead.
    return Model.log(
        artifact_path=None,  # `name` names the logged model in MLflow 3
        flavor=mlflow.transformers,
        name=settings.PIPELINE_MODEL_NAME,
        transformers_model=pipe,
        task="llm/v1/chat",
        # Generation defaults; a request's max_tokens overrides max_new_tokens.
        model_config={"max_new_tokens": max_new_tokens, "do_sample": do_sample},
        input_example={"messages": [{"role": "user", "content": settings.SEED_QUESTION}]},
        validate_serving_input=False,
        # Explicit: inference would add torchvision (absent here) and load the model in a subprocess.
        pip_requirements=settings.pinned("mlflow", "transformers", "tokenizers", "safetensors", "torch", "numpy",
                                         "pandas"),
        registered_model_name=registered_model_name,
    )
