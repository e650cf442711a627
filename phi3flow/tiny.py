"""The embedded `builtin:tiny-phi3` model: real Phi-3 architecture and tokenizer format, random weights.

It exists so that every step, test and quickstart runs with no model hub: `fetch_model` builds it
(once per machine: the local cache keeps it, see fetch.builtin_folder) into a folder laid out like a
Hub snapshot of microsoft/Phi-3-mini-4k-instruct, and everything
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


# The real configurations, from the public config.json of each model on the Hugging Face Hub.
# The tiny models keep each one's features and key layout; widths shrink, and for LongRoPE the
# positions shrink (original 64 / max 512 instead of 4096 / 131072) so crossings are cheap to test.
# Head sizes respect a runtime limit: onnxruntime's GroupQueryAttention accepts a rotary table
# (cos_cache) whose width is a multiple of 8 and at most head_size/2; a narrower one converts but
# fails at run time. So 16 for full rotary (width 8) and 64 for partial rotary 0.75 (width 24).

# microsoft/Phi-3.5-mini-instruct config.json, rope_scaling (48 factors for head size 96).
PHI35_SHORT_FACTOR = [
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
    1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
    1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
    2.749999523162842, 2.8399994373321533,
]
PHI35_LONG_FACTOR = [
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
    17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
    50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
    62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
    63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
    64.51000213623047, 64.52999877929688, 64.83999633789062,
]
# microsoft/Phi-4-mini-instruct config.json, rope_scaling (48 factors: 0.75 of head size 128).
PHI4_MINI_SHORT_FACTOR = [1.0] * 48
PHI4_MINI_LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]


def _every(factors: list[float], count: int) -> list[float]:
    """count of the real factors, evenly spaced: a smaller head keeps the low-to-high frequency shape."""
    step = len(factors) // count
    return [float(f) for f in factors[::step][:count]]


def _longrope(short: list[float], long: list[float], count: int) -> dict:
    return {"type": "longrope", "short_factor": _every(short, count), "long_factor": _every(long, count)}


# name → the config fields that differ between family members (the rest is common, in `build`).
FAMILY: dict[str, dict] = {
    # microsoft/Phi-3-mini-4k-instruct: 32 heads = 32 KV heads, sliding_window 2047, context 4096.
    "tiny-phi3": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
        rope_scaling=None, tie_word_embeddings=False,
    ),
    # microsoft/Phi-3-medium-4k-instruct: 40 heads / 10 KV heads (GQA 4:1), sliding_window 2047,
    # context 4096.
    "tiny-phi3-medium": dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
        max_position_embeddings=4096, original_max_position_embeddings=4096, sliding_window=2047,
        rope_scaling=None, tie_word_embeddings=False,
    ),
    # microsoft/Phi-3.5-mini-instruct: 32 heads = 32 KV heads, LongRoPE, original 4096 / max
    # 131072, sliding_window 262144 (twice the context: no window), scaled here to 64 / 512 / 1024.
    "tiny-phi3.5": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=512, original_max_position_embeddings=64, sliding_window=1024,
        rope_scaling=_longrope(PHI35_SHORT_FACTOR, PHI35_LONG_FACTOR, 8), tie_word_embeddings=False,
    ),
    # microsoft/Phi-4-mini-instruct: 24 heads / 8 KV heads (GQA 3:1), partial_rotary_factor 0.75,
    # tied embeddings, LongRoPE, original 4096 / max 131072, sliding_window 262144; scaled as above.
    "tiny-phi4-mini": dict(
        hidden_size=192, intermediate_size=256, num_attention_heads=3, num_key_value_heads=1,
        partial_rotary_factor=0.75,
        max_position_embeddings=512, original_max_position_embeddings=64, sliding_window=1024,
        rope_scaling=_longrope(PHI4_MINI_SHORT_FACTOR, PHI4_MINI_LONG_FACTOR, 24), tie_word_embeddings=True,
    ),
}
DEFAULT_MEMBER = "tiny-phi3"


def _write_hub_layout(config_file: Path, rope_scaling: dict | None) -> None:
    """Rewrite config.json with the Hub files' keys (transformers 5 saves `rope_parameters`, `dtype`).

    The Hub's Phi-3 configs say `rope_scaling: {"type": "longrope", "short_factor", "long_factor"}`
    (or null), `rope_theta` and `torch_dtype`; users' folders look like that, so the tiny ones do too.
    """
    config = json.loads(config_file.read_text())
    rope = config.pop("rope_parameters", {}) or {}
    config["rope_theta"] = rope.get("rope_theta", 10000.0)
    config["rope_scaling"] = rope_scaling
    config["torch_dtype"] = config.pop("dtype", "bfloat16")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def build(out_dir: Path, name: str = DEFAULT_MEMBER) -> Path:
    """Write the family member `name` (config, bf16 safetensors weights, tokenizer files) into out_dir."""
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
        num_hidden_layers=2,
        bos_token_id=token_id["<s>"],
        eos_token_id=eos_ids,
        pad_token_id=token_id["<|endoftext|>"],
        # Wider than the usual 0.02 so that logits are well separated and greedy decoding is stable
        # across runtimes (ONNX vs torch) despite float rounding differences.
        initializer_range=0.2,
        architectures=["Phi3ForCausalLM"],
        **FAMILY[name],
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
    # The Hub files are bfloat16; every member is rounded to it before saving, like them.
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=token_id["<s>"], eos_token_id=eos_ids, pad_token_id=token_id["<|endoftext|>"]
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    _write_hub_layout(out_dir / "config.json", FAMILY[name].get("rope_scaling"))

    (out_dir / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    tokenizer_config = {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|endoftext|>",
        "legacy": False,
        "model_max_length": config.max_position_embeddings,
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
