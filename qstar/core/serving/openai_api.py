"""The OpenAI-compatible HTTP API (FastAPI; `pip install 'qstar-lm[serve]'`): /v1/chat/completions, /v1/completions,
/v1/models, /health.

qstar's additions to the OpenAI request: `reasoning` (return each token's thought as `reasoning_content`, one thought
a line, as vLLM returns a reasoning model's), `thoughts` (false: generate without thinking) and `top_k`. With
reasoning, each choice carries a `qstar` object: the thoughts one per emitted token and the mixing head's weight
of each. Usage counts the thoughts' tokens apart (`usage.thought_tokens`), not in completion_tokens.
Every error is the OpenAI error shape {"error": {"message", "type", "param", "code"}}: a 4xx status for a request
the server refuses, a 5xx typed server_error for a failure of its own.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from qstar.core.generate import Sampling
from qstar.core.model import QStarModel
from qstar.core.serving.batcher import MAX_TOP_LOGPROBS, Batcher, Busy, Event, Job, Stopped

FINISH = {"eos": "stop", "stop": "stop", "max_tokens": "length", "context": "length"}
"""qstar's stop reasons as OpenAI's finish_reason."""
RETRY_AFTER_S = 1
MAX_STOPS, MAX_STOP_CHARS = 4, 256
"""Stop strings a request may send (OpenAI's limit) and their longest; each token's stop check costs as much."""
MAX_LOGIT_BIAS = 300
"""Entries of a request's logit_bias."""
MIN_BODY_BYTES = 1 << 20
JSON_BYTES_PER_CHAR = 12
"""The most bytes a prompt's character takes in JSON (an escaped character outside the BMP: two \\uXXXX)."""
UNBOUNDED_BODY_BYTES = 64 << 20
"""The body limit of a model whose context is not known."""


class Strict(BaseModel):
    """Unknown fields and wrong types are errors, not guesses."""

    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


Penalty = Annotated[float | None, Field(ge=-2, le=2)]


class Generation(Strict):
    """What both endpoints take. Accepted and ignored, as common clients send them: user, metadata, store,
    service_tier, safety_identifier, prompt_cache_key (docs/GUIDE.md#serving)."""

    model: str
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float | None, Field(gt=0, le=1)] = None
    top_k: Annotated[int | None, Field(ge=1)] = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = None
    frequency_penalty: Penalty = None
    logit_bias: (
        Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=MAX_LOGIT_BIAS)] | None
    ) = None
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    reasoning: bool | None = None
    thoughts: bool = True

    @field_validator("stop")
    @classmethod
    def bounded(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in strings):
            raise ValueError(f"at most {MAX_STOPS} stop strings of at most {MAX_STOP_CHARS} characters each")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias and not all(key.isascii() and key.isdigit() for key in bias):
            raise ValueError("the keys must be token ids (as strings of digits)")
        return bias

    def sampling(self, max_tokens: int) -> Sampling:
        """How the request's tokens are drawn."""
        bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        penalties = self.presence_penalty or 0.0, self.frequency_penalty or 0.0
        return Sampling(max_tokens, self.temperature, self.top_k, self.top_p, self.thoughts, *penalties, bias)


class ChatRequest(Generation):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None
    parallel_tool_calls: bool | None = None
    """Accepted and ignored: no tools are offered."""


class CompletionRequest(Generation):
    prompt: str | Annotated[list[int], Field(min_length=1)]
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None
    echo: Literal[False] = False


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(status)
    kind = "server_error" if status >= 500 else kind or "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    return JSONResponse(body, status_code=status, headers=headers)


class Refused(Exception):
    """A request the server will not run: its status and message."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def response(self) -> JSONResponse:
        return error(self.status, str(self), self.param, self.code)


def stopped(why: str) -> Refused:
    return Refused(503, f"the generation worker has stopped ({why}): restart the server", None, "worker_stopped")


class Reply:
    """One request's rows as they come: text, thoughts, weights and log-probabilities per choice."""

    def __init__(self, n: int) -> None:
        self.texts, self.stops = [""] * n, [""] * n
        self.thoughts: list[list[str]] = [[] for _ in range(n)]
        self.weights: list[list[float]] = [[] for _ in range(n)]
        self.logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.tokens = self.thought_tokens = 0


Body = TypeVar("Body", ChatRequest, CompletionRequest)


class Server:
    """The model's batcher and the routes over it."""

    def __init__(self, model: QStarModel, name: str, batcher: Batcher, reasoning: bool, api_key: str | None) -> None:
        self.model, self.name, self.batcher = model, name, batcher
        self.reasoning, self.api_key = reasoning, api_key
        self.created = int(time.time())
        context, tokenizer = model.config.context, model.tokenizer
        self.max_chars = None
        """The most characters a prompt's text can have and fit the context: its tokens times the longest token's."""
        if context is not None and tokenizer is not None:
            self.max_chars = context * max(map(len, tokenizer.get_vocab()), default=1)
        self.max_body = (
            UNBOUNDED_BODY_BYTES if self.max_chars is None else MIN_BODY_BYTES + JSON_BYTES_PER_CHAR * self.max_chars
        )

    def check_key(self, request: Request) -> None:
        """The API key, compared in constant time (a timing attack learns nothing of it)."""
        given = request.headers.get("authorization", "").encode("latin-1")
        if self.api_key is not None and not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            raise Refused(
                401, "a valid API key is needed: send the header Authorization: Bearer KEY", None, "invalid_api_key"
            )

    async def parse(self, request: Request, kind: type[Body]) -> Body:
        """The request's body as `kind`: read no further than `max_body` bytes (413), parsed and validated off the
        event loop, so that no request stalls the others' streams."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise Refused(
                    413, f"the request body is over {self.max_body} bytes, more than the model's context can take"
                )
            chunks.append(chunk)
        try:
            return await asyncio.to_thread(kind.model_validate_json, b"".join(chunks))
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            where = ".".join(str(x) for x in first.get("loc", ()))
            message = first.get("msg", "invalid").removeprefix("Value error, ")
            raise Refused(400, f"{where or 'body'}: {message}", where or None, "invalid_request") from None

    def check_worker(self) -> None:
        """503 once the worker thread has ended: no request can be answered any more."""
        if self.batcher.dead:
            raise stopped(self.batcher.dead)

    def prompt(self, body: ChatRequest | CompletionRequest) -> list[int]:
        """The prompt's ids; its length is checked first, then it is templated and tokenized (off the event loop:
        `respond`)."""
        if body.model != self.name:
            raise Refused(
                404,
                f"the model {body.model!r} does not exist; this server has {self.name!r}",
                "model",
                "model_not_found",
            )
        tokenizer = self.model.tokenizer
        if tokenizer is None and (isinstance(body, ChatRequest) or isinstance(body.prompt, str)):
            raise Refused(400, f"{self.name} has no tokenizer: send /v1/completions a prompt of token ids", "prompt")
        self.check_length(body)
        if isinstance(body, ChatRequest):
            try:
                ids = self.model.chat_ids([{"role": m.role, "content": m.text()} for m in body.messages])
            except ValueError as err:  # the chat template's own refusal
                raise Refused(400, str(err), "messages") from None
        elif isinstance(body.prompt, str):
            ids = list(tokenizer(body.prompt)["input_ids"]) if body.prompt.strip() else []
        else:
            ids = list(body.prompt)
        vocab = self.model.config.vocab_size
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise Refused(400, f"the prompt must be non-empty text or token ids in [0, {vocab})", "prompt")
        return ids

    def check_length(self, body: ChatRequest | CompletionRequest) -> None:
        """A prompt text longer than the context can hold, refused before it is templated or tokenized."""
        if isinstance(body, ChatRequest):
            chars = sum(len(m.text()) for m in body.messages)
        elif isinstance(body.prompt, str):
            chars = len(body.prompt)
        else:
            return  # token ids: their count is checked against the context (`job`)
        if self.max_chars is not None and chars > self.max_chars:
            raise Refused(
                400,
                f"the prompt has {chars} characters, more than the model's context of {self.model.config.context} "
                f"tokens can hold ({self.max_chars}): shorten it",
                "messages" if isinstance(body, ChatRequest) else "prompt",
                "context_length_exceeded",
            )

    def job(self, body: ChatRequest | CompletionRequest, ids: list[int], deliver: Callable[[Event], None]) -> Job:
        context = self.model.config.context
        room = None if context is None else context - len(ids)
        if room is not None and room < 1:
            raise Refused(
                400,
                f"the prompt has {len(ids)} tokens; the model's context is {context}: shorten it",
                "messages",
                "context_length_exceeded",
            )
        asked = body.max_completion_tokens if isinstance(body, ChatRequest) else None
        asked = asked or body.max_tokens
        if asked is not None and room is not None and asked > room:
            raise Refused(
                400,
                f"max_tokens={asked} does not fit: the prompt takes {len(ids)} of the context's {context} tokens",
                "max_tokens",
                "context_length_exceeded",
            )
        max_tokens = asked or room or 256
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if isinstance(body, ChatRequest):
            top = (body.top_logprobs or 0) if body.logprobs else None
        else:
            top = body.logprobs
        sampling = body.sampling(max_tokens)
        try:
            sampling.check_vocabulary(self.model.config.vocab_size)
        except ValueError as err:
            raise Refused(400, str(err), "logit_bias") from None
        return Job(ids, sampling, deliver, body.n, body.seed, tuple(s for s in stop if s), top)


def logprob_entry(model: QStarModel, token: int, logprob: float) -> dict[str, Any]:
    piece = model.decode([token], special=True)
    return {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}


def record(model: QStarModel, reply: Reply, event: Event) -> None:
    """Add an event to the reply (the thought decoded, the log-probabilities in OpenAI's shape)."""
    i = event.choice
    reply.texts[i] += event.text
    reply.tokens += event.token is not None
    if event.thought is not None:
        reply.thoughts[i].append(model.decode(event.thought))
        reply.thought_tokens += len(event.thought)
    if event.weight is not None:
        reply.weights[i].append(event.weight)
    if event.logprob is not None:
        entry = logprob_entry(model, event.logprob.token, event.logprob.logprob)
        entry["top_logprobs"] = [logprob_entry(model, t, lp) for t, lp in event.logprob.top]
        reply.logprobs[i].append(entry)
    reply.stops[i] = event.stop or reply.stops[i]


def build_app(server: Server) -> FastAPI:
    app = FastAPI(title="qstar", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(Refused)
    async def refused(request: Request, err: Refused) -> JSONResponse:
        return err.response()

    @app.exception_handler(HTTPException)
    async def http(request: Request, err: HTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> JSONResponse:
        return error(500, f"the server failed: {type(err).__name__}: {err}", None, "internal_error")

    @app.get("/health")
    async def health() -> Any:
        if server.batcher.dead:
            return stopped(server.batcher.dead).response()
        return {"status": "ok", "active_rows": server.batcher.active, "waiting": server.batcher.waiting.qsize()}

    keyed = [Depends(server.check_key)]

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> dict[str, Any]:
        card = {"id": server.name, "object": "model", "created": server.created, "owned_by": "qstar"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat(request: Request) -> Any:
        return await respond(server, await server.parse(request, ChatRequest), request, "chat.completion")

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(request: Request) -> Any:
        return await respond(server, await server.parse(request, CompletionRequest), request, "text_completion")

    return app


async def respond(server: Server, body: ChatRequest | CompletionRequest, request: Request, kind: str) -> Any:
    """Queue the request and answer it whole or as server-sent events."""
    server.check_worker()
    ids = await asyncio.to_thread(server.prompt, body)
    loop, events = asyncio.get_running_loop(), asyncio.Queue[Event]()

    def deliver(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop is gone
            job.cancelled.set()

    reply = Reply(body.n)
    job = server.job(body, ids, deliver)
    try:
        server.batcher.submit(job)
    except Busy:
        raise Refused(
            429, f"the server is busy ({server.batcher.waiting.maxsize} requests wait): retry later", None, "busy"
        ) from None
    except Stopped as err:
        raise stopped(str(err)) from None
    except ValueError as err:
        raise Refused(400, str(err), "n") from None
    reasoning = server.reasoning if body.reasoning is None else body.reasoning
    shape = Shape(server, body, kind, reasoning, len(ids))
    if body.stream:
        return StreamingResponse(stream(shape, job, events, reply), media_type="text/event-stream")
    try:
        done = 0
        while done < body.n:
            event = await next_event(server, events)
            if event is None:
                if await request.is_disconnected():
                    return None
                continue
            if event.error:
                raise Refused(500, event.error, None, "generation_failed")
            record(server.model, reply, event)
            done += bool(event.stop)
    finally:
        job.cancelled.set()
    return shape.whole(reply)


async def stream(shape: Shape, job: Job, events: asyncio.Queue[Event], reply: Reply) -> AsyncIterator[str]:
    """Server-sent events: a chunk per emitted token (its text, its thought with reasoning), a last chunk per choice
    with its finish_reason, usage if asked, then [DONE]. A client that goes cancels the job at once."""
    try:
        done, started = 0, [False] * shape.body.n
        while done < shape.body.n:
            event = await next_event(shape.server, events)
            if event is None:
                continue
            if event.error:
                yield sse({"error": {"message": event.error, "type": "server_error", "param": None, "code": None}})
                return
            record(shape.server.model, reply, event)
            chunk = shape.chunk(event, reply, first=not started[event.choice])
            if chunk is not None:
                started[event.choice] = True
                yield sse(chunk)
            done += bool(event.stop)
        options = shape.body.stream_options
        if options is not None and options.include_usage:
            yield sse({**shape.header(chunk=True), "choices": [], "usage": shape.usage(reply)})
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()


async def next_event(server: Server, events: asyncio.Queue[Event]) -> Event | None:
    """A job's next event; None after a second without one; an error once the worker has stopped (none will come)."""
    try:
        return await asyncio.wait_for(events.get(), timeout=1.0)
    except asyncio.TimeoutError:
        why = server.batcher.dead
        return Event(0, error=f"the generation worker has stopped ({why})") if why else None


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@dataclass
class Shape:
    """One request's responses in OpenAI's JSON shapes."""

    server: Server
    body: ChatRequest | CompletionRequest
    kind: str
    reasoning: bool
    prompt_tokens: int
    id: str = field(default_factory=lambda: f"qstar-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def header(self, chunk: bool = False) -> dict[str, Any]:
        kind = self.kind + (".chunk" if chunk and self.kind == "chat.completion" else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.server.name}

    def usage(self, reply: Reply) -> dict[str, int]:
        total = self.prompt_tokens + reply.tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": reply.tokens,
            "total_tokens": total,
            "thought_tokens": reply.thought_tokens,
        }

    def extension(self, reply: Reply, i: int, last: int | None = None) -> dict[str, Any]:
        thoughts, weights = reply.thoughts[i], reply.weights[i]
        if last is not None:
            thoughts, weights = thoughts[-last:], weights[-last:]
        return {"qstar": {"thoughts": thoughts, "mixing_weights": weights}}

    def logprobs(self, entries: list[dict[str, Any]]) -> dict[str, Any] | None:
        if self.body.logprobs in (None, False):
            return None
        if self.kind == "chat.completion":
            return {"content": entries}
        return {
            "tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
        }

    def whole(self, reply: Reply) -> dict[str, Any]:
        choices = []
        for i in range(self.body.n):
            choice: dict[str, Any] = {
                "index": i,
                "finish_reason": FINISH[reply.stops[i]],
                "logprobs": self.logprobs(reply.logprobs[i]),
            }
            if self.kind == "chat.completion":
                message: dict[str, Any] = {"role": "assistant", "content": reply.texts[i]}
                if self.reasoning:
                    message["reasoning_content"] = "".join(t + "\n" for t in reply.thoughts[i])
                choice["message"] = message
            else:
                choice["text"] = reply.texts[i]
            if self.reasoning:
                choice |= self.extension(reply, i)
            choices.append(choice)
        return {**self.header(), "choices": choices, "usage": self.usage(reply)}

    def chunk(self, event: Event, reply: Reply, first: bool) -> dict[str, Any] | None:
        """The chunk of one event, or None when it carries nothing to show."""
        thought = reply.thoughts[event.choice][-1] if self.reasoning and event.thought is not None else None
        if not event.text and thought is None and not event.stop and not first:
            return None
        choice: dict[str, Any] = {"index": event.choice, "finish_reason": FINISH[event.stop] if event.stop else None}
        entries = reply.logprobs[event.choice][-1:] if event.logprob is not None else []
        choice["logprobs"] = self.logprobs(entries) if entries else None
        if self.kind == "chat.completion":
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            delta["content"] = event.text
            if thought is not None:
                delta["reasoning_content"] = thought + "\n"
            choice["delta"] = delta
        else:
            choice["text"] = event.text
        if thought is not None:
            choice |= self.extension(reply, event.choice, last=1)
        return {**self.header(chunk=True), "choices": [choice]}
