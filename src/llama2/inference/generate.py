"""Text generation: `Generator.generate` (many prompts, batched) and `Generator.stream` (one prompt, text pieces),
thin loops over the step-level `Engine` (engine.py), which owns a fixed-slot KV cache and lets requests join and
leave between decode steps.

The one generation path: chat, the server, evaluation, rejection sampling and PPO all generate through here.
Every request has its own SamplingParams, seed and stop rules; a request yields the tokens it would yield alone.
Scoring (log-probabilities of given tokens, with gradients for PPO) is `scoring.sequence_logprobs`; generating
from an FSDP2-sharded policy: `sharded.gathered_for_generation`.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import torch

from ..errors import Llama2Error
from ..model import Transformer
from ..tokenizer import TokenizerLike
from . import cpu_kernels
from . import quantize as quantization  # not `quantize`: Generator's argument of that name
from .adapters import AdapterBank
from .engine import Engine, Event, Request, check_decoding_options
from .fastlinear import fast_fp32_model
from .sampling import Completion, SamplingParams, sample, sample_rows, top_k_filter, top_p_filter
from .scoring import sequence_logprobs
from .sharded import gathered_for_generation, is_fsdp

__all__ = ["Generator", "Engine", "Event", "Request", "SamplingParams", "Completion", "sample", "sample_rows",
           "top_k_filter", "top_p_filter", "sequence_logprobs", "gathered_for_generation"]


class Generator:
    """Generates from a Transformer with a tokenizer (encode/decode/bos_id/eos_id).

    max_batch_size: most requests decoded together (the engine's slots; more prompts join as others finish).
    cache_len: positions per request, prompt + generated (default the model's max_seq_len). The engine and its
    KV cache are allocated on first use, with min(max_batch_size, prompts) slots, and rebuilt larger only when a
    later call needs more. quantize="int8": int8 linear layers (blocks of 32 with fp16 scales, llama.cpp's q8_0
    layout; see quantize.py), about 3.8x fewer bytes per decoded token than fp32; the given model is left
    untouched, its other weights are shared. compile=True (or a torch.compile backend, e.g. "eager"): decode
    steps run through torch.compile over fixed shapes (a one-off compilation, seconds to minutes, per slot
    count and cache size, so the engine gets all max_batch_size slots at once; at most 1 + log2(max_batch_size)
    graphs, one per power-of-two row bucket, never again for other prompt lengths). prefill_chunk: most prompt
    positions per prefill forward (default Engine.PREFILL_CHUNK, 512; longer prompts go chunk by chunk, so
    their activations stay one chunk's). fast_fp32 (default: on for an fp32 CPU model without quantize, where
    the C kernel builds): forwards of up to 8 rows (decode steps of up to 8 active requests, prompts of up to 8
    tokens; up to 32 for weights of 1M elements or more) multiply by the fp32 weights through the kernels of
    cpu_kernels.py (fastlinear.py), exact fp32 summed in another order; more rows use the normal matmul. The
    model is wrapped in a copy sharing its parameters, not changed. prefix_cache: positions of keys and values
    the engine keeps across calls (0: none; see Engine), so a chat's next turn computes only what is new. An
    FSDP2-sharded model is used as it is (no quantize, no kernel): see `gathered_for_generation`. adapters: LoRA
    adapters by name ({name: PEFT adapter directory}; an empty dict: none yet, `self.adapters.load` adds them),
    served beside the base in the same batches: a request picks one with SamplingParams.adapter (see adapters.py).
    A Generator serves one call at a time (it owns one engine).
    """

    def __init__(self, model: Transformer, tokenizer: TokenizerLike, *, max_batch_size: int = 8,
                 cache_len: int | None = None, quantize: str | None = None, compile: bool | str | Callable = False,
                 fast_fp32: bool | None = None, prefill_chunk: int | None = None, prefix_cache: int = 0,
                 adapters: Mapping[str, str | Path] | None = None) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise Llama2Error(f"max_batch_size must be >= 1, got {max_batch_size}")
        limit = 2 * model.config.max_seq_len  # the rotary table's length
        if cache_len is not None and not 0 < cache_len <= limit:
            raise Llama2Error(f"cache_len must be in 1..{limit} for this model, got {cache_len}")
        if quantize not in (None, "none", "int8"):
            raise Llama2Error(f"unknown quantize {quantize!r}; choose int8 or none")
        sharded = is_fsdp(model)
        if quantize == "int8":
            if sharded:
                raise Llama2Error("quantize='int8' needs a plain model, not an FSDP-sharded one; generate from the "
                                  "sharded model inside gathered_for_generation(model) without quantize")
            if model.embed_tokens.weight.device.type == "cpu" and not cpu_kernels.available():
                warnings.warn("int8 decoding: the C kernel could not be built here (needs gcc and an AVX2 CPU); "
                              "falling back to dequantised matmuls, which are slower than fp32", stacklevel=2)
            model = quantization.quantize_int8(model)  # through the module: tests patch quantize_int8
        elif fast_fp32 is not False and not sharded:
            model = fast_fp32_model(model, explicit=fast_fp32 is True)
        self.adapters: AdapterBank | None = None
        if adapters is not None:
            if sharded:
                raise Llama2Error("LoRA adapters are served over a plain model, not an FSDP-sharded one")
            if compile is not False:
                raise Llama2Error("LoRA adapters and compile cannot be combined; leave compile off")
            self.adapters = AdapterBank(model)
            for name, path in adapters.items():
                self.adapters.load(name, path)
            model = self.adapters.model
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.context = cache_len or model.config.max_seq_len
        check_decoding_options(prefill_chunk, compile)
        self.compile = compile
        self.prefill_chunk = prefill_chunk
        self.prefix_cache = prefix_cache
        self._engine: Engine | None = None

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and the KV cache's) dtype."""
        return self.model.embed_tokens.weight.dtype

    def engine(self, slots: int = 1) -> Engine:
        """The engine, with at least min(slots, max_batch_size) slots; requests left over from an abandoned
        call are cancelled (a Generator serves one call at a time)."""
        # compiled: every slot from the start (a larger engine later would compile its graphs again)
        want = self.max_batch_size if self.compile is not False else max(1, min(slots, self.max_batch_size))
        e = self._engine
        if e is None or e.max_slots < want:
            self._engine = None  # free the old cache first
            self._engine = e = Engine(self.model, self.tokenizer, max_slots=want, max_len=self.context,
                                      compile=self.compile, prefill_chunk=self.prefill_chunk,
                                      prefix_cache=self.prefix_cache, adapters=self.adapters)
        for slot in e.active:
            e.cancel(slot)
        return e

    # -- public API --------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Complete each prompt (token ids, or text encoded with BOS). params: one SamplingParams for all (with
        a seed s, prompt i samples with seed s + i, so K copies of a prompt give K different samples) or one
        per prompt. Returns one Completion per prompt, in order. Every prompt is checked before any work."""
        per = _params_per_prompt(prompts, params)
        engine = self.engine(len(prompts))
        # not streamed: each request's text is decoded once, when it finishes (or as its stop strings need)
        waiting = deque(enumerate(engine.prepare(p, q, stream=False) for p, q in zip(prompts, per)))
        results: list[Completion | None] = [None] * len(per)
        running: dict[int, int] = {}  # slot -> prompt index
        try:
            while waiting or running:
                while waiting and engine.free_slots:  # requests join between decode steps
                    i, request = waiting.popleft()
                    running[engine._admit(request)] = i
                for event in engine.step():
                    if event.completion is not None:
                        results[running.pop(event.slot)] = event.completion
        finally:
            for slot in running:
                engine.cancel(slot)
        return results  # type: ignore[return-value]

    def stream(self, prompt: Sequence[int] | str, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text in pieces as it is generated; the pieces join to `generate`'s text
        (with echo, the first piece is the prompt text). The generator's return value is the Completion;
        closing it early cancels the request."""
        engine = self.engine(1)
        slot = engine._admit(engine.prepare(prompt, params or SamplingParams()))
        done: Completion | None = None
        try:
            while done is None:
                for event in engine.step():
                    if event.slot != slot:
                        continue
                    if event.text:
                        yield event.text
                    if event.completion is not None:
                        done = event.completion
        finally:
            if done is None:
                engine.cancel(slot)
        return done

    def token_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Log-probability of every token given the ones before it: for a sequence of n tokens, n - 1 values
        (entry i scores token i + 1). A convenience over `sequence_logprobs` (no gradients); training code
        that needs gradients calls sequence_logprobs(model, tokens, mask) itself."""
        out: list[list[float]] = []
        for i in range(0, len(sequences), self.max_batch_size):
            chunk = [[int(t) for t in s] for s in sequences[i:i + self.max_batch_size]]
            for s in chunk:
                if not s:
                    raise Llama2Error("empty sequence: give at least one token")
                if len(s) > self.context:
                    raise Llama2Error(f"sequence of {len(s)} tokens exceeds the context of {self.context}")
            T = max(len(s) for s in chunk)
            toks = torch.zeros(len(chunk), T, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.bool)
            for b, s in enumerate(chunk):  # right padding
                toks[b, :len(s)] = torch.tensor(s, dtype=torch.long)
                mask[b, :len(s)] = True
            with torch.no_grad():
                lp = sequence_logprobs(self.model, toks.to(self.device), mask.to(self.device)).cpu()
            out.extend(lp[b, :len(s) - 1].tolist() for b, s in enumerate(chunk))
        return out


def _params_per_prompt(prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] | None
                       ) -> list[SamplingParams]:
    if isinstance(prompts, str):
        raise Llama2Error("generate takes a list of prompts; wrap a single prompt in a list (or use stream)")
    if params is None or isinstance(params, SamplingParams):
        base = params or SamplingParams()
        if base.seed is None or len(prompts) == 1:
            return [base] * len(prompts)
        return [base.replace(seed=base.seed + i) for i in range(len(prompts))]
    per = list(params)
    if len(per) != len(prompts):
        raise Llama2Error(f"got {len(per)} SamplingParams for {len(prompts)} prompts; give one, or one per prompt")
    return per
