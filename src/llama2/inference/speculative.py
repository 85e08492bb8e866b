"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes k tokens, the
target model scores them all in one forward pass, and a prefix of them is kept.

    spec = SpeculativeDecoder(target, draft, k=4)
    result = spec.generate(prompt_ids, SamplingParams(temperature=0, max_new_tokens=64))
    result.tokens, result.acceptance_rate

Without a draft model (`SpeculativeDecoder(target, None, k=4)`), the proposals come from the text itself (prompt
lookup, Saxena 2023): the last `ngram` tokens (down to `ngram_min`) are searched for earlier in the prompt and the
output, and the k tokens that followed their latest occurrence are proposed. That pays where answers copy their
context (quoting, editing, extracting, a tool result repeated); a proposal is a point mass, so the sampling rule
below keeps it with probability p(x).

Greedy (temperature 0): a draft token is kept while it equals the target's argmax at its position, and the first
mismatch is replaced by the target's argmax, so the output is the target's own greedy output (up to
floating-point ties: the target scores k + 1 positions at once instead of one). Sampling: the standard acceptance
rule, keep draft token x with probability min(1, p(x) / q(x)), on rejection draw from max(0, p - q) renormalised,
and after k kept tokens draw one more from p; p and q are the target's and the draft's distributions after the
same temperature, top-k and top-p, so every token follows the target's (filtered) distribution exactly.
Batch 1; both models keep a KV cache, and rejected positions are simply overwritten on the next round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import Llama2Error
from ..model import Transformer
from .fastlinear import fast_fp32_model
from .sampling import SamplingParams, top_k_filter, top_p_filter


@dataclass
class SpeculativeResult:
    """Generated token ids (without the stop id), why it ended, and how the draft fared."""

    tokens: list[int]
    finish_reason: str  # "stop" or "length"
    proposed: int  # draft tokens the target checked
    accepted: int  # of them, kept
    target_calls: int  # target forward passes after the prompt

    @property
    def acceptance_rate(self) -> float:
        """Kept draft tokens / proposed draft tokens (1.0 when nothing was proposed)."""
        return self.accepted / self.proposed if self.proposed else 1.0

    @property
    def tokens_per_target_call(self) -> float:
        return len(self.tokens) / self.target_calls if self.target_calls else 0.0


def distribution(logits: Tensor, params: SamplingParams) -> Tensor:
    """The fp32 probabilities `sample` draws from: temperature, then top-k, then top-p (temperature > 0)."""
    z = top_k_filter(logits.float() / params.temperature, params.top_k)
    return top_p_filter(torch.softmax(z, dim=-1), params.top_p)


def lookup(seq: Sequence[int], ngram: int, k: int, ngram_min: int = 1) -> list[int]:
    """Prompt-lookup proposals: the up to k tokens that followed the latest earlier occurrence of seq's last n
    tokens, for the largest n in ngram_min..ngram that occurs; [] when none does."""
    for n in range(min(ngram, len(seq) - 1), ngram_min - 1, -1):
        tail = list(seq[-n:])
        first = tail[0]
        for start in range(len(seq) - n - 1, -1, -1):
            if seq[start] == first and list(seq[start:start + n]) == tail:
                return list(seq[start + n:start + n + k])
    return []


class SpeculativeDecoder:
    """Decode with `target`, drafting `k` tokens at a time with `draft` (same vocabulary, smaller model), or, with
    draft None, by prompt lookup over the last `ngram` tokens."""

    def __init__(self, target: Transformer, draft: Transformer | None, k: int = 4, cache_len: int | None = None,
                 ngram: int = 3, ngram_min: int = 1) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise Llama2Error(f"speculative decoding: k (draft tokens per step) must be a positive integer, got {k!r}")
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (ngram, ngram_min)) \
                or not 1 <= ngram_min <= ngram:
            raise Llama2Error(f"prompt lookup: ngram and ngram_min must be integers with 1 <= ngram_min <= ngram, got "
                              f"{ngram!r} and {ngram_min!r}")
        if draft is not None and draft.config.vocab_size != target.config.vocab_size:
            raise Llama2Error(f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the target's "
                              f"({target.config.vocab_size}); the draft must use the target's tokenizer")
        # fp32 CPU models score through the few-row kernels, as the Generator decodes (the k + 1 positions of a
        # check fit them), so the two are compared on the same arithmetic
        self.target, self.k, self.ngram, self.ngram_min = fast_fp32_model(target.eval()), k, ngram, ngram_min
        self.draft = fast_fp32_model(draft.eval()) if draft is not None else None
        self.cache_len = cache_len or min(target.config.max_seq_len,
                                          draft.config.max_seq_len if draft is not None else target.config.max_seq_len)

    @torch.inference_mode()
    def generate(self, prompt: Sequence[int], params: SamplingParams | None = None,
                 generator: torch.Generator | None = None) -> SpeculativeResult:
        """Up to params.max_new_tokens tokens after `prompt` (token ids, BOS included if wanted); stops at
        params.stop_ids (none if unset). `generator` (else params.seed, else torch's global RNG) draws samples."""
        params = params or SamplingParams()
        seq = [int(t) for t in prompt]
        if not seq:
            raise Llama2Error("speculative decoding needs a non-empty prompt (at least BOS)")
        changed = [name for name, on in (("grammar", params.grammar is not None), ("logit_bias", params.logit_bias),
                                         ("presence_penalty", params.presence_penalty),
                                         ("frequency_penalty", params.frequency_penalty)) if on]
        if changed:
            raise Llama2Error(f"speculative decoding samples the model's own distribution; {', '.join(changed)} "
                              "would change it: decode without a draft model for those")
        if len(seq) + params.max_new_tokens + self.k > self.cache_len:
            raise Llama2Error(f"prompt ({len(seq)}) + max_new_tokens ({params.max_new_tokens}) + k ({self.k}) "
                              f"exceed the context ({self.cache_len}); shorten the prompt or ask for fewer tokens")
        if generator is None and params.seed is not None:
            generator = torch.Generator().manual_seed(params.seed)
        dev = self.target.lm_head.weight.device
        greedy = params.temperature == 0
        stops = set(params.stop_ids or ())
        t_cache = self.target.make_cache(1, self.cache_len)
        d_cache = self.draft.make_cache(1, self.cache_len) if self.draft is not None else None
        t_len = d_len = 0  # tokens each cache holds (a prefix of seq)
        out: list[int] = []
        proposed = accepted = calls = 0

        def step(model: Transformer, cache, start: int, tokens: list[int]) -> Tensor:
            return model(torch.tensor([tokens], device=dev), start, cache)[0].float()

        def draw(p: Tensor) -> int:
            return int(torch.multinomial(p.cpu(), 1, generator=generator))

        if len(seq) > 1:  # prefill all but the last prompt token: each round feeds the tokens a cache lacks
            step(self.target, t_cache, 0, seq[:-1])
            if self.draft is not None:
                step(self.draft, d_cache, 0, seq[:-1])
            t_len = d_len = len(seq) - 1
        while len(out) < params.max_new_tokens:
            n_draft = min(self.k, params.max_new_tokens - len(out) - 1)
            drafts: list[int] = []
            qs: list[Tensor] = []
            if self.draft is None:  # prompt lookup: proposals are point masses
                drafts = lookup(seq, self.ngram, n_draft, self.ngram_min) if n_draft > 0 else []
                n_draft = len(drafts)
                if not greedy:
                    vocab = self.target.config.vocab_size
                    qs = [torch.nn.functional.one_hot(torch.tensor(d), vocab).float().to(dev) for d in drafts]
            else:
                for _ in range(n_draft):
                    ctx = seq + drafts
                    logits = step(self.draft, d_cache, d_len, ctx[d_len:])[-1]
                    d_len = len(ctx)
                    if greedy:
                        drafts.append(int(logits.argmax()))
                    else:
                        q = distribution(logits, params)
                        qs.append(q)
                        drafts.append(draw(q))
            logits = step(self.target, t_cache, t_len, seq[t_len:] + drafts)[-(n_draft + 1):]
            calls += 1
            proposed += n_draft
            kept, new = 0, None
            for i, d in enumerate(drafts):
                if greedy:
                    best = int(logits[i].argmax())
                    if best == d:
                        kept += 1
                        continue
                    new = best
                    break
                p, q = distribution(logits[i], params), qs[i]
                u = float(torch.rand((), generator=generator))
                if u * float(q[d]) <= float(p[d]):
                    kept += 1
                    continue
                residual = (p - q).clamp_min(0)
                new = draw(residual / residual.sum()) if float(residual.sum()) > 0 else draw(p)
                break
            if new is None:
                last = logits[n_draft]
                new = int(last.argmax()) if greedy else draw(distribution(last, params))
            accepted += kept
            base = len(seq)
            finish = None
            for tok in drafts[:kept] + [new]:
                if tok in stops:
                    finish = "stop"
                    break
                seq.append(tok)
                out.append(tok)
            if finish is not None:
                return SpeculativeResult(out, finish, proposed, accepted, calls)
            t_len = len(seq) - 1  # the target holds seq + drafts; valid: all of seq but the new last token
            d_len = min(d_len, base + kept)
        return SpeculativeResult(out, "length", proposed, accepted, calls)
