"""Benchmarks of phi3flow's models and steps, each run as `python -m benchmarks.<name>` from the
repository root (see benchmarks/README.md).

Shared helpers, one place each:
- rss: peak RSS of a process and of its process tree (psutil), sampled while it runs;
- server: a model server (`mlflow models serve`, the project's `serve`) started, waited for, stopped;
- phi3_mini_shaped: the Phi-3-mini-shaped checkpoint (full widths, few layers, random weights);
- int4_model: that checkpoint (or the tiny model) as the int4 ONNX pyfunc log_onnx_wrapper logs;
- project_steps: the project's steps run one process each, their runs read back from MLflow Tracking.
"""
