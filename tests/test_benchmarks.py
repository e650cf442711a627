"""The benchmarks in their smallest settings, so that they never rot.

The generation benchmark in smoke mode (tiny model, 16 tokens) runs end to end: the project's
steps, the raw onnxruntime-genai loop, both pyfunc models, `mlflow models serve`, the bandwidth
probe. Its numbers are checked for sanity only (present, positive, consistent with each other),
never against speed targets.

The steps' memory goal is a gate of its own, `python -m benchmarks.step_memory --num-layers 3
--baseline-layers 1 --dtype bfloat16 --check` (4 minutes of full-width checkpoints; see
benchmarks/README.md), not a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from conftest import REPO

# minutes of main chains, servers or benchmarks: started first (tests/conftest.py)
pytestmark = pytest.mark.long


def run_benchmark(name: str, args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`python -m benchmarks.<name> args` from outside the repository, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


PATHS = ["raw int4", "raw fp32", "pyfunc int4 (stream)", "served int4", "pipeline fp32"]
STEPS = ["fetch_model", "log_pipeline", "log_onnx_wrapper int4", "log_onnx_wrapper fp32"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, tracking_uri):
    workdir = tmp_path_factory.mktemp("bench")
    results = workdir / "results"
    proc = run_benchmark("generation", ["--smoke", "--workdir", str(workdir), "--results-dir", str(results),
                                        "--tracking-uri", tracking_uri], workdir, timeout=900)
    return results, proc.stdout


def test_smoke_writes_json_markdown_and_png(smoke):
    results, stdout = smoke
    report = json.loads((results / "benchmark.json").read_text())
    assert report["smoke"] is True
    assert report["machine"]["nproc"] >= 1 and report["machine"]["cpu"]
    assert len(report["loadavg"]["start"]) == 3
    assert [r["name"] for r in report["rows"]] == PATHS
    for r in report["rows"]:
        # every path saw the same prompt and generated every requested token
        assert r["prompt_tokens"] == report["prompt_tokens"] == 32, r
        assert r["tokens"] == report["new_tokens"] == 16, r
        assert r["load_s"] > 0 and r["ttft_s"] > 0, r
        assert 50e6 < r["peak_rss_bytes"] < 8e9, r
    # per-token timestamps always give a decode rate (request differences may be noise on a tiny model)
    for r in report["rows"]:
        if r["method"] == "per-token timestamps":
            assert r["decode_tok_s"] > 0, r
            assert all(run["tokens"] == 16 and run["total_s"] >= run["ttft_s"] for run in r["runs"])
    assert 0.1 < report["bandwidth"]["read_gb_s"] < 1000
    # the int4 model reads fewer bytes per token than the fp32 one
    bpt = report["bytes_per_token"]
    assert 0 < bpt["int4"]["weights"] < bpt["fp32"]["weights"]
    assert report["bound_tok_s"]["int4"] > report["bound_tok_s"]["fp32"] > 0
    assert set(report["steps"]) == set(STEPS)
    for s in report["steps"].values():
        assert s["peak_rss_bytes"] > 50e6 and s["wall_s"] > 0
    goals = {g["goal"]: g for g in report["goals"]}
    assert {"pyfunc_vs_raw", "served_vs_raw", "int4_vs_transformers", "raw_vs_bound",
            "log_pipeline_rss_vs_weights"} <= set(goals)
    assert goals["raw_vs_bound"]["measured"] > 0

    table = (results / "benchmark.md").read_text()
    assert "| path | load (s) |" in table and "| goal | measured | target | met |" in table
    for name in PATHS + STEPS:
        assert f"| {name} |" in table
    assert table in stdout  # the script prints the table it wrote
    png = (results / "benchmark.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_smoke_is_logged_to_mlflow(smoke, tracking_uri):
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("phi3flow-benchmarks")
    [run] = client.search_runs([experiment.experiment_id], "tags.mlflow.runName = 'generation-benchmark'")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["smoke"] == "True" and run.data.params["new_tokens"] == "16"
    assert run.data.metrics["raw_int4.decode_tok_s"] > 0
    assert run.data.metrics["read_gb_s"] > 0
    names = {f.path for f in client.list_artifacts(run_id)}
    assert names == {"benchmark.json", "benchmark.md", "benchmark.png"}
