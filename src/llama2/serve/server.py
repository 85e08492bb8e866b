"""Building and running a server: the model's Generator and worker, uvicorn on a host and port, and a
`BackgroundServer` that runs one in a thread on a free loopback port (for tests, benchmarks and notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Llama2Error
from ..inference.generate import Generator
from .app import MAX_REQUEST_BYTES, create_app
from .metrics import Metrics
from .protocol import Defaults
from .worker import ModelWorker


@dataclass
class ServeOptions:
    """How to serve: batching (max_batch slots, max_queue waiting requests), the context per request, the
    prefix cache's size, the defaults for omitted sampling fields, an optional API key, the request-size limit and
    the LoRA adapters served beside the model ({name: adapter directory}; a request's `model` picks one)."""

    model_name: str = "llama2"
    max_batch: int = 8
    max_queue: int = 64
    context: int | None = None
    quantize: str | None = None
    compile: bool = False
    prefix_cache: int | None = None  # positions of prefix keys and values kept (None: one context's worth; 0: none)
    api_key: str | None = None
    defaults: Defaults | None = None
    max_request_bytes: int = MAX_REQUEST_BYTES
    adapters: dict[str, Path] = field(default_factory=dict)  # LoRA adapters by the model name clients send


def build_app(model, tokenizer, options: ServeOptions):
    """The FastAPI app over a model, with its worker (started and stopped by the app's lifespan)."""
    if options.max_batch < 1:
        raise Llama2Error(f"--max-batch must be >= 1, got {options.max_batch}")
    if options.max_queue < 0:
        raise Llama2Error(f"--max-queue must be >= 0, got {options.max_queue}")
    if options.api_key is not None and not options.api_key.strip():
        raise Llama2Error("--api-key is empty; give a key or leave the option out")
    context = options.context or model.config.max_seq_len
    prefix = context if options.prefix_cache is None else options.prefix_cache
    if prefix and prefix < 16:
        raise Llama2Error(f"--prefix-cache must be 0 (none) or at least 16 positions (one block), got {prefix}")
    if options.model_name in options.adapters:
        raise Llama2Error(f"the adapter name {options.model_name!r} is the served model's name; give it another")
    generator = Generator(model, tokenizer, max_batch_size=options.max_batch, cache_len=options.context,
                          quantize=options.quantize, compile=options.compile, prefix_cache=prefix,
                          adapters=options.adapters or None)
    worker = ModelWorker(generator.engine(options.max_batch), max_queue=options.max_queue, metrics=Metrics())
    return create_app(worker, model_name=options.model_name, api_key=options.api_key, defaults=options.defaults,
                      max_request_bytes=options.max_request_bytes)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: a free one); a clear error when the address is taken or invalid."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it
    # a keep-alive connection's small writes wait ~40 ms for delayed ACKs (Nagle)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise Llama2Error(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") \
            from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


MAX_HEADER_BYTES = 32 * 1024  # the request line and headers together; more is answered 431


def _http_protocol():
    """uvicorn's h11 protocol, except that a request line and headers over MAX_HEADER_BYTES get 431 (not 400), and
    that a connection it refuses is closed only after the client has finished sending: the response goes out, the
    write side is shut, and what still arrives is read and dropped for up to LINGER seconds. Closing at once, with
    the client's bytes still unread, resets the connection before the client reads the answer."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderLimitedH11(H11Protocol):
        LINGER = 2.0

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._refused = False

        def data_received(self, data: bytes) -> None:
            if self._refused:  # the answer is out: drop the rest of the request
                return
            super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            buffered = len(self.conn.trailing_data[0])
            status = 431 if buffered > MAX_HEADER_BYTES else 400
            if status == 431:
                msg = (f"the request line and headers exceed {MAX_HEADER_BYTES // 1024} KiB; send smaller headers "
                       "(put large values in the body)")
            headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
            for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=msg.encode()),
                          h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self._refused = True
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(self.LINGER, self.transport.close)

    return HeaderLimitedH11


def _uvicorn(app, log_level: str):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("debug", "info"),
                            timeout_graceful_shutdown=5, lifespan="on", http=_http_protocol(),
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES)
    return uvicorn.Server(config)


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C)."""
    sock = bind(host, port)
    _uvicorn(app, log_level).run(sockets=[sock])


class BackgroundServer:
    """uvicorn in a daemon thread on 127.0.0.1 and a free port: `with BackgroundServer(app) as s: s.url`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app = app
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = _uvicorn(app, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="llama2-serve", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        if self.thread.ident is None:
            self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise Llama2Error("the server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
