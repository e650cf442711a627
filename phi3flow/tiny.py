"""The embedded `builtin:tiny-phi3` model: real Phi-3 architecture and tokenizer format, random weights.

It exists so that every step, test and quickstart runs with no model hub: `fetch_model` builds it
into a folder laid out like a Hub snapshot of microsoft/Phi-3-mini-4k-instruct, and everything
downstream treats it exactly like the real model. Two builds are byte-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

# Phi-3's chat template, as shipped in microsoft/Phi-3-mini-4k-instruct's tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-3's added tokens. The real model appends them after a 32000-entry Llama vocabulary; the tiny
# model appends them after its own small vocabulary in the same order.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|placeholder1|>",
    "<|placeholder2|>",
    "<|placeholder3|>",
    "<|placeholder4|>",
    "<|system|>",
    "<|end|>",
    "<|placeholder5|>",
    "<|placeholder6|>",
    "<|user|>",
]

BASE_VOCAB_SIZE = 1024  # <unk> <s> </s>, 256 byte-fallback tokens, characters and learned merges
SEED = 20240423  # Phi-3's release date; any fixed value gives reproducible weights

# A small embedded corpus so the BPE merges are real English subwords.
_CORPUS = """
What is the capital of Spain? The capital of Spain is Madrid. What is the capital of France?
The capital of France is Paris. Rome is the capital of Italy and Berlin is the capital of Germany.
You are a helpful assistant. Answer the question in one short sentence. Tell me a joke about atoms.
Why do atoms never trust each other? Because they make up everything. Summarize the text below.
Translate the following sentence into French. Write a haiku about the sea. List three colours.
The quick brown fox jumps over the lazy dog. How many days are there in a week? There are seven.
Machine learning models are trained on data and evaluated on held-out examples before deployment.
MLflow tracks experiments, packages projects, registers models and serves them behind an endpoint.
Phi-3 is a small language model from Microsoft. It runs on phones, laptops and servers with ONNX.
Please explain, step by step, how to convert a model to int4 and measure its tokens per second.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14 1,000,000. Dates like 2024-04-23 and times 12:30.
Punctuation matters: commas, periods. Question marks? Exclamation marks! Quotes "like this" and
'this'; parentheses (here) [brackets] {braces} <angles> - dashes _ underscores / slashes \\ # @ & *
def main():\n    print("hello, world")\n    return 0\n
The sun rises in the east and sets in the west. Water boils at one hundred degrees Celsius.
"""


def build_tokenizer_json() -> str:
    """Train a Phi-3 (Llama sentencepiece-BPE) style tokenizer and return its tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # Byte-fallback tokens are ordinary vocabulary, as in Phi-3: og drops *special* ones on decode.
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    # Training splits words at "\u2581" so no merge spans two words: sentencepiece (and og) never
    # applies such merges, transformers would. The saved tokenizer has no pre-tokenizer, like Phi-3's.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never"),
            pre_tokenizers.UnicodeScripts(),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB_SIZE,
        special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
        initial_alphabet=sorted(set(_CORPUS.replace(" ", "\u2581"))),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    data = json.loads(tokenizer.to_str())
    # The trainer marks every initial token special; only <unk> <s> </s> are special in Phi-3.
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] in ("<unk>", "<s>", "</s>")]
    next_id = len(data["model"]["vocab"])
    for offset, content in enumerate(SPECIAL_TOKENS):
        data["added_tokens"].append(
            {
                "id": next_id + offset,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    return json.dumps(data, ensure_ascii=False, indent=2, sort_keys=True) + "\n"


def build(out_dir: Path) -> Path:
    """Write the tiny Phi-3 model (config, safetensors weights, tokenizer files) into out_dir."""
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_json = build_tokenizer_json()
    tok = json.loads(tokenizer_json)
    vocab_size = len(tok["model"]["vocab"]) + len(SPECIAL_TOKENS)
    token_id = {t["content"]: t["id"] for t in tok["added_tokens"]}
    eos_ids = [token_id["<|endoftext|>"], token_id["<|end|>"]]

    config = Phi3Config(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        sliding_window=None,  # onnxruntime-genai issue 2603: a window below the context crashes generation
        bos_token_id=token_id["<s>"],
        eos_token_id=eos_ids,
        pad_token_id=token_id["<|endoftext|>"],
        tie_word_embeddings=False,
        # Wider than the usual 0.02 so that logits are well separated and greedy decoding is stable
        # across runtimes (ONNX vs torch) despite float rounding differences.
        initializer_range=0.2,
        architectures=["Phi3ForCausalLM"],
    )
    torch.manual_seed(SEED)
    model = Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        # Byte-fallback tokens 0x80-0xFF only make sense inside valid UTF-8 sequences, which random
        # weights would not produce; transformers and og decode invalid ones differently (U+FFFD
        # per byte vs dropped), and og's decode stops at a NUL. Zero logits keep every byte but
        # printable ASCII, tab and newlines out of greedy answers.
        printable = {0x09, 0x0A, 0x0D, *range(0x20, 0x7F)}
        odd_bytes = [tok["model"]["vocab"][f"<0x{b:02X}>"] for b in range(256) if b not in printable]
        model.lm_head.weight[odd_bytes] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=token_id["<s>"], eos_token_id=eos_ids, pad_token_id=token_id["<|endoftext|>"]
    )
    model.save_pretrained(out_dir, safe_serialization=True)

    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": 4096,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
    special_map = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, sort_keys=True) + "\n")
    return out_dir
