"""The embedded family: every member's fp32 ONNX pyfunc answers like the transformers pipeline, token for token.

Each member is built, converted (fp32 and int4) and logged once per module. The cases are the ones
where onnxruntime-genai and transformers part ways unless the conversion and the batcher take care:
a prompt or an answer past the sliding window, an answer that crosses LongRoPE's switch from short
to long factors (original_max_position_embeddings), a prompt already past it, and rows of one batch
that cross at different times.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import torch
import transformers
from mlflow.exceptions import MlflowException

from phi3flow import onnx_convert, onnx_model, settings, tiny
from phi3flow.onnx_convert import convert

# Words of ordinary text, cycled to make prompts of any length.
WORDS = (
    "What is the capital of Spain? Tell me a joke about atoms. MLflow tracks experiments and serves "
    "models. The quick brown fox jumps over the lazy dog. Water boils at one hundred degrees."
).split()


@dataclass
class Member:
    name: str
    src: Path
    config: dict
    pipeline: transformers.Pipeline
    fp32: mlflow.pyfunc.PyFuncModel
    int4: mlflow.pyfunc.PyFuncModel

    def prompt(self, tokens: int) -> tuple[str, int]:
        """The longest prompt of whole words with at most `tokens` tokens, and its length."""
        def text(words: int) -> str:
            return " ".join(WORDS[i % len(WORDS)] for i in range(words))

        low, high = 1, tokens  # every word is at least one token
        while low < high:  # bisect on the number of words
            middle = (low + high + 1) // 2
            fits = len(self.pipeline.tokenizer.encode(text(middle))) <= tokens
            low, high = (middle, high) if fits else (low, middle - 1)
        return text(low), len(self.pipeline.tokenizer.encode(text(low)))

    def expected(self, prompt: str, max_tokens: int) -> tuple[str, int]:
        """The transformers pipeline's greedy answer: its text and its number of tokens."""
        out = self.pipeline(prompt, max_new_tokens=max_tokens, do_sample=False, return_tensors=True)
        prompt_ids = self.pipeline.tokenizer.encode(prompt)
        answer = out[0]["generated_token_ids"][len(prompt_ids):]
        assert out[0]["generated_token_ids"][: len(prompt_ids)] == prompt_ids
        return self.pipeline.tokenizer.decode(answer, skip_special_tokens=True).lstrip(), len(answer)


def _log(onnx_dir: Path) -> mlflow.pyfunc.PyFuncModel:
    with mlflow.start_run():
        info = onnx_model.log_onnx_model(onnx_dir, "prompt", "phi3-onnx")
    return mlflow.pyfunc.load_model(info.model_uri)


@pytest.fixture(scope="module", params=list(tiny.FAMILY))
def member(request, tracking_uri, tmp_path_factory) -> Member:
    name = request.param
    root = tmp_path_factory.mktemp(name)
    src = tiny.build(root / "model", name)
    pipeline = transformers.pipeline("text-generation", model=str(src), dtype=torch.float32)
    return Member(
        name, src, json.loads((src / "config.json").read_text()), pipeline,
        fp32=_log(convert(src, root / "fp32", precision="fp32")),
        int4=_log(convert(src, root / "int4", precision="int4")),
    )


def test_family_names_match_settings():
    assert settings.BUILTINS == tuple(f"builtin:{name}" for name in tiny.FAMILY)


def test_builds_are_byte_identical(tmp_path):
    first, second = (tiny.build(tmp_path / d, "tiny-phi4-mini") for d in ("a", "b"))
    files = sorted(p.name for p in first.iterdir())
    assert files == sorted(p.name for p in second.iterdir())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)


def _cases(member: Member) -> list[tuple[str, int, int]]:
    """(what, prompt tokens, max_tokens) for the features this member has."""
    config = member.config
    cases = [("short prompt", 12, 16)]
    window, context = config["sliding_window"], config["max_position_embeddings"]
    if window < context:
        cases += [("prompt past the window", window + 60, 12), ("answer crosses the window", window - 8, 24)]
    switch = config["original_max_position_embeddings"]
    if switch < context:
        cases += [("answer crosses original_max_position_embeddings", switch - 14, 30),
                  ("prompt longer than original_max_position_embeddings", 2 * switch, 16)]
    return cases


def test_member_has_its_real_config(member):
    config = member.config
    assert config["architectures"] == ["Phi3ForCausalLM"] and config["torch_dtype"] == "bfloat16"
    if member.name in ("tiny-phi3", "tiny-phi3-medium"):
        assert (config["sliding_window"], config["max_position_embeddings"],
                config["rope_scaling"]) == (2047, 4096, None)
    else:
        assert config["rope_scaling"]["type"] == "longrope"
        assert (config["original_max_position_embeddings"], config["max_position_embeddings"]) == (64, 512)
    if member.name == "tiny-phi4-mini":
        assert config["partial_rotary_factor"] == 0.75 and config["tie_word_embeddings"]
    gqa = config["num_attention_heads"] > config["num_key_value_heads"]
    assert gqa == (member.name in ("tiny-phi3-medium", "tiny-phi4-mini"))


def test_fp32_answers_like_the_pipeline_token_for_token(member):
    for what, prompt_tokens, max_tokens in _cases(member):
        prompt, length = member.prompt(prompt_tokens)
        text, tokens = member.expected(prompt, max_tokens)
        assert tokens == max_tokens, f"{what}: the reference ended early; pick another prompt"
        assert length + tokens > prompt_tokens  # the case really crosses what it names
        model = member.fp32.unwrap_python_model()
        answer = model._run([model._job(model._prompt_ids(prompt), {"max_tokens": max_tokens}, None)])[0]
        assert (answer.text, answer.completion_tokens) == (text, tokens), f"{member.name}: {what}"


def test_rows_of_one_batch_crossing_at_different_times_answer_as_alone(member):
    config = member.config
    switch = min(config["original_max_position_embeddings"], config["sliding_window"])
    prompts = [member.prompt(switch + offset)[0] for offset in (-20, -6, 30)]
    expected = [member.expected(prompt, 28)[0] for prompt in prompts]
    answers = member.fp32.predict([{"prompt": prompt} for prompt in prompts], params={"max_tokens": 28})
    assert answers == expected


def test_int4_quantized_from_disk_equals_the_builders_own_conversion(member, tmp_path, capfd, monkeypatch):
    streamed = convert(member.src, tmp_path / "streamed", precision="int4")
    assert "Writing float weights to " in capfd.readouterr().out  # it did go through the disk
    monkeypatch.setattr(onnx_convert, "quantizing_from_disk", contextlib.nullcontext)  # the builder left alone
    builders = convert(member.src, tmp_path / "builders", precision="int4")
    files = sorted(p.name for p in builders.iterdir())
    assert "model.onnx.data" in files and files == sorted(p.name for p in streamed.iterdir())
    differing = [f for f in files if (streamed / f).read_bytes() != (builders / f).read_bytes()]
    assert differing == []
    assert not (tmp_path / "streamed.builder-cache").exists()  # the float weights were removed


def test_int4_answers_the_same_requests(member):
    for what, prompt_tokens, max_tokens in _cases(member):
        prompt, _ = member.prompt(prompt_tokens)
        answer = member.int4.predict({"prompt": prompt}, params={"max_tokens": max_tokens})
        assert len(answer) == 1 and isinstance(answer[0], str), what


def test_prompt_past_the_context_is_refused_with_the_limit(member):
    prompt, length = member.prompt(member.config["max_position_embeddings"] + 10)
    with pytest.raises(MlflowException,
                       match=f"the model's context is {member.config['max_position_embeddings']} tokens") as error:
        member.fp32.predict({"prompt": prompt}, params={"max_tokens": 4})
    assert error.value.error_code == "INVALID_PARAMETER_VALUE"
