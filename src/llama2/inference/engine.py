"""A step-level generation engine: requests join and leave between decode steps.

`Engine(model, tokenizer, max_slots, max_len)` owns one KV cache of fixed slots, `[max_slots, n_kv_heads,
max_len, head_dim]` per layer, allocated once. `add(request)` gives a request a free slot; the next `step()`
prefills the requests added since the last one (in groups of similar prompt lengths, one right-padded forward
per group), decodes every other active slot in one forward (one row per slot, each with its own rotary position
and a `key <= position` mask over its own slot, attending over the longest active length only), samples one
token per request with its own SamplingParams and torch.Generator (greedy rows in one argmax, sampled rows'
filters in one batched pass with per-row settings; a request's uniform draws come from its own generator, so its
tokens never depend on the other rows), and returns the events: new tokens, text pieces that never change once
emitted (for streamed requests; others decode their text once, at the end), logprobs and finish reasons.
`cancel(slot)` ends a request between steps. The cache rows in use are packed at the front at the start of each
step: a request added after another left takes its row as it is; otherwise the last row's request moves into
the hole (its keys and values are copied once), so a decode step computes active rows only. The slot number
`add` returned stays that request's handle. When every row is at the same position (one request, say) a step
runs without a mask, as plain batch-1 decoding does.

A prompt longer than `prefill_chunk` positions (default 512) is prefilled chunk by chunk, each chunk attending to
the keys the earlier ones wrote, so no prefill forward holds more than one chunk's activations. With
`compile`, decode steps run through torch.compile over fixed shapes (see `Engine`): a few graphs per engine, one
per power-of-two row bucket, none for new prompt lengths; the greedy argmax is taken inside the graph, and a
step moves one small tensor to the device (tokens and positions) and one back (the sampled token ids, which
the stop rules and streamed text need on the host). Sampled rows are filtered and drawn on the device too,
from uniforms drawn ahead on the host in blocks of 64 per request.

Tools (SamplingParams.tools): when the text a request writes closes a tool call block (llama2.tools.format), the
engine runs the calls with the request's Toolbox and queues the results (encoded as they continue the text) with
the closing token; at the next step they are fed into the request's own slot at its own positions (the results of
every request that called in the same step in one right-padded forward) and the request samples on from there, in
the batch with the others. Completion.tool_calls and tool_spans say what ran and which tokens were appended.

Every forward goes through the model's root `__call__` (so FSDP2's hooks run). A server calls add/step/cancel
from its loop; `Generator.generate`/`stream` are thin loops over it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import Llama2Error
from ..fused_ops import target_logprobs_and_top
from ..model import KVCache
from ..tokenizer import TokenizerLike, decode_after, encode_continuation
from ..tools import ToolCall
from ..tools.format import CALL_CLOSE, CALL_OPEN, last_call_block, parse_call_block, results_text
from .adapters import AdapterBank
from .grammar import Constrainer
from .prefix_cache import PrefixCache
from .sampling import Completion, FinishReason, SamplingParams, sample_rows
from .sharded import is_fsdp


@dataclass
class Request:
    """A prompt (token ids, or text encoded with BOS) and how to complete it."""

    prompt: Sequence[int] | str
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Event:
    """What one step did for one request. token: the new token (None when the step only ends the request,
    e.g. on a stop id, which is not part of the output); text: new text that will never change (a split
    UTF-8 character and a possible stop-string prefix are held back; "" until the last event for a request
    added with stream=False, whose last event has all of its text); logprob / raw_logprob: the token's
    log-probability under the sampled / the raw distribution; finish_reason and completion: set on the
    request's last event."""

    slot: int
    token: int | None
    text: str
    logprob: float | None = None
    raw_logprob: float | None = None
    finish_reason: FinishReason | None = None
    completion: Completion | None = None
    top_logprobs: list[tuple[int, float]] | None = None  # the token's position's alternatives, when asked


# ------------------------------------------------------------------------------------------- cache views


class _PrefillView:
    """One slot of a KVCache, written from position `start` on (KVCache's update semantics)."""

    def __init__(self, cache: KVCache, slot: int) -> None:
        self.k, self.v = cache.k[slot:slot + 1], cache.v[slot:slot + 1]

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class _BatchPrefillView:
    """Prompts starting at position 0, one per given cache row (right-padded to a common length): the keys and
    values go to their rows, and attention reads the fresh ones (nothing before them)."""

    def __init__(self, cache: KVCache, rows: Tensor) -> None:
        self.cache, self.rows = cache, rows

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        assert start == 0
        T = k.shape[2]
        self.cache.k[:, :, :T].index_copy_(0, self.rows, k)
        self.cache.v[:, :, :T].index_copy_(0, self.rows, v)
        return k, v


class _ExtensionView:
    """Cache rows each written from its own position on (tool results fed into running requests, right-padded to
    a common length): the keys and values go to their rows at their positions through one index_copy_ into the
    flattened cache, and attention reads the rows' first `length` positions (the mask hides what is not each
    row's own)."""

    def __init__(self, cache: KVCache, rows: Tensor, index: Tensor, length: int) -> None:
        d = cache.k.shape[-1]
        self.flat_k, self.flat_v = cache.k.view(-1, d), cache.v.view(-1, d)
        self.k, self.v, self.rows, self.index, self.length = cache.k, cache.v, rows, index, length

    def update(self, start: Tensor | int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        d = k.shape[-1]
        self.flat_k.index_copy_(0, self.index, k.reshape(-1, d))
        self.flat_v.index_copy_(0, self.index, v.reshape(-1, d))
        return self.k[self.rows, :, :self.length], self.v[self.rows, :, :self.length]


class _StepState:
    """What every layer's decode view needs for one step (set once per step, shared by the views): how many
    positions attention reads, and where each (row, head)'s new key goes in the flattened cache (None: every
    row writes at position length - 1)."""

    def __init__(self) -> None:
        self.length = 0
        self.index: Tensor | None = None


class _DecodeView:
    """Slots 0..n-1 of a KVCache for one decode step: row i writes its new key/value at its own position
    (through one index_copy_ into the flattened cache) and attends over the first `length` positions (the mask
    hides the rest)."""

    def __init__(self, cache: KVCache, n: int, state: _StepState) -> None:
        self.k, self.v = cache.k[:n], cache.v[:n]
        d = cache.k.shape[-1]
        self.flat_k, self.flat_v = cache.k.view(-1, d), cache.v.view(-1, d)
        self.state = state

    def update(self, positions: Tensor | int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        s = self.state
        if s.index is None:  # every row at the same position: a plain slice write
            p = s.length - 1
            self.k[:, :, p:p + 1] = k
            self.v[:, :, p:p + 1] = v
        else:
            d = k.shape[-1]
            self.flat_k.index_copy_(0, s.index, k.reshape(-1, d))
            self.flat_v.index_copy_(0, s.index, v.reshape(-1, d))
        return self.k[:, :, :s.length], self.v[:, :, :s.length]


class _StaticView:
    """Slots 0..n-1 and every position of a KVCache for compiled decode steps (fixed shapes): row i writes at
    its own position positions[i]; attention reads every position (the mask hides the unused)."""

    def __init__(self, cache: KVCache, n: int) -> None:
        self.k, self.v = cache.k[:n], cache.v[:n]

    def update(self, positions: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        rows = torch.arange(self.k.shape[0], device=self.k.device)
        self.k[rows, :, positions] = k[:, :, 0]
        self.v[rows, :, positions] = v[:, :, 0]
        return self.k, self.v


def _decode_forward(model: nn.Module, tokens: Tensor, positions: Tensor, key_valid: Tensor,
                    views: list) -> Tensor:
    """One decode step: last-position logits (rows, vocab)."""
    return model(tokens, positions, views, positions=positions[:, None], mask=key_valid, output="last")


def _static_decode_step(model: nn.Module, meta: Tensor, key_pos: Tensor, views: list) -> tuple[Tensor, Tensor]:
    """One decode step over every slot and every position, what torch.compile sees (fixed shapes): meta (2,
    slots) holds each row's token and position; returns the logits (slots, vocab) and each row's argmax (the
    greedy token), computed on the device inside the same graph. The mask (key <= position) is built here too,
    so a step costs one host-to-device copy (meta) and one device-to-host copy (the tokens, read by the
    engine's stop rules)."""
    tokens, positions = meta[0][:, None], meta[1]
    key_valid = (key_pos[None, :] <= positions[:, None])[:, None, None, :]
    logits = _decode_forward(model, tokens, positions, key_valid, views)
    return logits, logits.argmax(dim=-1)


# ------------------------------------------------------------------------------------ per-request state


TEXT_CONTEXT = 4  # prompt tokens decoded before the generated ones (their text is then cut off)
TOOL_CONTEXT = 512  # prompt tokens searched for a call block the prompt opened (a prefilled call)


class _Active:
    """One request's progress: its slot and cache length, generated tokens and logprobs, stop detection and
    stable streamed text. Text is decoded from the whole sequence (the prompt too with echo) so pieces join."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer: TokenizerLike, stop_ids: set[int],
                 generator: torch.Generator, stream: bool = True) -> None:
        self.prompt = prompt
        self.stream = stream  # events carry text pieces; otherwise the text is decoded once, at the end
        self.params = params
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.generator = generator
        self.slot = -1  # the request's handle (add's return value), stable while it runs
        self.row = -1  # its row of the KV cache (rows stay packed at the front: it may move)
        self.length = 0  # positions of the slot holding this request's keys and values
        self.prefilled = False
        self.pending: int | None = None  # sampled, not yet fed to the model
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.raw_logprobs: list[float] = []
        self.prompt_logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []  # with params.top_logprobs: per token, (id, logprob) best first
        self.prompt_top: list[list[tuple[int, float]]] = []
        self.finish: FinishReason | None = None
        self.cut: int | None = None  # where a stop string begins in the generated text
        # The text is decoded after (a tail of) the prompt and read as the difference, so a first token's leading
        # space (SentencePiece drops it at the start of a sequence) is kept and prompt + text reads as the whole.
        self._base = list(prompt) if params.echo else []
        self._context = list(prompt) if params.echo else list(prompt[-TEXT_CONTEXT:])
        self._base_text = tokenizer.decode(self._base).rstrip("\ufffd") if params.echo else ""  # echoed text
        self._gen_text: str | None = ""  # decoded generated text; None when stale
        self._searched = 0
        self._emitted = 0
        self._longest_stop = max((len(s) for s in params.stop), default=0)
        self._uniforms: list[float] = []
        self.created = time.perf_counter()  # when the request was accepted (prepared)
        self.first_token_at: float | None = None  # when its first token was sampled
        self.matcher = None  # the grammar's matcher (params.grammar), fed every kept token
        self.counts: dict[int, int] = {}  # generated tokens' counts, for the presence and frequency penalties
        self.calling = False  # the last token closed a tool call block (params.tools): run it before going on
        self.extension: list[int] | None = None  # tokens to feed at the next step's prefill (after a tool call)
        self.tool_calls: list[ToolCall] = []
        self.tool_spans: list[tuple[int, int]] = []
        self._call_prefix = ""  # a call block the prompt opened and left unclosed (a prefilled call), if any
        self._call_searched = 0  # how much of _call_prefix + gen_text() was searched for a call's end
        self._call_end = 0  # where the last call found ends in it
        self.adapter = 0  # the LoRA adapter's id in the engine's AdapterBank (0: the base model)
        if params.tools is not None:
            head = tokenizer.decode(list(prompt[-TOOL_CONTEXT:]))
            start = head.rfind(CALL_OPEN)
            if start >= 0 and CALL_CLOSE not in head[start:]:
                self._call_prefix = head[start:]

    def uniform(self) -> float:
        """The next uniform draw of this request's generator (drawn in blocks: one call per 64 tokens)."""
        if not self._uniforms:
            g = self.generator
            self._uniforms = torch.rand(64, generator=g, device=g.device).tolist()[::-1]
        return self._uniforms.pop()

    def push(self, token: int, logprob: float | None, raw_logprob: float | None,
             top: list[tuple[int, float]] | None = None) -> bool:
        """Add a sampled token (False when it is a stop id, which ends the request and is not kept)."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.stop_ids:
            self.finish = "stop"
            return False
        self.tokens.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
            self.raw_logprobs.append(raw_logprob)
        if top is not None:
            self.top.append(top)
        if self.params.presence_penalty or self.params.frequency_penalty:
            self.counts[token] = self.counts.get(token, 0) + 1
        self._gen_text = None
        if self.matcher is not None:
            if not self.matcher.consume_token(token):
                raise Llama2Error(f"the grammar refused token {token}: {self.matcher.get_error()}")
            if self.matcher.is_stopped():  # the text is complete and the grammar admits nothing more
                self.finish = "stop"
                return True
        if self.params.tools is not None and ">" in self.tokenizer.decode([token]):
            text = self._call_prefix + self.gen_text()  # a call closed by this token (which may hold more text)
            found = text.find(CALL_CLOSE, max(0, self._call_searched - len(CALL_CLOSE) + 1))
            self._call_searched = len(text)
            if found >= 0:
                self.calling = True
                self._call_end = found + len(CALL_CLOSE)
        if self.params.stop:
            text = self.gen_text()
            start = max(0, self._searched - self._longest_stop + 1)
            hits = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
            self._searched = len(text)
            if hits:
                self.cut = min(hits)
                self.finish = "stop"
                return True
        if len(self.tokens) >= self.params.max_new_tokens:
            self.finish = "length"
        return True

    def call_block(self) -> str | None:
        """The body of the call block just closed (it may have begun in the prompt)."""
        return last_call_block((self._call_prefix + self.gen_text())[:self._call_end])

    def gen_text(self) -> str:
        """The generated tokens' text (as it reads after the prompt with echo), before any stop cut."""
        if self._gen_text is None:
            self._gen_text = decode_after(self.tokenizer, self._context, self.tokens)
        return self._gen_text

    def text(self) -> str:
        text = self.gen_text()
        return self._base_text + (text if self.cut is None else text[:self.cut])

    def new_text(self) -> str:
        """Text not yet streamed that can no longer change: the whole rest once finished; before that, hold
        back a trailing U+FFFD (a split multi-byte character) and any tail that may begin a stop string. A request
        that is not streamed gets all of its text in its last event."""
        if self.finish is None and not self.stream:
            return ""
        if self.finish is not None:
            safe = self.text()
        else:
            gen = self.gen_text().rstrip("\ufffd")
            safe = self._base_text + gen[:len(gen) - _stop_prefix_len(gen, self.params.stop)]
        if len(safe) <= self._emitted:
            return ""
        piece, self._emitted = safe[self._emitted:], len(safe)
        return piece

    def completion(self) -> Completion:
        assert self.finish is not None
        tokens = self._base + self.tokens
        lps = raw = None
        if self.params.logprobs:
            lps, raw = list(self.logprobs), list(self.raw_logprobs)
            if self.params.echo:
                lps, raw = self.prompt_logprobs + lps, self.prompt_logprobs + raw
        top = None
        if self.params.top_logprobs:
            top = (self.prompt_top if self.params.echo else []) + self.top
        ttft = None if self.first_token_at is None else self.first_token_at - self.created
        shift = len(self._base)
        return Completion(list(self.prompt), tokens, self.text(), lps, self.finish, raw, ttft, top,
                          list(self.tool_calls), [(a + shift, b + shift) for a, b in self.tool_spans])

    def append_results(self, ids: list[int], calls: list[ToolCall]) -> None:
        """Add a tool call block's results (token ids the model did not sample) to the output."""
        start = len(self.tokens)
        self.tokens += ids
        if self.params.logprobs:
            self.logprobs += [0.0] * len(ids)
            self.raw_logprobs += [0.0] * len(ids)
        if self.params.top_logprobs:
            self.top += [[] for _ in ids]
        self.tool_spans.append((start, len(self.tokens)))
        self.tool_calls += calls
        self._gen_text = None


def _adjust(logits: Tensor, rows: list[_Active], at: list[int]) -> Tensor:
    """logits with each row's logit_bias added and its presence and frequency penalties subtracted (a copy)."""
    out = logits.float().clone()
    for i, r in zip(at, rows):
        p = r.params
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=out.device)
            out[i, ids] += torch.tensor(list(p.logit_bias.values()), dtype=out.dtype, device=out.device)
        if r.counts:
            ids = torch.tensor(list(r.counts), device=out.device)
            n = torch.tensor(list(r.counts.values()), dtype=out.dtype, device=out.device)
            out[i, ids] -= p.frequency_penalty * n + p.presence_penalty
    return out


def _top_logprobs(logits: Tensor, rows: list[_Active], tokens: Tensor, raws: list) -> list:
    """Per row, the top_logprobs alternatives of its raw distribution ((id, logprob), best first), or None; the
    raw logprob of each such row's token is recomputed alongside, so a most-likely token equals its top entry."""
    want = [i for i, r in enumerate(rows) if r.params.top_logprobs]
    out: list = [None] * len(rows)
    if not want:
        return out
    sub = logits[want].float()
    lse = torch.logsumexp(sub, dim=-1, keepdim=True)
    top = sub.topk(min(max(rows[i].params.top_logprobs for i in want), sub.shape[-1]), dim=-1)
    values, ids = (top.values - lse).tolist(), top.indices.tolist()
    picked = (sub.gather(1, tokens[want][:, None].to(sub.device)) - lse).squeeze(1).tolist()
    for j, i in enumerate(want):
        k = rows[i].params.top_logprobs
        out[i] = list(zip(ids[j][:k], values[j][:k]))
        raws[i] = picked[j]
    return out


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ---------------------------------------------------------------------------------------------- the engine


def check_decoding_options(prefill_chunk: int | None, compile: bool | str | Callable) -> int:
    """The prefill chunk to use (None: Engine.PREFILL_CHUNK); raises Llama2Error for a bad chunk or compile."""
    chunk = Engine.PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise Llama2Error(f"prefill_chunk must be an integer >= 1 (prompt positions per forward), got {chunk!r}")
    if not isinstance(compile, (bool, str)) and not callable(compile):
        raise Llama2Error(f"compile must be True/False or a torch.compile backend (a name or callable), "
                          f"got {compile!r}")
    return chunk


class Engine:
    """Continuous batching over a fixed-slot KV cache (see the module docstring).

    model: a Transformer (possibly quantised, kernel-wrapped or FSDP2-sharded; it is only called through its
    forward). max_slots: most requests at once. max_len: positions per slot (prompt + generated tokens; default
    the model's max_seq_len, at most the rotary table's 2 x max_seq_len). compile: True (or a torch.compile
    backend name or callable, e.g. "eager"; True means "inductor") runs decode steps through torch.compile over
    fixed shapes: the rows in use rounded up to a power of two (1, 2, 4, ... max_slots) and every position
    (the mask hides what is unused), so an engine compiles at most 1 + ceil(log2(max_slots)) graphs, one per
    row bucket it meets, and never again for other prompt lengths or positions; the greedy tokens are taken on
    the device inside the graph. prefill_chunk: most prompt positions one prefill forward computes (longer prompts
    are prefilled chunk by chunk, each chunk attending to the cache written by the ones before; requests joining
    together are grouped within that size too), so a long prompt never holds more than one chunk's activations.
    share_prompts (default on): requests joining at the same step with the same prompt (the K samples of one
    prompt) prefill it once; the others copy its keys and values and its last logits, then sample on their own.
    prefix_cache: positions of keys and values kept across requests (0: none; see prefix_cache.py), in blocks
    of 16: a prompt that begins with a stored prefix (a system prompt, an earlier turn and its answer) copies it
    and prefills only the rest. Prompts are stored as they are prefilled, and prompt plus answer when a request
    ends.

    adapters: an AdapterBank (adapters.py) whose `model` is `model`: each request runs with the LoRA adapter its
    SamplingParams.adapter names, rows of different adapters in the same forwards (sharing and the prefix cache
    keep each adapter's keys and values apart). Not with compile.
    """

    # requests joining at one step are prefilled together in groups of similar prompt lengths (right-padded):
    # a group grows while its padded size stays within this factor of its tokens, up to prefill_chunk in all
    PREFILL_PADDING = 1.25
    PREFILL_CHUNK = 512
    ANSWER_ROOM = 16  # tokens of max_new_tokens a tool result must leave for the answer after it

    def __init__(self, model: nn.Module, tokenizer: TokenizerLike, *, max_slots: int = 8,
                 max_len: int | None = None, compile: bool | str | Callable = False,
                 prefill_chunk: int | None = None, prefix_cache: int = 0, share_prompts: bool = True,
                 adapters: AdapterBank | None = None) -> None:
        limit = 2 * model.config.max_seq_len  # the rotary table's length
        if adapters is not None and adapters.model is not model:
            raise Llama2Error("the engine's model must be its AdapterBank's model (bank.model)")
        if adapters is not None and compile is not False:
            raise Llama2Error("LoRA adapters and compile cannot be combined; serve adapters without --compile")
        if isinstance(max_slots, bool) or not isinstance(max_slots, int) or max_slots < 1:
            raise Llama2Error(f"max_slots must be an integer >= 1, got {max_slots!r}")
        if max_len is not None and not 0 < max_len <= limit:
            raise Llama2Error(f"max_len must be in 1..{limit} for this model, got {max_len}")
        self.prefill_chunk = check_decoding_options(prefill_chunk, compile)
        self.model = model
        self.adapters = adapters
        self.tokenizer = tokenizer
        self._constrainer = Constrainer(tokenizer, model.config.vocab_size)
        self.max_slots = max_slots
        self.max_len = max_len or model.config.max_seq_len
        ref = model.embed_tokens.weight
        self.device, self.dtype = ref.device, ref.dtype
        self.cache = model.make_cache(max_slots, self.max_len, dtype=self.dtype, device=self.device)
        self.share_prompts = share_prompts
        self.prefix_cache = PrefixCache(self.cache, prefix_cache) if prefix_cache else None
        self.compile = compile is not False
        self._backend = "inductor" if compile is True else compile
        self._compiled = None
        self._static_views: dict[int, list[_StaticView]] = {}  # by row bucket
        self._state = _StepState()
        self._views: dict[int, list[_DecodeView]] = {}
        self._heads = self.cache[0].k.shape[1]
        self._head_base: dict[int, Tensor] = {}  # n -> ((row * heads + head) * max_len), (n, heads)
        self._key_pos = torch.arange(self.max_len, device=self.device)
        self._zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self._neg_inf = torch.full((), float("-inf"), dtype=self.dtype, device=self.device)
        # inference_mode is the cheaper of the two, but FSDP2 would allocate its gathered weights as inference
        # tensors there, which training cannot use afterwards: a sharded model decodes under no_grad
        self._no_autograd = torch.no_grad if is_fsdp(model) else torch.inference_mode
        self._slots: list[_Active | None] = [None] * max_slots  # by handle
        self._rows: list[_Active | None] = []  # by cache row; None: a hole, filled by add or packed by step

    # -- public API --------------------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return sum(r is None for r in self._slots)

    @property
    def active(self) -> list[int]:
        """Slots holding a request (prefilled or waiting for the next step's prefill)."""
        return [i for i, r in enumerate(self._slots) if r is not None]

    def add(self, request: Request | Sequence[int] | str, params: SamplingParams | None = None, *,
            stream: bool = True) -> int:
        """Queue a request for the next step's prefill; returns its slot. Raises Llama2Error when the request
        is invalid (bad ids, too long for max_len) or no slot is free. stream=False: its events carry no text
        until the last one (which has all of it), so text is decoded once (unless stop strings need it)."""
        if not isinstance(request, Request):
            request = Request(request, params or SamplingParams())
        return self._admit(self.prepare(request.prompt, request.params, stream))

    def cancel(self, slot: int) -> Completion | None:
        """End the request in `slot` now (finish_reason "cancelled") and free the slot; None if it is free."""
        r = self._slots[slot] if 0 <= slot < self.max_slots else None
        if r is None:
            return None
        self._release(r)
        if r.finish is None:
            r.finish = "cancelled"
        return r.completion()

    def step(self) -> list[Event]:
        """Decode every active slot one token (and prefill the requests added since the last step, whose first
        token is sampled here too). Returns one event per request that produced a token or finished."""
        with self._no_autograd():
            self._pack()
            rows: list[_Active] = []
            logits: list[Tensor] = []
            greedy: Tensor | None = None  # the decoded rows' argmax, when the compiled step computed it
            fed = [r for r in self._rows if r.pending is not None]  # in row order
            if fed:
                out, greedy = self._decode(fed)
                logits.append(out)
                rows += fed
            events: list[Event] = []
            joining = [r for r in self._rows if not r.prefilled]
            if joining:
                done = self._prefill(joining, rows, logits)
                events += [self._finish(r, None) for r in done]  # nothing to generate (max_new_tokens 0)
            if not rows:
                return events
            if greedy is not None and len(logits) > 1:  # rows prefilled this step have no precomputed argmax
                greedy = None
            logits = logits[0] if len(logits) == 1 else torch.cat(logits)
            adjusted = [i for i, r in enumerate(rows) if r.params.logit_bias or r.counts]
            if adjusted:
                logits = _adjust(logits, [rows[i] for i in adjusted], adjusted)
                greedy = None
            constrained = [i for i, r in enumerate(rows) if r.matcher is not None]
            if constrained:
                logits = self._constrainer.mask(logits, constrained, [rows[i].matcher for i in constrained])
                greedy = None
            want = any(r.params.logprobs for r in rows)
            params = [r.params for r in rows]
            uniforms = [r.uniform() for r in rows if r.params.temperature > 0]
            tokens, lps, raws = sample_rows(logits, params, logprobs=want, uniforms=uniforms, greedy=greedy)
            n = len(rows)
            lps = lps.tolist() if want else [None] * n
            raws = raws.tolist() if want else [None] * n
            tops = _top_logprobs(logits, rows, tokens, raws)
            for r, tok, lp, raw, top in zip(rows, tokens.tolist(), lps, raws, tops):
                if not r.params.logprobs:
                    lp = raw = None
                kept = r.push(tok, lp, raw, top)
                if r.calling and r.finish is None:
                    self._run_tools(r, tok)
                if r.finish is not None:
                    events.append(self._finish(r, tok if kept else None, lp if kept else None,
                                               raw if kept else None, top if kept else None))
                else:
                    r.pending = tok if r.extension is None else None  # (else fed with the results)
                    events.append(Event(r.slot, tok, r.new_text() if r.stream else "", lp, raw, top_logprobs=top))
            return events

    def run(self) -> Iterator[list[Event]]:
        """step() until no request is left (what a batch job does; a server calls step itself)."""
        while self.active:
            yield self.step()

    # -- internals ---------------------------------------------------------------------------------------

    def prepare(self, prompt: Sequence[int] | str, params: SamplingParams, stream: bool = True) -> _Active:
        """Validate and encode a request (truncating the prompt when params.truncate allows); no slot yet.
        stream=False: its events carry no text until the last (the text is decoded once, at the end)."""
        if not isinstance(params, SamplingParams):
            raise Llama2Error(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        ids = self.tokenizer.encode(prompt, bos=True, eos=False) if isinstance(prompt, str) else \
            [int(i) for i in prompt]
        self._check_ids(ids)
        if params.logit_bias and max(params.logit_bias) >= self.model.config.vocab_size:
            raise Llama2Error(f"logit_bias names token {max(params.logit_bias)}, outside the model's vocabulary "
                              f"(0..{self.model.config.vocab_size - 1})")
        need = len(ids) + params.max_new_tokens
        if need > self.max_len:
            keep = self.max_len - params.max_new_tokens
            if not params.truncate or keep < 1:
                raise Llama2Error(
                    f"prompt of {len(ids)} tokens + max_new_tokens {params.max_new_tokens} = {need} exceeds the "
                    f"context of {self.max_len} tokens; shorten the prompt, lower max_new_tokens"
                    + (", or truncate the prompt (truncate=True / --truncate)" if keep >= 1 else ""))
            bos = self.tokenizer.bos_id
            ids = [bos] + ids[len(ids) - keep + 1:] if ids[0] == bos and keep > 1 else ids[len(ids) - keep:]
        # default: EOS, and a chat tag the vocabulary holds as one piece (a model starting a new turn is done)
        stop_ids = set(params.stop_ids if params.stop_ids is not None else
                       [self.tokenizer.eos_id, *getattr(self.tokenizer, "tag_ids", ())])
        gen = torch.Generator(device=self.device)
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()
        active = _Active(ids, params, self.tokenizer, stop_ids, gen, stream)
        if params.adapter is not None:
            if self.adapters is None:
                raise Llama2Error(f"adapter {params.adapter!r} asked for, but this engine has no LoRA adapters loaded")
            active.adapter = self.adapters.id(params.adapter)
        if params.grammar is not None:
            active.matcher = self._constrainer.matcher(params.grammar)
        return active

    def _check_ids(self, ids: list) -> None:
        n = self.model.config.vocab_size
        if not ids:
            raise Llama2Error("empty prompt: give at least one token (text prompts get a BOS)")
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < n)]
        if bad:
            raise Llama2Error(f"token id {bad[0]!r} is outside the model's vocabulary (0..{n - 1})")

    def _admit(self, r: _Active) -> int:
        try:
            slot = self._slots.index(None)
        except ValueError:
            raise Llama2Error(f"all {self.max_slots} slots are busy; step() until one finishes, cancel one, "
                              "or build the engine with more max_slots") from None
        r.slot = slot
        self._slots[slot] = r
        try:  # the lowest hole a finished request left, else a new row at the end
            r.row = self._rows.index(None)
            self._rows[r.row] = r
        except ValueError:
            r.row = len(self._rows)
            self._rows.append(r)
        return slot

    def _release(self, r: _Active) -> None:
        """Free r's slot and cache row. The row becomes a hole: a request added before the next step takes it
        (no copy); otherwise the next step packs the rows (see _pack)."""
        if self.prefix_cache is not None and r.length:  # its prompt and answer, for a later turn that repeats them
            self.prefix_cache.store((r.prompt + r.tokens)[:r.length], r.row, r.length, r.adapter)
        self._slots[r.slot] = None
        self._rows[r.row] = None
        while self._rows and self._rows[-1] is None:
            self._rows.pop()

    def _pack(self) -> None:
        """Move the last rows' requests into the holes (their keys and values are copied once), so the rows in
        use are 0..n-1 and decode steps never compute rows of finished requests."""
        rows = self._rows
        while None in rows:
            hole = rows.index(None)
            last = rows.pop()
            rows[hole] = last
            n = last.length
            if n:
                for c in self.cache:
                    c.k[hole, :, :n] = c.k[last.row, :, :n]
                    c.v[hole, :, :n] = c.v[last.row, :, :n]
            last.row = hole
            while rows and rows[-1] is None:
                rows.pop()

    def _finish(self, r: _Active, token: int | None, lp: float | None = None, raw: float | None = None,
                top: list[tuple[int, float]] | None = None) -> Event:
        self._release(r)
        return Event(r.slot, token, r.new_text(), lp, raw, r.finish, r.completion(), top)

    def _prefill(self, joining: list[_Active], rows: list[_Active], logits: list[Tensor]) -> list[_Active]:
        """Fill the joining requests' slots with their prompts: requests with prompt scoring (echo and logprobs)
        one at a time, the others in groups of similar lengths, one right-padded forward per group. Appends each
        request that will generate to rows and its last-position logits (1 row each) to logits, in the same
        order; returns the requests that generate nothing (they are then finished, their prompts scored if
        asked)."""
        done: list[_Active] = []
        plain: list[_Active] = []
        extending = [r for r in joining if r.extension is not None]  # tool results after a call
        if extending:
            logits.append(self._prefill_extensions(extending))
            rows += extending
        for r in joining:
            if r in extending:
                continue
            if r.params.echo and r.params.logprobs:
                out = self._prefill_scored(r)
                (done.append(r) if out is None else (rows.append(r), logits.append(out)))
            elif r.params.max_new_tokens > 0:
                plain.append(r)
            else:  # nothing to compute: it ends at once
                r.prefilled, r.finish = True, "length"
                done.append(r)
        plain, copies = self._share_prompts(plain)
        if self.prefix_cache is not None:
            plain = self._load_prefixes(plain, rows, logits)
        plain.sort(key=lambda r: len(r.prompt))
        group: list[_Active] = []
        tokens = 0
        for r in plain + [None]:
            if r is not None:
                t = len(r.prompt)
                size = (len(group) + 1) * t
                if not group or (size <= self.PREFILL_PADDING * (tokens + t) and size <= self.prefill_chunk):
                    group.append(r)
                    tokens += t
                    continue
            if group:
                logits.append(self._prefill_group(group))
                rows += group
                if self.prefix_cache is not None:
                    for g in group:
                        self.prefix_cache.store(g.prompt, g.row, g.length, g.adapter)
            group, tokens = ([r], len(r.prompt)) if r is not None else ([], 0)
        if copies:
            self._copy_prompts(copies, rows, logits)
        return done

    def _share_prompts(self, plain: list[_Active]) -> tuple[list[_Active], list[tuple[_Active, _Active]]]:
        """Requests with the same prompt (the K samples of one prompt): the first of each is prefilled, the others
        copy its keys and values (see _copy_prompts). Returns the requests to prefill and (copy, source) pairs."""
        if not self.share_prompts or len(plain) < 2:
            return plain, []
        first: dict[tuple[int, ...], _Active] = {}
        copies = []
        for r in plain:
            key = (r.adapter, *r.prompt)  # an adapter's keys and values are its own
            if key in first:
                copies.append((r, first[key]))
            else:
                first[key] = r
        return list(first.values()), copies

    def _copy_prompts(self, copies: list[tuple[_Active, _Active]], rows: list[_Active], logits: list[Tensor]) -> None:
        """Give each copy its source's prompt keys and values (one row copy per layer) and last-position logits."""
        for r, src in copies:
            n = len(r.prompt)
            for c in self.cache:
                c.k[r.row, :, :n] = c.k[src.row, :, :n]
                c.v[r.row, :, :n] = c.v[src.row, :, :n]
            r.length, r.prefilled = n, True
        at = {id(r): i for i, r in enumerate(rows)}
        out = logits[0] if len(logits) == 1 else torch.cat(logits)
        pick = torch.tensor([at[id(src)] for _, src in copies], device=out.device)
        logits[:] = [out, out[pick]]
        rows += [r for r, _ in copies]

    def _load_prefixes(self, plain: list[_Active], rows: list[_Active], logits: list[Tensor]) -> list[_Active]:
        """Requests whose prompt begins with a stored prefix: copy it into their rows and prefill only the rest,
        as tool results are fed (one right-padded forward from each row's own position). Returns the others."""
        cache = self.prefix_cache
        hit: list[_Active] = []
        for r in plain:
            chain = cache.lookup(r.prompt, len(r.prompt) - 1, r.adapter)  # at least one position left to compute
            if chain:
                r.length = cache.load(chain, r.row)
                r.extension = r.prompt[r.length:]
                hit.append(r)
        if not hit:
            return plain
        logits.append(self._prefill_extensions(hit))
        rows += hit
        for r in hit:
            cache.store(r.prompt, r.row, r.length, r.adapter)
        return [r for r in plain if r not in hit]

    def _routed(self, rows: Sequence[_Active | None]) -> contextlib.AbstractContextManager:
        """The forwards within compute row i with rows[i]'s LoRA adapter (None: an empty row, the base)."""
        if self.adapters is None or not self.adapters.names:
            return contextlib.nullcontext()
        return self.adapters.routed([0 if r is None else r.adapter for r in rows])

    def _chunks(self, start: int, end: int) -> list[tuple[int, int]]:
        """Positions start..end-1 in pieces of at most prefill_chunk."""
        c = self.prefill_chunk
        return [(s, min(s + c, end)) for s in range(start, end, c)]

    def _prefill_group(self, group: list[_Active]) -> Tensor:
        """One forward over the group's prompts (right-padded; each row is causal from position 0, so its
        padding, written after its prompt, is overwritten before any step reads it); logits (len(group), V)."""
        if len(group) == 1:  # alone: chunk by chunk when the prompt is longer than prefill_chunk
            r = group[0]
            views = [_PrefillView(c, r.row) for c in self.cache]
            toks = torch.tensor([r.prompt], dtype=torch.long, device=self.device)
            with self._routed(group):
                for s, e in self._chunks(0, toks.shape[1]):
                    out = self.model(toks[:, s:e], s, views, output="last")
        else:  # only groups within prefill_chunk positions (see _prefill)
            T = max(len(r.prompt) for r in group)
            toks = torch.tensor([r.prompt + [0] * (T - len(r.prompt)) for r in group], dtype=torch.long,
                                device=self.device)
            meta = torch.tensor([[r.row for r in group], [len(r.prompt) - 1 for r in group]], device=self.device)
            views = [_BatchPrefillView(c, meta[0]) for c in self.cache]
            with self._routed(group):
                out = self.model(toks, 0, views, output="last", index=meta[1])
        for r in group:
            r.length, r.prefilled = len(r.prompt), True
        return out

    def _prefill_extensions(self, group: list[_Active]) -> Tensor:
        """Feed each request's extension (the token that closed its call, then the results) at its own positions
        from r.length on, attending to its slot's cache: one right-padded forward for the requests whose padded
        extension fits their slot and is at most prefill_chunk long, the others alone, chunk by chunk. Returns
        the last real position's logits (len(group), vocab), in the order of group."""
        T = max(len(r.extension) for r in group)
        together = [r for r in group if r.length + T <= self.max_len] if T <= self.prefill_chunk else []
        out: dict[int, Tensor] = {}
        if len(together) > 1:
            heads = self._heads
            rows = torch.tensor([r.row for r in together], device=self.device)
            starts = torch.tensor([r.length for r in together], device=self.device)
            positions = starts[:, None] + torch.arange(T, device=self.device)[None, :]
            index = ((rows[:, None, None] * heads + torch.arange(heads, device=self.device)[None, :, None])
                     * self.max_len + positions[:, None, :]).reshape(-1)
            length = int(starts.max()) + T
            mask = self._key_pos[:length][None, None, :] <= positions[:, :, None]
            toks = torch.tensor([r.extension + [0] * (T - len(r.extension)) for r in together], dtype=torch.long,
                                device=self.device)
            last = torch.tensor([len(r.extension) - 1 for r in together], device=self.device)
            views = [_ExtensionView(c, rows, index, length) for c in self.cache]
            with self._routed(together):
                logits = self.model(toks, starts, views, positions=positions, mask=mask[:, None], output="last",
                                    index=last)
            for i, r in enumerate(together):
                out[id(r)] = logits[i:i + 1]
        for r in group:
            if id(r) not in out:
                views = [_PrefillView(c, r.row) for c in self.cache]
                toks = torch.tensor([r.extension], dtype=torch.long, device=self.device)
                base = r.length
                with self._routed([r]):
                    for s, e in self._chunks(base, base + toks.shape[1]):
                        out[id(r)] = self.model(toks[:, s - base:e - base], s, views, output="last")
        for r in group:
            r.length, r.prefilled, r.extension = r.length + len(r.extension), True, None
        return torch.cat([out[id(r)] for r in group])

    def _run_tools(self, r: _Active, token: int) -> None:
        """Run the call block r just closed with its toolbox and queue the results for the next step (with the
        closing token); a malformed block gets an error result. Results that would not leave room for the answer
        in max_new_tokens are replaced by an error saying so; if even that does not fit, the request ends."""
        r.calling = False
        body = r.call_block()
        try:
            calls = r.params.tools.run(parse_call_block(body or ""))
            results = [c.result or "" for c in calls]
        except Llama2Error as e:
            calls, results = [ToolCall("", {}, result=f"error: {e}", error=True, malformed=True)], [f"error: {e}"]
        left = r.params.max_new_tokens - len(r.tokens) - 1  # room for the results and at least one token
        ids = encode_continuation(self.tokenizer, results_text(results))
        if len(ids) > left - self.ANSWER_ROOM:
            note = f"error: the result ({len(ids)} tokens) does not fit in what is left of max_new_tokens"
            ids = encode_continuation(self.tokenizer, results_text([note] * len(results)))
            for c in calls:
                c.result, c.error = note, True
        if len(ids) > left:
            r.finish = "length"
            return
        r.append_results(ids, calls)
        r.extension = [token] + ids
        r.prefilled = False

    def _prefill_scored(self, r: _Active) -> Tensor | None:
        """Prefill with prompt log-probabilities (echo and logprobs); the last position's logits (1, vocab), or
        None when the request generates nothing (it is then finished)."""
        views = [_PrefillView(c, r.row) for c in self.cache]
        toks = torch.tensor([r.prompt], dtype=torch.long, device=self.device)
        T = toks.shape[1]
        out = None
        r.prompt_logprobs = [0.0]
        r.prompt_top = [[]]
        k = r.params.top_logprobs
        with self._routed([r]):
            for s, e in self._chunks(0, T - 1):
                if k:
                    h = self.model(toks[:, s:e], s, views, output="hidden")
                    lp, values, ids = target_logprobs_and_top(h, self.model.lm_head, toks[:, s + 1:e + 1], k)
                    r.prompt_top += [list(zip(i, v)) for i, v in zip(ids[0].tolist(), values[0].tolist())]
                else:
                    lp = self.model(toks[:, s:e], s, views, targets=toks[:, s + 1:e + 1], output="logprobs")
                r.prompt_logprobs += lp[0].tolist()
            if r.params.max_new_tokens > 0:
                out = self.model(toks[:, -1:], T - 1, views, output="last")
        r.length, r.prefilled = T, True
        if out is None:
            r.finish = "length"
        return out

    def _decode(self, rows: list[_Active]) -> tuple[Tensor, Tensor | None]:
        """Feed each row's pending token at its own position, all rows in one forward; logits (len(rows), V)
        in the order of rows, and (compiled steps only, else None) their argmax, computed on the device."""
        # cache rows < n without a fed request (only requests waiting for this step's prefill, which then
        # overwrites them, or, compiled, rows beyond the last request up to its bucket) write a token 0 at
        # position 0 of their own row (a request feeding tool results: where they will go): no effect on others
        n = rows[-1].row + 1
        if self.compile:  # fixed shapes: the rows in use rounded up to a power of two (at most max_slots)
            n = min(self.max_slots, 1 << (n - 1).bit_length())
        if n == len(rows):
            toks = [r.pending for r in rows]
            pos = [r.length for r in rows]
        else:
            toks, pos = [0] * n, [0] * n
            for i, other in enumerate(self._rows[:n]):  # a request waiting to feed tool results: write where
                if other is not None and other.extension is not None:  # they will go, not over its prompt
                    pos[i] = other.length
            for r in rows:
                toks[r.row], pos[r.row] = r.pending, r.length
        length = max(pos) + 1
        uniform = not self.compile and n == len(rows) and min(pos) == length - 1
        meta = torch.tensor([toks, pos], dtype=torch.long, device=self.device)  # one host-to-device copy
        tokens, positions = meta[0][:, None], meta[1]
        greedy = None
        if self.compile:
            if self._compiled is None:
                self._compiled = torch.compile(_static_decode_step, dynamic=False, backend=self._backend)
            views = self._static_views.get(n)
            if views is None:
                views = self._static_views[n] = [_StaticView(c, n) for c in self.cache]
            logits, greedy = self._compiled(self.model, meta, self._key_pos, views)
        else:
            views = self._views.get(n)
            if views is None:  # one set of views per row count, reused; the step state says what changes
                views = self._views[n] = [_DecodeView(c, n, self._state) for c in self.cache]
            with self._routed(rows if n == len(rows) else self._rows[:n]):
                state = self._state
                state.length = length
                if uniform:
                    # every row at the same position (one request, say): no mask, one rotary slice, slice writes
                    state.index = None
                    logits = self.model(tokens, length - 1, views, output="last")
                else:
                    base = self._head_base.get(n)
                    if base is None:
                        base = self._head_base[n] = (torch.arange(n * self._heads, device=self.device)
                                                     * self.max_len).view(n, self._heads)
                    state.index = (base + positions[:, None]).view(-1)
                    # an additive mask, made once for every layer: 0 where row i may attend (key <= its position)
                    mask = torch.where(self._key_pos[:length] <= positions[:, None], self._zero, self._neg_inf)
                    logits = _decode_forward(self.model, tokens, positions, mask[:, None, None, :], views)
        for r in rows:
            r.length += 1
            r.pending = None
        if n == len(rows):
            return logits, greedy
        pick = torch.tensor([r.row for r in rows], device=logits.device)
        return logits[pick], None if greedy is None else greedy[pick]
