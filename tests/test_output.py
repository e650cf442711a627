"""What the steps print in a log: progress bars as their last state, a line per layer merged, nothing else lost."""

from __future__ import annotations

import io
import logging
import os
import re
import sys

import pytest

from phi3flow import output, settings
from phi3flow.onnx_convert import BUILDER_LAYER_LINE


def test_a_log_gets_a_bars_last_state_and_the_first_and_last_layer_line():
    log = io.StringIO()
    stream = output.LogLines(log, merge=BUILDER_LAYER_LINE)
    print("Reading embedding layer", file=stream)
    for layer in range(32):
        print(f"Reading layer {layer}", file=stream)
    print("Reading final norm", file=stream)
    for step in range(1, 101):  # onnxruntime's quantizer: a bar of its own that never ends its line
        print(f"\rProgress: [{'#' * (step // 5):<20}] {step:.2f}%", end="", file=stream)
    print("Saving GenAI config in /out", file=stream)
    stream.write("\r0it [00:00, ?it/s]")
    for i in range(300):  # tqdm
        stream.write(f"\rSaving tensor {i}: {i + 1}/300 [00:00<00:00, 999.0it/s]  ")
    stream.write("\n")
    print("  Run name: \x1b[94monnx\x1b[0m; open the \x1b[93m\x1b[1mTraces\x1b[0m tab", file=stream)  # MLflow's colours
    stream.write("Error: layer 3 failed\nError: layer 4 failed\nlast words")
    stream.finish()
    assert log.getvalue().splitlines() == [
        "Reading embedding layer",
        "Reading layer 0",
        "Reading layer 31 (30 alike lines left out)",
        "Reading final norm",
        "Progress: [####################] 100.00%",
        "Saving GenAI config in /out",
        "Saving tensor 299: 300/300 [00:00<00:00, 999.0it/s]",
        "  Run name: onnx; open the Traces tab",
        "Error: layer 3 failed",
        "Error: layer 4 failed",
        "last words",
    ]


def test_bounded_keeps_the_order_of_stdout_and_stderr_and_restores_them_after_an_error(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stdout", log)
    monkeypatch.setattr(sys, "stderr", log)
    with pytest.raises(RuntimeError), output.bounded():
        for step in range(3):
            print(f"\rquantizing {step + 1}/3", end="")
        sys.stderr.write("\rsaving 1/1\n")  # a bar on the other stream: the first one ended there
        print("partial line", end="")
        raise RuntimeError("conversion failed")
    assert sys.stdout is log and sys.stderr is log
    assert log.getvalue().splitlines() == ["quantizing 3/3", "saving 1/1", "partial line"]


def test_progress_bars_are_switched_off_only_away_from_a_terminal(monkeypatch):
    for name in settings.PROGRESS_BARS_OFF:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")  # the user's choice wins
    output.quiet_progress_bars()  # pytest's stderr is no terminal
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"


def test_drop_log_message_drops_only_that_message_of_that_logger(caplog):
    output.drop_log_message("phi3flow.test.noisy", "known harmless")
    output.drop_log_message("phi3flow.test.noisy", "known harmless")  # once is enough
    assert len(logging.getLogger("phi3flow.test.noisy").filters) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger("phi3flow.test.noisy").warning("known harmless: %s", "x")
        logging.getLogger("phi3flow.test.noisy").warning("something else")
        logging.getLogger("phi3flow.test.other").warning("known harmless")
    assert [record.getMessage() for record in caplog.records] == ["something else", "known harmless"]


def test_the_onnx_model_class_hides_only_the_type_hint_warning():
    import warnings

    from phi3flow import onnx_pyfunc

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        class Model(onnx_pyfunc._NoTypeHintWarning):
            def predict(self, context, model_input, params=None):
                return model_input

            def predict_stream(self, context, model_input, params=None, extra=None):  # MLflow warns: keep it
                yield model_input

        class Plain(onnx_pyfunc.mlflow.pyfunc.PythonModel):  # the warning is real: a plain model gets it
            def predict(self, context, model_input, params=None):
                return model_input

    messages = [str(w.message) for w in caught]
    assert sum(bool(onnx_pyfunc.TYPE_HINT_WARNING.match(m)) for m in messages) == 1, messages  # Plain's only
    assert any("predict_stream" in m for m in messages), messages
    assert getattr(Model.predict, "_is_pyfunc", False)  # MLflow still wrapped predict
    assert re.match(onnx_pyfunc.TYPE_HINT_WARNING, "\x1b[33mAdd type hints to the `predict` method to enable")
