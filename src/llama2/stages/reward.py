"""Reward models (paper section 5): a helpfulness RM and a safety RM, each trained from the chat model on
preference comparisons with the binary ranking loss and a margin that grows with the preference rating.

For a comparison (prompt x, chosen y_c, rejected y_r, rating r) the model scores both answers (the scalar head
of `llama2.classifier.SequenceClassifier`, read at the final EOS of the completed chat turn, `llama2.reward`) and
the loss is

    L = -log sigmoid(r(x, y_c) - r(x, y_r) - m(r))

with m(r) from Table 27 (`margin: none | small | large`; a comparison without a rating gets m = 0, as
"negligibly better / unsure"). Chosen and rejected answers are scored in one batched forward (chosen rows first).
One epoch, cosine to 10 % of the rate with a warm-up of 3 % of the steps (at least 5); the paper used 512 pairs per
batch and lr 1e-5 (5e-6 for 70B): configs/{7B,13B,70B}/reward-*.yaml.

Data mixes are weighted sources (`data.sources`): each JSONL file (or the built-in `builtin:helpfulness` /
`builtin:safety` comparisons) gives `weight` x its size pairs per epoch (a seeded subsample below 1, repeats above),
or a `share` of the mixed epoch (the safety RM's 90/10 mix: safety weight 1, helpfulness share 0.1).

Held-out evaluation (each source's held-out file is a test set): accuracy overall and per rating level, the
paper's Table 8 (ties count as half right; TRL counts them as wrong), in metrics.jsonl (`val_accuracy`,
`val_accuracy/SET`, `val_accuracy/SET/RATING`), in `eval.md`, as `score_histogram.png` (chosen and rejected
scores) and per pair in `heldout_scores.jsonl`. The run is evaluated once before the first step (step 0).

    recipe = load_recipe(RewardRecipe, "configs/tiny/reward-helpfulness.yaml")
    result = reward(recipe)            # builds the built-in comparisons when missing (pipeline.run: the SFT model too)
    rm = RewardModel.load(recipe.out_dir)
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..atomic import atomic_write_text
from ..checkpoint import AdapterCheckpointIO, detect_kind, detect_layout, load_checkpoint, load_config
from ..checkpoint.runs import load_tokenizer, require_checkpoint
from ..classifier import DEFAULT_PAD_ID, LIKELIHOOD_INIT, SequenceClassifier, init_score_
from ..data.comparisons import RATINGS, Comparison, ensure_comparisons, read_comparisons
from ..data.mix import WeightedSource, check_mix, draw, epoch_counts
from ..data.packing import Example, collate, pack_rows, packed_attention
from ..data.world import data_path
from ..errors import Llama2Error
from ..figures import pyplot, save_png
from ..inference.scoring import sequence_logprobs
from ..lora import LoRASpec, apply_lora
from ..reward import RewardModel, encode_scored, pad_rows
from ..train.config import FineTuneRecipe, OptimConfig
from ..train.distributed import DistEnv, barrier, init_distributed
from ..train.loop import HFCheckpointIO, LossOutput, Trainer, TrainResult
from ..train.metrics import flops_per_token

Kind = Literal["helpfulness", "safety"]
MarginVariant = Literal["none", "small", "large"]
# Table 27: m(r) by rating, from far apart to nearly equal
MARGINS: dict[str, dict[str, float]] = {
    "none": dict.fromkeys(RATINGS, 0.0),
    "small": {"significantly_better": 1.0, "better": 2 / 3, "slightly_better": 1 / 3, "negligibly_better": 0.0},
    "large": {"significantly_better": 3.0, "better": 2.0, "slightly_better": 1.0, "negligibly_better": 0.0},
}
# Table 8: the Helpfulness RM on Meta's helpfulness test set, accuracy (%) per rating level and overall
PAPER_TABLE_8 = {"significantly_better": 80.7, "better": 67.5, "slightly_better": 60.9, "negligibly_better": 54.7,
                 "all": 63.2}
BUILTIN = ("builtin:helpfulness", "builtin:safety")
UNRATED = "unrated"

# ---------------------------------------------------------------------------------------------------------------
# The loss and its bookkeeping


def margins(ratings: Sequence[str | None], variant: str) -> Tensor:
    """m(r) per comparison (Table 27); an unrated comparison gets 0."""
    table = MARGINS[variant]
    return torch.tensor([table[r] if r is not None else 0.0 for r in ratings], dtype=torch.float32)


def ranking_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """Per comparison: -log sigmoid(r_c - r_r - m(r))."""
    return -F.logsigmoid(chosen - rejected - margin)


def pair_accuracy(chosen: Tensor, rejected: Tensor) -> Tensor:
    """1 where the chosen answer scores higher, 1/2 on a tie, 0 otherwise."""
    return (chosen > rejected).float() + 0.5 * (chosen == rejected).float()


def accuracy_by_rating(chosen: Sequence[float], rejected: Sequence[float],
                       ratings: Sequence[str | None]) -> dict[str, tuple[float, int]]:
    """{rating: (accuracy, pairs)} for every rating present (None as "unrated"), plus "all" over every pair."""
    right = pair_accuracy(torch.tensor(list(chosen), dtype=torch.float64),
                          torch.tensor(list(rejected), dtype=torch.float64)).tolist()
    groups: dict[str, list[float]] = {}
    for r, a in zip(ratings, right):
        groups.setdefault(r or UNRATED, []).append(a)
    out = {k: (float(np.mean(v)), len(v)) for k, v in sorted(groups.items(), key=lambda kv: _rating_rank(kv[0]))}
    if right:
        out["all"] = (float(np.mean(right)), len(right))
    return out


def _rating_rank(r: str) -> int:
    return RATINGS.index(r) if r in RATINGS else len(RATINGS)


def reward_loss(model: nn.Module, batch: dict[str, Tensor], center: float = 0.0) -> LossOutput:
    """The ranking loss of a micro-batch of n comparisons, all 2n answers scored in one forward: padded rows (rows
    0..n-1 the chosen answers, n..2n-1 the rejected ones, each read at its last real token) or packed rows
    (`read_at`: where each of the 2n sequences ends, chosen ones first). center > 0 adds
    center x mean((r_c + r_r)^2), which keeps the scores' level near 0 (`center_rewards`)."""
    extra = {"response_from": batch["response_from"]} if getattr(model, "likelihood", False) else {}
    if "read_at" in batch:
        scores = model(batch["tokens"], positions=batch["positions"], mask=packed_attention(batch["segments"]),
                       read_at=batch["read_at"], **extra).float()
    else:
        scores = model(batch["tokens"], lengths=batch["lengths"], **extra).float()
    n = batch["margin"].shape[0]
    chosen, rejected = scores[:n], scores[n:]
    loss = ranking_loss(chosen, rejected, batch["margin"]).mean()
    if center:
        loss = loss + center * ((chosen + rejected) ** 2).mean()
    metrics = {"accuracy": pair_accuracy(chosen, rejected).mean().detach(),
               "score_gap": (chosen - rejected).mean().detach()}
    return LossOutput(loss, n, tokens=batch["lengths"].sum(), metrics=metrics)


def collate_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], margin: Sequence[float], pad_id: int,
                  pack_len: int | None = None, starts: Sequence[tuple[int, int]] | None = None) -> dict[str, Tensor]:
    """n (chosen ids, rejected ids) -> margin (n,) and the 2n sequences (chosen first): right-padded rows,
    `tokens` (2n, T) and `lengths` (2n,); or, with pack_len, packed into rows of at most pack_len tokens (best-fit
    decreasing, each sequence attending only to itself with positions from 0: llama2.data.packing), `tokens`,
    `positions`, `segments` (R, T), `read_at` (2n,) the flat index of each sequence's last token, and `lengths`.
    starts: (chosen, rejected) response starts per pair -> `response_from` (2n,): positions in the padded rows, or
    flat indices like read_at when packed (the likelihood term, llama2.classifier)."""
    seqs = [c for c, _ in pairs] + [r for _, r in pairs]
    firsts = [c for c, _ in starts] + [r for _, r in starts] if starts is not None else [1] * len(seqs)
    out: dict[str, Tensor] = {"margin": torch.tensor(list(margin), dtype=torch.float32)}
    if pack_len is None:
        out["tokens"], out["lengths"] = pad_rows(seqs, pad_id)
        out["response_from"] = torch.tensor(firsts, dtype=torch.long)
        return out
    examples = [Example(np.asarray(s, dtype=np.int64), np.zeros(len(s), dtype=bool)) for s in seqs]
    rows = pack_rows([len(s) for s in seqs], pack_len)
    packed = collate(examples, rows, pad_id)
    width = packed["tokens"].shape[1]
    read_at = torch.empty(len(seqs), dtype=torch.long)
    response_from = torch.empty(len(seqs), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for i in row:
            response_from[i] = r * width + t + firsts[i]
            t += len(seqs[i])
            read_at[i] = r * width + t - 1
    out.update(tokens=packed["tokens"], positions=packed["positions"], segments=packed["segments"],
               read_at=read_at, lengths=torch.tensor([len(s) for s in seqs], dtype=torch.long),
               response_from=response_from)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The recipe


@dataclass
class ComparisonSource(WeightedSource):
    """One source of a comparisons mix (WeightedSource): a comparisons JSONL file (llama2.data.comparisons) or
    builtin:helpfulness / builtin:safety, its held-out file (a test set; builtin: the built-in held-out file), and
    `weight` x its pairs per epoch (default 1 when share is unset) or a `share` of the mixed epoch."""

    name: str | None = None  # label in metrics and eval.md (default: helpfulness / safety, or the held-out stem)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.path in BUILTIN:
            return self.path.split(":", 1)[1]
        return Path(self.val_path or self.path).name.removesuffix(".jsonl")

    @property
    def train_label(self) -> str:
        """How the training mix names this source: `name`, else the built-in set or the training file."""
        if self.name or self.path in BUILTIN:
            return self.label
        return Path(self.path).name


@dataclass
class ComparisonDataConfig:
    """`path` (+ `val_path`): one comparisons file; else `sources`, a weighted mix (default: both built-in sets)."""

    path: str | None = None  # training comparisons (JSONL); unset: the built-in helpfulness or safety set (by kind)
    val_path: str | None = None  # held-out comparisons (JSONL)
    # a weighted mix: [{path, val_path, weight | share, name}]; path may be builtin:helpfulness or builtin:safety
    sources: list[ComparisonSource] = field(default_factory=list)
    on_bad_line: Literal["error", "skip"] = "error"  # error, or skip (counted and printed)
    val_max: int | None = None  # score at most this many held-out comparisons of each source (its first); null: all

    def validate(self, prefix: str = "data") -> None:
        if self.val_max is not None and self.val_max < 1:
            raise Llama2Error(f"recipe key '{prefix}.val_max' is {self.val_max}; give a positive count of held-out "
                              "comparisons per source, or null for all of them")
        if self.val_path is not None and self.path is None:
            raise Llama2Error(f"recipe key '{prefix}.val_path' is set but '{prefix}.path' is not; give the training "
                              f"file too (or use {prefix}.sources)")
        check_mix(self.sources, f"{prefix}.sources", f"a comparisons JSONL file or one of {list(BUILTIN)}")

    def resolved(self) -> list[ComparisonSource]:
        if self.path is not None:
            return [ComparisonSource(self.path, self.val_path, 1.0)]
        return self.sources or [ComparisonSource(b, weight=1.0) for b in BUILTIN]


def _reward_optim() -> OptimConfig:
    return OptimConfig(lr=1e-5, weight_decay=0.1, warmup_steps=5, warmup_ratio=0.03, min_lr_ratio=0.1)


@dataclass
class RewardRecipe(FineTuneRecipe):
    """`llama2 reward`: the shared loop's keys (TrainRecipe, FineTuneRecipe: base is the chat model) plus what
    reward-model training needs; see configs/*/reward-*.yaml. batch_size and global_batch_size count comparisons
    (each is two sequences, chosen and rejected); max_seq_len: longer comparisons are skipped (counted)."""

    kind: Kind = "helpfulness"  # helpfulness or safety: the built-in data and the name in reports
    out_dir: str = "runs/reward"  # the run directory: recipe.yaml, metrics.jsonl, eval.md, plots, checkpoints/
    # the rating margin m(r) in the ranking loss: none, small or large (the paper's Table 27)
    margin: MarginVariant = "small"
    packing: bool = True  # pack each micro-batch's answers into rows of max_seq_len (else pad every answer)
    # add w x log p(response) under the chat model's LM head to the score, w trained (llama2.classifier): lets the
    # RM read the facts the chat model knows; an extension of ours, off in the paper's recipes
    likelihood_term: bool = False
    # c > 0 adds c x mean((r_chosen + r_rejected)^2) to the loss (TRL's center_rewards_coefficient): the ranking
    # loss fixes only differences, this keeps scores near 0 so sigmoid(score) neither sits at 0 nor saturates at 1
    center_rewards: float = 0.0
    data: ComparisonDataConfig = field(default_factory=ComparisonDataConfig)
    lora: LoRASpec = field(default_factory=LoRASpec)
    optim: OptimConfig = field(default_factory=_reward_optim)

    def validate(self) -> None:
        super().validate()
        self.data.validate()
        self.lora.validate()
        if self.lora.quantize_base != "none":
            raise Llama2Error("lora.quantize_base is for SFT; reward models train on the full-precision base")
        if self.center_rewards < 0:
            raise Llama2Error(f"center_rewards must be >= 0 (0 turns it off), got {self.center_rewards}")
        if self.likelihood_term and self.lora.rank > 0:
            raise Llama2Error("likelihood_term trains every weight; set lora.rank=0 or likelihood_term=false")


# ---------------------------------------------------------------------------------------------------------------
# Data: sources, the epoch mix, batches


@dataclass
class SourceData:
    label: str
    train: list[Comparison]
    held_out: list[Comparison]
    weight: float | None
    share: float | None
    train_label: str | None = None  # how the training mix names it (default: label)


def load_sources(data: ComparisonDataConfig, quiet: bool = False) -> list[SourceData]:
    """Every source's training and held-out comparisons (built-in ones built when missing)."""
    out = []
    for s in data.resolved():
        if s.path in BUILTIN:
            train_path, val_path = ensure_comparisons(quiet=quiet)
            safety = s.path == "builtin:safety"
            pick = lambda cs: [c for c in cs if bool(c.safety) == safety]  # noqa: E731
            if s.val_path is not None:
                val_path = data_path(s.val_path)
        else:
            train_path, val_path = data_path(s.path), (data_path(s.val_path) if s.val_path else None)
            pick = list  # noqa: E731
        files = [read_comparisons(train_path, on_bad_line=data.on_bad_line)]
        if val_path is not None:
            files.append(read_comparisons(val_path, on_bad_line=data.on_bad_line))
        if not quiet:
            for f in files:
                if f.skipped:
                    print(f.summary(), flush=True)
        train = pick(files[0].comparisons)
        held = pick(files[1].comparisons)[:data.val_max] if len(files) > 1 else []
        if not train:
            raise Llama2Error(f"data source {s.path} has no training comparisons")
        weight = s.weight if s.weight is not None or s.share is not None else 1.0
        out.append(SourceData(s.label, train, held, weight, s.share, s.train_label))
    return out


@dataclass
class EncodedPair:
    chosen: list[int]
    rejected: list[int]
    rating: str | None
    source: str | None = None
    starts: tuple[int, int] = (1, 1)  # where each answer's response starts (encode_scored)

    @property
    def longest(self) -> int:
        return max(len(self.chosen), len(self.rejected))


def encode_comparisons(tokenizer: Any, comparisons: Sequence[Comparison], max_seq_len: int
                       ) -> tuple[list[EncodedPair], int]:
    """(the encoded pairs, how many were skipped as longer than max_seq_len)."""
    out, skipped = [], 0
    for c in comparisons:
        (chosen, c_start), (rejected, r_start) = (encode_scored(tokenizer, c.prompt, c.chosen),
                                                  encode_scored(tokenizer, c.prompt, c.rejected))
        p = EncodedPair(chosen, rejected, c.rating, c.source, (c_start, r_start))
        if p.longest > max_seq_len:
            skipped += 1
        else:
            out.append(p)
    return out, skipped


def encode_sources(sources: Sequence[SourceData], tokenizer: Any, seq_len: int, quiet: bool = False
                   ) -> tuple[list[list[EncodedPair]], dict[str, list[EncodedPair]]]:
    """(each source's encoded training pairs, {label: encoded held-out pairs}); comparisons longer than seq_len
    are skipped (counted and printed unless quiet)."""
    encoded, held = [], {}
    for s in sources:
        train, skipped = encode_comparisons(tokenizer, s.train, seq_len)
        test, test_skipped = encode_comparisons(tokenizer, s.held_out, seq_len)
        if not train:
            raise Llama2Error(f"every training comparison of {s.label} is longer than max_seq_len {seq_len}")
        encoded.append(train)
        held[s.label] = test
        if not quiet and (skipped or test_skipped):
            print(f"{s.label}: skipped {skipped} training and {test_skipped} held-out comparisons longer than "
                  f"max_seq_len {seq_len}", flush=True)
    return encoded, held


class PairBatches:
    """Epochs over the mixed comparisons: each epoch draws every source's count (epoch_counts) with a generator
    seeded by (seed, epoch, source) and shuffles the mix. A step takes the next global batch (batch_size x accum x
    processes pairs; the epoch's remainder is dropped), sorts it by length so micro-batches pad little, and gives
    process r its contiguous slice in `accum` micro-batches, each packed into rows of pack_len tokens (or padded,
    pack_len None; see collate_pairs). The state is (epoch, position): a resumed run continues with the same
    batches."""

    def __init__(self, sources: Sequence[list[EncodedPair]], counts: Sequence[int], batch_size: int, accum: int,
                 margin: str, *, rank: int = 0, world_size: int = 1, seed: int = 0, pad_id: int = 0,
                 pack_len: int | None = None) -> None:
        self.sources, self.counts, self.pack_len = [list(s) for s in sources], list(counts), pack_len
        self.batch_size, self.accum, self.rank, self.world_size = batch_size, accum, rank, world_size
        self.margin, self.seed, self.pad_id = margin, seed, pad_id
        self.global_size = batch_size * accum * world_size
        self.epoch_size = sum(counts)
        self.steps_per_epoch = self.epoch_size // self.global_size
        if self.steps_per_epoch < 1:
            raise Llama2Error(f"an epoch has {self.epoch_size} comparisons, fewer than one global batch of "
                              f"{self.global_size} (batch_size x grad_accum x processes); lower the batch or give "
                              "more data")
        self.epoch, self.position = 0, 0
        self._order: tuple[int, list[EncodedPair]] | None = None
        self.fingerprint = sum(len(p.chosen) * 3 + len(p.rejected) for s in self.sources for p in s) % 1_000_003

    def order(self, epoch: int) -> list[EncodedPair]:
        if self._order is None or self._order[0] != epoch:
            mix: list[EncodedPair] = []
            for k, (pairs, count) in enumerate(zip(self.sources, self.counts)):
                idx = draw(len(pairs), count, np.random.default_rng([self.seed, epoch, k]))
                mix += [pairs[i] for i in idx]
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(mix))
            self._order = (epoch, [mix[i] for i in perm])
        return self._order[1]

    def next(self) -> list[dict[str, Tensor]]:
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        lo = self.position * self.global_size
        step = sorted(self.order(self.epoch)[lo:lo + self.global_size], key=lambda p: p.longest)
        self.position += 1
        per = self.batch_size * self.accum
        mine = step[self.rank * per:(self.rank + 1) * per]
        table = MARGINS[self.margin]
        return [collate_pairs([(p.chosen, p.rejected) for p in chunk],
                              [table[p.rating] if p.rating else 0.0 for p in chunk], self.pad_id, self.pack_len,
                              [p.starts for p in chunk])
                for chunk in (mine[a * self.batch_size:(a + 1) * self.batch_size] for a in range(self.accum))]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "global_size": self.global_size,
                "counts": list(self.counts), "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["global_size"]) != self.global_size:
            raise Llama2Error(f"the checkpoint was trained with a global batch of {state['global_size']} comparisons, "
                              f"this run has {self.global_size}; resume with the same global batch (set "
                              "global_batch_size)")
        if list(state["counts"]) != self.counts or int(state["fingerprint"]) != self.fingerprint:
            raise Llama2Error("the checkpoint was trained on other comparisons (or another mix); resume with the "
                              "same data, tokenizer and max_seq_len, or use a new out_dir")
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])


# ---------------------------------------------------------------------------------------------------------------
# Held-out evaluation: Table 8


class HeldOutEvaluator:
    """eval_fn: scores every held-out pair of every test set through RewardModel (every process the same pairs),
    returns val_loss / val_accuracy (overall, per set, per set and rating) and, on rank 0, writes eval.md,
    heldout_scores.jsonl and score_histogram.png in the run directory."""

    def __init__(self, sets: dict[str, list[EncodedPair]], tokenizer: Any, margin: str, kind: str, run_dir: Path,
                 env: DistEnv) -> None:
        self.sets = {k: v for k, v in sets.items() if v}
        self.tokenizer, self.margin, self.kind, self.run_dir, self.env = tokenizer, margin, kind, run_dir, env

    def __call__(self, trainer: Trainer) -> dict[str, float]:
        if not self.sets:
            return {}
        rm = RewardModel(trainer.model, self.tokenizer, autocast_dtype=trainer.amp_dtype)
        result: dict[str, float] = {}
        losses: list[float] = []
        rights: list[float] = []
        tables: dict[str, dict[str, tuple[float, int]]] = {}
        scored: dict[str, tuple[list[float], list[float]]] = {}
        for name, pairs in self.sets.items():
            scores = rm.score_ids([p.chosen for p in pairs] + [p.rejected for p in pairs],
                                  [p.starts[0] for p in pairs] + [p.starts[1] for p in pairs])
            chosen, rejected = scores[:len(pairs)], scores[len(pairs):]
            scored[name] = (chosen, rejected)
            c, r = torch.tensor(chosen), torch.tensor(rejected)
            losses += ranking_loss(c, r, margins([p.rating for p in pairs], self.margin)).tolist()
            rights += pair_accuracy(c, r).tolist()
            tables[name] = accuracy_by_rating(chosen, rejected, [p.rating for p in pairs])
            for rating, (acc, _) in tables[name].items():
                result[f"val_accuracy/{name}" + ("" if rating == "all" else f"/{rating}")] = acc
        result["val_loss"] = float(np.mean(losses))
        result["val_accuracy"] = float(np.mean(rights))
        if self.env.is_main:
            self.write(trainer.step, tables, scored)
        return result

    def write(self, step: int, tables: dict[str, dict[str, tuple[float, int]]],
              scored: dict[str, tuple[list[float], list[float]]]) -> None:
        atomic_write_text(self.run_dir / "eval.md", eval_markdown(self.kind, step, tables))
        lines = []
        for name, (chosen, rejected) in scored.items():
            for p, c, r in zip(self.sets[name], chosen, rejected):
                lines.append(json.dumps({"step": step, "set": name, "rating": p.rating, "source": p.source,
                                         "chosen": round(c, 5), "rejected": round(r, 5)}) + "\n")
        atomic_write_text(self.run_dir / "heldout_scores.jsonl", "".join(lines))
        score_histogram(scored, self.run_dir / "score_histogram.png", f"{self.kind} RM, step {step}")


def eval_markdown(kind: str, step: int, tables: dict[str, dict[str, tuple[float, int]]]) -> str:
    """Table 8 for this run: accuracy (%) per held-out set and rating level, with the paper's row beside."""
    cols = [*RATINGS, UNRATED] if any(UNRATED in t for t in tables.values()) else list(RATINGS)
    head = "| test set | " + " | ".join(c.replace("_", " ") for c in cols) + " | all | pairs |"
    lines = [f"# {kind.capitalize()} reward model: held-out accuracy at step {step}", "",
             "Accuracy (%) of preferring the chosen answer, per preference rating (the paper's Table 8; ties count "
             "as half right).", "", head, "|" + "---|" * (len(cols) + 3)]
    for name, t in tables.items():
        cells = [f"{100 * t[c][0]:.1f} ({t[c][1]})" if c in t else "-" for c in cols]
        lines.append(f"| {name} (ours) | " + " | ".join(cells) + f" | {100 * t['all'][0]:.1f} | {t['all'][1]} |")
    if kind == "helpfulness":
        cells = [f"{PAPER_TABLE_8[c]:.1f}" if c in PAPER_TABLE_8 else "-" for c in cols]
        lines.append("| paper: Helpfulness RM on Meta Helpful | " + " | ".join(cells) +
                     f" | {PAPER_TABLE_8['all']:.1f} | - |")
    return "\n".join(lines) + "\n"


def score_histogram(scored: dict[str, tuple[list[float], list[float]]], path: Path, title: str) -> Path:
    """A PNG histogram of chosen and rejected held-out scores, one panel per test set."""
    plt = pyplot()

    fig, axes = plt.subplots(1, len(scored), figsize=(5.5 * len(scored), 3.6), squeeze=False)
    for ax, (name, (chosen, rejected)) in zip(axes[0], scored.items()):
        lo, hi = min(chosen + rejected), max(chosen + rejected)
        bins = np.linspace(lo, hi + 1e-6, 30)
        ax.hist(rejected, bins=bins, alpha=0.6, label="rejected", color="tab:red")
        ax.hist(chosen, bins=bins, alpha=0.6, label="chosen", color="tab:green")
        ax.set_title(f"{name} held-out ({len(chosen)} pairs)")
        ax.set_xlabel("reward score")
        ax.legend()
    fig.suptitle(title)
    save_png(fig, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class RewardRun:
    trainer: Trainer
    evaluator: HeldOutEvaluator
    tokenizer: Any


def build_reward(recipe: RewardRecipe, *, sources: Sequence[SourceData] | None = None, env: DistEnv | None = None,
                 quiet: bool = False) -> RewardRun:
    """Everything `llama2 reward` sets up: the chat model, the data mix, the classifier started
    from the chat model's backbone with a fresh head (LoRA adapters if asked), the evaluator, the Trainer."""
    env = env or init_distributed(recipe.device)
    base = require_checkpoint(recipe.base, "chat model")
    if env.is_main and sources is None and any(s.path in BUILTIN for s in recipe.data.resolved()):
        ensure_comparisons(quiet=quiet)
    barrier(env)
    cfg = load_config(base)
    tokenizer = load_tokenizer(base)
    seq_len = recipe.max_seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise Llama2Error(f"max_seq_len {seq_len} is longer than the base's context ({cfg.max_seq_len}); lower it")
    lora = recipe.lora
    if lora.rank > 0 and detect_layout(base) != "hf":
        raise Llama2Error(f"LoRA needs the base in the Hugging Face layout; convert it first: llama2 convert {base} "
                          f"{base.name}-hf --to hf")
    sources = list(sources) if sources is not None else load_sources(recipe.data, quiet=quiet or not env.is_main)
    encoded, held = encode_sources(sources, tokenizer, seq_len, quiet=quiet or not env.is_main)
    counts = epoch_counts([len(e) for e in encoded], [s.weight for s in sources], [s.share for s in sources])
    accum = recipe.accumulation(env.world_size)
    batches = PairBatches(encoded, counts, recipe.batch_size, accum, recipe.margin, rank=env.rank,
                          world_size=env.world_size, seed=recipe.seed, pad_id=DEFAULT_PAD_ID,
                          pack_len=seq_len if recipe.packing else None)
    total = recipe.epochs * batches.steps_per_epoch
    run = dataclasses.replace(recipe, max_steps=min(recipe.max_steps or total, total))
    if env.is_main and not quiet:
        mix = ", ".join(f"{s.train_label or s.label} {c:,} of {len(e):,}" for s, c, e in zip(sources, counts, encoded))
        tests = ", ".join(f"{k} {len(v):,}" for k, v in held.items() if v) or "none"
        print(f"{recipe.kind} RM: an epoch mixes {mix} comparisons; held-out: {tests}; {batches.steps_per_epoch} "
              f"steps per epoch of {batches.global_size} pairs; training {run.max_steps} steps", flush=True)

    def build_model() -> nn.Module:
        model = SequenceClassifier(cfg, pad_id=DEFAULT_PAD_ID, likelihood=recipe.likelihood_term)
        if lora.rank > 0:
            apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.modules, base_model=str(base))
        return model

    def initial() -> dict[str, Tensor]:
        if not recipe.likelihood_term or detect_kind(base) == "classifier":
            return load_checkpoint(base, kind="classifier", device="cpu").state_dict()
        # the chat model read once: its LM head stays, a fresh scalar head and (w, b) are added
        lm = load_checkpoint(base, kind="causal_lm", device="cpu")
        state = lm.state_dict()
        dtype = lm.lm_head.weight.dtype
        state["score.weight"] = init_score_(torch.empty(1, cfg.dim, dtype=dtype))
        offset = -LIKELIHOOD_INIT * mean_answer_logprob(lm, [p for e in encoded for p in e][:CENTRING_ANSWERS])
        state["likelihood_weight"] = torch.tensor([LIKELIHOOD_INIT, offset], dtype=dtype)
        return state

    if lora.rank > 0:
        io: Any = AdapterCheckpointIO(base, tokenizer)
        fresh = ["*.lora_A.weight", "*.lora_B.weight"]
    else:
        io, fresh = HFCheckpointIO(tokenizer), []
    evaluator = HeldOutEvaluator(held, tokenizer, recipe.margin, recipe.kind, Path(run.out_dir), env)
    loss = functools.partial(reward_loss, center=recipe.center_rewards) if recipe.center_rewards else reward_loss
    trainer = Trainer(run, build_model, loss, batches, initial_weights=initial, checkpoint_io=io, env=env,
                      flops_per_token=flops_per_token(cfg, seq_len), quiet=quiet, fresh=fresh,
                      eval_fn=evaluator if evaluator.sets else None)
    return RewardRun(trainer, evaluator, tokenizer)


CENTRING_ANSWERS = 64  # chosen training answers that set the likelihood term's constant b


@torch.no_grad()
def mean_answer_logprob(lm: nn.Module, pairs: Sequence[EncodedPair], batch: int = 16) -> float:
    """The mean over the pairs' chosen answers of sum log p(answer tokens) under the causal LM `lm`: the level the
    likelihood term's constant b cancels (llama2.classifier)."""
    totals: list[float] = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        tokens, lengths = pad_rows([p.chosen for p in chunk], DEFAULT_PAD_ID)
        real = torch.arange(tokens.shape[1])[None, :] < lengths[:, None]
        logp = sequence_logprobs(lm, tokens, real)  # logp[:, j] is the log-probability of token j + 1
        for row, p in zip(logp, chunk):
            totals.append(float(row[p.starts[0] - 1:len(p.chosen) - 1].sum()))
    return sum(totals) / max(len(totals), 1)


def evaluate_at_start(run: RewardRun) -> dict[str, float]:
    """Start the trainer (resuming if it can); a fresh run is evaluated before its first step, logged as step 0."""
    t = run.trainer
    t.start()
    if t.step > 0 or not run.evaluator.sets:
        return {}
    record = {"step": 0, **t.evaluate()}
    t.metrics.append(record)
    return record


def reward(recipe: RewardRecipe, quiet: bool = False, *, sources: Sequence[SourceData] | None = None) -> TrainResult:
    """Train (or resume) a reward model as the recipe says; evaluates on the held-out comparisons before the first
    step and at every evaluation; prints a one-line summary unless quiet."""
    run = build_reward(recipe, sources=sources, quiet=quiet)
    t = run.trainer
    evaluate_at_start(run)
    result = t.fit()
    if t.env.is_main and not quiet:
        print(summary_line(recipe.kind, result), flush=True)
    return result


def summary_line(kind: str, result: TrainResult) -> str:
    last = result.last
    loss = f"loss {last['loss']:.4f}" if "loss" in last else "loss n/a"
    acc = f", held-out accuracy {100 * last['val_accuracy']:.1f}%" if "val_accuracy" in last else ""
    return f"reward ({kind}): {result.step} steps, {loss}{acc}; checkpoint {result.checkpoint}"


__all__ = ["RewardRecipe", "reward", "build_reward", "ranking_loss", "margins", "accuracy_by_rating", "MARGINS",
           "PAPER_TABLE_8", "ensure_comparisons", "epoch_counts", "PairBatches", "encode_sources", "load_sources",
           "collate_pairs", "ComparisonDataConfig"]
