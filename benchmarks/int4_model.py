"""The int4 ONNX model the serving and batch benchmarks measure, logged as log_onnx_wrapper logs it."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import phi3_mini_shaped

MODELS = ("phi3-mini-shaped", "tiny")


def build_onnx(model: str, workdir: Path, num_layers: int) -> Path:
    """The int4 onnxruntime-genai folder of the chosen model ("phi3-mini-shaped" with num_layers
    float32 layers, or the embedded "tiny" one), converted once per workdir with the project's converter."""
    out = workdir / f"{model}-{num_layers}L-int4" if model == "phi3-mini-shaped" else workdir / "tiny-int4"
    src = workdir / out.name.replace("-int4", "-src")
    if model == "tiny":
        rebuilt = not (out / "genai_config.json").is_file()
        if rebuilt:
            from phi3flow import tiny

            tiny.build(src)
    else:  # a checkpoint built with another config is built again, and converted again
        rebuilt = phi3_mini_shaped.ensure_built(src, num_layers, "float32", log=workdir / "build.log") is not None
    if rebuilt or not (out / "genai_config.json").is_file():
        from phi3flow.onnx_convert import convert

        shutil.rmtree(out, ignore_errors=True)
        print(f"converting to int4 in {out} ...", flush=True)
        convert(src, out, precision="int4")
    return out


def log_model(onnx_dir: Path, workdir: Path, experiment: str) -> tuple[str, str]:
    """Log the pyfunc as the log_onnx_wrapper step does, in sqlite:///<workdir>/mlflow.db;
    returns (tracking URI, model URI)."""
    import mlflow

    from phi3flow import onnx_model

    tracking_uri = f"sqlite:///{workdir}/mlflow.db"
    mlflow.set_tracking_uri(tracking_uri)
    existing = mlflow.get_experiment_by_name(experiment)
    experiment_id = existing.experiment_id if existing else mlflow.create_experiment(
        experiment, artifact_location=(workdir / "artifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment_id):
        info = onnx_model.log_onnx_model(onnx_dir, "chat", onnx_dir.name)
    return tracking_uri, info.model_uri
