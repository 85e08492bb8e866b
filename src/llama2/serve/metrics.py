"""Server counters and their Prometheus text exposition (`GET /metrics`)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any


class Metrics:
    """Counters written by the event loop (requests, prompt tokens) and the worker (steps, tokens). Plain int
    updates; a lock guards the labelled request counter."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.steps = 0
        self.batch_size = 0  # requests in the last decode step
        self.batch_size_sum = 0
        self.queue_depth = 0
        self.cancelled = 0
        self.queue_wait_sum = 0.0
        self.queue_wait_count = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.step_seconds = 0.0

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def step(self, batch: int, seconds: float = 0.0) -> None:
        self.steps += 1
        self.step_seconds += seconds
        self.batch_size = batch
        self.batch_size_sum += batch

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_sum += seconds
        self.queue_wait_count += 1

    def first_token(self, seconds: float) -> None:
        """A request's time to first token (submission to its first event), queueing and prefill included."""
        self.ttft_sum += seconds
        self.ttft_count += 1

    def render(self, *, slots: int, busy: int, running: int, prefix_cache: Any = None) -> str:
        """The Prometheus text format (version 0.0.4); prefix_cache: the engine's PrefixCache, if it has one."""
        out: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {help}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
                       for labels, value in samples)

        with self._lock:
            reqs = sorted(self.requests.items())
        metric("llama2_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
               [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in reqs] or [("", 0)])
        metric("llama2_prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
               [("", self.prompt_tokens)])
        metric("llama2_generation_tokens_total", "counter", "Tokens generated.", [("", self.generated_tokens)])
        metric("llama2_requests_cancelled_total", "counter", "Requests cancelled because the client went away.",
               [("", self.cancelled)])
        metric("llama2_decode_steps_total", "counter", "Engine steps run.", [("", self.steps)])
        metric("llama2_decode_step_seconds_total", "counter", "Time spent in engine steps (the model's work).",
               [("", float(self.step_seconds))])
        metric("llama2_batch_size", "gauge", "Requests decoded in the last engine step.", [("", self.batch_size)])
        metric("llama2_batch_size_sum", "counter", "Sum over steps of the requests decoded (divide by steps).",
               [("", self.batch_size_sum)])
        metric("llama2_queue_depth", "gauge", "Requests waiting for a slot.", [("", self.queue_depth)])
        metric("llama2_requests_running", "gauge", "Requests holding a slot.", [("", running)])
        metric("llama2_slots_busy", "gauge", "Engine slots in use.", [("", busy)])
        metric("llama2_slots_total", "gauge", "Engine slots (most requests decoded together).", [("", slots)])
        metric("llama2_queue_wait_seconds", "summary", "Time from submission to a slot.",
               [("_sum", float(self.queue_wait_sum)), ("_count", self.queue_wait_count)])
        metric("llama2_time_to_first_token_seconds", "summary",
               "Time from submission to a request's first token (queueing and prefill included).",
               [("_sum", float(self.ttft_sum)), ("_count", self.ttft_count)])
        if prefix_cache is not None:
            metric("llama2_prefix_cache_queries_total", "counter", "Prompts looked up in the prefix cache.",
                   [("", prefix_cache.lookups)])
            metric("llama2_prefix_cache_hits_total", "counter", "Prompts that found a stored prefix.",
                   [("", prefix_cache.hits)])
            metric("llama2_prefix_cache_hit_tokens_total", "counter",
                   "Prompt positions copied from the prefix cache instead of computed.",
                   [("", prefix_cache.hit_positions)])
            metric("llama2_prefix_cache_blocks", "gauge", "Blocks of 16 positions stored / the most it holds.",
                   [('{state="stored"}', prefix_cache.stored_blocks), ('{state="capacity"}', prefix_cache.blocks)])
        return "\n".join(out) + "\n"
