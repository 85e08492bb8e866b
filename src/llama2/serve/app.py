"""The HTTP application (FastAPI): the OpenAI-compatible endpoints, /health, /metrics and the chat page at /.

Every model request is checked here (protocol.py), prepared by the engine (validation and encoding only) and
handed to the ModelWorker; the handlers only await the events it sends back, so the event loop never runs the
model. A client that disconnects (streaming or not) has its requests cancelled at once, freeing their slots.

`Api` holds the served model's state and has one method per endpoint; `create_app` wires them to routes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import Llama2Error
from ..inference.engine import Event
from ..tools import CALL_OPEN
from .metrics import Metrics
from .protocol import (FINISH, ApiError, Defaults, Job, bad, chat_logprobs, completion_logprobs, parse_chat,
                       parse_completion, tool_answer, usage)
from .worker import Handle, ModelWorker, QueueFull, WorkerStopped

log = logging.getLogger("llama2.serve")

MAX_REQUEST_BYTES = 1 << 20


def create_app(worker: ModelWorker, *, model_name: str, api_key: str | None = None,
               defaults: Defaults | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
               manage_worker: bool = True) -> FastAPI:
    """The server for one model. worker: runs the engine (started and stopped with the app when
    manage_worker). api_key: required as `Authorization: Bearer KEY` on /v1/* and /metrics when set."""
    api = Api(worker, model_name=model_name, api_key=api_key, defaults=defaults or Defaults(),
              max_request_bytes=max_request_bytes, manage_worker=manage_worker)
    app = FastAPI(title="llama2 serve", lifespan=api.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.state.metrics = api.metrics
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
    app.add_middleware(_CountRequests, metrics=api.metrics)
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/tokenize", api.tokenize, methods=["POST"])
    app.add_api_route("/detokenize", api.detokenize, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", api.model, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.metrics_text, methods=["GET"])
    app.add_api_route("/", api.page, methods=["GET"])
    return app


class Api:
    """The endpoints over one worker: checking requests (key, size, JSON), running jobs on the worker (whole
    or streamed, cancelled when the client leaves) and answering in OpenAI's shape."""

    def __init__(self, worker: ModelWorker, *, model_name: str, api_key: str | None, defaults: Defaults,
                 max_request_bytes: int, manage_worker: bool) -> None:
        self.worker = worker
        self.model_name = model_name
        self.api_key = api_key
        self.defaults = defaults
        self.max_request_bytes = max_request_bytes
        self.manage_worker = manage_worker
        self.tokenizer = worker.engine.tokenizer
        self.context: int = worker.engine.max_len
        self.metrics: Metrics = worker.metrics
        self.started = int(time.time())

    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Start the worker with the app and stop it (off the event loop) at shutdown, when managed."""
        if self.manage_worker:
            self.worker.start()
        try:
            yield
        finally:
            if self.manage_worker:
                await asyncio.to_thread(self.worker.stop)

    # -- checking requests -----------------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        """Raise 401 unless the request carries the API key (when one is set)."""
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ApiError(401, "missing API key: send it as the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        """The body as JSON: 413 past max_request_bytes (declared or read), 400 when it is not JSON."""
        limit = self.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {limit}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:
            raise bad("the request body nests JSON too deeply; a request needs a few levels only",
                      code="invalid_json") from None

    # -- running jobs ----------------------------------------------------------------------------------------

    def submit(self, job: Job) -> tuple[asyncio.Queue, list[Handle]]:
        """Prepare the job's requests and queue them on the worker (429 when full, 503 when stopped)."""
        engine = self.worker.engine
        per_prompt = len(job.params) // len(job.prompts)
        try:
            actives = [engine.prepare(job.prompts[i // per_prompt], p, stream=job.stream)
                       for i, p in enumerate(job.params)]
            queue, handles = self.worker.submit(actives)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
        except WorkerStopped as e:
            raise ApiError(503, str(e), code="unavailable") from None
        except Llama2Error as e:
            raise bad(str(e)) from None
        self.metrics.prompt_tokens += job.prompt_tokens
        return queue, handles

    async def collect(self, request: Request, job: Job) -> list[Event]:
        """Every choice's last event (with its Completion); cancels the requests if the client goes away."""
        queue, handles = self.submit(job)
        last: list[Event | None] = [None] * len(handles)
        waiter = asyncio.ensure_future(drain(queue, last))
        gone = asyncio.ensure_future(until_disconnect(request))
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not waiter.done():
                waiter.cancel()
                self.worker.cancel(handles)
        if not waiter.done() or waiter.cancelled():
            raise ApiError(499, "client disconnected")
        exc = waiter.exception()
        if exc is not None:
            raise generation_failed(exc)
        return last  # type: ignore[return-value]

    def streamed(self, job: Job) -> Response:
        """The job as server-sent events; its requests are cancelled when the stream ends or the client leaves."""
        queue, handles = self.submit(job)
        return EventStream(self.chunks(job, queue, handles), on_close=lambda: self.worker.cancel(handles))

    async def chunks(self, job: Job, queue: asyncio.Queue, handles: list[Handle]) -> AsyncIterator[str]:
        """The stream's events: the role (chat), a chunk per piece of text, the usage if asked, then [DONE]."""
        chat = job.kind == "chat"
        head = answer_head(job, "chat.completion.chunk" if chat else "text_completion")
        extra = {"usage": None} if job.include_usage else {}
        if chat:  # the role first, as OpenAI does
            yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None} for i in range(len(handles))],
                       **extra})
        left, generated = len(handles), 0
        offsets = [0] * len(handles)
        held = [ToolStream() for _ in handles] if chat and job.tools is not None else None
        while left:
            i, ev = await queue.get()
            if isinstance(ev, Exception):
                yield sse(generation_failed(ev).body())
                break
            if ev.token is not None:
                generated += 1
            choice = self.delta(job, i, ev, offsets[i]) if held is None else held[i].delta(job, i, ev)
            if ev.completion is not None:
                left -= 1
            if choice is None:
                continue
            offsets[i] += len(ev.text)
            yield sse({**head, "choices": [choice], **extra})
        else:
            if job.include_usage:
                yield sse({**head, "choices": [], "usage": usage(job.prompt_tokens, generated)})
        yield "data: [DONE]\n\n"

    def delta(self, job: Job, i: int, ev: Event, offset: int) -> dict | None:
        """Choice i's streamed chunk for one event; None when it has no text, logprobs or finish reason."""
        chat = job.kind == "chat"
        lp = None
        if job.logprobs and ev.token is not None:
            raw = [ev.raw_logprob]
            top = [ev.top_logprobs] if job.top_logprobs else None
            lp = (chat_logprobs(self.tokenizer, [ev.token], raw, top) if chat else
                  completion_logprobs(self.tokenizer, [ev.token], raw, echo=False, offset=offset, top=top))
        finish = FINISH[ev.finish_reason] if ev.completion is not None else None
        if not ev.text and lp is None and finish is None:
            return None
        if chat:
            delta = {"content": ev.text} if ev.text else {}
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return {"index": i, "text": ev.text, "logprobs": lp, "finish_reason": finish}

    async def answer(self, request: Request, job: Job, obj: str, choice: Callable[[int, Any], dict]) -> Response:
        """A streamed answer, or the whole one: one choice per completion, with usage."""
        if job.stream:
            return self.streamed(job)
        events = await self.collect(request, job)
        return JSONResponse({**answer_head(job, obj),
                             "choices": [choice(i, ev.completion) for i, ev in enumerate(events)],
                             "usage": usage(job.prompt_tokens, completion_tokens(events, job))})

    # -- endpoints -------------------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        self.authorize(request)
        job = parse_chat(await self.read_json(request), self.tokenizer, served=self.model_name,
                         context=self.context, defaults=self.defaults, adapters=self.adapter_names)

        def choice(i: int, c: Any) -> dict:
            lp = chat_logprobs(self.tokenizer, c.tokens, c.raw_logprobs, c.top_logprobs) if job.logprobs else None
            content, calls = tool_answer(c.text, job.tools) if c.finish_reason == "stop" else (c.text, None)
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            return {"index": i, "message": message, "logprobs": lp,
                    "finish_reason": "tool_calls" if calls else FINISH[c.finish_reason]}

        return await self.answer(request, job, "chat.completion", choice)

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions."""
        self.authorize(request)
        job = parse_completion(await self.read_json(request), self.tokenizer, served=self.model_name,
                               context=self.context, defaults=self.defaults, adapters=self.adapter_names)

        def choice(i: int, c: Any) -> dict:
            lp = (completion_logprobs(self.tokenizer, c.tokens, c.raw_logprobs, echo=job.echo, top=c.top_logprobs,
                                      at_start=not self.tokenizer.decode(c.prompt_tokens))
                  if job.logprobs else None)
            return {"index": i, "text": c.text, "logprobs": lp, "finish_reason": FINISH[c.finish_reason]}

        return await self.answer(request, job, "text_completion", choice)

    async def tokenize(self, request: Request) -> Response:
        """POST /tokenize (vLLM's shape): {"prompt", "add_special_tokens"} (BOS first, the default) or {"messages"}
        (the chat format) -> {"tokens", "count", "max_model_len"}."""
        self.authorize(request)
        body = await self.read_json(request)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        if "messages" in body:
            ids = parse_chat({**body, "model": None, "max_tokens": 1}, self.tokenizer, served=self.model_name,
                             context=10**9, defaults=self.defaults).prompts[0]
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise bad("prompt must be a string (or give messages)", "prompt")
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise bad("add_special_tokens must be true or false", "add_special_tokens")
            ids = self.tokenizer.encode(prompt, bos=special)
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.context})

    async def detokenize(self, request: Request) -> Response:
        """POST /detokenize: {"tokens": [ids]} -> {"prompt": text}."""
        self.authorize(request)
        body = await self.read_json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        vocab = self.worker.engine.model.config.vocab_size
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                   for t in tokens):
            raise bad(f"tokens must be a list of token ids in 0..{vocab - 1}", "tokens")
        return JSONResponse({"prompt": self.tokenizer.decode(tokens)})

    async def models(self, request: Request) -> Response:
        """GET /v1/models: the served model, then its LoRA adapters (each with `parent`: the base, as vLLM lists
        them)."""
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [self.model_card(n) for n in
                                                        [self.model_name, *sorted(self.adapter_names)]]})

    async def model(self, name: str, request: Request) -> Response:
        """GET /v1/models/{name}: 404 for any other name."""
        self.authorize(request)
        if name != self.model_name and name not in self.adapter_names:
            raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return JSONResponse(self.model_card(name))

    async def health(self) -> Response:
        """GET /health (no key needed): 200 while the worker runs, else 503."""
        worker = self.worker
        ok = worker.alive
        body = {"status": "ok" if ok else "unavailable", "model": self.model_name, "slots": worker.slots,
                "busy_slots": worker.busy_slots, "queue_depth": worker.queue_depth, "context": self.context}
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_text(self, request: Request) -> Response:
        """GET /metrics, in Prometheus' text format."""
        self.authorize(request)
        worker = self.worker
        text = self.metrics.render(slots=worker.slots, busy=worker.busy_slots, running=worker.busy_slots,
                                   prefix_cache=worker.engine.prefix_cache)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def page(self) -> Response:
        """GET /: the chat page."""
        return HTMLResponse(chat_page(), headers={"Cache-Control": "no-cache"})

    @property
    def adapter_names(self) -> list[str]:
        bank = self.worker.engine.adapters
        return list(bank.names) if bank is not None else []

    def model_card(self, name: str) -> dict:
        card = {"id": name, "object": "model", "created": self.started, "owned_by": "llama2",
                "max_model_len": self.context}
        if name != self.model_name:  # an adapter
            card.update(root=str(self.worker.engine.adapters.paths[name]), parent=self.model_name)
        return card


# -- errors in OpenAI's shape --------------------------------------------------------------------------------


class ToolStream:
    """One streamed chat choice of a request with tools: text is sent as content until a call block may begin
    (a tail that could start `<call>` is held back); a call block is not sent as text but, once the answer ends,
    as one `tool_calls` delta (the whole arguments at once) with finish_reason "tool_calls"."""

    def __init__(self) -> None:
        self.text, self.sent = "", 0

    def delta(self, job: Job, i: int, ev: Event) -> dict | None:
        self.text += ev.text
        if ev.completion is None:
            start = self.text.find(CALL_OPEN)
            safe = len(self.text) - _held_back(self.text) if start < 0 else start
            piece, self.sent = self.text[self.sent:max(safe, self.sent)], max(safe, self.sent)
            return {"index": i, "delta": {"content": piece}, "logprobs": None, "finish_reason": None} \
                if piece else None
        c = ev.completion
        content, calls = tool_answer(c.text, job.tools) if c.finish_reason == "stop" else (c.text, None)
        before = c.text[:c.text.rfind(CALL_OPEN)] if calls else c.text
        rest = before[self.sent:]
        delta: dict[str, Any] = {"content": rest} if rest else {}
        if calls:
            delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
        return {"index": i, "delta": delta, "logprobs": None,
                "finish_reason": "tool_calls" if calls else FINISH[c.finish_reason]}


def _held_back(text: str) -> int:
    """Length of the longest tail of text that begins `<call>`."""
    return next((n for n in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1) if text.endswith(CALL_OPEN[:n])), 0)


async def api_error(request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    msg, code = {404: (f"no such endpoint: {request.method} {request.url.path}; the endpoints are "
                       f"{', '.join(ENDPOINTS)}", "unknown_url"),
                 405: (f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed")
                 }.get(e.status_code, (str(e.detail), None))
    return JSONResponse(ApiError(e.status_code, msg, code=code).body(), status_code=e.status_code)


async def server_error(request: Request, e: Exception) -> JSONResponse:
    """A 500 for an unexpected error, logged and counted in /metrics (Starlette answers it outside the
    counting middleware)."""
    log.exception("unhandled error on %s", request.url.path)
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.request(_endpoint_label(request.url.path), 500)
    return JSONResponse(ApiError(500, f"internal server error: {type(e).__name__}", code="internal_error").body(),
                        status_code=500)


def generation_failed(exc: BaseException) -> ApiError:
    """The error for a job the worker failed: 503 when it stopped, else 500."""
    return ApiError(503 if isinstance(exc, WorkerStopped) else 500, f"generation failed: {exc}")


# -- helpers -------------------------------------------------------------------------------------------------


async def drain(queue: asyncio.Queue, last: list[Event | None]) -> None:
    """Fill last[i] with choice i's final event; raise the worker's error if it sends one."""
    left = len(last)
    while left:
        i, item = await queue.get()
        if isinstance(item, Exception):
            raise item
        if item.completion is not None:
            last[i] = item
            left -= 1


async def until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def answer_head(job: Job, obj: str) -> dict:
    """The id, object, created and model fields that start every answer and chunk."""
    prefix = "chatcmpl-" if job.kind == "chat" else "cmpl-"
    return {"id": prefix + job.id, "object": obj, "created": job.created, "model": job.model}


def completion_tokens(events: list[Event], job: Job) -> int:
    n = 0
    for ev in events:
        c = ev.completion
        n += len(c.tokens) - (len(c.prompt_tokens) if job.echo else 0)
    return n


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def chat_page() -> str:
    """The web chat page (static HTML with inline JS and CSS, shipped in the package)."""
    return resources.files(__package__).joinpath("static", "index.html").read_text(encoding="utf-8")


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/detokenize", "/health", "/metrics")


def _endpoint_label(path: str) -> str:
    """The /metrics label of a request path (unknown paths are "other": bounded label values)."""
    return path if path in ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"


class _CountRequests:
    """ASGI middleware: count answered requests by endpoint and status (a plain wrapper of `send`, so streamed
    bodies pass through untouched). Unknown paths are counted as "other" (bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/":
            return await self.app(scope, receive, send)
        label = _endpoint_label(scope["path"])

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.request(label, message["status"])
            await send(message)

        await self.app(scope, receive, counted)


class EventStream(StreamingResponse):
    """Server-sent events that also watch for the client leaving: on disconnect (or any end) the stream stops
    and on_close runs at once, so the requests' slots are freed without waiting for the next token."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def stream() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(stream)
                await self.listen_for_disconnect(receive)
                tg.cancel_scope.cancel()
        finally:
            self.on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
