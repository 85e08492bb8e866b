"""Pretraining data order: packed windows of seq_len + 1 tokens drawn from a weighted mixture of token shards.

For optimiser step s the whole global batch (batch_size x accum x world_size sequences) is drawn from
numpy's Generator seeded with (seed, s): each sequence picks a source with probability proportional to its
weight, then a uniformly random start in that source's token stream (windows cross document boundaries:
every document is BOS ... EOS, so the model sees the separators). Process r trains on its contiguous slice.
Hence the order depends only on (seed, step) — not on the number of processes — and the sampler's whole
state is the step it has reached, so resuming continues the exact same order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import Llama2Error


class PackedBatches:
    """`next()` gives this process's `accum` micro-batches (LongTensor (batch_size, seq_len + 1)) of a step."""

    def __init__(self, sources: Sequence[Any], weights: Sequence[float], seq_len: int, batch_size: int,
                 accum: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 names: Sequence[str] | None = None) -> None:
        if len(sources) != len(weights) or not sources:
            raise ValueError("one weight per source, at least one source")
        self.sources = list(sources)
        self.names = list(names) if names is not None else [str(i) for i in range(len(sources))]
        w = np.asarray(weights, dtype=np.float64)
        self.probs = w / w.sum()
        self.seq_len, self.batch_size, self.accum = seq_len, batch_size, accum
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_size = batch_size * accum * world_size
        self.step = 0
        window = seq_len + 1
        for name, src in zip(self.names, self.sources):
            if src.num_tokens < window:
                raise Llama2Error(f"data source {name!r} ({src.path}) has {src.num_tokens} training tokens, fewer than "
                                  f"one sequence of max_seq_len + 1 = {window}; lower model.max_seq_len or give "
                                  "it more text")
        total = sum(src.num_tokens for src in self.sources)
        if total < self.global_size * window:
            raise Llama2Error(f"a global batch of {self.global_size} sequences x {window} tokens = "
                              f"{self.global_size * window} tokens is larger than all the training data "
                              f"({total} tokens); lower batch_size / grad_accum / global_batch_size or "
                              "model.max_seq_len, or add data")
        self._starts = np.array([src.num_tokens - seq_len for src in self.sources], dtype=np.int64)

    def plan(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, start offset) of every sequence of the global batch of `step`."""
        rng = np.random.default_rng([self.seed, step])
        if len(self.sources) > 1:
            src = rng.choice(len(self.sources), size=self.global_size, p=self.probs)
        else:
            src = np.zeros(self.global_size, dtype=np.int64)
        starts = (rng.random(self.global_size) * self._starts[src]).astype(np.int64)
        return src, starts

    def next(self) -> list[torch.Tensor]:
        src, starts = self.plan(self.step)
        self.step += 1
        per_rank = self.batch_size * self.accum
        lo = self.rank * per_rank
        out = []
        for a in range(self.accum):
            rows = [self.sources[src[i]].read(starts[i], self.seq_len + 1)
                    for i in range(lo + a * self.batch_size, lo + (a + 1) * self.batch_size)]
            out.append(torch.from_numpy(np.stack(rows)))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "global_size": self.global_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("global_size", self.global_size)) != self.global_size:
            raise Llama2Error(f"the checkpoint was trained with a global batch of {state['global_size']} sequences, "
                              f"this run has {self.global_size} (batch_size x grad_accum x processes); resume with "
                              "the same global batch (set global_batch_size)")
        self.step = int(state["step"])
        self.seed = int(state.get("seed", self.seed))


def validation_windows(sources: Sequence[Any], names: Sequence[str], total: int, seq_len: int, batch_size: int,
                       rank: int = 0, world_size: int = 1) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Fixed validation batches: `total` windows split evenly over the sources, at evenly spaced offsets of each
    val split; this process's share, as (tokens, labels) batches, padded with fully masked rows (labels -100) so
    every process runs the same number of batches."""
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    if total <= 0 or not sources:
        return out
    per_source = math.ceil(total / len(sources))
    window = seq_len + 1
    for name, src in zip(names, sources):
        if src.num_tokens < window:
            raise Llama2Error(f"data source {name!r}: its val split ({src.path}) has {src.num_tokens} tokens, fewer "
                              f"than one sequence of {window}; set eval_every=0 and data.eval_sequences=0, or "
                              "prepare it with more validation text")
        starts = np.linspace(0, src.num_tokens - window, per_source).round().astype(np.int64)
        mine = starts[rank::world_size]
        n_rows = math.ceil(per_source / world_size)
        n_batches = math.ceil(n_rows / batch_size)
        rows = [src.read(s, window) for s in mine]
        mask = [True] * len(rows) + [False] * (n_batches * batch_size - len(rows))
        rows += [rows[0] if rows else src.read(0, window)] * (len(mask) - len(rows))
        batches = []
        for b in range(n_batches):
            tokens = torch.from_numpy(np.stack(rows[b * batch_size:(b + 1) * batch_size]))
            labels = tokens.clone()
            labels[~torch.tensor(mask[b * batch_size:(b + 1) * batch_size])] = -100
            batches.append((tokens, labels))
        out[name] = batches
    return out
