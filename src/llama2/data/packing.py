"""Packing: how tokens become batches.

Pretraining data order: packed windows of seq_len + 1 tokens drawn from a weighted mixture of token shards.

For optimiser step s the whole global batch (batch_size x accum x world_size sequences) is drawn from
numpy's Generator seeded with (seed, s): each sequence picks a source with probability proportional to its
weight, then a uniformly random start in that source's token stream (windows cross document boundaries:
every document is BOS ... EOS, so the model sees the separators). Process r trains on its contiguous slice.
Hence the order depends only on (seed, step) — not on the number of processes — and the sampler's whole
state is the step it has reached, so resuming continues the exact same order. A share of steps (`long_share`,
drawn from (seed, s) too) may train rows as long as the model's context instead: as many tokens, fewer rows.

Dialogues (SFT and the stages that fine-tune through it): tokenised dialogues packed best-fit into rows of
max_seq_len tokens, each dialogue kept to itself (positions restart, `attention_mask` is block-diagonal causal),
epochs of shuffled rows with a resumable position (`SFTBatches`). Plain text may be replayed among them
(`text_examples`: every token trained) as a fixed share of each epoch's rows.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import Llama2Error
from ..fused_ops import IGNORE_INDEX
from ..model import PackedRows
from .mix import draw, epoch_counts


class PackedBatches:
    """`next()` gives this process's `accum` micro-batches (LongTensor (batch_size, seq_len + 1)) of a step."""

    def __init__(self, sources: Sequence[Any], weights: Sequence[float], seq_len: int, batch_size: int,
                 accum: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 names: Sequence[str] | None = None, long_len: int = 0, long_share: float = 0.0) -> None:
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
        # long steps: rows of long_len tokens, as many tokens per micro-batch (at least one row)
        self.long_len = long_len
        self.long_share = long_share if long_len > seq_len else 0.0
        self.long_batch = max(1, batch_size * seq_len // long_len) if self.long_share else batch_size
        if self.long_share and any(src.num_tokens < long_len + 1 for src in self.sources):
            raise Llama2Error(f"long_rows: a data source has fewer than {long_len + 1} training tokens, one row as "
                              "long as the context; set long_rows: 0 or give it more text")

    def is_long(self, step: int) -> bool:
        """Whether `step` trains rows as long as the context (drawn from (seed, step), so a resumed run agrees)."""
        return bool(self.long_share) and np.random.default_rng([self.seed, step, 1]).random() < self.long_share

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
        length, batch = self.seq_len, self.batch_size
        if self.is_long(self.step):  # the plan's first rows, long: their starts kept inside the source
            length, batch = self.long_len, self.long_batch
            room = np.array([self.sources[k].num_tokens - length - 1 for k in src], dtype=np.int64)
            starts = np.minimum(starts, room)
        self.step += 1
        lo = self.rank * batch * self.accum
        out = []
        for a in range(self.accum):
            rows = [self.sources[src[i]].read(starts[i], length + 1)
                    for i in range(lo + a * batch, lo + (a + 1) * batch)]
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


# ---------------------------------------------------------------------------------------------------------------
# Dialogues packed into rows, each kept to itself (SFT and every stage that fine-tunes through it)


@dataclass
class Example:
    """One tokenised dialogue: token ids and the trained mask aligned with them (llama2.chat)."""

    ids: np.ndarray  # int64 (L,)
    trained: np.ndarray  # bool (L,)


def text_examples(tokenizer: Any, texts: Iterable[str], max_seq_len: int) -> list[Example]:
    """Plain documents as examples with every token trained (a plain LM loss, no chat template): BOS + text + EOS,
    cut into pieces of at most max_seq_len tokens that overlap by one, so every token after BOS is a target once."""
    if max_seq_len < 2:
        raise Llama2Error(f"max_seq_len {max_seq_len} is too short to train on text; give at least 2")
    out = []
    for text in texts:
        ids = np.asarray(tokenizer.encode(text, bos=True, eos=True), dtype=np.int64)
        for lo in range(0, max(len(ids) - 1, 1), max_seq_len - 1):
            piece = ids[lo:lo + max_seq_len]
            out.append(Example(piece, np.ones(len(piece), dtype=bool)))
    return out


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of examples grouped into rows of at most `capacity` tokens (each example
    goes to the fullest row it still fits in). Deterministic: ties keep index order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            room -= n
        else:
            rows.append([i])
            r, room = len(rows) - 1, capacity - n
        if room > 0:
            bisect.insort(free, (room, r))
    return rows


def collate(examples: Sequence[Example], rows: Sequence[Sequence[int]], pad_id: int = 0) -> dict[str, Tensor]:
    """One micro-batch of rows (each a list of example indices; [] is an empty padding row) as tensors, all
    (B, T) with T the longest row: `tokens`; `labels` (the next token where it is trained and in the same
    dialogue, else -100); `positions` (restarting at 0 per dialogue); `segments` (the dialogue's number within
    its row, -1 on padding) from which the loss builds the block-diagonal causal mask; `packed` (a bool): some
    row holds more than one dialogue (else plain causal attention is exact: padding comes last)."""
    T = max([sum(len(examples[i].ids) for i in row) for row in rows] + [1])
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for s, i in enumerate(row):
            ex = examples[i]
            n = len(ex.ids)
            ids = torch.from_numpy(ex.ids)
            tokens[b, t:t + n] = ids
            lab = torch.where(torch.from_numpy(ex.trained[1:]), ids[1:], IGNORE_INDEX)
            labels[b, t:t + n - 1] = lab
            positions[b, t:t + n] = torch.arange(n)
            segments[b, t:t + n] = s
            t += n
        positions[b, t:] = torch.arange(T - t)
    packed = any(len(row) > 1 for row in rows)
    return {"tokens": tokens, "labels": labels, "positions": positions, "segments": segments, "packed": packed}


class SFTBatches:
    """The SFT batch source: epochs over rows (packed dialogues, or one dialogue per row), the rows of each
    epoch shuffled by a generator seeded with (seed, epoch). A step takes the next `global size` rows (batch_size
    x accum x processes); process r trains on its contiguous slice, in `accum` micro-batches; the last step of an
    epoch is filled with empty rows. The state is (epoch, position in the epoch), so a resumed run continues
    with the exact same batches.

    `replay` examples (text_examples), packed into rows of their own, make `replay_fraction` of each epoch's
    rows: every epoch draws that many of them (each once before any repeats, seeded by (seed, epoch)) and shuffles
    them in among the dialogue rows."""

    def __init__(self, examples: Sequence[Example], max_seq_len: int, batch_size: int, accum: int, *,
                 packing: bool = True, rank: int = 0, world_size: int = 1, seed: int = 0, pad_id: int = 0,
                 replay: Sequence[Example] = (), replay_fraction: float = 0.0) -> None:
        if not examples:
            raise Llama2Error("no training dialogues left to train on (all were skipped as too long?); raise "
                              "max_seq_len, set overlong=truncate or give more data")
        if not 0 <= replay_fraction < 1:
            raise Llama2Error(f"the text replay fraction {replay_fraction} must be in [0, 1)")
        n = len(examples)
        self.examples = list(examples) + (list(replay) if replay_fraction > 0 else [])
        self.batch_size, self.accum, self.rank, self.world_size = batch_size, accum, rank, world_size
        self.seed, self.pad_id = seed, pad_id
        self.global_size = batch_size * accum * world_size
        lengths = [len(e.ids) for e in self.examples]

        def rows_of(lo: int, hi: int) -> list[list[int]]:
            if not packing:
                return [[i] for i in range(lo, hi)]
            return [[lo + i for i in row] for row in pack_rows(lengths[lo:hi], max_seq_len)]

        self.rows = rows_of(0, n)
        self.replay_rows = rows_of(n, len(self.examples))
        self.replay_count = (epoch_counts([len(self.rows), len(self.replay_rows)], [1.0, None],
                                          [None, replay_fraction])[1] if self.replay_rows else 0)
        self.steps_per_epoch = math.ceil((len(self.rows) + self.replay_count) / self.global_size)
        self.epoch, self.position = 0, 0
        self._epoch: tuple[int, list[list[int]], np.ndarray] | None = None
        self.fingerprint = int(np.sum(np.asarray(lengths, dtype=np.int64) * (np.arange(len(lengths)) % 997 + 1)))

    def epoch_rows(self, epoch: int) -> tuple[list[list[int]], np.ndarray]:
        """(the rows of `epoch`: every dialogue row, then the replayed rows drawn for it; their shuffled order)."""
        if self._epoch is None or self._epoch[0] != epoch:
            rows = self.rows
            if self.replay_count:
                drawn = draw(len(self.replay_rows), self.replay_count, np.random.default_rng([self.seed, epoch, 1]))
                rows = rows + [self.replay_rows[i] for i in drawn]
            self._epoch = (epoch, rows, np.random.default_rng([self.seed, epoch]).permutation(len(rows)))
        return self._epoch[1], self._epoch[2]

    def order(self, epoch: int) -> np.ndarray:
        """The rows of `epoch` in their shuffled order (indices into epoch_rows(epoch)[0])."""
        return self.epoch_rows(epoch)[1]

    def step_rows(self, epoch: int, position: int) -> list[list[int]]:
        """This process's rows of step `position` of `epoch` ([] = an empty padding row)."""
        rows, order = self.epoch_rows(epoch)
        per = self.batch_size * self.accum
        lo = position * self.global_size + self.rank * per
        return [rows[order[j]] if j < len(order) else [] for j in range(lo, lo + per)]

    def next(self) -> list[dict[str, Tensor]]:
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        rows = self.step_rows(self.epoch, self.position)
        self.position += 1
        return [collate(self.examples, rows[a * self.batch_size:(a + 1) * self.batch_size], self.pad_id)
                for a in range(self.accum)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "global_size": self.global_size,
                "rows": len(self.rows), "fingerprint": self.fingerprint, "replay_rows": self.replay_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["global_size"]) != self.global_size:
            raise Llama2Error(f"the checkpoint was trained with a global batch of {state['global_size']} rows, this "
                              f"run has {self.global_size} (batch_size x grad_accum x processes); resume with the "
                              "same global batch (set global_batch_size)")
        if (int(state["rows"]), int(state["fingerprint"]), int(state.get("replay_rows", 0))) != (
                len(self.rows), self.fingerprint, self.replay_count):
            raise Llama2Error("the checkpoint was trained on other data (its dialogues or replayed text tokenise and "
                              "pack differently); resume with the same data, text_replay, tokenizer, max_seq_len and "
                              "packing, or use a new out_dir")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


def validation_batches(examples: Sequence[Example], max_seq_len: int, batch_size: int, *, packing: bool,
                       rank: int = 0, world_size: int = 1, pad_id: int = 0) -> list[dict[str, Tensor]]:
    """The held-out dialogues packed like the training data (in a fixed order); this process's share, padded
    with empty rows so every process runs the same number of batches."""
    if not examples:
        return []
    lengths = [len(e.ids) for e in examples]
    rows = pack_rows(lengths, max_seq_len) if packing else [[i] for i in range(len(lengths))]
    mine = rows[rank::world_size]
    n_batches = math.ceil(math.ceil(len(rows) / world_size) / batch_size)
    mine += [[]] * (n_batches * batch_size - len(mine))
    return [collate(examples, mine[b * batch_size:(b + 1) * batch_size], pad_id) for b in range(n_batches)]


def attention_mask(segments: Tensor) -> Tensor:
    """(B, 1, T, T) bool, True where query t may attend key s: s <= t within the same dialogue (padding, segment
    -1, attends causally among itself, so no row is empty)."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


# Below this row length, on a CPU, PyTorch's attention kernel runs the block-diagonal mask faster than the rows'
# sequences taken apart (its cost there grows with the padded tokens, not their square). Measured forward + backward
# of a 4-layer dim-256 model on 2 cores: rows of 256 tokens (5 sequences) mask 0.78 s, apart 1.03 s; rows of 512 (4)
# 1.76 / 2.01 s; rows of 1,024 (2, 4 or 10 sequences) 2.41-2.81 / 2.02-2.28 s (benchmarks/packed_attention.py).
APART_FROM_CPU = 1024


def packed_attention(segments: Tensor) -> Tensor | PackedRows:
    """How the model keeps packed dialogues apart (Transformer's `mask`): each sequence taken out of its row
    (PackedRows) on a GPU, whose flash attention takes no mask, and for rows of APART_FROM_CPU tokens or more on a
    CPU; otherwise the block-diagonal causal mask (attention_mask). The two give the same outputs."""
    if segments.device.type != "cpu" or segments.shape[1] >= APART_FROM_CPU:
        return PackedRows.from_segments(segments)
    return attention_mask(segments)
