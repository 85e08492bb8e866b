"""The HTTP application (FastAPI): the OpenAI-compatible endpoints, /health, /metrics and the chat page at /.

Every model request is checked here (protocol.py), prepared by the engine (validation and encoding only) and
handed to the ModelWorker; the handlers only await the events it sends back, so the event loop never runs the
model. A client that disconnects (streaming or not) has its requests cancelled at once, freeing their slots.
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

from ..errors import Llama2Error
from ..inference.engine import Event
from .protocol import (FINISH, ApiError, Defaults, Job, bad, chat_logprobs, completion_logprobs, parse_chat,
                       parse_completion, usage)
from .worker import Handle, ModelWorker, QueueFull, WorkerStopped

log = logging.getLogger("llama2.serve")

MAX_REQUEST_BYTES = 1 << 20


def create_app(worker: ModelWorker, *, model_name: str, api_key: str | None = None,
               defaults: Defaults | None = None, max_request_bytes: int = MAX_REQUEST_BYTES,
               manage_worker: bool = True) -> FastAPI:
    """The server for one model. worker: runs the engine (started and stopped with the app when
    manage_worker). api_key: required as `Authorization: Bearer KEY` on /v1/* and /metrics when set."""
    defaults = defaults or Defaults()
    tokenizer = worker.engine.tokenizer
    context = worker.engine.max_len
    metrics = worker.metrics
    started = int(time.time())

    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_worker:
            worker.start()
        try:
            yield
        finally:
            if manage_worker:
                await asyncio.to_thread(worker.stop)

    app = FastAPI(title="llama2 serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    # -- errors in OpenAI's shape ----------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        msg = {404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return JSONResponse(ApiError(e.status_code, msg).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(ApiError(500, f"internal server error: {type(e).__name__}").body(), status_code=500)

    app.add_middleware(_CountRequests, metrics=metrics)

    # -- helpers ---------------------------------------------------------------------------------------------

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ApiError(401, "missing API key: send it as the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {max_request_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                raise ApiError(413, f"request body exceeds the limit of {max_request_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None

    def submit(job: Job) -> tuple[asyncio.Queue, list[Handle]]:
        engine = worker.engine
        per_prompt = len(job.params) // len(job.prompts)
        try:
            actives = [engine.prepare(job.prompts[i // per_prompt], p, stream=job.stream)
                       for i, p in enumerate(job.params)]
            queue, handles = worker.submit(actives)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
        except WorkerStopped as e:
            raise ApiError(503, str(e), code="unavailable") from None
        except Llama2Error as e:
            raise bad(str(e)) from None
        metrics.prompt_tokens += job.prompt_tokens
        return queue, handles

    async def until_disconnect(request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def collect(request: Request, job: Job) -> list[Event]:
        """Every choice's last event (with its Completion); cancels the requests if the client goes away."""
        queue, handles = submit(job)
        last: list[Event | None] = [None] * len(handles)

        async def drain() -> None:
            left = len(handles)
            while left:
                i, item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.completion is not None:
                    last[i] = item
                    left -= 1

        waiter = asyncio.ensure_future(drain())
        gone = asyncio.ensure_future(until_disconnect(request))
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not waiter.done():
                waiter.cancel()
                worker.cancel(handles)
        if not waiter.done() or waiter.cancelled():
            raise ApiError(499, "client disconnected")
        exc = waiter.exception()
        if exc is not None:
            raise ApiError(503 if isinstance(exc, WorkerStopped) else 500, f"generation failed: {exc}")
        return last  # type: ignore[return-value]

    def header(job: Job, obj: str) -> dict:
        prefix = "chatcmpl-" if job.kind == "chat" else "cmpl-"
        return {"id": prefix + job.id, "object": obj, "created": job.created, "model": job.model}

    def completion_tokens(events: list[Event], job: Job) -> int:
        n = 0
        for ev in events:
            c = ev.completion
            n += len(c.tokens) - (len(c.prompt_tokens) if job.echo else 0)
        return n

    def streamed(request: Request, job: Job) -> Response:
        queue, handles = submit(job)
        return EventStream(_chunks(job, queue, handles), on_close=lambda: worker.cancel(handles))

    async def _chunks(job: Job, queue: asyncio.Queue, handles: list[Handle]) -> AsyncIterator[str]:
        chat = job.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = header(job, obj)
        extra = {"usage": None} if job.include_usage else {}
        if chat:  # the role first, as OpenAI does
            yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None} for i in range(len(handles))],
                       **extra})
        left, generated = len(handles), 0
        offsets = [0] * len(handles)
        while left:
            i, ev = await queue.get()
            if isinstance(ev, Exception):
                status = 503 if isinstance(ev, WorkerStopped) else 500
                yield sse(ApiError(status, f"generation failed: {ev}").body())
                break
            if ev.token is not None:
                generated += 1
            lp = None
            if job.logprobs and ev.token is not None:
                raw = [ev.raw_logprob]
                lp = (chat_logprobs(tokenizer, [ev.token], raw) if chat else
                      completion_logprobs(tokenizer, [ev.token], raw, echo=False, offset=offsets[i]))
            finish = None
            if ev.completion is not None:
                finish = FINISH[ev.finish_reason]
                left -= 1
            if not ev.text and lp is None and finish is None:
                continue
            offsets[i] += len(ev.text)
            if chat:
                delta = {"content": ev.text} if ev.text else {}
                choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": i, "text": ev.text, "logprobs": lp, "finish_reason": finish}
            yield sse({**head, "choices": [choice], **extra})
        else:
            if job.include_usage:
                yield sse({**head, "choices": [], "usage": usage(job.prompt_tokens, generated)})
        yield "data: [DONE]\n\n"

    # -- endpoints -------------------------------------------------------------------------------------------

    async def answer(request: Request, job: Any, obj: str, choice: Callable[[int, Any], dict]) -> Response:
        """A streamed answer, or the whole one: one choice per completion, with usage."""
        if job.stream:
            return streamed(request, job)
        events = await collect(request, job)
        return JSONResponse({**header(job, obj), "choices": [choice(i, ev.completion) for i, ev in enumerate(events)],
                             "usage": usage(job.prompt_tokens, completion_tokens(events, job))})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        job = parse_chat(await read_json(request), tokenizer, served=model_name, context=context,
                         defaults=defaults)

        def choice(i: int, c: Any) -> dict:
            return {"index": i, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(tokenizer, c.tokens, c.raw_logprobs) if job.logprobs else None,
                    "finish_reason": FINISH[c.finish_reason]}

        return await answer(request, job, "chat.completion", choice)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        job = parse_completion(await read_json(request), tokenizer, served=model_name, context=context,
                               defaults=defaults)

        def choice(i: int, c: Any) -> dict:
            lp = completion_logprobs(tokenizer, c.tokens, c.raw_logprobs, echo=job.echo) if job.logprobs else None
            return {"index": i, "text": c.text, "logprobs": lp, "finish_reason": FINISH[c.finish_reason]}

        return await answer(request, job, "text_completion", choice)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [_model_card(model_name, started, context)]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> Response:
        authorize(request)
        if name != model_name:
            raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return JSONResponse(_model_card(model_name, started, context))

    @app.get("/health")
    async def health() -> Response:
        ok = worker.alive
        body = {"status": "ok" if ok else "unavailable", "model": model_name, "slots": worker.slots,
                "busy_slots": worker.busy_slots, "queue_depth": worker.queue_depth, "context": context}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_text(request: Request) -> Response:
        authorize(request)
        text = metrics.render(slots=worker.slots, busy=worker.busy_slots, running=worker.busy_slots)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page() -> Response:
        return HTMLResponse(chat_page(), headers={"Cache-Control": "no-cache"})

    return app


def _model_card(name: str, created: int, context: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "llama2", "max_model_len": context}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def chat_page() -> str:
    """The web chat page (static HTML with inline JS and CSS, shipped in the package)."""
    return resources.files(__package__).joinpath("static", "index.html").read_text(encoding="utf-8")


ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class _CountRequests:
    """ASGI middleware: count answered requests by endpoint and status (a plain wrapper of `send`, so streamed
    bodies pass through untouched). Unknown paths are counted as "other" (bounded label values)."""

    def __init__(self, app, metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] == "/":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = path if path in ENDPOINTS else "/v1/models" if path.startswith("/v1/models/") else "other"

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.request(label, message["status"])
            await send(message)

        await self.app(scope, receive, counted)


class EventStream(StreamingResponse):
    """Server-sent events that also watch for the client leaving: on disconnect (or any end) the stream stops
    and on_close runs at once, so the requests' slots are freed without waiting for the next token."""

    def __init__(self, content: AsyncIterator[str], on_close) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
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
