"""Convert a Phi-3 checkpoint folder to an onnxruntime-genai folder with the model builder."""

from __future__ import annotations

import atexit
import gc
import json
import multiprocessing
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import chdir, contextmanager
from pathlib import Path

from phi3flow import output
from phi3flow.errors import UserError
from phi3flow.step_process import die_with_parent

PRECISIONS = ("int4", "fp32")
EXECUTION_PROVIDERS = ("cpu",)
# Microsoft's published cpu-int4-rtn-block-32-acc-level-4 variant of Phi-3-mini, its block size a
# parameter (below). The builder silently ignores the older `int4_`-prefixed spellings of these options.
INT4_OPTIONS = {"accuracy_level": "4", "algo_config": "rtn"}
# The int4 block sizes the builder takes: weights sharing one scale. 32 is the builder's default and
# the Phi-3-mini layout Microsoft publishes (RTN); 128 is the one it publishes for Phi-3.5-mini on CPU
# (with AWQ). On this project's 2-core benchmark it decodes 4-10% faster than 32 at batch 1 and 8, and
# answers the first token 12% sooner at full size (docs/performance.md): one coarser scale per 128 weights.
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_INT4_BLOCK_SIZE = 32
CONVERSION_RSS_RATIO = 1.4  # peak RSS of an int4 conversion / checkpoint bytes (benchmarks/step_memory.py, full size)
BUILDER_LAYER_LINE = re.compile(r"Reading layer \d+")  # the builder prints one per layer (32 for Phi-3-mini)


def convert_in_child(src: Path, out: Path, precision: str = "int4", execution_provider: str = "cpu",
                     int4_block_size: int = DEFAULT_INT4_BLOCK_SIZE) -> Path:
    """convert() in a process of its own, so that what the builder held is given back before the step goes on.

    The step then loads the converted model (to try it and for MLflow's input-example check) with
    none of the builder's memory (the torch model, the quantizer's buffers) still in its process.
    """
    check_options(precision, execution_provider, int4_block_size)
    # spawn, not fork: a forked copy of a process that has started threads can hang in torch.
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_converter_process) as pool:
        try:
            return pool.submit(convert, src, out, precision, execution_provider, int4_block_size).result()
        except BrokenProcessPool:
            shutil.rmtree(builder_cache(out), ignore_errors=True)  # the killed child could not remove it
            weights = weights_gb(src)
            raise UserError(
                f"the ONNX conversion process was killed before it finished, most likely by the system's"
                f" out-of-memory killer: converting needs about {weights * CONVERSION_RSS_RATIO:.0f} GB"
                f" of memory for these {weights:.1f} GB of weights") from None


def _start_converter_process() -> None:
    """The conversion process ends with the step's, and exits without Python's teardown.

    Registered before the builder is imported, this exit handler runs after the builder's, torch's and
    transformers' own; the process then ends at once instead of freeing their modules one by one, 2 to 3 s
    the step would wait for before it goes on. The result has reached the step by then.
    """
    die_with_parent()
    atexit.register(os._exit, 0)


def builder_cache(out: Path) -> Path:
    """Where the builder of `out` keeps its temporary files (the float weights while quantizing)."""
    return out.parent / f"{out.name}.builder-cache"


def weights_gb(src: Path) -> float:
    """The checkpoint's safetensors weights, in GB."""
    return sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1e9


def check_options(precision: str, execution_provider: str,
                  int4_block_size: int | str = DEFAULT_INT4_BLOCK_SIZE) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    if execution_provider not in EXECUTION_PROVIDERS:
        raise UserError(
            f"execution_provider must be one of {', '.join(EXECUTION_PROVIDERS)}, not '{execution_provider}'")
    parse_int4_block_size(int4_block_size)


def parse_int4_block_size(value: str | int) -> int:
    """A block size from a step parameter (a string) or a caller: one of INT4_BLOCK_SIZES, else a user mistake."""
    text = str(value).strip()
    if not text.isdigit() or int(text) not in INT4_BLOCK_SIZES:
        raise UserError(f"int4_block_size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))}, not '{text}'")
    return int(text)


def convert(src: Path, out: Path, precision: str = "int4", execution_provider: str = "cpu",
            int4_block_size: int = DEFAULT_INT4_BLOCK_SIZE) -> Path:
    """Build the ONNX model, genai_config.json and tokenizer files of src into out."""
    check_options(precision, execution_provider, int4_block_size)
    # The builder reads config and tokenizer through transformers, which asks the Hub about a
    # local folder unless told it is offline.
    os.environ["HF_HUB_OFFLINE"] = "1"
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    options = INT4_OPTIONS | {"block_size": str(int4_block_size)} if precision == "int4" else {}
    extra = [f"{k}={v}" for k, v in options.items()]
    window = sliding_window(src)
    if window is not None:
        extra.append("windowed_kv_cache=false")
    cache = builder_cache(out)
    options = parse_extra_options(None, str(src), str(out), precision, execution_provider, str(cache), extra)
    # In a log, the builder's phase lines stay; its per-tensor progress (a bar while saving, and
    # the quantizer's own carriage-return bar, which no switch turns off) shows as its last state,
    # and one "Reading layer N" line per layer as the first and last. Error output stays whole.
    try:
        with output.bounded(merge=BUILDER_LAYER_LINE), quantizing_from_disk():
            create_model(None, str(src), str(out), precision, execution_provider, str(cache), **options)
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # on failure too: it holds the float weights (15 GB for Phi-3-mini)
    if window is not None:
        apply_sliding_window(out / "model.onnx", window)
    prune_lm_head(out / "model.onnx")
    # The checkpoint's config travels with the ONNX files: the pyfunc reads LongRoPE's switch point
    # (original_max_position_embeddings) from it, which genai_config.json cannot hold (its parser
    # refuses unknown keys).
    shutil.copyfile(src / "config.json", out / "config.json")
    return out


@contextmanager
def quantizing_from_disk() -> Iterator[None]:
    """While in it, the builder quantizes to int4 from float weights written to disk, not held in memory.

    Why: the builder (onnxruntime-genai 0.18) quantizes at save time from `ir.to_proto(model)`, a
    protobuf copy of the whole float32 graph, while the torch model it was read from is still
    loaded: 23-30 GB for Phi-3-mini's 7.6 GB checkpoint. Here its own `to_nbits` runs unchanged on a
    graph whose float weights were first streamed to disk one tensor at a time and are read back
    one MatMul at a time by the quantizer; the torch model is released before quantizing. The
    files written are byte-identical to the builder's own (tests/test_family.py compares them), and
    onnxruntime-genai is pinned to the version this replaces a method of.
    """
    # The builder imports its model classes from the top-level package `builders`, not through
    # onnxruntime_genai.models.builders: builder.Model is the base class its Phi-3 classes use.
    from onnxruntime_genai.models.builder import Model

    builder_to_nbits = Model.to_nbits

    def to_nbits_from_disk(model: Model):
        import onnx_ir as ir

        staging = Path(model.cache_dir) / "float-weights"
        staging.mkdir(parents=True, exist_ok=True)
        print(f"Writing float weights to {staging} before quantizing", flush=True)
        ir.save(model.model, staging / "model.onnx", external_data="model.onnx.data", size_threshold_bytes=0)
        # Reloaded, the weights are memory-mapped from disk. The graph read from the torch model
        # lets go of its weights: its lazy tensors refer to the torch tensors, and the builder
        # keeps its values (model.values) to the end.
        float_graph = model.model.graph
        model.model = ir.load(staging / "model.onnx")
        for value in float_graph.initializers.values():
            value.const_value = None
        del float_graph
        gc.collect()
        # ORT's RTN quantizer reads each external weight relative to the working directory.
        with chdir(staging):
            quantized = builder_to_nbits(model)
        ir.external_data.set_base_dir(quantized.graph, staging)  # the weights it left float (embedding, norms)
        return quantized

    # Its advice (pass a path, not a model object) is what is done here: the model object's weights are on disk.
    output.drop_log_message("neural_compressor", "Model size > 2GB. Please use model path instead")
    Model.to_nbits = to_nbits_from_disk
    try:
        yield
    finally:
        Model.to_nbits = builder_to_nbits


def sliding_window(src: Path) -> int | None:
    """The checkpoint's attention window when it is shorter than its context, else None.

    Phi-3-mini-4k and Phi-3-medium-4k attend to the last 2047 positions of a 4096 context; the
    LongRoPE models name a window twice their context, which never applies.
    """
    config = json.loads((src / "config.json").read_text())
    window = config.get("sliding_window")
    if window is None or window >= config["max_position_embeddings"]:
        return None
    return int(window)


def apply_sliding_window(model_file: Path, window: int) -> None:
    """Make every GroupQueryAttention node attend to the last `window` positions, as transformers does.

    Why this post-processing: with its default windowed KV cache the builder (onnxruntime-genai
    0.18) sizes the cache to the window while the attention still sees the whole sequence, so
    every request past about window + 16 tokens fails inside GroupQueryAttention (onnxruntime-genai
    issue 2603). `windowed_kv_cache=false` keeps a full-length cache but then also drops the
    window from the graph (local_window_size=-1), so answers past the window differ from
    transformers'. Restoring local_window_size on the full-length cache gives transformers' window
    (measured token for token on prompts and answers past it).
    """
    import onnx

    # The weights stay in model.onnx.data: only the graph is read and rewritten.
    model = onnx.load(str(model_file), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            for attribute in node.attribute:
                if attribute.name == "local_window_size":
                    attribute.i = window
    onnx.save(model, str(model_file))


def prune_lm_head(model_file: Path) -> None:
    """Make the LM head compute each row's next-token logits only, not those of every prompt position.

    Generation reads one row of logits per sequence; the builder's graph computes them for every
    position of the prompt, a (positions x 3072) by (3072 x 32064) product and its float32 output
    (128 KB a position: 1 GB for a batch of eight 1000-token prompts), where llama.cpp computes one.

    Why not the builder's own `prune_lm_head` option: it keeps the batch's last position, while a
    batch pads its shorter prompts on the right (onnx_engine.Pass, as onnxruntime-genai's
    encode_batch does), so those rows would get a padding position's logits (seen: a batched answer
    differed from the same prompt answered alone). Here each row's position comes from the attention
    mask: its real tokens, less those already in the KV cache, less one; 0 in a decode step, where
    every row feeds one token. onnxruntime-genai 0.18 reads [batch, 1, vocab] logits as each row's
    next-token logits (its support for pruned heads).
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(model_file), load_external_data=False)  # the weights stay in model.onnx.data
    graph = model.graph
    [head_index] = [i for i, node in enumerate(graph.node) if "logits" in node.output]
    head = graph.node[head_index]
    hidden = head.input[0]  # [batch, positions, hidden]
    prefix = "/lm_head/row_last_position"

    def name(part: str) -> str:
        return f"{prefix}/{part}"

    graph.initializer.extend([
        helper.make_tensor(name("one"), TensorProto.INT64, [1], [1]),
        helper.make_tensor(name("zero"), TensorProto.INT64, [1], [0]),
        helper.make_tensor(name("axis"), TensorProto.INT64, [1], [1]),
    ])
    nodes = [
        # real tokens of each row so far [batch, 1]; the mask's width is the cache's plus this step's
        helper.make_node("ReduceSum", ["attention_mask", name("axis")], [name("tokens")], keepdims=1),
        helper.make_node("Shape", ["attention_mask"], [name("width")], start=1, end=2),
        helper.make_node("Shape", ["input_ids"], [name("fed")], start=1, end=2),
        helper.make_node("Sub", [name("tokens"), name("width")], [name("tokens_less_width")]),
        helper.make_node("Add", [name("tokens_less_width"), name("fed")], [name("tokens_fed")]),
        helper.make_node("Sub", [name("tokens_fed"), name("one")], [name("last")]),
        helper.make_node("Max", [name("last"), name("zero")], [name("position")]),
        # GatherElements wants an index of the output's shape: [batch, 1, hidden]
        helper.make_node("Unsqueeze", [name("position"), name("axis")], [name("position_3d")]),
        helper.make_node("Shape", [hidden], [name("hidden_size")], start=2, end=3),
        helper.make_node("Concat", [name("one"), name("one"), name("hidden_size")], [name("index_shape")], axis=0),
        helper.make_node("Expand", [name("position_3d"), name("index_shape")], [name("index")]),
        helper.make_node("GatherElements", [hidden, name("index")], [name("output_0")], axis=1),
    ]
    for offset, node in enumerate(nodes):
        node.name = name(f"{node.op_type}_{offset}")
        graph.node.insert(head_index + offset, node)
    head.input[0] = name("output_0")
    [logits] = [output for output in graph.output if output.name == "logits"]
    positions = logits.type.tensor_type.shape.dim[1]
    positions.Clear()
    positions.dim_value = 1
    onnx.save(model, str(model_file))
