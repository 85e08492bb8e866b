"""Sampling: the per-request settings (SamplingParams), the result type (Completion), Meta's filters, and
`sample_rows`, which samples one token per row of a batch where every row has its own settings and its own
random generator, and reports the log-probability of each token under the distribution it was drawn from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import Llama2Error
from ..tools import ToolCall, Toolbox
from .grammar import Grammar

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class SamplingParams:
    """How to sample. temperature 0 is greedy; top_p 1 and top_k 0 turn those filters off.

    stop: strings that end the completion (the returned text excludes them); stop_ids: token ids that end it
    (default: the tokenizer's EOS, and the chat tags where its vocabulary holds them as single pieces; they are not
    included in the output). echo: the output starts with the
    prompt tokens (with their log-probabilities when logprobs is on; the first token, having no context, gets
    0.0 as in Meta's code). top_logprobs: with logprobs, the k most likely tokens of each position's raw
    distribution and their raw log-probabilities (prompt positions too with echo). truncate: a prompt too long
    for the context keeps its last tokens (and its BOS) instead of raising. grammar: the text must match it
    (constrained decoding, llama2.inference.grammar); the logprobs are then those of the masked distribution. logit_bias ({token id: -100..100}) is added to the
    logits; presence_penalty and frequency_penalty (-2..2, OpenAI's definition) subtract, from each token's logit,
    the presence penalty once it was generated and the frequency penalty times how often (the prompt does not
    count); both change the distribution that is sampled and scored. tools: the engine runs the calls the model
    writes (`<call>...</call>`, llama2.tools.format) with this Toolbox and appends their results to the request,
    which goes on in its slot; the appended tokens count towards max_new_tokens. adapter: the name of a LoRA adapter
    loaded into the engine (`Generator(adapters=...)`, llama2.inference.adapters) that this request runs with
    (None: the base model).
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
    top_logprobs: int = 0
    grammar: Grammar | None = None
    logit_bias: dict[int, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    tools: Toolbox | None = None
    adapter: str | None = None

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
        if integer("top_logprobs") < 0 or (self.top_logprobs and not self.logprobs):
            raise Llama2Error(f"sampling: top_logprobs must be >= 0, and > 0 only with logprobs, got "
                              f"{self.top_logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= number(name) <= 2:
                raise Llama2Error(f"sampling: {name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logit_bias is not None:
            bias = self.logit_bias
            if not isinstance(bias, dict) or not all(
                    isinstance(k, int) and not isinstance(k, bool) and k >= 0 and isinstance(v, (int, float))
                    and not isinstance(v, bool) and -100 <= v <= 100 for k, v in bias.items()):
                raise Llama2Error(f"sampling: logit_bias must map token ids to numbers in [-100, 100], got {bias!r}")
        if self.grammar is not None and not isinstance(self.grammar, Grammar):
            raise Llama2Error(f"sampling: grammar must be a Grammar, got {type(self.grammar).__name__}")
        if self.tools is not None and not isinstance(self.tools, Toolbox):
            raise Llama2Error(f"sampling: tools must be a llama2.tools.Toolbox, got {type(self.tools).__name__}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not all(isinstance(s, str) and s for s in self.stop):
            raise Llama2Error(f"sampling: stop must be a list of non-empty strings, got {self.stop!r}")
        if self.stop_ids is not None and not all(isinstance(i, int) and i >= 0 for i in self.stop_ids):
            raise Llama2Error(f"sampling: stop_ids must be non-negative token ids, got {self.stop_ids!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise Llama2Error(f"sampling: seed must be an integer or None, got {self.seed!r}")
        if self.adapter is not None and (not isinstance(self.adapter, str) or not self.adapter):
            raise Llama2Error(f"sampling: adapter must be an adapter's name or None, got {self.adapter!r}")

    def replace(self, **changes) -> "SamplingParams":
        return dataclasses.replace(self, **changes)


@dataclass
class Completion:
    """One prompt's result. tokens are the generated ids (prompt + generated with echo), without the stop id.

    logprobs (when asked) align with tokens: each generated token's log-probability under the distribution it
    was sampled from (after temperature, top-k and top-p; greedy: the model's raw distribution); raw_logprobs:
    under the raw distribution (log_softmax of the logits, no temperature or filter). Echoed prompt tokens were
    not sampled: both lists give them the raw value (the first prompt token, without context, gets 0.0).
    finish_reason: "stop" (a stop id or string), "length" (max_new_tokens) or "cancelled" (Engine.cancel).
    ttft: seconds from the request's acceptance (Engine.prepare / add) to its first sampled token, queueing and
    prefill included (None if it sampled nothing); not part of equality. top_logprobs (with
    SamplingParams.top_logprobs): per token, the (id, raw logprob) of the most likely tokens at that position,
    most likely first (an echoed first prompt token, without context, has none). tool_calls: the calls the
    engine ran (SamplingParams.tools), each with its result; tool_spans: the [start, end) ranges of `tokens` that
    the engine appended (tool results, not sampled: their logprobs are 0.0)."""

    prompt_tokens: list[int]
    tokens: list[int]
    text: str
    logprobs: list[float] | None
    finish_reason: FinishReason
    raw_logprobs: list[float] | None = None
    ttft: float | None = field(default=None, compare=False)
    top_logprobs: list[list[tuple[int, float]]] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_spans: list[tuple[int, int]] = field(default_factory=list)


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


def _sorted_descending(x: Tensor) -> Tensor:
    """Each row's values sorted from largest to smallest (values only). On the CPU numpy's vectorised sort is
    tens of times faster than torch.sort for vocabulary-sized rows."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(np.sort(x.numpy(), axis=-1)[:, ::-1]))
    return x.sort(dim=-1, descending=True).values


def sample_rows(logits: Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator | None] | None = None, logprobs: bool = True, *,
                uniforms: Sequence[float] | Tensor | None = None, greedy: Tensor | None = None
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One token per row of logits (B, V), row i with params[i] and generators[i]: (tokens, logprobs, raw);
    with logprobs=False only the tokens (the two others are None; greedy rows then skip a pass over V).
    uniforms: instead of generators, the sampled rows' uniform draws in [0, 1), one per row with temperature > 0
    in row order (the engine draws them ahead from each request's own generator). greedy: every row's argmax,
    when the caller already has it (the compiled decode step computes it on the device, in its graph).

    Greedy rows (temperature 0) take the argmax. Sampled rows: logits / temperature, top-k (ties with the k-th
    logit kept), top-p (Meta's rule: sorted by probability, drop the tokens whose preceding cumulative
    probability exceeds p), renormalise, then one uniform draw from the row's own generator inverts the
    cumulative distribution in vocabulary order, so a row's tokens depend on its own seed and logits only, never
    on the other rows. logprobs: log-probability of each token under the distribution it was
    drawn from (greedy: the raw one); raw: log_softmax(logits) at the token."""
    logits = logits.float()
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    every = len(sampled) == len(params)
    tokens = None if every else logits.argmax(dim=-1) if greedy is None else greedy.clone()  # greedy rows
    lse = torch.logsumexp(logits, dim=-1) if logprobs else None
    sampled_lp = logits.gather(1, tokens[:, None]).squeeze(1) - lse if logprobs and not every else None
    if sampled:
        dev, vocab = logits.device, logits.shape[-1]
        idx = None if every else torch.tensor(sampled, device=dev)
        ks = [params[i].top_k if 0 < params[i].top_k < vocab else vocab for i in sampled]
        ps = [params[i].top_p for i in sampled]
        by_k, by_p = any(k < vocab for k in ks), any(p < 1 for p in ps)
        # every row's settings (and its uniform draw) reach the device in one copy, a column each
        given = uniforms is not None and not isinstance(uniforms, Tensor)
        settings = [[params[i].temperature, params[i].top_p] for i in sampled]
        if given:
            settings = [row + [x] for row, x in zip(settings, uniforms)]
        st = torch.tensor(settings, dtype=torch.float32, device=dev)
        if uniforms is None:
            u = torch.stack([torch.rand((), generator=generators[i], device=dev) for i in sampled])[:, None]
        elif given:
            u = st[:, 2:3]
        else:
            u = uniforms.to(dev, torch.float32).reshape(-1, 1)
        kth = torch.tensor([[k - 1] for k in ks], device=dev) if by_k else None
        z = (logits if every else logits[idx]) / st[:, 0:1]
        chosen, chosen_lp = _draw(z, kth, st[:, 1:2] if by_p else None, u, lse is not None)
        if every:
            tokens = chosen
            sampled_lp = chosen_lp
        else:
            tokens[idx] = chosen
            if sampled_lp is not None:
                sampled_lp[idx] = chosen_lp
    if lse is None:
        return tokens, None, None
    raw = logits.gather(1, tokens[:, None]).squeeze(1) - lse
    return tokens, sampled_lp, raw


def _draw(z: Tensor, kth: Tensor | None, top_p: Tensor | None, u: Tensor, want_lp: bool
          ) -> tuple[Tensor, Tensor | None]:
    """The filtered draw of sample_rows: z (n, V) tempered logits; kth (n, 1): k - 1 for top-k (None: no row
    filters by k); top_p (n, 1) (None: no row filters by p); u (n, 1) the uniform draws. Returns the tokens and,
    if asked, their log-probabilities under the filtered distribution."""
    vocab = z.shape[-1]
    dev = z.device
    by_k, by_p = kth is not None, top_p is not None
    if by_k or by_p:
        # the filters as one threshold on the logits, found on the sorted values (the nucleus is a prefix
        # there); the draw itself is made in vocabulary order, where rounding differences between a row
        # decoded alone and in a batch move the CDF the least
        zs = _sorted_descending(z).to(dev)
        peak = zs[:, :1]
        threshold = None
        if by_k:
            threshold = zs.gather(1, kth)  # the k-th largest (ties kept)
        if by_p:
            if threshold is not None:
                zs = zs.masked_fill(zs < threshold, float("-inf"))
            e = torch.exp(zs - peak)  # unnormalised probabilities, sorted
            cum = e.cumsum(dim=-1)
            # Meta's rule: keep the tokens whose preceding mass is <= p of the total
            kept = torch.searchsorted(cum - e, top_p * cum[:, -1:], right=True).clamp_(1, vocab)
            smallest = zs.gather(1, kept - 1)  # the smallest logit kept
            threshold = smallest if threshold is None else torch.maximum(threshold, smallest)
        z = z.masked_fill(z < threshold, float("-inf"))
    else:
        peak = z.amax(dim=-1, keepdim=True)
    e = torch.exp(z - peak)
    cdf = e.cumsum(dim=-1)
    total = cdf[:, -1:]
    pos = torch.searchsorted(cdf, u * total, right=True).clamp(max=vocab - 1)
    chosen = pos.squeeze(1)
    chosen_lp = (e.gather(1, pos) / total).log().squeeze(1) if want_lp else None
    return chosen, chosen_lp
