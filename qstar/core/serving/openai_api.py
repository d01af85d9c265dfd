"""The OpenAI-compatible HTTP API (FastAPI; `pip install 'qstar-lm[serve]'`): /v1/chat/completions, /v1/completions,
/v1/models, /health.

qstar's additions to the OpenAI request: `reasoning` (return each token's thought as `reasoning_content`, one thought
a line, as vLLM returns a reasoning model's), `thoughts` (false: generate without thinking) and `top_k`. With
reasoning, each choice carries a `qstar` object: the thoughts one per emitted token and the mixing head's weight
of each. Usage counts the thoughts' tokens apart (`usage.thought_tokens`), not in completion_tokens.
Every error is the OpenAI error shape {"error": {"message", "type", "param", "code"}} with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from qstar.core.generate import Sampling
from qstar.core.model import QStarModel
from qstar.core.serving.batcher import MAX_TOP_LOGPROBS, Batcher, Busy, Event, Job

FINISH = {"eos": "stop", "stop": "stop", "max_tokens": "length", "context": "length"}
"""qstar's stop reasons as OpenAI's finish_reason."""
RETRY_AFTER_S = 1


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


class Generation(Strict):
    """What both endpoints take."""

    model: str
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float | None, Field(gt=0, le=1)] = None
    top_k: Annotated[int | None, Field(ge=1)] = None
    seed: int | None = None
    stop: str | Annotated[list[str], Field(max_length=16)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    reasoning: bool | None = None
    thoughts: bool = True


class ChatRequest(Generation):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    logprobs: bool = False
    top_logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None


class CompletionRequest(Generation):
    prompt: str | Annotated[list[int], Field(min_length=1)]
    logprobs: Annotated[int | None, Field(ge=0, le=MAX_TOP_LOGPROBS)] = None
    echo: Literal[False] = False


def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(status)
    body = {"error": {"message": message, "type": kind or "invalid_request_error", "param": param, "code": code}}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


class Refused(Exception):
    """A request the server will not run: its status and message."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


class Reply:
    """One request's rows as they come: text, thoughts, weights and log-probabilities per choice."""

    def __init__(self, n: int) -> None:
        self.texts, self.stops = [""] * n, [""] * n
        self.thoughts: list[list[str]] = [[] for _ in range(n)]
        self.weights: list[list[float]] = [[] for _ in range(n)]
        self.logprobs: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        self.tokens = self.thought_tokens = 0


class Server:
    """The model's batcher and the routes over it."""

    def __init__(self, model: QStarModel, name: str, batcher: Batcher, reasoning: bool, api_key: str | None) -> None:
        self.model, self.name, self.batcher = model, name, batcher
        self.reasoning, self.api_key = reasoning, api_key
        self.created = int(time.time())

    def check_key(self, request: Request) -> None:
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise Refused(
                401, "a valid API key is needed: send the header Authorization: Bearer KEY", None, "invalid_api_key"
            )

    def prompt(self, body: ChatRequest | CompletionRequest) -> list[int]:
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
        if isinstance(body, ChatRequest):
            ids = self.model.chat_ids([{"role": m.role, "content": m.text()} for m in body.messages])
        elif isinstance(body.prompt, str):
            ids = list(tokenizer(body.prompt)["input_ids"]) if body.prompt.strip() else []
        else:
            ids = list(body.prompt)
        vocab = self.model.config.vocab_size
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise Refused(400, f"the prompt must be non-empty text or token ids in [0, {vocab})", "prompt")
        return ids

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
        sampling = Sampling(max_tokens, body.temperature, body.top_k, body.top_p, body.thoughts)
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
        return error(err.status, str(err), err.param, err.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:])
        return error(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", where or None, "invalid_request")

    @app.exception_handler(HTTPException)
    async def http(request: Request, err: HTTPException) -> JSONResponse:
        return error(err.status_code, str(err.detail))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "active_rows": server.batcher.active, "waiting": server.batcher.waiting.qsize()}

    keyed = [Depends(server.check_key)]

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> dict[str, Any]:
        card = {"id": server.name, "object": "model", "created": server.created, "owned_by": "qstar"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await respond(server, body, request, "chat.completion")

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await respond(server, body, request, "text_completion")

    return app


async def respond(server: Server, body: ChatRequest | CompletionRequest, request: Request, kind: str) -> Any:
    """Queue the request and answer it whole or as server-sent events."""
    ids = server.prompt(body)
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
    except ValueError as err:
        raise Refused(400, str(err), "n") from None
    reasoning = server.reasoning if body.reasoning is None else body.reasoning
    shape = Shape(server, body, kind, reasoning, len(ids))
    if body.stream:
        return StreamingResponse(stream(shape, job, events, reply), media_type="text/event-stream")
    try:
        done = 0
        while done < body.n:
            try:
                event = await asyncio.wait_for(events.get(), timeout=1.0)
            except asyncio.TimeoutError:
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
            event = await events.get()
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
