"""The model worker: one thread owns the generation Engine and runs its decode steps; the event loop only submits
requests and reads their events.

Requests wait in a bounded queue and join the running batch between decode steps, as slots free up (the engine's
continuous batching). Each submitted group (the n choices of one HTTP request) shares one asyncio.Queue on the
submitting event loop; the worker hands each step's events to every loop in one `call_soon_threadsafe`.
`cancel` (a client that went away) takes effect before the next step: the request leaves the queue or its
engine slot is freed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import Llama2Error
from ..inference.engine import Engine, Event
from .metrics import Metrics

log = logging.getLogger("llama2.serve")


class QueueFull(Llama2Error):
    """The waiting queue is at its bound (the server answers 429)."""


class WorkerStopped(Llama2Error):
    """The worker is not running (shutting down, or it failed)."""


@dataclass(eq=False)
class Handle:
    """One engine request (one choice) in flight: where its events go and where it runs."""

    active: object  # the engine's prepared request (Engine.prepare)
    index: int  # the choice index within its group
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    slot: int | None = None
    finished: bool = False
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    started: bool = False  # its first event (first token, or the end) was dispatched


class ModelWorker:
    """Runs `engine.step()` in a thread while requests are active; see the module docstring.

    engine: an Engine (e.g. `Generator(...).engine(max_batch)`), used by this worker's thread only (its
    `prepare` is called by submitters: it only validates and encodes). max_queue: most requests waiting for a
    slot (beyond the engine's slots) before `submit` raises QueueFull."""

    def __init__(self, engine: Engine, *, max_queue: int = 64, metrics: Metrics | None = None) -> None:
        if max_queue < 0:
            raise Llama2Error(f"max_queue must be >= 0, got {max_queue}")
        self.engine = engine
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._cond = threading.Condition()
        self._waiting: deque[Handle] = deque()
        self._cancels: list[Handle] = []
        self._running: dict[int, Handle] = {}
        self._outstanding = 0  # submitted and not yet finished or cancelled
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None

    # -- state, for /health and /metrics ---------------------------------------------------------------------

    @property
    def slots(self) -> int:
        return self.engine.max_slots

    @property
    def busy_slots(self) -> int:
        """Engine slots holding a request (0 when idle: nothing leaked)."""
        return self.engine.max_slots - self.engine.free_slots

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def outstanding(self) -> int:
        with self._cond:
            return self._outstanding

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="llama2-model-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step; requests still in flight get a WorkerStopped error."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- called from the event loop --------------------------------------------------------------------------

    def submit(self, actives: list, loop: asyncio.AbstractEventLoop | None = None) -> tuple[asyncio.Queue,
                                                                                           list[Handle]]:
        """Queue a group of prepared requests (all or none). Returns the queue their (index, Event or exception)
        items arrive on, and their handles. Raises QueueFull or WorkerStopped."""
        loop = loop or asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        handles = [Handle(a, i, queue, loop) for i, a in enumerate(actives)]
        with self._cond:
            if self._stop or not self.alive:
                raise WorkerStopped("the model worker is not running" + (f": {self.error}" if self.error else ""))
            if self._outstanding + len(handles) > self.engine.max_slots + self.max_queue:
                raise QueueFull(f"the server is busy: {self._outstanding} requests in flight ("
                                f"{self.engine.max_slots} slots, {self.max_queue} queue places); retry shortly")
            self._waiting.extend(handles)
            self._outstanding += len(handles)
            self._cond.notify_all()
        self.metrics.queue_depth = self.queue_depth
        return queue, handles

    def cancel(self, handles: list[Handle]) -> None:
        """Abandon these requests (the client is gone): the worker frees them before its next step."""
        with self._cond:
            todo = [h for h in handles if not h.finished and not h.cancelled]
            for h in todo:
                h.cancelled = True
            if todo:
                self._cancels.extend(todo)
                self._cond.notify_all()

    # -- the worker thread -----------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._cancels and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._stop:
                        break
                    self._apply_cancels()
                    admitted = self._admit()
                    self.metrics.queue_depth = len(self._waiting)
                if not self._running:
                    continue
                for h in admitted:
                    self.metrics.queue_wait(time.perf_counter() - h.submitted)
                t0 = time.perf_counter()
                try:
                    events = self.engine.step()
                except Exception as e:  # a failed step fails the requests in it, not the server
                    log.exception("decode step failed")
                    self._fail_running(e)
                    continue
                self.metrics.step(len(self._running), time.perf_counter() - t0)
                self._dispatch(events)
        except BaseException as e:  # pragma: no cover - a bug in the loop itself
            log.exception("model worker died")
            self.error = e
        finally:
            self._shutdown()

    def _apply_cancels(self) -> None:
        """Drop cancelled requests from the queue and free their slots (under the lock)."""
        if not self._cancels:
            return
        gone = set(self._cancels)
        self._cancels.clear()
        before = len(self._waiting)
        self._waiting = deque(h for h in self._waiting if h not in gone)
        self._outstanding -= before - len(self._waiting)
        for h in gone:
            if h.slot is not None and self._running.get(h.slot) is h:
                del self._running[h.slot]
                self.engine.cancel(h.slot)
                self._outstanding -= 1
                self.metrics.cancelled += 1
            h.finished = True

    def _admit(self) -> list[Handle]:
        admitted = []
        while self._waiting and self.engine.free_slots:
            h = self._waiting.popleft()
            h.slot = self.engine._admit(h.active)
            self._running[h.slot] = h
            admitted.append(h)
        return admitted

    def _dispatch(self, events: list[Event]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Handle, object]]] = {}
        tokens = 0
        now = time.perf_counter()
        with self._cond:
            for ev in events:
                h = self._running.get(ev.slot)
                if h is None:
                    continue
                if not h.started:
                    h.started = True
                    self.metrics.first_token(now - h.submitted)
                if ev.token is not None:
                    tokens += 1
                if ev.completion is not None:
                    del self._running[ev.slot]
                    h.finished = True
                    self._outstanding -= 1
                by_loop.setdefault(h.loop, []).append((h, ev))
        self.metrics.generated_tokens += tokens
        for loop, items in by_loop.items():
            self._send(loop, items)

    def _send(self, loop: asyncio.AbstractEventLoop, items: list[tuple[Handle, object]]) -> None:
        try:
            loop.call_soon_threadsafe(_deliver, items)
        except RuntimeError:  # that event loop is closed: its requests have nobody to go to
            self.cancel([h for h, _ in items])

    def _fail_running(self, error: Exception) -> None:
        with self._cond:
            items = list(self._running.values())
            for h in items:
                self.engine.cancel(h.slot)
                h.finished = True
            self._running.clear()
            self._outstanding -= len(items)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Handle, object]]] = {}
        for h in items:
            by_loop.setdefault(h.loop, []).append((h, error))
        for loop, group in by_loop.items():
            self._send(loop, group)

    def _shutdown(self) -> None:
        with self._cond:
            left = list(self._waiting) + list(self._running.values())
            for h in self._running.values():
                self.engine.cancel(h.slot)
            self._waiting.clear()
            self._running.clear()
            self._outstanding = 0
            self._stop = True
        error = WorkerStopped("the server is shutting down")
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Handle, object]]] = {}
        for h in left:
            h.finished = True
            by_loop.setdefault(h.loop, []).append((h, error))
        for loop, group in by_loop.items():
            self._send(loop, group)


def _deliver(items: list[tuple[Handle, object]]) -> None:
    """On the submitting loop: put each (index, event or exception) on its group's queue."""
    for h, item in items:
        h.queue.put_nowait((h.index, item))
