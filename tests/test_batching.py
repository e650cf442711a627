"""The phi3-onnx engine (phi3flow/onnx_engine.py): its batching policy, and a row ending on a stop sequence.

`choose_batch` is the policy as a function of the waiting jobs, tested without a model; the order
the batcher takes held-back jobs in and the stop sequence split across tokens run on the builtin
tiny model (its onnxruntime-genai model, tokenizer and token stream).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import onnxruntime_genai as og
import pytest

from phi3flow.onnx_engine import Batcher, Decoding, Job, Row, choose_batch

GREEDY = Decoding(max_tokens=10, temperature=0.0, top_p=1.0, top_k=0, stop=())
SAMPLED = replace(GREEDY, temperature=0.7)


def _job(prompt_tokens: int = 10, decoding: Decoding = GREEDY, **options) -> Job:
    return Job(list(range(1, prompt_tokens + 1)), replace(decoding, **options), deadline=None)


def _choose(waiting: list[Job], max_size: int = 8, context_length: int = 100,
            max_batch_tokens: int = 1000) -> tuple[list[Job], list[Job]]:
    return choose_batch(waiting, max_size, context_length, max_batch_tokens)


# ---- the policy, without a model ------------------------------------------------------------------

def test_jobs_with_other_sampling_options_wait_for_a_batch_of_their_own():
    greedy, sampled, greedy_too, sampled_too = _job(), _job(decoding=SAMPLED), _job(), _job(decoding=SAMPLED)
    hotter = _job(decoding=SAMPLED, temperature=0.9)
    batch, held_back = _choose([greedy, sampled, greedy_too, sampled_too, hotter])
    assert batch == [greedy, greedy_too]
    assert held_back == [sampled, sampled_too, hotter]
    assert _choose(held_back) == ([sampled, sampled_too], [hotter])


def test_greedy_jobs_share_a_batch_whatever_their_top_p_and_top_k():
    greedy = [_job(), _job(top_p=0.5), _job(top_k=3)]
    assert _choose(greedy) == (greedy, [])
    sampled, other_top_k = _job(decoding=SAMPLED), _job(decoding=SAMPLED, top_k=3)
    assert _choose([sampled, other_top_k]) == ([sampled], [other_top_k])


def test_the_token_budget_bounds_rows_times_padded_length():
    # Each job alone: 10 prompt + 10 answer tokens; three of them fill a 60-token budget.
    jobs = [_job() for _ in range(4)]
    assert _choose(jobs, max_batch_tokens=60) == (jobs[:3], jobs[3:])
    # A long prompt pads every row to its width: (30 + 10) x 2 rows > 60, so it waits, and a later
    # job that fits still joins.
    first, wide, small = _job(), _job(prompt_tokens=30), _job()
    assert _choose([first, wide, small], max_batch_tokens=60) == ([first, small], [wide])
    # The longest max_tokens pads every row too.
    first, long_answer = _job(), _job(max_tokens=25)
    assert _choose([first, long_answer], max_batch_tokens=60) == ([first], [long_answer])


def test_every_row_of_a_batch_fits_in_the_context():
    # Alone each fits in 100 tokens; together the rows are 80-token prompts + 50 answer tokens.
    long_prompt, long_answer, small = _job(prompt_tokens=80), _job(max_tokens=50), _job(max_tokens=15)
    assert _choose([long_prompt, long_answer, small]) == ([long_prompt, small], [long_answer])


def test_the_oldest_job_always_starts_the_batch():
    # Even a job that fills the budget alone: a single request may use the whole context.
    whole, other = _job(prompt_tokens=60, max_tokens=40), _job()
    assert _choose([whole, other], max_batch_tokens=100) == ([whole], [other])


def test_a_full_batch_holds_back_the_newest_jobs_in_arrival_order():
    jobs = [_job() for _ in range(5)]
    assert _choose(jobs, max_size=2) == (jobs[:2], jobs[2:])
    sampled, wide, greedy, late = _job(decoding=SAMPLED), _job(prompt_tokens=95), _job(), _job(decoding=SAMPLED)
    first = _job()
    batch, held_back = _choose([first, sampled, wide, greedy, late], max_size=2)
    assert batch == [first, greedy]
    assert held_back == [sampled, wide, late]  # skipped or left over, in the order they came


# ---- on the tiny model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_genai(tiny_onnx_fp32: Path) -> tuple[og.Model, og.Tokenizer, dict]:
    model = og.Model(str(tiny_onnx_fp32))
    return model, og.Tokenizer(model), json.loads((tiny_onnx_fp32 / "genai_config.json").read_text())


def test_held_back_jobs_go_before_jobs_that_came_later(tiny_genai):
    model, tokenizer, genai = tiny_genai
    batcher = Batcher(model, tokenizer, genai, max_batch_size=8, max_batch_tokens=8192, gather_s=0.05, burst_s=0.01)
    greedy, sampled = _job(max_tokens=3), _job(decoding=SAMPLED, max_tokens=3)
    greedy_too, later = _job(max_tokens=3), _job(max_tokens=3)
    batches: list[list[Job]] = []
    generate = batcher._generate

    def recorded(rows: list[Row]) -> None:
        batches.append([row.job for row in rows])
        if len(batches) == 1:
            batcher.submit([later])  # arrives while the first batch runs
        generate(rows)

    batcher._generate = recorded
    try:
        batcher.submit([greedy, sampled, greedy_too])
        answers = [job.wait() for job in (greedy, sampled, greedy_too, later)]
    finally:
        batcher.stop()
    # The sampled job, held back by the first batch, runs before `later`, which could not join it.
    assert batches == [[greedy, greedy_too], [sampled], [later]]
    assert all(answer.completion_tokens >= 1 for answer in answers)
    assert batcher.max_batch_tokens == 8192


def test_a_batch_may_always_hold_one_whole_context(tiny_genai):
    model, tokenizer, genai = tiny_genai
    batcher = Batcher(model, tokenizer, genai, max_batch_size=8, max_batch_tokens=1, gather_s=0.05, burst_s=0.01)
    batcher.stop()
    assert batcher.max_batch_tokens == batcher.context_length == genai["model"]["context_length"]


def _pieces(tokenizer: og.Tokenizer, ids: list[int]) -> list[str]:
    stream = tokenizer.create_stream()
    return [stream.decode(token) for token in ids]


def _run_row(tokenizer: og.Tokenizer, ids: list[int], decoding: Decoding) -> tuple[Row, list[str]]:
    """A streaming job's row fed ids until it ends: the row and the text of each event."""
    job = Job(ids[:1], decoding, deadline=None, streaming=True)
    row = Row(job, tokenizer.create_stream(), eos_tokens=set())
    for token in ids:
        row.take(token)
        if row.done:
            break
    events = []
    while not job.events.empty():
        piece, _, _ = job.events.get()
        events.append(piece)
    return row, events


ANSWER = "Hello world, the answer is here."  # the tiny tokenizer: " ", "an", "sw", "er", ...


def test_a_stop_sequence_split_across_two_tokens_is_found_and_never_sent(tiny_genai):
    _, tokenizer, _ = tiny_genai
    ids = [int(i) for i in tokenizer.encode(ANSWER)]
    pieces = _pieces(tokenizer, ids)
    text = "".join(pieces).lstrip()
    # The first two tokens (after the first) that both decode to 2+ characters: a stop made of the
    # end of one and the start of the next ("answ").
    i = next(i for i in range(1, len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    at = text.find(stop)
    assert at == len("".join(pieces[: i + 1]).lstrip()) - 2  # found first where the two tokens meet

    row, events = _run_row(tokenizer, ids, replace(GREEDY, max_tokens=len(ids), stop=(stop,)))
    assert row.done and row.completion.completion_tokens == i + 2  # ended by the token that completed it
    assert row.completion.text == text[:at]
    assert row.completion.finish_reason == "stop"
    assert len(events) == i + 2  # one event per token
    assert "".join(events) == text[:at]  # the stop's first half, held back at token i, was never sent
    assert events[i] == pieces[i][:-2]


def test_text_held_back_for_a_stop_that_never_completes_is_sent(tiny_genai):
    _, tokenizer, _ = tiny_genai
    ids = [int(i) for i in tokenizer.encode(ANSWER)]
    text = "".join(_pieces(tokenizer, ids)).lstrip()
    # The answer's last character could begin this stop: it waits, and the last event, the answer's
    # end, carries it.
    row, events = _run_row(tokenizer, ids, replace(GREEDY, max_tokens=len(ids), stop=(text[-1] + "\x00",)))
    assert row.completion.finish_reason == "length"
    assert row.completion.text == text
    assert "".join(events) == text and events[-1].endswith(text[-1])
