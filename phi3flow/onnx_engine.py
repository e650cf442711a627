"""The generation engine of the `phi3-onnx` model: jobs, the batcher and its batching policy.

Shipped with the model (`code_paths`) beside onnx_pyfunc.py, which imports it; like that file it
imports nothing from this project, only the libraries listed in the model's pip requirements.

onnxruntime-genai is not thread-safe and the scoring server calls `predict` from several worker
threads at once. Every generation therefore runs on one thread of its own (the batcher), and the
jobs waiting when it starts a generation share it as one onnxruntime-genai batch (`batch_size=N`,
prompts padded). Decode on a CPU is bound by reading the weights, so N rows cost little more than
one: aggregate tokens/s grows with the number of concurrent clients. Greedy answers are the same in
a batch as alone (padding is masked); stop sequences, `max_tokens` and streaming stay per job; jobs
with different sampling options go to different batches (`Decoding.batch_key`).
LongRoPE models (Phi-3.5-mini, Phi-4-mini) answer as transformers does when a sequence passes
`original_max_position_embeddings`: it is re-read in a new generator with the long factors (see
`Batcher._generate`).
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED


@dataclass(frozen=True)
class Decoding:
    """How one job's answer is generated."""

    max_tokens: int
    temperature: float  # 0 means greedy
    top_p: float
    top_k: int
    stop: tuple[str, ...]

    @property
    def batch_key(self) -> tuple:
        """Jobs can share a batch when this is equal: one set of search options per generator."""
        return ("greedy",) if self.temperature == 0 else (self.temperature, self.top_p, self.top_k)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of text or a stop sequence) or "length"


# One event of a generation: (new text, completion so far, is last), or the error that ended it.
Event = tuple[str, Completion, bool]


@dataclass
class Job:
    """One request: its prompt ids and options in, its events out (filled by the batcher)."""

    prompt_ids: list[int]
    decoding: Decoding
    deadline: float | None  # time.monotonic() past which the job fails; None: no limit
    streaming: bool = False  # wants every token's text; otherwise only the final event
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: bool = False  # set by the consumer when it stops reading (a closed stream)

    def results(self) -> Iterator[Event]:
        try:
            while True:
                item = self.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item[2]:
                    return
        finally:
            self.cancelled = True  # after the last event this changes nothing; before it frees the row

    def wait(self) -> Completion:
        return next(completion for _, completion, final in self.results() if final)


def choose_batch(waiting: Iterable[Job], max_size: int, context_length: int,
                 max_batch_tokens: int) -> tuple[list[Job], list[Job]]:
    """The next batch from the waiting jobs (one or more, oldest first), and the jobs held back, in arrival order.

    The batch is the oldest job and, in arrival order, each later job that can share its generator:
    the same batch key, and with the batch padded to its longest prompt and its largest max_tokens,
    every row inside the context and all rows together within max_batch_tokens. A job that does not
    fit is held back without closing the batch to the jobs behind it.
    """
    first, *others = waiting
    batch, held_back = [first], []
    prompt_width, answer_room = len(first.prompt_ids), first.decoding.max_tokens
    for job in others:
        if len(batch) == max_size:
            held_back.append(job)
            continue
        width = max(prompt_width, len(job.prompt_ids))
        room = max(answer_room, job.decoding.max_tokens)
        fits = width + room <= context_length and (len(batch) + 1) * (width + room) <= max_batch_tokens
        if job.decoding.batch_key == first.decoding.batch_key and fits:
            batch.append(job)
            prompt_width, answer_room = width, room
        else:
            held_back.append(job)
    return batch, held_back


class Row:
    """A job's place in a running batch: turns its tokens into text and decides when it ends."""

    def __init__(self, job: Job, token_stream: og.TokenizerStream, eos_tokens: set[int]) -> None:
        self.job, self.token_stream, self.eos_tokens = job, token_stream, eos_tokens
        self.completion = Completion("", len(job.prompt_ids), 0, "length")
        self.answer_ids: list[int] = []  # to re-read prompt + answer in a new pass
        self.sent_chars = 0  # how much of completion.text the job's events carried so far
        self.done = False

    def _emit(self, final: bool) -> None:
        self.done = final
        # Waking a waiting request thread for every token would take CPU (and the GIL) from
        # the generation itself; a non-streaming request only needs its answer.
        if final or self.job.streaming:
            text = self.completion.text
            # Text that may be the start of a stop sequence waits for the next tokens: if they
            # complete the stop, it was never part of the answer.
            end = len(text) if final else len(text) - _stop_prefix_length(text, self.job.decoding.stop)
            piece = text[self.sent_chars : end]
            self.sent_chars = max(self.sent_chars, end)
            self.job.events.put((piece, self.completion, final))

    def fail(self, error: BaseException) -> None:
        self.done = True
        self.job.events.put(error)

    def check_deadline(self, now: float) -> None:
        if self.job.cancelled:
            self.done = True
        elif self.job.deadline is not None and now > self.job.deadline:
            limit = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
            self.fail(MlflowException(
                f"the answer did not finish within the server's {limit} s request timeout"
                f" (MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT) after {self.completion.completion_tokens}"
                f" of {self.job.decoding.max_tokens} tokens: ask for fewer max_tokens or raise the timeout",
                error_code=DEADLINE_EXCEEDED,  # answered with HTTP 504
            ))

    def take(self, token: int) -> None:
        completion, decoding = self.completion, self.job.decoding
        completion.completion_tokens += 1
        self.answer_ids.append(token)
        piece = self.token_stream.decode(token)
        if not completion.text:
            piece = piece.lstrip()  # sentencepiece's leading space, stripped as MLflow does
        text = completion.text + piece
        stop_at = min((text.find(s) for s in decoding.stop if s in text), default=-1)
        if stop_at >= 0:  # a stop sequence: answer up to it, without it
            completion.text, completion.finish_reason = text[:stop_at], "stop"
            self._emit(final=True)
            return
        completion.text = text
        if token in self.eos_tokens and completion.completion_tokens < decoding.max_tokens:
            completion.finish_reason = "stop"  # an end-of-text token
        self._emit(final=token in self.eos_tokens or completion.completion_tokens == decoding.max_tokens)


def _stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """How many of text's last characters a stop sequence begins with (the most over all stops; 0: none)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def long_rope_switch(folder: Path) -> int | None:
    """A LongRoPE model's original_max_position_embeddings, from the checkpoint's config.json kept
    beside the ONNX files (genai_config.json has no place for it); None for other models."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if (scaling.get("type") or scaling.get("rope_type")) not in ("longrope", "su"):
        return None
    return int(config.get("original_max_position_embeddings") or scaling["original_max_position_embeddings"])


class Batcher:
    """Runs every generation on its own thread, batching the jobs that wait for it."""

    def __init__(
        self, model: og.Model, tokenizer: og.Tokenizer, genai_config: dict,
        max_batch_size: int, max_batch_tokens: int, gather_s: float, burst_s: float, rope_switch: int | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        # LongRoPE's original_max_position_embeddings (None without LongRoPE): see `_generate`.
        self.rope_switch = rope_switch
        config = genai_config["model"]
        eos = config["eos_token_id"]
        self.eos_tokens = set(eos) if isinstance(eos, list) else {eos}
        self.pad_token = int(config.get("pad_token_id", min(self.eos_tokens)))
        self.context_length = int(config["context_length"])
        self.max_batch_size = max_batch_size
        # Bounds the KV cache of one batch (rows x padded length), so memory stays bounded
        # however many clients wait; a single request may still use the whole context.
        self.max_batch_tokens = max(max_batch_tokens, self.context_length)
        self.gather_s = gather_s
        self.burst_s = burst_s
        self._last_batch_size = 0
        self._waiting: deque[Job] = deque()
        self._wakeup = threading.Condition()
        self._stopped = False
        threading.Thread(target=self._loop, name="phi3-onnx-batcher", daemon=True).start()

    def stop(self) -> None:
        """End the generation thread once no job waits, so the model it holds can be freed."""
        with self._wakeup:
            self._stopped = True
            self._wakeup.notify()

    def submit(self, jobs: list[Job]) -> None:
        with self._wakeup:
            self._waiting.extend(jobs)
            self._wakeup.notify()

    def _next_batch(self) -> list[Job]:
        """Wait for jobs, then take the next batch (`choose_batch`); the jobs held back go first next time."""
        with self._wakeup:
            # The clients the last batch answered usually send their next request within a few
            # milliseconds. Waiting briefly for them puts them in one batch with the requests
            # already queued, instead of two groups taking turns, each a whole generation behind.
            expected = min(self.max_batch_size, len(self._waiting) + self._last_batch_size)
            until = time.monotonic() + self.gather_s
            while len(self._waiting) < expected and time.monotonic() < until:
                self._wakeup.wait(until - time.monotonic())
            while not self._waiting:
                if self._stopped:
                    return []
                self._wakeup.wait()
            # Concurrent clients reach the batcher one after another, milliseconds apart: an idle
            # batcher that started on the first would leave the others a whole generation behind.
            # So it keeps gathering while requests keep arriving less than burst_s apart (a lone
            # request waits burst_s once), for gather_s at most.
            first = time.monotonic()
            quiet = first + self.burst_s
            while len(self._waiting) < self.max_batch_size and (now := time.monotonic()) < quiet:
                count = len(self._waiting)
                self._wakeup.wait(quiet - now)
                if len(self._waiting) > count:
                    quiet = min(time.monotonic() + self.burst_s, first + self.gather_s)
            batch, held_back = choose_batch(self._waiting, self.max_batch_size, self.context_length,
                                            self.max_batch_tokens)
            self._waiting = deque(held_back)
            self._last_batch_size = len(batch)
            return batch

    def _loop(self) -> None:
        while jobs := self._next_batch():  # none: stopped
            rows = [Row(job, self.tokenizer.create_stream(), self.eos_tokens) for job in jobs]
            try:
                self._generate(rows)
            except Exception as error:  # one failed batch must not stop the server
                for row in rows:
                    if not row.done:
                        row.fail(error)

    def _generate(self, rows: list[Row]) -> None:
        now = time.monotonic()
        for row in rows:
            row.check_deadline(now)  # waited too long for its turn, or its client left
        passes = [Pass(self, group) for group in self._rope_groups([row for row in rows if not row.done])]
        # The passes of one batch take turns token by token, so every row keeps streaming.
        while passes:
            for current in list(passes):
                if current.crossing():
                    # LongRoPE: transformers recomputes the whole sequence with the long factors
                    # once it is longer than original_max_position_embeddings. A generator keeps
                    # the keys it computed with the short ones, so the rows that cross re-read
                    # prompt + answer in a new pass, and so do the others: the runtime picks the
                    # factors for a whole batch from its padded length.
                    passes.remove(current)
                    passes += [Pass(self, group) for group in self._rope_groups(current.live_rows())]
                elif not current.step():
                    passes.remove(current)
        # Rows that ended early (stop sequence, their own max_tokens) ride along until their pass
        # ends; a pass stops as soon as every row in it is done.
        for row in rows:
            if not row.done:
                row.fail(RuntimeError(f"generation ended after {row.completion.completion_tokens} tokens"))

    def _rope_groups(self, rows: list[Row]) -> list[list[Row]]:
        """Rows grouped so that one set of rotary factors is right for all: at most two groups."""
        if self.rope_switch is None:
            return [rows] if rows else []
        long = [row for row in rows if len(row.job.prompt_ids) + len(row.answer_ids) > self.rope_switch]
        short = [row for row in rows if row not in long]
        return [group for group in (short, long) if group]


class Pass:
    """One onnxruntime-genai generator over some rows of a batch, fed each row's prompt + answer so far."""

    def __init__(self, batcher: Batcher, rows: list[Row]) -> None:
        self.batcher, self.rows = batcher, rows
        sequences = [row.job.prompt_ids + row.answer_ids for row in rows]
        self.width = max(len(ids) for ids in sequences)  # the padded length fed at the start
        self.steps = 0  # tokens generated in this pass
        # Prompts padded on the right with the pad token, as `Tokenizer.encode_batch` does;
        # onnxruntime-genai masks the padding, so each row decodes as it would alone.
        padded = np.full((len(rows), self.width), batcher.pad_token, dtype=np.int32)
        for i, sequence in enumerate(sequences):
            padded[i, : len(sequence)] = sequence
        decoding = rows[0].job.decoding  # the same batch_key for all rows
        tokens_left = max(row.job.decoding.max_tokens - row.completion.completion_tokens for row in rows)
        search_options: dict[str, Any] = {
            "batch_size": len(rows),
            "max_length": self.width + tokens_left,
            "do_sample": decoding.temperature > 0,
        }
        if decoding.temperature > 0:
            search_options.update(temperature=decoding.temperature, top_p=decoding.top_p, top_k=decoding.top_k)
        params = og.GeneratorParams(batcher.model)
        params.set_search_options(**search_options)
        self.generator = og.Generator(batcher.model, params)
        self.generator.append_tokens(padded)

    def live_rows(self) -> list[Row]:
        return [row for row in self.rows if not row.done]

    def crossing(self) -> bool:
        """Whether the next step would run past the LongRoPE switch with short-factor keys cached."""
        switch = self.batcher.rope_switch
        # The first step only picks from the prompt's logits; each later step runs the model on a
        # sequence of width + steps positions, and the runtime switches factors above `switch`.
        return switch is not None and self.width <= switch < self.width + self.steps and bool(self.live_rows())

    def step(self) -> bool:
        """Generate one token for every row; False when the pass is over."""
        if all(row.done for row in self.rows) or self.generator.is_done():
            return False
        self.generator.generate_next_token()
        self.steps += 1
        tokens = self.generator.get_next_tokens()
        now = time.monotonic()
        for row, token in zip(self.rows, tokens, strict=True):
            if not row.done:
                row.take(int(token))
            if not row.done:
                row.check_deadline(now)
        return True
