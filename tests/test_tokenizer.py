"""The embedded tokenizer encodes identically in transformers and in onnxruntime-genai."""

from __future__ import annotations

import json

import onnxruntime_genai as og
import pytest
from transformers import AutoTokenizer

TEXTS = [
    "What is the capital of Spain?",
    "Hello, world! 3.14159 and 2024-11-25.",
    "digits 0123456789 9876543210 and 1,000,000",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple    spaces\there\n\nnew\nlines\n",
    "\n",
    " ",
    "x",
    "unicode: café naïve — “quotes” 日本語 🙂 Ελληνικά ünïcödé",
    "Zebra quokka XYZZY, never seen in training",
    "def f(x):\n    return x**2  # comment",
    "MLflow's ONNX int4 models!!!??? (yes) [no] {maybe} <tag> a/b c\\d @e #f",
    "tab\tseparated\tvalues",
]
# Special tokens inside text: encoding agrees; on decode transformers renders the "\u2581" that
# follows a special token as a space and og does not, which never reaches a completion because
# generation ends at <|end|>.
SPECIAL_TEXTS = ["<|user|>\nhi<|end|>\n<|assistant|>\n", "a<|end|>b", "<|system|>\n<|end|>"]

MESSAGES = [
    [{"role": "user", "content": "What is the capital of Spain?"}],
    [
        {"role": "system", "content": "You are a stand-up comedian."},
        {"role": "user", "content": "Tell me a joke about atoms."},
        {"role": "assistant", "content": "Atoms make up everything!"},
        {"role": "user", "content": "Another one,  please:\n 42 more 🙂"},
    ],
]


@pytest.fixture(scope="module")
def tokenizers(tiny_dir, tiny_onnx_fp32):
    return AutoTokenizer.from_pretrained(tiny_dir), og.Tokenizer(og.Model(str(tiny_onnx_fp32)))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_agree(tokenizers, text):
    hf, ogt = tokenizers
    ids = hf.encode(text, add_special_tokens=True)
    assert [int(i) for i in ogt.encode(text)] == ids
    # Both drop special tokens on decode; og keeps sentencepiece's leading space, which the
    # chat wrappers strip from completions exactly as MLflow's transformers flavor does.
    assert ogt.decode(ids).lstrip() == hf.decode(ids, skip_special_tokens=True).lstrip()


@pytest.mark.parametrize("text", SPECIAL_TEXTS)
def test_encode_agrees_around_special_tokens(tokenizers, text):
    hf, ogt = tokenizers
    ids = hf.encode(text, add_special_tokens=True)
    assert [int(i) for i in ogt.encode(text)] == ids
    assert hf.convert_tokens_to_ids("<|end|>") in ids  # one id, not spelled out in pieces


@pytest.mark.parametrize("messages", MESSAGES)
def test_chat_template_renders_and_encodes_identically(tokenizers, messages):
    hf, ogt = tokenizers
    hf_prompt = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    og_prompt = ogt.apply_chat_template(json.dumps(messages), add_generation_prompt=True)
    assert og_prompt == hf_prompt
    assert hf_prompt.endswith("<|end|>\n<|assistant|>\n")
    assert [int(i) for i in ogt.encode(og_prompt)] == hf.encode(hf_prompt, add_special_tokens=True)


def test_unicode_roundtrips_through_byte_fallback(tokenizers):
    hf, ogt = tokenizers
    text = "日本語 🙂 Ελληνικά"
    ids = hf.encode(text, add_special_tokens=False)
    assert hf.convert_ids_to_tokens(ids).count("<0xF0>") == 1  # the emoji fell back to bytes
    assert ogt.decode(ids).strip() == text
