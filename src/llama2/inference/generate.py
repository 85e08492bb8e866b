"""Text generation: prefill + decode with a preallocated KV cache, sampling, batching, streaming and stop rules.

The one generation path: chat, the server, evaluation, rejection sampling and PPO all generate through
`Generator`. Batched prompts of different lengths are left-padded; every row gets its own rotary positions and
a boolean mask, so a row yields the tokens it would yield alone. Rows that finish leave the batch.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from ..errors import Llama2Error
from ..model import KVCache, Transformer
from ..tokenizer import TokenizerLike


@dataclass
class SamplingParams:
    """How to sample. temperature 0 is greedy; top_p 1 and top_k 0 turn those filters off.

    stop: strings that end the completion (the returned text excludes them); stop_ids: token ids that end it
    (default: the tokenizer's EOS; they are not included in the output). echo: the output starts with the
    prompt tokens (with their log-probabilities when logprobs is on; the first token, having no context, gets
    0.0 as in Meta's code). truncate: a prompt too long for the context keeps its last tokens (and its BOS)
    instead of raising.
    """

    temperature: float = 0.6
    top_p: float = 0.9
    top_k: int = 0
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    stop_ids: list[int] | None = None
    seed: int | None = None
    logprobs: bool = False
    echo: bool = False
    truncate: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def number(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
                raise Llama2Error(f"sampling: {name} must be a number, got {v!r}")
            return float(v)

        def integer(name: str) -> int:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise Llama2Error(f"sampling: {name} must be an integer, got {v!r}")
            return v

        if number("temperature") < 0:
            raise Llama2Error(f"sampling: temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < number("top_p") <= 1:
            raise Llama2Error(f"sampling: top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if integer("top_k") < 0:
            raise Llama2Error(f"sampling: top_k must be >= 0 (0 = off), got {self.top_k}")
        if integer("max_new_tokens") < 0:
            raise Llama2Error(f"sampling: max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise Llama2Error(f"sampling: stop must be a list of non-empty strings, got {self.stop!r}")
        if self.stop_ids is not None and not all(isinstance(i, int) and i >= 0 for i in self.stop_ids):
            raise Llama2Error(f"sampling: stop_ids must be non-negative token ids, got {self.stop_ids!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise Llama2Error(f"sampling: seed must be an integer or None, got {self.seed!r}")

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


@dataclass
class Completion:
    """One prompt's result. tokens are the generated ids (prompt + generated with echo), without the stop id;
    logprobs (when asked) align with tokens; finish_reason is "stop" (a stop id or string) or "length"."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: Literal["stop", "length"]


# ----------------------------------------------------------------------------------------------- sampling


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the k-th largest of its row to -inf (k <= 0 or k >= vocab: unchanged)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(probs: Tensor, p: float) -> Tensor:
    """Nucleus filter as Meta's sample_top_p: sort descending, keep the tokens whose preceding cumulative
    probability is <= p (the smallest set reaching p), zero the tail beyond it, renormalise."""
    if p >= 1.0:
        return probs
    sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
    cum = torch.cumsum(sorted_p, dim=-1)
    sorted_p = sorted_p.masked_fill(cum - sorted_p > p, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """Next token per row of logits (B, V): argmax at temperature 0, else temperature, top-k, top-p, draw."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_k_filter(logits.float() / params.temperature, params.top_k)
    probs = top_p_filter(torch.softmax(logits, dim=-1), params.top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ------------------------------------------------------------------------------------------------ the cache


class CacheView:
    """The first `batch` rows and `length` slots of a preallocated KVCache, with KVCache's update semantics.
    Rows can be compacted in place when some finish."""

    def __init__(self, cache: KVCache, batch: int, length: int) -> None:
        self.k, self.v = cache.k[:batch, :, :length], cache.v[:batch, :, :length]

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def keep(self, rows: Tensor, filled: int) -> None:
        """Keep only `rows` (ascending indices), moved to the front; `filled` slots hold data."""
        n = rows.numel()
        self.k[:n, :, :filled] = self.k[rows, :, :filled]
        self.v[:n, :, :filled] = self.v[rows, :, :filled]
        self.k, self.v = self.k[:n], self.v[:n]


class StaticCacheView:
    """All slots of the first `batch` rows of a KVCache, written at a slot given as a tensor: fixed shapes
    for compiled decoding (attention then covers every slot, the mask hiding those not yet written)."""

    def __init__(self, cache: KVCache, batch: int) -> None:
        self.k, self.v = cache.k[:batch], cache.v[:batch]

    def update(self, start: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k.index_copy_(2, start, k)
        self.v.index_copy_(2, start, v)
        return self.k, self.v


# ----------------------------------------------------------------------------------------- per-row state


class _Row:
    """One prompt's progress: generated tokens and logprobs, stop detection, and stable streamed text.

    Text is decoded from the whole sequence (the prompt too with echo) so that pieces join exactly."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer: TokenizerLike,
                 stop_ids: set[int]) -> None:
        self.prompt = prompt
        self.params = params
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.prompt_logprobs: list[float] = []
        self.finish: Literal["stop", "length"] | None = None if params.max_new_tokens > 0 else "length"
        self.cut: int | None = None  # where a stop string begins in the generated text
        self._base = list(prompt) if params.echo else []
        self._base_text = tokenizer.decode(self._base) if params.echo else ""
        self._gen_text: str | None = ""  # decoded generated text; None when stale
        self._searched = 0
        self._emitted = 0
        self._longest_stop = max((len(s) for s in params.stop), default=0)

    def push(self, token: int, logprob: float | None) -> None:
        """Add a sampled token; sets finish when the row is done."""
        if token in self.stop_ids:
            self.finish = "stop"
            return
        self.tokens.append(token)
        self._gen_text = None
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.params.stop:
            text = self.gen_text()
            start = max(0, self._searched - self._longest_stop + 1)
            hits = [i for i in (text.find(s, start) for s in self.params.stop) if i >= 0]
            self._searched = len(text)
            if hits:
                self.cut = min(hits)
                self.finish = "stop"
                return
        if len(self.tokens) >= self.params.max_new_tokens:
            self.finish = "length"

    def gen_text(self) -> str:
        """The generated tokens' text (as it reads after the prompt with echo), before any stop cut."""
        if self._gen_text is None:
            self._gen_text = self.tokenizer.decode(self._base + self.tokens)[len(self._base_text):]
        return self._gen_text

    def text(self) -> str:
        text = self.gen_text()
        return self._base_text + (text if self.cut is None else text[:self.cut])

    def new_text(self) -> str:
        """Text not yet streamed that can no longer change: the whole rest once finished; before that, hold
        back a trailing U+FFFD (a split multi-byte character) and any tail that may begin a stop string."""
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
        lps = list(self.logprobs) if self.params.logprobs else None
        tokens = self._base + self.tokens
        if lps is not None and self.params.echo:
            lps = self.prompt_logprobs + lps
        return Completion(list(self.prompt), tokens, self.text(), lps, self.finish)


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ----------------------------------------------------------------------------------------------- generator


class Generator:
    """Generates from a Transformer with a tokenizer (encode/decode/bos_id/eos_id).

    max_batch_size: most prompts decoded together (longer lists run in chunks). cache_len: the context in
    tokens (default the model's max_seq_len); the KV cache is preallocated once and grown only when needed.
    quantize="int8": int8 linear layers (blocks of 32 with fp16 scales, llama.cpp's q8_0 layout; see
    quantize.py), about 3.8x fewer bytes per decoded token than fp32; the given model is left untouched, its
    other weights are shared. compile=True: decode steps run through torch.compile over fixed shapes (a one-off
    compilation, seconds to minutes, per batch size and cache size; worth it for long or repeated generation).
    fast_fp32 (default: on for an fp32 CPU model without quantize, where the C kernel builds): one-row decode
    steps multiply by the fp32 weights through the matrix-vector kernel of cpu_kernels.py (fastlinear.py),
    exact fp32 summed in another order; the model is wrapped in a copy sharing its parameters, not changed.
    A Generator serves one call at a time (it owns one KV cache).
    """

    def __init__(self, model: Transformer, tokenizer: TokenizerLike, *, max_batch_size: int = 8,
                 cache_len: int | None = None, quantize: str | None = None, compile: bool = False,
                 fast_fp32: bool | None = None) -> None:
        if max_batch_size < 1:
            raise Llama2Error(f"max_batch_size must be >= 1, got {max_batch_size}")
        limit = 2 * model.config.max_seq_len  # the rotary table's length
        if cache_len is not None and not 0 < cache_len <= limit:
            raise Llama2Error(f"cache_len must be in 1..{limit} for this model, got {cache_len}")
        if quantize not in (None, "none", "int8"):
            raise Llama2Error(f"unknown quantize {quantize!r}; choose int8 or none")
        if quantize == "int8":
            from . import cpu_kernels
            from .quantize import quantize_int8

            if model.embed_tokens.weight.device.type == "cpu" and not cpu_kernels.available():
                warnings.warn("int8 decoding: the C kernel could not be built here (needs gcc and an AVX2 CPU); "
                              "falling back to dequantised matmuls, which are slower than fp32", stacklevel=2)
            model = quantize_int8(model)
        elif fast_fp32 is not False:
            model = _fast_fp32(model, explicit=fast_fp32 is True)
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.context = cache_len or model.config.max_seq_len
        self._cache: list[KVCache] | None = None
        self.compile = compile
        self._step = None

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' (and the KV cache's) dtype."""
        return self.model.embed_tokens.weight.dtype

    # -- public API --------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]] | Sequence[str],
                 params: SamplingParams | None = None) -> list[Completion]:
        """Complete each prompt (token ids, or text encoded with BOS). Returns one Completion per prompt."""
        params = params or SamplingParams()
        rows = [self._row(p, params) for p in prompts]
        out: list[Completion] = []
        for i in range(0, len(rows), self.max_batch_size):
            chunk = rows[i:i + self.max_batch_size]
            for _ in self._run(chunk, params):
                pass
            out.extend(r.completion() for r in chunk)
        return out

    def stream(self, prompt: Sequence[int] | str, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion's text in pieces as it is generated; the pieces join to `generate`'s text
        (with echo, the first piece is the prompt text). The generator's return value is the Completion."""
        params = params or SamplingParams()
        row = self._row(prompt, params)
        for _ in self._run([row], params):
            piece = row.new_text()
            if piece:
                yield piece
        piece = row.new_text()
        if piece:
            yield piece
        return row.completion()

    @torch.inference_mode()
    def token_logprobs(self, sequences: Sequence[Sequence[int]]) -> list[list[float]]:
        """Log-probability of every token given the ones before it: for a sequence of n tokens, n - 1 values
        (entry i scores token i + 1). For evaluation, reward shaping and PPO."""
        out: list[list[float]] = []
        for i in range(0, len(sequences), self.max_batch_size):
            chunk = [list(s) for s in sequences[i:i + self.max_batch_size]]
            for s in chunk:
                self._check_ids(s)
                if len(s) > self.context:
                    raise Llama2Error(f"sequence of {len(s)} tokens exceeds the context of {self.context}")
            T = max(len(s) for s in chunk)
            toks = torch.zeros(len(chunk), T, dtype=torch.long)
            for b, s in enumerate(chunk):  # right padding: causal attention keeps pads out of real tokens
                toks[b, :len(s)] = torch.tensor(s, dtype=torch.long)
            toks = toks.to(self.device)
            logits = self.model(toks).float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, toks[:, 1:, None]).squeeze(-1).cpu()
            out.extend(lp[b, :len(s) - 1].tolist() for b, s in enumerate(chunk))
        return out

    # -- internals ---------------------------------------------------------------------------------------

    def _check_ids(self, ids: list[int]) -> None:
        n = self.model.config.vocab_size
        if not ids:
            raise Llama2Error("empty prompt: give at least one token (text prompts get a BOS)")
        bad = [i for i in ids if not (isinstance(i, int) and 0 <= i < n)]
        if bad:
            raise Llama2Error(f"token id {bad[0]!r} is outside the model's vocabulary (0..{n - 1})")

    def _row(self, prompt: Sequence[int] | str, params: SamplingParams) -> _Row:
        ids = self.tokenizer.encode(prompt, bos=True, eos=False) if isinstance(prompt, str) else \
            [int(i) for i in prompt]
        self._check_ids(ids)
        need = len(ids) + params.max_new_tokens
        if need > self.context:
            keep = self.context - params.max_new_tokens
            if not params.truncate or keep < 1:
                raise Llama2Error(
                    f"prompt of {len(ids)} tokens + max_new_tokens {params.max_new_tokens} = {need} exceeds the "
                    f"context of {self.context} tokens; shorten the prompt, lower max_new_tokens"
                    + (", or truncate the prompt (truncate=True / --truncate)" if keep >= 1 else ""))
            bos = self.tokenizer.bos_id
            ids = [bos] + ids[len(ids) - keep + 1:] if ids[0] == bos and keep > 1 else ids[len(ids) - keep:]
        stop_ids = set(params.stop_ids if params.stop_ids is not None else [self.tokenizer.eos_id])
        return _Row(ids, params, self.tokenizer, stop_ids)

    def _views(self, batch: int, length: int) -> list[CacheView]:
        """Views of the preallocated cache; it is (re)allocated only when a call needs more than it holds."""
        c = self._cache
        if c is None or c[0].k.shape[0] < batch or c[0].max_len < length or c[0].k.device != self.device \
                or c[0].k.dtype != self.dtype:
            rows = max(batch, c[0].k.shape[0] if c else 0)
            slots = min(self.context, max(length, c[0].max_len if c else 0, 256))
            self._cache = None  # free the old one first
            self._cache = c = self.model.make_cache(rows, slots, dtype=self.dtype, device=self.device)
        return [CacheView(layer, batch, length) for layer in c]

    def _compiled_step(self):
        if self._step is None:
            self._step = torch.compile(_decode_step, dynamic=False)
        return self._step

    @torch.inference_mode()
    def _run(self, rows: list[_Row], params: SamplingParams) -> Iterator[None]:
        """Prefill and decode `rows` together; yields after every decode step."""
        device, model = self.device, self.model
        gen = torch.Generator(device=device)
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()
        if all(r.finish is not None for r in rows) and not (params.echo and params.logprobs):
            return  # max_new_tokens 0 and nothing to score
        B = len(rows)
        lens = torch.tensor([len(r.prompt) for r in rows])
        T = int(lens.max())
        total = T + params.max_new_tokens
        pads = (T - lens).to(device)
        padded = bool((pads > 0).any())
        toks = torch.zeros(B, T, dtype=torch.long)
        for b, r in enumerate(rows):
            toks[b, T - len(r.prompt):] = torch.tensor(r.prompt, dtype=torch.long)
        toks = toks.to(device)
        cache = self._views(B, total)

        positions = mask = key_valid = pos = None
        if padded:
            slots = torch.arange(total, device=device)
            key_valid = (slots[None, :] >= pads[:, None])[:, None, None, :]  # (B, 1, 1, total)
            positions = (slots[None, :T] - pads[:, None]).clamp(min=0)
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            # a pad query attends to itself only, so it stays finite and never reaches a real token
            mask = causal & (key_valid[..., :T] | torch.eye(T, dtype=torch.bool, device=device))
            pos = (lens.to(device) - 1)[:, None]
        hidden = model.hidden(toks, 0, cache, positions, mask)
        if params.echo and params.logprobs:
            lp = torch.log_softmax(model.lm_head(hidden[:, :-1]).float(), dim=-1)
            lp = lp.gather(-1, toks[:, 1:, None]).squeeze(-1).cpu()
            for b, r in enumerate(rows):
                r.prompt_logprobs = [0.0] + lp[b, T - len(r.prompt):].tolist()
        logits = model.lm_head(hidden[:, -1])

        step = None
        if self.compile:  # fixed shapes: the whole allocated cache, the slot and positions as tensors
            step = self._compiled_step()
            static = [StaticCacheView(c, B) for c in self._cache]
            all_slots = torch.arange(static[0].k.shape[2], device=device)
            static_valid = (all_slots[None, :] >= pads[:, None])[:, None, None, :]
            slot = torch.tensor([T - 1], device=device)
            pos = (lens.to(device) - 1)[:, None]
        batch = list(rows)  # the rows still in the batch, in batch order
        filled = T
        while any(r.finish is None for r in batch):
            nxt = sample(logits, params, gen)
            lps = None
            if params.logprobs:
                lps = torch.log_softmax(logits.float(), dim=-1).gather(-1, nxt[:, None]).squeeze(-1).tolist()
            ids = nxt.tolist()
            for b, r in enumerate(batch):
                if r.finish is None:
                    r.push(ids[b], None if lps is None else lps[b])
            yield
            keep = [b for b, r in enumerate(batch) if r.finish is None]
            if not keep:
                break
            if step is not None:  # finished rows stay (fixed shapes); their outputs are ignored
                slot += 1
                pos += 1
                logits = step(model, nxt[:, None], slot, pos, static_valid, static)
                continue
            if len(keep) < len(batch):  # finished rows leave the batch
                idx = torch.tensor(keep, device=device)
                for c in cache:
                    c.keep(idx, filled)
                nxt = nxt[idx]
                if padded:
                    key_valid, pos = key_valid[idx], pos[idx]
                batch = [batch[b] for b in keep]
            cur = nxt[:, None]
            if padded:
                pos = pos + 1
                logits = model(cur, filled, cache, pos, key_valid[..., :filled + 1])[:, -1]
            else:
                logits = model(cur, filled, cache)[:, -1]
            filled += 1


def _fast_fp32(model: Transformer, explicit: bool) -> Transformer:
    """model wrapped for the fp32 matrix-vector kernel when it is an fp32 CPU model and the kernel builds."""
    from . import cpu_kernels
    from .fastlinear import with_matvec_kernel

    w = model.embed_tokens.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return model
    if not cpu_kernels.available():
        if explicit:
            warnings.warn("fast_fp32: the C kernel could not be built here (needs gcc and an AVX2 CPU); "
                          "using PyTorch's matmuls", stacklevel=3)
        return model
    return with_matvec_kernel(model)


def _decode_step(model: Transformer, tokens: Tensor, slot: Tensor, positions: Tensor, key_valid: Tensor,
                 cache: list[StaticCacheView]) -> Tensor:
    """One decode step over fixed shapes (what torch.compile sees): the new token goes to cache `slot`, and
    attends to every valid slot up to it."""
    mask = key_valid & (torch.arange(key_valid.shape[-1], device=slot.device) <= slot)
    return model(tokens, slot, cache, positions, mask)[:, -1]
