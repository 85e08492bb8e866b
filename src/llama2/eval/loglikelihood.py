"""Log-likelihoods of continuations, batched through the model's one forward, with shared contexts run once.

`Scorer(model).loglikelihood([(context_ids, continuation_ids), ...])` returns, per request, the summed
log p(continuation | context) and whether the continuation is the greedy one (every token the argmax), as
lm-eval's `loglikelihood` does. Requests with the same context (the choices of a multiple-choice item) share
one row: one forward runs the contexts of a batch (right-padded, causal attention, keys and values kept in a KV
cache), a second runs each row's continuations but their last tokens, packed one after another, over that cache:
every continuation attends to its context and to itself only (a block mask), with rotary positions as if it
followed the context alone. So an item with 4 choices costs one context plus the choices instead of 4 contexts,
single-token continuations ("A".."D") cost nothing beyond the context, and the long part (the context) runs
under plain causal attention (the fast kernel), the masked part being short. Rows are sorted by length and
right-padded into batches.

`rolling_windows(tokens, prefix, max_len, context_len)` cuts a long document into (context, continuation) pairs
that score every token once, each with up to max_len - 1 tokens of context (lm-eval's loglikelihood_rolling with
its disjoint windows); `Scorer.rolling` sums them per document.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import Llama2Error

Request = tuple[Sequence[int], Sequence[int]]


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int,
                    context_len: int = 1) -> Iterator[tuple[list[int], list[int]]]:
    """(context, continuation) pairs covering every token of `tokens` once, in order. The first pair's context
    is [prefix]; each window holds at most max_len tokens of input and predicts up to max_len - context_len + 1
    new tokens, so every later token keeps at least context_len - 1 tokens of left context (context_len=1:
    disjoint windows, lm-eval's default; larger values overlap the windows, costing more forwards)."""
    if not 1 <= context_len <= max_len:
        raise Llama2Error(f"rolling windows: context_len must be in 1..{max_len}, got {context_len}")
    toks = list(tokens)
    if not toks:
        return
    pred_len = max_len - context_len + 1
    first = min(max_len, len(toks))
    yield [prefix], toks[:first]  # input [prefix] + toks[:first - 1]: the context is the prefix alone
    done = first
    while done < len(toks):
        n = min(len(toks) - done, pred_len)
        end = done + n
        window = toks[max(0, end - max_len - 1):end - 1]  # the window's input tokens
        yield window[:len(window) - (n - 1)], toks[end - n:end]
        done = end


class Scorer:
    """Scores (context, continuation) token requests with a Transformer (or its int8 copy).

    batch_size: packed rows per forward. max_len: most positions a request may span (default the model's
    context); a longer context keeps its last tokens, as lm-eval truncates (before contexts are shared: a
    truncated context is shared only by continuations of the same length)."""

    def __init__(self, model: nn.Module, *, batch_size: int = 16, max_len: int | None = None) -> None:
        if batch_size < 1:
            raise Llama2Error(f"batch size must be >= 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.max_len = max_len or model.config.max_seq_len

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def loglikelihood(self, requests: Sequence[Request],
                      progress: Callable[[int], object] | None = None) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, greedy?) per request, in order. progress(n): called as rows finish, with
        the number of requests they held."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(requests):
            if not ctx:
                raise Llama2Error("loglikelihood: empty context; start it with BOS")
            if not cont:
                raise Llama2Error("loglikelihood: empty continuation; nothing to score")
            if len(cont) > self.max_len:
                raise Llama2Error(f"a continuation of {len(cont)} tokens does not fit the context of "
                                  f"{self.max_len}; shorten it or evaluate with a longer-context model")
            # lm-eval's truncation, (context + continuation)[-(max_len + 1):], before contexts are shared
            groups.setdefault(tuple(int(t) for t in ctx[-(self.max_len + 1 - len(cont)):]), []).append(i)
        rows = [_Row(ctx, [[int(t) for t in requests[i][1]] for i in idx], idx)
                for ctx, idx in groups.items()]
        rows.sort(key=lambda r: -len(r.tokens))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start:start + self.batch_size]
            for row, scores in zip(batch, self._score_rows(batch)):
                for i, s in zip(row.indices, scores):
                    out[i] = s
            if progress is not None:
                progress(sum(len(r.indices) for r in batch))
        return out  # type: ignore[return-value]

    def rolling(self, documents: Sequence[Sequence[int]], prefix: int, context_len: int = 1,
                progress: Callable[[int], object] | None = None) -> list[float]:
        """Total log-likelihood of each document (its every token scored once, see rolling_windows)."""
        reqs, owner = [], []
        for d, doc in enumerate(documents):
            for ctx, cont in rolling_windows(doc, prefix, self.max_len, context_len):
                reqs.append((ctx, cont))
                owner.append(d)
        totals = [0.0] * len(documents)
        for d, (lp, _) in zip(owner, self.loglikelihood(reqs, progress)):
            totals[d] += lp
        return totals

    @torch.no_grad()
    def _score_rows(self, rows: list[_Row]) -> list[list[tuple[float, bool]]]:
        """Two forwards: the contexts (right-padded, plain causal attention, keys and values kept in a cache),
        then every row's packed continuations over that cache, each attending to its own context and itself."""
        B, dev = len(rows), self.device
        C = max(r.n_ctx for r in rows)
        L = max(len(r.tokens) - r.n_ctx for r in rows)
        ctx = torch.zeros(B, C, dtype=torch.long)
        cont = torch.zeros(B, max(L, 1), dtype=torch.long)
        positions = torch.zeros(B, max(L, 1), dtype=torch.long)
        segment = torch.full((B, max(L, 1)), -1, dtype=torch.long)  # -1 pad, k continuation k
        n_ctx = torch.tensor([r.n_ctx for r in rows])
        for b, r in enumerate(rows):
            ctx[b, :r.n_ctx] = torch.tensor(r.tokens[:r.n_ctx])
            m = len(r.tokens) - r.n_ctx
            if m:
                cont[b, :m] = torch.tensor(r.tokens[r.n_ctx:])
                positions[b, :m] = torch.tensor(r.positions[r.n_ctx:])
                segment[b, :m] = torch.tensor(r.segments[r.n_ctx:])
        cache = self.model.make_cache(B, C + L) if L else None
        h_ctx = self.model(ctx.to(dev), cache=cache, output="hidden")
        h_cont = None
        if L:
            q, k = segment[:, :, None], segment[:, None, :]
            own = torch.ones(L, L, dtype=torch.bool).tril() & (k >= 0) & (k == q)
            own |= torch.eye(L, dtype=torch.bool)  # a pad query attends to itself: finite, never read
            past = (torch.arange(C)[None, :] < n_ctx[:, None])[:, None, :].expand(B, L, C)
            mask = torch.cat([past, own], dim=2)[:, None]
            h_cont = self.model(cont.to(dev), start_pos=C, cache=cache, positions=positions.to(dev),
                                mask=mask.to(dev), output="hidden")
        # the hidden state before every continuation token, from the context pass or the continuation pass
        parts, tgt = [], []
        for b, r in enumerate(rows):
            idx = torch.tensor(r.reads, device=dev)
            from_ctx = idx < r.n_ctx
            hb = h_ctx[b, idx.clamp(max=r.n_ctx - 1)]
            if h_cont is not None:
                hb = torch.where(from_ctx[:, None], hb, h_cont[b, (idx - r.n_ctx).clamp(min=0)])
            parts.append(hb)
            tgt += r.targets
        lp, greedy = _target_logprobs(torch.cat(parts), self.model.lm_head, torch.tensor(tgt, device=dev))
        lp, greedy = lp.tolist(), greedy.tolist()
        out, at = [], 0
        for r in rows:
            scores = []
            for n in r.lengths:
                scores.append((float(sum(lp[at:at + n])), bool(all(greedy[at:at + n]))))
                at += n
            out.append(scores)
        return out


def _target_logprobs(h: Tensor, head: nn.Module, targets: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """log_softmax(head(h)) at targets and whether each target is the argmax, a chunk of rows at a time."""
    lps, greedy = [], []
    for s in range(0, h.shape[0], chunk):
        logits = head(h[s:s + chunk]).float()
        t = targets[s:s + chunk]
        lps.append(logits.gather(1, t[:, None]).squeeze(1) - torch.logsumexp(logits, dim=1))
        greedy.append(logits.argmax(dim=1) == t)
    return torch.cat(lps).cpu(), torch.cat(greedy).cpu()


class _Row:
    """One packed row: a context, then every continuation but its last token; `reads` are the positions in the
    row whose hidden states predict the continuation tokens `targets` (continuation by continuation)."""

    def __init__(self, context: tuple[int, ...], conts: list[list[int]], indices: list[int]) -> None:
        ctx = list(context)
        self.n_ctx = len(ctx)
        self.indices = indices
        self.tokens = list(ctx)
        self.positions = list(range(len(ctx)))
        self.segments = [0] * len(ctx)
        self.reads: list[int] = []
        self.targets: list[int] = []
        self.lengths = [len(c) for c in conts]
        for k, cont in enumerate(conts, 1):
            start = len(self.tokens)
            self.reads += [len(ctx) - 1] + list(range(start, start + len(cont) - 1))
            self.targets += cont
            self.tokens += cont[:-1]
            self.positions += range(len(ctx), len(ctx) + len(cont) - 1)
            self.segments += [k] * (len(cont) - 1)
