"""The OpenAI-compatible server of `mlflow run . -e serve`: one MLflow model behind OpenAI's chat API.

Routes: POST /v1/chat/completions (OpenAI's request, streamed as server-sent events when asked),
GET /v1/models, GET /health (200 once the model is loaded, 503 before), and POST /invocations
(MLflow's scoring-server contract, parsed by MLflow's own scoring_server functions).

The model is loaded once, on a thread, while the server already answers /health with 503. Each
generation runs on a thread of its own and is read by the event loop piece by piece: a client that
disconnects, or a request that runs past its timeout, stops reading, which closes the model's
stream; the `phi3-onnx` model then drops the request's row from its batch at the next decode step.

Every error is OpenAI's `{"error": {"message", "type", "param", "code"}}` with a clean message: no
stack trace, file path or echo of a large input.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import mlflow
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, ErrorCode
from mlflow.pyfunc import scoring_server
from mlflow.store.artifact.utils.models import get_model_name_and_version
from starlette.exceptions import HTTPException

from phi3flow import settings
from phi3flow.errors import UserError

log = logging.getLogger("phi3flow.serve")

ROLES = ("system", "user", "assistant")
# The OpenAI request fields this server honours; any other is refused, never silently ignored.
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
               "stop", "seed", "n", "stream", "stream_options", "user"}
MAX_ECHO_CHARS = 100  # bad input is echoed in an error message up to this many characters
MAX_MESSAGE_CHARS = 500  # an error message from MLflow or the model is cut to this length
ERROR_TYPES = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 400: "invalid_request_error"}


class ApiError(Exception):
    """A request this server refuses, answered with status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error_body(error.status, error.message, error.param, error.code), status_code=error.status)


def _shown(value: Any) -> str:
    """repr of a bad value for an error message, cut to MAX_ECHO_CHARS."""
    text = repr(value)
    return text if len(text) <= MAX_ECHO_CHARS else f"{text[:MAX_ECHO_CHARS]}... ({len(text)} characters)"


def clean_message(error: MlflowException) -> str:
    """MLflow's message without the input it echoes: the scoring server's 'Failed to predict data
    '<the whole input>'' prefix and its JSON parser's 'Input: <the whole body>' tail."""
    message = error.message
    if message.startswith("Failed to predict data") and "\nError: " in message:
        message = message.split("\nError: ", 1)[1]
    message = message.split("\nInput: ", 1)[0].strip()
    return message if len(message) <= MAX_MESSAGE_CHARS else f"{message[:MAX_MESSAGE_CHARS]}... (cut)"


def _model_error(error: Exception) -> ApiError:
    """What a model or MLflow raised, as a clean answer; anything unexpected is logged, not shown."""
    if isinstance(error, MlflowException):
        status = 504 if error.error_code == ErrorCode.Name(DEADLINE_EXCEEDED) else error.get_http_status_code()
        return ApiError(status, clean_message(error))
    log.error("the model failed", exc_info=error)
    return ApiError(500, "the model failed to answer; the server log has the details")


# ---- the served model ------------------------------------------------------------------------


@dataclass
class Piece:
    """A part of an answer: its new text and, on the last piece, why it ended and the token counts."""

    text: str
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


@dataclass
class Served:
    model_uri: str
    model_id: str  # listed by /v1/models; also the name the `model` field of a request may give
    names: frozenset[str]  # every `model` value that means this model
    created: int
    pyfunc: mlflow.pyfunc.PyFuncModel
    chat: bool  # takes chat messages (not the prompt interface of phi3-onnx)
    token_stream: bool  # predict_stream yields one chunk per token (phi3-onnx)
    context_length: int
    max_prompt_chars: int  # more characters than this cannot fit in the context
    markers: tuple[str, ...]  # control markers the model would read as control: refused in content

    def pieces(self, request: dict[str, Any]) -> Iterator[Piece]:
        """The answer to a validated chat request, piece by piece (blocking: run on a thread)."""
        if self.token_stream:
            for chunk in self.pyfunc.predict_stream(request):
                choice = chunk["choices"][0]
                yield Piece(choice["delta"].get("content") or "", choice["finish_reason"], chunk.get("usage"))
            return
        # MLflow's transformers flavor has no predict_stream (3.17): the answer is one piece.
        answer = self.pyfunc.predict(request)[0]
        choice = answer["choices"][0]
        yield Piece(choice["message"]["content"], choice["finish_reason"], answer["usage"])


def _names(model_uri: str) -> tuple[str, set[str], int]:
    """The served model's id (`<registered name>/<version>`), the names a request may use, its creation time."""
    if model_uri.startswith("models:/"):
        client = mlflow.MlflowClient()
        found = get_model_name_and_version(client, model_uri)
        if len(found) == 2:
            name, version = found
            created = client.get_model_version(name, version).creation_timestamp // 1000
            return f"{name}/{version}", {f"{name}/{version}", name, model_uri}, created
    return model_uri, {model_uri}, int(time.time())


def load_served(model_uri: str) -> Served:
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    model_id, names, created = _names(model_uri)
    common = {"model_uri": model_uri, "model_id": model_id, "names": frozenset(names), "created": created,
              "pyfunc": pyfunc}
    if "transformers" in pyfunc.metadata.flavors:
        pipeline = pyfunc._model_impl.pipeline  # MLflow's transformers wrapper has no public accessor
        tokenizer = pipeline.tokenizer
        context = int(getattr(pipeline.model.config, "max_position_embeddings", tokenizer.model_max_length))
        # MLflow renders the chat template and tokenizes the result with special tokens matched,
        # so a marker typed in a message would become a control token: refused here instead.
        markers = tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
        return Served(**common, chat=True, token_stream=False, context_length=context,
                      max_prompt_chars=context * max(map(len, tokenizer.get_vocab())), markers=markers)
    model = pyfunc.unwrap_python_model()  # phi3-onnx: it encodes message content as plain text itself
    return Served(**common, chat=model.interface == "chat", token_stream=True, context_length=model.context_length,
                  max_prompt_chars=model.max_prompt_chars, markers=())


# ---- request parsing ---------------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, kind: type, low: float, high: float) -> Any:
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {_shown(value)}", name)
    if kind is int and float(value) != int(value):
        raise ApiError(400, f"'{name}' must be a whole number, got {_shown(value)}", name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {_shown(value)}", name)
    return kind(value)


def _content(message: dict[str, Any], i: int) -> str:
    """A message's text: a string, or OpenAI's list of text parts."""
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts, got "
                            f"{type(content).__name__}", "messages")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError as error:  # a lone surrogate: valid in JSON, not in Unicode text
        raise ApiError(400, f"messages[{i}].content is not valid Unicode: a lone surrogate at character {error.start}",
                       "messages") from None
    return content


def _messages(value: Any, served: Served) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object with 'role' and 'content'", "messages")
        if extra := sorted(set(message) - {"role", "content"}):
            raise ApiError(400, f"messages[{i}] has unsupported field(s) {', '.join(map(_shown, extra[:5]))}; a "
                                "message takes role and content", "messages")
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_shown(role)}", "messages")
        content = _content(message, i)
        if marker := min((m for m in served.markers if m in content), key=content.index, default=None):
            raise ApiError(400, f"messages[{i}].content holds {marker!r}, a control marker of this model that it "
                                "cannot take as text", "messages")
        messages.append({"role": role, "content": content})
    chars = sum(len(m["content"]) for m in messages)
    if chars > served.max_prompt_chars:
        raise ApiError(400, f"the messages hold {chars} characters but the model's context is "
                            f"{served.context_length} tokens,"
                            f" at most {served.max_prompt_chars} characters", "messages")
    return messages


@dataclass
class ChatRequest:
    model_input: dict[str, Any]  # what the MLflow model is given
    stream: bool
    include_usage: bool


def chat_request(body: dict[str, Any], served: Served) -> ChatRequest:
    """OpenAI's chat request, checked field by field, as the model's llm/v1/chat input."""
    if unknown := sorted(set(body) - CHAT_FIELDS):
        raise ApiError(400, f"unsupported field(s) {', '.join(map(_shown, unknown[:10]))}; this server takes "
                            f"{', '.join(sorted(CHAT_FIELDS))}", unknown[0])
    if "model" in body and body["model"] not in served.names:
        raise ApiError(404, f"the model {_shown(body['model'])} does not exist; this server serves {served.model_id!r}",
                       "model", "model_not_found")
    if not served.chat:
        raise ApiError(400, "this model takes prompts, not chat messages: send them to /invocations")
    given = {k: v for k, v in body.items() if v is not None}  # OpenAI's clients may send null for "not set"
    model_input: dict[str, Any] = {"messages": _messages(given.get("messages"), served)}
    lengths = {name: _number(given, name, int, 1, served.context_length)
               for name in ("max_tokens", "max_completion_tokens") if name in given}
    if len(set(lengths.values())) > 1:
        raise ApiError(400, "'max_tokens' and 'max_completion_tokens' differ; send one of them", "max_tokens")
    if lengths:
        model_input["max_tokens"] = next(iter(lengths.values()))
    if "temperature" in given:
        model_input["temperature"] = _number(given, "temperature", float, 0, 2)
    if "top_p" in given:
        model_input["top_p"] = _number(given, "top_p", float, 0, 1)
        if model_input["top_p"] == 0:
            raise ApiError(400, "'top_p' must be above 0", "top_p")
    if "stop" in given:
        stop = [given["stop"]] if isinstance(given["stop"], str) else given["stop"]
        if not (isinstance(stop, list) and 0 < len(stop) <= settings.SERVE_MAX_STOP
                and all(isinstance(s, str) and s for s in stop)):
            raise ApiError(400, "'stop' must be a non-empty string or a list of 1 to "
                                f"{settings.SERVE_MAX_STOP} of them", "stop")
        model_input["stop"] = stop
    if "seed" in given:
        _number(given, "seed", int, -(2**63), 2**63 - 1)
        # Greedy answers do not depend on a seed; neither model can seed its sampler.
        if model_input.get("temperature", 0) > 0:
            raise ApiError(400, "'seed' is not supported with sampling (temperature > 0): this model cannot "
                                "seed its sampler", "seed")
    if given.get("n", 1) != 1 or isinstance(given.get("n"), bool):
        raise ApiError(400, "only n=1 is supported", "n")
    if "user" in given and not isinstance(given["user"], str):
        raise ApiError(400, "'user' must be a string", "user")
    stream = given.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"'stream' must be true or false, got {_shown(stream)}", "stream")
    options = given.get("stream_options", {})
    if "stream_options" in given and not stream:
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", "stream_options")
    if (not isinstance(options, dict) or set(options) - {"include_usage"}
            or not isinstance(options.get("include_usage", False), bool)):
        raise ApiError(400, "'stream_options' must be an object with one optional boolean, 'include_usage'",
                       "stream_options")
    return ChatRequest(model_input, stream, options.get("include_usage", False))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past limit bytes: by its Content-Length before reading
    anything, and while reading (a chunked body declares no length)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit}",
                       code="request_too_large")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, the most this server takes",
                           code="request_too_large")
        parts.append(part)
    return b"".join(parts)


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes, content_type: str) -> dict[str, Any]:
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "the body must be JSON with Content-Type: application/json, got "
                            f"{_shown(content_type or None)}", code="unsupported_media_type")
    try:
        parsed = json.loads(body, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not valid UTF-8") from None
    except json.JSONDecodeError as error:
        raise ApiError(400,
                       f"the body is not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except ValueError as error:
        raise ApiError(400, f"the body is not valid JSON: {error}") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON here: it is nested too deeply") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, f"the body must be a JSON object, got a {type(parsed).__name__}")
    return parsed


# ---- generation ----------------------------------------------------------------------------------


class Generation:
    """A model call on a thread of its own, read by the event loop as an async stream of pieces.

    The model APIs block, so they cannot run on the event loop. A dedicated thread (not the loop's
    shared pool, whose size would cap concurrent requests) gives each piece to the loop as soon as
    it exists; stop() makes the thread close the model's stream at the next piece, which cancels
    the request in phi3-onnx's batcher within one decode step.
    """

    def __init__(self, served: Served, model_input: dict[str, Any]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stopped = threading.Event()
        self.pieces = 0  # read from the model so far
        threading.Thread(target=self._run, args=(served, model_input), name="phi3-serve-request", daemon=True).start()

    def _put(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: the server is gone
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    def _run(self, served: Served, model_input: dict[str, Any]) -> None:
        try:
            with contextlib.closing(served.pieces(model_input)) as pieces:
                for piece in pieces:
                    self.pieces += 1
                    self._put(piece)
                    if self.stopped.is_set():
                        return
            self._put(None)
        except Exception as error:
            self._put(error)

    def stop(self) -> None:
        self.stopped.set()

    async def __aiter__(self) -> AsyncIterator[Piece]:
        while (item := await self.queue.get()) is not None:
            if isinstance(item, Exception):
                raise _model_error(item)
            yield item


def _chunk(served: Served, chunk_id: str, created: int, delta: dict[str, str], finish_reason: str | None,
           **extra: Any) -> str:
    choices = [{"index": 0, "delta": delta, "finish_reason": finish_reason}] if delta or finish_reason else []
    body = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": served.model_id,
            "choices": choices, **extra}
    return f"data: {json.dumps(body)}\n\n"


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client has gone (the body has been read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- the app ---------------------------------------------------------------------------------------


class AccessLog:
    """One log line per request: client, method, path, status, seconds, and what a chat request
    produced (token counts, how it ended). Never the body, the prompt or the Authorization header."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), ["-"]
        state = scope.setdefault("state", {})

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            client = "{}:{}".format(*scope["client"]) if scope.get("client") else "-"
            log.info("%s %s %s %s %.3fs %s", client, scope["method"], scope["path"], status[0],
                     time.monotonic() - start, state.get("outcome", ""))


def create_app(model_uri: str) -> FastAPI:
    api_key = os.environ.get(settings.SERVE_API_KEY_ENV) or None
    max_body = int(os.environ.get(settings.SERVE_MAX_BODY_BYTES_ENV) or settings.SERVE_MAX_BODY_BYTES)
    timeout = float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())
    loaded: dict[str, Any] = {}  # "served" once loaded; "error" if loading failed

    def load() -> None:
        try:
            loaded["served"] = load_served(model_uri)
            log.info("loaded %s as %s", model_uri, loaded["served"].model_id)
        except Exception as error:  # reported by serve() as one line
            loaded["error"] = error
            app.state.on_load_failure()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=load, name="phi3-serve-load", daemon=True).start()
        yield

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loaded = loaded
    app.state.on_load_failure = lambda: None

    def ready(request: Request) -> Served:
        """The model, after the key check: 401 and 503 come before anything is read."""
        if api_key is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                raise ApiError(401, "a valid API key is required: send it as 'Authorization: Bearer <key>' "
                                    f"({settings.SERVE_API_KEY_ENV} on the server)", code="invalid_api_key")
        if "served" not in loaded:
            raise ApiError(503, "the model is still loading; retry shortly")
        return loaded["served"]

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            return _error_response(ApiError(404, f"there is no route {request.method} {request.url.path}"))
        return _error_response(ApiError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=error)
        return _error_response(ApiError(500, "internal server error; the server log has the details"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if "served" not in loaded:
            raise ApiError(503, "the model is still loading")
        return JSONResponse({"status": "ok", "model": loaded["served"].model_id})

    def model_card(served: Served) -> dict[str, Any]:
        return {"id": served.model_id, "object": "model", "created": served.created, "owned_by": "phi3flow"}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card(ready(request))]})

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> JSONResponse:
        served = ready(request)
        if model not in served.names:
            raise ApiError(404, f"the model {_shown(model)} does not exist; this server serves {served.model_id!r}",
                           "model", "model_not_found")
        return JSONResponse(model_card(served))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        served = ready(request)
        chat = chat_request(parse_json(await read_body(request, max_body), request.headers.get("content-type", "")),
                            served)
        generation = Generation(served, chat.model_input)
        pieces = aiter(generation)
        deadline = asyncio.get_running_loop().time() + timeout
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not chat.stream:
            return await _answer(request, served, generation, pieces, deadline, chunk_id, created)
        try:  # the first piece before the first byte: a refused request still gets its status
            async with asyncio.timeout_at(deadline):
                first = await anext(pieces)
        except BaseException as error:
            generation.stop()
            if isinstance(error, TimeoutError):
                raise _timeout(timeout) from None
            raise
        return StreamingResponse(_events(request, served, chat, generation, pieces, first, deadline, chunk_id, created),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _answer(request: Request, served: Served, generation: Generation, pieces: AsyncIterator[Piece],
                      deadline: float, chunk_id: str, created: int) -> Response:
        async def collect() -> list[Piece]:
            return [piece async for piece in pieces]

        answer, left = asyncio.ensure_future(collect()), asyncio.ensure_future(_wait_disconnect(request))
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.wait({answer, left}, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            request.state.outcome = f"timeout after {generation.pieces} pieces"
            raise _timeout(timeout) from None
        finally:
            generation.stop()
            left.cancel()
            if not answer.done():
                answer.cancel()
        if not answer.done():  # the client has gone: nobody reads the answer
            request.state.outcome = f"client disconnected after {generation.pieces} pieces"
            return Response(status_code=499)
        got = answer.result()
        last = got[-1]
        request.state.outcome = _outcome(last)
        return JSONResponse({
            "id": chunk_id, "object": "chat.completion", "created": created, "model": served.model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(p.text for p in got)},
                         "finish_reason": last.finish_reason}],
            "usage": last.usage,
        })

    async def _events(request: Request, served: Served, chat: ChatRequest, generation: Generation,
                      pieces: AsyncIterator[Piece], first: Piece, deadline: float, chunk_id: str,
                      created: int) -> AsyncIterator[str]:
        """Server-sent events: chat.completion.chunk objects, then `data: [DONE]`. Starlette cancels
        this generator when the client disconnects; the finally clause then stops the generation."""
        usage_field = {"usage": None} if chat.include_usage else {}
        piece, delta = first, {"role": "assistant", "content": first.text}
        request.state.outcome = "client disconnected"
        try:
            while True:
                yield _chunk(served, chunk_id, created, delta, piece.finish_reason, **usage_field)
                if piece.finish_reason is not None:
                    break
                try:
                    async with asyncio.timeout_at(deadline):
                        piece = await anext(pieces)
                except TimeoutError:
                    error = _timeout(timeout)
                    request.state.outcome = f"timeout after {generation.pieces} pieces"
                    yield f"data: {json.dumps(error_body(error.status, error.message))}\n\n"
                    return
                except ApiError as error:
                    request.state.outcome = f"error {error.status}"
                    yield f"data: {json.dumps(error_body(error.status, error.message))}\n\n"
                    return
                delta = {"content": piece.text}
            if chat.include_usage:
                yield _chunk(served, chunk_id, created, {}, None, usage=piece.usage)
            yield "data: [DONE]\n\n"
            request.state.outcome = _outcome(piece)
        finally:
            generation.stop()
            if request.state.outcome == "client disconnected":
                request.state.outcome = f"client disconnected after {generation.pieces} pieces"

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        """MLflow's scoring-server contract, parsed by MLflow's own scoring_server.invocations."""
        served = ready(request)
        content_type = request.headers.get("content-type", "")
        body = await read_body(request, max_body)
        # JSON is parsed here, within this server's bounds (depth, constants); MLflow's parser
        # takes the parsed object as it is. CSV and Parquet go to MLflow as bytes.
        is_json = content_type.split(";")[0].strip().lower() == "application/json"
        data: bytes | dict = parse_json(body, content_type) if is_json else body
        if not content_type:
            raise ApiError(415, "a Content-Type is required: application/json, text/csv or "
                                "application/vnd.apache.parquet", code="unsupported_media_type")
        work = asyncio.to_thread(scoring_server.invocations, data, content_type, served.pyfunc,
                                 served.pyfunc.metadata.get_input_schema())
        try:
            result = await asyncio.wait_for(work, timeout)
        except TimeoutError:
            raise _timeout(timeout) from None
        except Exception as error:
            problem = _model_error(error)
            # MLflow's clients read error_code and message at the top level: both shapes are given.
            code = error.error_code if isinstance(error, MlflowException) else "INTERNAL_ERROR"
            return JSONResponse({**error_body(problem.status, problem.message), "error_code": code,
                                 "message": problem.message}, status_code=problem.status)
        if result.status != 200:
            return _error_response(ApiError(result.status, result.response[:MAX_MESSAGE_CHARS],
                                            code="unsupported_media_type" if result.status == 415 else None))
        return Response(content=result.response, status_code=200, media_type=result.mimetype)

    return app


def _outcome(last: Piece) -> str:
    usage = last.usage or {}
    return (f"prompt_tokens={usage.get('prompt_tokens')} completion_tokens={usage.get('completion_tokens')} "
            f"finish={last.finish_reason}")


def _timeout(seconds: float) -> ApiError:
    return ApiError(504, f"the answer did not finish within the request timeout of {seconds:g} s"
                         f" ({MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name}): ask for fewer max_tokens or "
                         "raise the timeout")


def serve(model_uri: str, host: str, port: int) -> None:
    """Run the server until SIGTERM or Ctrl-C; a model that cannot be loaded is a UserError."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The phi3-onnx model stops a generation just before this timeout (and says why) on its own.
    os.environ.setdefault(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.name, str(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()))
    app = create_app(model_uri)
    config = uvicorn.Config(AccessLog(app), host=host, port=port, access_log=False, log_config=None,
                            timeout_graceful_shutdown=settings.SERVE_SHUTDOWN_GRACE_S)
    server = uvicorn.Server(config)

    def on_load_failure() -> None:
        server.should_exit = True

    app.state.on_load_failure = on_load_failure
    # uvicorn shuts down gracefully on SIGTERM (stops accepting, lets in-flight requests finish for
    # SERVE_SHUTDOWN_GRACE_S, then cancels them), then raises the signal again with the handler
    # installed before it: a no-op here, so a clean shutdown exits with status 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    log.info("loading %s; serving on http://%s:%s", model_uri, host, port)
    server.run()
    if error := app.state.loaded.get("error"):
        raise UserError(f"cannot load {model_uri}: "
                        f"{clean_message(error) if isinstance(error, MlflowException) else error}")
