"""Threads of the ONNX model: the count logged, overridden at load time, and the cores a decode uses."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from click.testing import CliRunner
from mlflow.exceptions import MlflowException

from phi3flow import onnx_model, settings
from phi3flow.errors import UserError
from steps import log_onnx_wrapper

# A long prompt, so that prefill and decode do enough work per step for onnxruntime to split it.
LONG_REQUEST = {
    "messages": [{"role": "user", "content": "The quick brown fox jumps over the lazy dog. " * 80}],
    "max_tokens": 48,
}


@pytest.fixture(scope="module")
def logged_with_two_threads(tiny_onnx_fp32: Path, tracking_uri: str, tmp_path_factory) -> str:
    """The tiny fp32 model logged with threads=2 (a copy: logging writes into the folder)."""
    folder = tmp_path_factory.mktemp("threads") / "onnx"
    shutil.copytree(tiny_onnx_fp32, folder)
    with mlflow.start_run():
        return onnx_model.log_onnx_model(folder, "chat", "builtin:tiny-phi3", threads="2").model_uri


def _cpu_ticks_per_thread() -> dict[str, int]:
    """User + system CPU time of each thread of this process, in clock ticks (Linux /proc)."""
    ticks = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        ticks[tid] = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


def _busy_threads(model) -> list[int]:
    """CPU ticks of the busiest threads of this process during 4 batched long generations."""
    model.predict([LONG_REQUEST] * 4)  # warm-up: first-run allocations
    before, start = _cpu_ticks_per_thread(), os.times()
    model.predict([LONG_REQUEST] * 4)
    after, end = _cpu_ticks_per_thread(), os.times()
    cpu = end.user - start.user + end.system - start.system
    # Printed, not asserted: on a shared machine the process may get less than a core per thread.
    print(f"{cpu / (end.elapsed - start.elapsed):.2f} CPU-seconds per second")
    return sorted((after[tid] - before.get(tid, 0) for tid in after), reverse=True)


def test_logged_model_carries_its_thread_count_and_decodes_on_that_many_cores(logged_with_two_threads, tmp_path):
    local = Path(mlflow.artifacts.download_artifacts(logged_with_two_threads, dst_path=str(tmp_path)))
    genai = json.loads(next(local.rglob("genai_config.json")).read_text())
    assert genai["model"]["decoder"]["session_options"]["intra_op_num_threads"] == 2
    assert yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]["config"]["threads"] == "2"

    busiest, second, *_ = _busy_threads(mlflow.pyfunc.load_model(logged_with_two_threads))
    assert second >= 0.3 * busiest, (busiest, second)  # two threads shared the work


def test_load_time_model_config_and_environment_override_the_logged_count(logged_with_two_threads, monkeypatch):
    one = mlflow.pyfunc.load_model(logged_with_two_threads, model_config={"threads": 1})
    assert one.unwrap_python_model().threads == 1
    busiest, second, *_ = _busy_threads(one)
    assert second <= 0.1 * busiest, (busiest, second)  # one thread did the work

    monkeypatch.setenv(settings.ONNX_THREADS_ENV, "3")  # the environment beats model_config
    loaded = mlflow.pyfunc.load_model(logged_with_two_threads, model_config={"threads": 1})
    assert loaded.unwrap_python_model().threads == 3

    monkeypatch.setenv(settings.ONNX_THREADS_ENV, "two")
    with pytest.raises(MlflowException, match="threads must be 'auto' or a positive whole number, not "
                                              f"'two'.*{settings.ONNX_THREADS_ENV}"):
        mlflow.pyfunc.load_model(logged_with_two_threads)


def test_auto_uses_the_cpus_the_process_may_run_on(logged_with_two_threads):
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})  # as `taskset -c 0` or a container's cpuset would
    try:
        model = mlflow.pyfunc.load_model(logged_with_two_threads, model_config={"threads": "auto"})
    finally:
        os.sched_setaffinity(0, allowed)
    assert model.unwrap_python_model().threads == 1


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5"])
def test_bad_thread_count_is_refused_before_any_work(value, tracking_uri):
    result = CliRunner().invoke(log_onnx_wrapper.main, ["--fetch-run-id", "no-such-run", "--threads", value])
    assert isinstance(result.exception, UserError)  # not the missing fetch run: checked first
    assert str(result.exception) == f"threads must be 'auto' or a positive whole number, not '{value}'"


def test_thread_setting_is_recorded_on_the_run(tracking_uri):
    result = CliRunner().invoke(log_onnx_wrapper.main, ["--fetch-run-id", "no-such-run", "--threads", "2"])
    assert result.exception is not None  # the missing fetch run, after the setting was recorded
    assert mlflow.last_active_run().data.tags[settings.TAG_ONNX_THREADS] == "2"
