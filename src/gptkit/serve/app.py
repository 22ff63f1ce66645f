"""The HTTP server: OpenAI's completions and chat completions over the engine, and the chat page.

`create_app` builds the FastAPI app for a loaded model (`gptkit.load`); `gptkit serve` runs it with
uvicorn. Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`; a request
that is wrong in any way (JSON, types, ranges, a prompt longer than the context) is a 400 that names
the field, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptkit.errors import GptkitError
from gptkit.generate.chat import Retrieval
from gptkit.generate.settings import SampleSettings
from gptkit.generate.textmodel import Augmenter, TextModel
from gptkit.layout import CHECKPOINT_FOLDER
from gptkit.serve import protocol as p
from gptkit.serve.engine import Engine, Event, Job, QueueFull
from gptkit.serve.metrics import Metrics
from gptkit.templates import ChatTemplate

MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused (413) before it is parsed
DRAIN_BYTES = 64 << 20  # what is read of a refused body, so that its sender sees the answer
KEEPALIVE_SECONDS = 5.0  # an SSE comment this often while a streamed request waits in the queue
RETRY_AFTER_SECONDS = 1
OPEN_ROUTES = ("/health", "/")  # without the API key: the health check and the page (it asks for the key)


class Rag(Retrieval, Augmenter, Protocol):
    """What `serve --rag` takes (a `gptkit.rag.Retriever`): a chat turn's user message and a
    completion's prompt, each composed from the passages retrieved for it."""


class ApiError(Exception):
    """An error answer in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(
            p.error(self.message, self.type, self.param, self.code), self.status, self.headers
        )


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    return ApiError(status, message, code=code).response()


class Guard:
    """ASGI middleware in front of every route: the API key (compared in constant time), the body size
    limit (read before anything parses it), and the request count per endpoint and status."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, status = scope["path"], [500]

        async def counting(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            answer = self._refuse(scope)
            if answer is None and scope["method"] in ("POST", "PUT", "PATCH"):
                answer, receive = await self._read_body(receive)
            if answer is not None:
                return await answer(scope, receive, counting)
            await self.app(scope, receive, counting)
        finally:
            endpoint = path if path.startswith("/v1/") or path in ("/health", "/metrics", "/") else "other"
            self.metrics.requests.labels(endpoint, str(status[0])).inc()

    def _refuse(self, scope: Scope) -> JSONResponse | None:
        if self.key is None or scope["path"] in OPEN_ROUTES or scope["method"] == "OPTIONS":
            return None
        headers = dict(scope["headers"])
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key):
            return None
        return error_response(
            401, "invalid or missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key"
        )

    async def _read_body(self, receive: Receive) -> tuple[JSONResponse | None, Receive]:
        """The whole body (at most MAX_BODY_BYTES), replayed to the app; then the client's messages."""
        too_large = error_response(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", "body_too_large")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None, receive  # the client left
            size += len(message.get("body", b""))
            if size > MAX_BODY_BYTES:
                # read on (up to a point) before answering: a client still sending would miss the 413
                while message.get("more_body", False) and size < DRAIN_BYTES:
                    message = await receive()
                    size += len(message.get("body", b""))
                return too_large, receive
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay


@dataclass
class Served:
    """The model being served and what requests need from it."""

    model: TextModel
    model_id: str
    engine: Engine
    metrics: Metrics
    keepalive: float = KEEPALIVE_SECONDS
    created: int = field(default_factory=lambda: int(time.time()))
    rag: Rag | None = None  # requests answer from retrieved passages (serve --rag)

    @property
    def context(self) -> int:
        return self.model.model.tokens_that_fit()


def create_app(
    model: TextModel,
    *,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    cors_origin: str | None = None,
    model_id: str | None = None,
    keepalive: float = KEEPALIVE_SECONDS,
    rag: Rag | None = None,
) -> FastAPI:
    """The OpenAI-compatible app for `model` (see README, "Serving"); the engine runs while it does."""
    if max_batch < 1 or max_queue < 1:
        raise GptkitError(f"max_batch and max_queue must be at least 1, not {max_batch} and {max_queue}")
    metrics = Metrics()
    engine = Engine(model.sampler, max_batch, max_queue, metrics)
    served = Served(model, model_id or default_model_id(model.source), engine, metrics, keepalive, rag=rag)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="gptkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = served
    add_error_handlers(app)
    add_routes(app, served)
    app.add_middleware(Guard, api_key=api_key, metrics=metrics)
    if cors_origin:  # outermost: a preflight is answered before the key is asked for
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[cors_origin],
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


def default_model_id(source: str) -> str:
    """The name a served model goes by: its file or folder name (a run's, for its checkpoint)."""
    path = Path(source)
    if path.parent.name == CHECKPOINT_FOLDER:
        return path.parent.parent.name
    return path.stem or "gptkit"


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {first.get('msg')}").response()
        where = ".".join(loc) or "body"
        return ApiError(400, f"{where}: {first.get('msg')}", param=where).response()

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception) -> JSONResponse:
        return ApiError(500, f"the server failed: {type(e).__name__}: {e}", type="server_error").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(
            e.status_code,
            str(e.detail),
            type="not_found_error" if e.status_code == 404 else "invalid_request_error",
        ).response()


def add_routes(app: FastAPI, served: Served) -> None:
    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        html = resources.files("gptkit.serve").joinpath("static", "chat.html")
        if not html.is_file():
            raise ApiError(404, "the chat page is not installed", type="not_found_error")
        return HTMLResponse(html.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(served.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = p.ModelCard(id=served.model_id, created=served.created)
        return p.ModelList(data=[card]).model_dump()

    @app.post("/v1/completions")
    async def completions(body: p.CompletionRequest, request: Request) -> Response:
        check_model(served, body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts or any(not t for t in texts):
            raise ApiError(400, "prompt: give a non-empty string or a list of them", param="prompt")
        if len(texts) * body.n > p.MAX_CHOICES:
            raise ApiError(
                400, f"prompts x n is {len(texts) * body.n}; at most {p.MAX_CHOICES}", param="prompt"
            )
        sources = None
        if retrieves(served, body):
            composed = [compose_prompt(served, t, body.max_tokens) for t in texts]
            texts = [text for text, _ in composed]
            cited = [[s.record() for s in srcs] for _, srcs in composed]
            sources = cited[0] if isinstance(body.prompt, str) else cited
        prompts = [encode_prompt(served, t) for t in texts]
        settings = sample_settings(served, body, prompts, body.max_tokens, body.logprobs, [])
        run = Run(served, body, prompts, settings, chat=False)
        run.sources = sources
        return await run.answer(request)

    @app.post("/v1/chat/completions")
    async def chat(body: p.ChatRequest, request: Request) -> Response:
        check_model(served, body.model)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        template, prompt, sources = chat_prompt(served, body, max_tokens)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        settings = sample_settings(served, body, [prompt], max_tokens, logprobs, template.stop)
        run = Run(served, body, [prompt], settings, chat=True)
        run.sources = sources
        return await run.answer(request)


def check_model(served: Served, name: str) -> None:
    if name != served.model_id:
        raise ApiError(
            404,
            f"the model {name!r} does not exist; this server serves {served.model_id!r}",
            param="model",
            code="model_not_found",
            type="not_found_error",
        )


def retrieves(served: Served, body: p.Request) -> bool:
    """Whether a request answers from retrieved passages: on a server with an index, unless it sends
    `"rag": false`; `"rag": true` on a server without one is an error, not a silent plain answer."""
    if body.rag and served.rag is None:
        raise ApiError(
            400, "rag: this server has no index; start it with gptkit serve ... --rag INDEX", param="rag"
        )
    return served.rag is not None and body.rag is not False


def compose_prompt(served: Served, question: str, max_tokens: int | None) -> tuple[str, list[Any]]:
    """A completion prompt answered from the passages retrieved for it, as `gptkit sample --rag`
    composes it (the model's chat template, else the passages before "Answer:"), within the context
    less the reply's room; and the sources it cites."""
    assert served.rag is not None
    try:
        return served.rag.augment(question, served.model, max_tokens or served.context)
    except GptkitError as e:
        raise ApiError(400, str(e), param="prompt") from None


def encode_prompt(served: Served, text: str) -> list[int]:
    ids = served.model.tokenizer.encode(text)
    if len(ids) > served.context:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens; the model's context is {served.context}",
            param="prompt",
            code="context_length_exceeded",
        )
    return ids


def chat_prompt(
    served: Served, body: p.ChatRequest, max_tokens: int | None = None
) -> tuple[ChatTemplate, list[int], list[dict[str, Any]] | None]:
    """The conversation through the checkpoint's chat template, ready for the assistant's reply; with
    retrieval, the last user message carries the passages retrieved for it, and their sources."""
    stored = served.model.chat_template
    if stored is None:
        raise ApiError(
            400,
            "this model has no chat template (a base model): use /v1/completions",
            param="messages",
            code="no_chat_template",
        )
    template = ChatTemplate.from_dict(stored, served.model.source or "the checkpoint")
    messages = [m.model_dump() for m in body.messages]
    if messages[0]["role"] != "system" and template.default_system:
        messages.insert(0, {"role": "system", "content": template.default_system})
    sources = None
    tok = served.model.tokenizer
    try:
        if retrieves(served, body) and messages[-1]["role"] == "user":
            question = messages[-1]["content"]
            bare = template.encode(tok, [*messages[:-1], {"role": "user", "content": ""}], True)[0]
            reply = min(max_tokens or served.context, served.context // 2)
            assert served.rag is not None
            content, cited = served.rag.message(question, tok, served.context - reply - len(bare))
            messages[-1] = {"role": "user", "content": content}
            sources = [s.record() for s in cited]
        ids = template.encode(tok, messages, add_generation_prefix=True)[0]
    except GptkitError as e:
        raise ApiError(400, str(e), param="messages") from None
    if len(ids) > served.context:
        raise ApiError(
            400,
            f"the messages take {len(ids)} tokens; the model's context is {served.context}",
            param="messages",
            code="context_length_exceeded",
        )
    return template, ids, sources


def sample_settings(
    served: Served,
    body: p.Request,
    prompts: list[list[int]],
    max_tokens: int | None,
    logprobs: int | None,
    template_stop: list[str],
) -> SampleSettings:
    """The sampler's settings for a request; max_tokens fits the context after the longest prompt."""
    room = served.context - max(map(len, prompts))
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise ApiError(
            400,
            f"max_tokens is {max_tokens}, but the prompt leaves room for {room} of the "
            f"model's {served.context}-token context",
            param="max_tokens",
            code="context_length_exceeded",
        )
    stop = body.stop_strings()
    if len(stop) > p.MAX_STOP:
        raise ApiError(400, f"stop: at most {p.MAX_STOP} strings", param="stop")
    try:
        return SampleSettings.of(
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            stop=[*template_stop, *stop],
            logprobs=logprobs,
            seed=body.seed,
        )
    except GptkitError as e:
        raise ApiError(400, str(e)) from None


@dataclass
class Choice:
    """One choice's text, tokens and logprobs as they arrive."""

    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    offset: int | None = None  # a stream's next text_offset (completions' logprobs)


class Run:
    """One request through the engine, answered whole or streamed as server-sent events."""

    def __init__(
        self, served: Served, body: p.Request, prompts: list[list[int]], settings: SampleSettings, chat: bool
    ) -> None:
        self.served, self.body, self.prompts, self.settings, self.chat = served, body, prompts, settings, chat
        self.id = p.new_id("chatcmpl" if chat else "cmpl")
        self.choices = [Choice() for _ in range(len(prompts) * body.n)]
        self.job: Job | None = None
        # the extension field of serve --rag: the sources of a chat reply or of a string prompt; one
        # list per prompt for a list of prompts
        self.sources: list[Any] | None = None

    async def answer(self, request: Request) -> Response:
        if self.body.n > self.served.engine.max_batch:
            raise ApiError(
                400,
                f"n is {self.body.n}; this server decodes at most "
                f"{self.served.engine.max_batch} sequences together",
                param="n",
            )
        try:
            self.job = self.served.engine.submit(self.prompts, self.settings, self.body.n)
        except QueueFull as e:
            raise ApiError(
                429,
                f"the server is busy ({e}); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None
        self.served.metrics.prompt_tokens.inc(sum(map(len, self.prompts)))
        if self.body.stream:
            return StreamingResponse(
                self.stream(),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return JSONResponse(await self.whole(request))

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)

    def _apply(self, events: list[Event]) -> None:
        for e in events:
            if e.error is not None:
                raise ApiError(500, e.error, type="server_error")
            c = self.choices[e.index]
            c.text += e.text
            if e.token is not None:
                c.tokens.append(e.token)
                if e.logprob is not None:
                    c.logprobs.append((e.token, e.logprob, e.top_logprobs))
            if e.finish_reason is not None:
                c.finish_reason = "length" if e.finish_reason == "length" else "stop"

    async def whole(self, request: Request) -> dict[str, Any]:
        """Wait for every choice to end (cancelling if the client leaves); the whole response."""
        assert self.job is not None
        try:
            while not self.done:
                try:
                    events = await asyncio.wait_for(self.job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        break
                    continue
                self._apply(events)
        finally:
            if not self.done:
                self.served.engine.cancel(self.job)
        n = self.body.n
        if self.chat:
            choices = [
                p.ChatChoice(
                    index=i,
                    message=p.ChatMessageOut(content=c.text),
                    logprobs=self._chat_logprobs(c.logprobs),
                    finish_reason=c.finish_reason,
                )
                for i, c in enumerate(self.choices)
            ]
            whole = p.ChatResponse(
                id=self.id, model=self.served.model_id, choices=choices, usage=self._usage()
            ).model_dump()
            return whole if self.sources is None else {**whole, "sources": self.sources}
        choices = [
            p.CompletionChoice(
                index=i,
                text=c.text,
                finish_reason=c.finish_reason,
                logprobs=self._completion_logprobs(c.logprobs, self.prompts[i // n]),
            )
            for i, c in enumerate(self.choices)
        ]
        whole = p.CompletionResponse(
            id=self.id, model=self.served.model_id, choices=choices, usage=self._usage()
        ).model_dump()
        return whole if self.sources is None else {**whole, "sources": self.sources}

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events as OpenAI sends them; the request is cancelled if the client leaves."""
        assert self.job is not None
        usage = self.body.include_usage()
        try:
            if self.chat:
                for i in range(len(self.choices)):
                    yield self._chunk(
                        [p.ChatChunkChoice(index=i, delta=p.ChatDelta(role="assistant", content=""))]
                    )
            while not self.done:
                try:
                    events = await asyncio.wait_for(self.job.events.get(), timeout=self.served.keepalive)
                except asyncio.TimeoutError:
                    yield ": keep-alive\n\n"
                    continue
                try:
                    self._apply(events)
                except ApiError as e:
                    yield f"data: {json.dumps(p.error(e.message, e.type))}\n\n"
                    return
                for e in events:
                    if chunk := self._event_chunk(e):
                        yield chunk
            if usage:
                yield self._chunk([], self._usage())
            yield "data: [DONE]\n\n"
        finally:
            if not self.done:
                self.served.engine.cancel(self.job)

    def _event_chunk(self, e: Event) -> str | None:
        finish = None if e.finish_reason is None else ("length" if e.finish_reason == "length" else "stop")
        if not e.text and finish is None and e.logprob is None:
            return None
        lp = [(e.token, e.logprob, e.top_logprobs)] if e.logprob is not None and e.token is not None else []
        if self.chat:
            delta = p.ChatDelta(content=e.text) if e.text or lp else p.ChatDelta()
            choice = p.ChatChunkChoice(
                index=e.index, delta=delta, logprobs=self._chat_logprobs(lp), finish_reason=finish
            )
        else:
            prompt = self.prompts[e.index // self.body.n]
            streamed = self.choices[e.index]
            logprobs = self._completion_logprobs(lp, prompt, streamed.offset)
            if logprobs is not None and logprobs.tokens:
                streamed.offset = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
            choice = p.CompletionChoice(index=e.index, text=e.text, finish_reason=finish, logprobs=logprobs)
        return self._chunk([choice])

    def _chunk(self, choices: list[Any], usage: p.Usage | None = None) -> str:
        kind = p.ChatChunk if self.chat else p.CompletionResponse
        chunk = kind(id=self.id, model=self.served.model_id, choices=choices, usage=usage)
        data = chunk.model_dump(exclude_none=False)
        if not self.body.include_usage():
            data.pop("usage")
        if self.sources is not None:
            data["sources"] = self.sources
        return f"data: {json.dumps(data)}\n\n"

    def _usage(self) -> p.Usage:
        prompt = sum(map(len, self.prompts))
        completion = sum(len(c.tokens) for c in self.choices)
        return p.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _token(self, token: int) -> tuple[str, list[int]]:
        raw = self.served.model.tokenizer.decode_bytes([token])
        return raw.decode("utf-8", errors="replace"), list(raw)

    def _chat_logprobs(
        self, items: list[tuple[int, float, list[tuple[int, float]]]]
    ) -> p.ChatLogprobs | None:
        if self.settings.logprobs is None:
            return None
        content = []
        for token, logprob, top in items:
            text, raw = self._token(token)
            alternatives = [
                p.TopLogprob(token=t, logprob=lp, bytes=b) for i, lp in top for t, b in [self._token(i)]
            ]
            content.append(p.TokenLogprob(token=text, logprob=logprob, bytes=raw, top_logprobs=alternatives))
        return p.ChatLogprobs(content=content)

    def _completion_logprobs(
        self,
        items: list[tuple[int, float, list[tuple[int, float]]]],
        prompt: list[int],
        offset: int | None = None,
    ) -> p.CompletionLogprobs | None:
        """`offset`: the first token's text_offset (a stream's later chunks), else the prompt's length:
        offsets count characters from the prompt's start, as OpenAI's do."""
        if self.settings.logprobs is None:
            return None
        if offset is None:
            offset = len(self.served.model.tokenizer.decode(prompt))
        tokens, offsets = [], []
        for token, _, _ in items:
            text = self._token(token)[0]
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
        top = [{self._token(i)[0]: lp for i, lp in alternatives} for _, _, alternatives in items]
        return p.CompletionLogprobs(
            tokens=tokens, token_logprobs=[lp for _, lp, _ in items], top_logprobs=top, text_offset=offsets
        )
