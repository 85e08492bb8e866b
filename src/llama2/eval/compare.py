"""Model comparison judged by a reward model: the win / tie / loss of model A's answers over model B's, as the
paper tracks RLHF progress (Figure 11, there with the reward models and GPT-4 as judges).

    cmp = compare_models("runs/ppo", "runs/sft", "runs/rm-helpful", prompts, max_new_tokens=128)
    print(cmp.markdown())            # win / tie / loss, A's win rate with its 95% interval, per prompt kind

**Answers** come from the project's one generation path (`llama2.inference.generate.Generator` over the chat
format, as `llama2.stages.rejection` answers prompts): temperature 0.1 and top-p 0.9 by default (temperature 0
is greedy), prompt i sampled with seed `seed + i` for both models.

**Judging.** The reward model scores each (prompt, answer) alone: p = sigmoid(score). A wins when
p_A - p_B > margin, loses when p_B - p_A > margin, and ties when |p_A - p_B| <= margin (default 0.01, one
percentage point). **Win rate** = wins / (wins + losses), ties left out, with a 95% **Wilson score interval**
(no interval without a non-tie). Ties are reported beside it (and `win_or_half_tie` counts a tie as half a win).

**Order.** The paper shows GPT-4 both orders because a pairwise judge can favour a position. A reward model never
sees the two answers together, so order cannot matter: `compare_models(b, a)` mirrors `compare_models(a, b)`
exactly (A's wins are B's losses), which the tests check.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..chat import encode_dialog
from ..data.prompts import PromptItem
from ..errors import Llama2Error
from ..figures import pyplot, save_png
from ..inference.generate import Generator, SamplingParams
from ..inference.scoring import sequence_logprobs
from ..reward import RewardModel, pad_rows
from .answering import answer as chat_answers

TIE_MARGIN = 0.01
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
Answerer = Callable[[Sequence[PromptItem]], list[str]]


def outcome(p_a: float, p_b: float, margin: float = TIE_MARGIN) -> str:
    """"win" (A better by more than margin), "loss" or "tie"."""
    eps = 1e-12  # a difference of exactly `margin` in floating point (0.7 - 0.69) is a tie
    if p_a - p_b > margin + eps:
        return "win"
    if p_b - p_a > margin + eps:
        return "loss"
    return "tie"


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion successes / n (z = 1.96: 95%)."""
    if n <= 0 or not 0 <= successes <= n:
        raise Llama2Error(f"a Wilson interval needs 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Tally:
    """Win / tie / loss counts of A over B, with A's win rate over non-ties and its Wilson 95% interval."""

    wins: int = 0
    ties: int = 0
    losses: int = 0

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float | None:
        decided = self.wins + self.losses
        return self.wins / decided if decided else None

    @property
    def interval(self) -> tuple[float, float] | None:
        decided = self.wins + self.losses
        return wilson_interval(self.wins, decided) if decided else None

    @property
    def win_or_half_tie(self) -> float | None:
        return (self.wins + self.ties / 2) / self.n if self.n else None

    def to_json(self) -> dict[str, Any]:
        return {"wins": self.wins, "ties": self.ties, "losses": self.losses, "win_rate": self.win_rate,
                "interval": list(self.interval) if self.interval else None, "win_or_half_tie": self.win_or_half_tie}


def tally(outcomes: Sequence[str]) -> Tally:
    t = Tally(outcomes.count("win"), outcomes.count("tie"), outcomes.count("loss"))
    if t.n != len(outcomes):
        raise Llama2Error(f"outcomes must be win, tie or loss; got {sorted(set(outcomes))}")
    return t


@dataclass
class Comparison:
    """Per-prompt answers, judge probabilities and outcomes of A over B, with the tallies."""

    name_a: str
    name_b: str
    judge: str
    prompts: list[PromptItem]
    answers_a: list[str]
    answers_b: list[str]
    probs_a: list[float]
    probs_b: list[float]
    margin: float = TIE_MARGIN
    outcomes: list[str] = field(init=False)

    def __post_init__(self) -> None:
        lengths = {len(self.prompts), len(self.answers_a), len(self.answers_b), len(self.probs_a), len(self.probs_b)}
        if len(lengths) != 1:
            raise Llama2Error("a comparison needs one answer and one score per prompt for each model")
        self.outcomes = [outcome(a, b, self.margin) for a, b in zip(self.probs_a, self.probs_b)]

    def tally(self, safety: bool | None = None) -> Tally:
        """Counts over all prompts, or only the safety (True) / helpfulness (False) prompts."""
        return tally([o for o, p in zip(self.outcomes, self.prompts) if safety is None or p.safety == safety])

    def swapped(self) -> Comparison:
        """B over A (what the judge would say with the order reversed: for an RM, exactly the mirror)."""
        return Comparison(self.name_b, self.name_a, self.judge, self.prompts, self.answers_b, self.answers_a,
                          self.probs_b, self.probs_a, self.margin)

    def rows(self) -> list[tuple[str, Tally]]:
        out = [("all prompts", self.tally())]
        kinds = {p.safety for p in self.prompts}
        if len(kinds) > 1:
            out += [("helpfulness prompts", self.tally(False)), ("safety prompts", self.tally(True))]
        return out

    def markdown(self) -> str:
        """The table: per prompt kind, A's wins / ties / losses and win rate (non-ties) with its 95% interval."""
        lines = [f"**{self.name_a}** (A) vs **{self.name_b}** (B), judged by the reward model {self.judge}: "
                 f"a tie when |p_A - p_B| <= {self.margin:g}; win rate = A wins / (wins + losses), "
                 "95% Wilson interval.", "",
                 "| prompts | n | A wins | tie | B wins | A win rate | 95% interval |",
                 "|---|---:|---:|---:|---:|---:|---|"]
        for name, t in self.rows():
            rate = f"{100 * t.win_rate:.1f}%" if t.win_rate is not None else "-"
            ci = f"{100 * t.interval[0]:.1f}% - {100 * t.interval[1]:.1f}%" if t.interval else "-"
            lines.append(f"| {name} | {t.n} | {t.wins} | {t.ties} | {t.losses} | {rate} | {ci} |")
        return "\n".join(lines) + "\n"

    def records(self) -> list[dict[str, Any]]:
        return [{"prompt": p.messages, "safety": p.safety, "answer_a": a, "answer_b": b, "p_a": pa, "p_b": pb,
                 "outcome": o}
                for p, a, b, pa, pb, o in zip(self.prompts, self.answers_a, self.answers_b, self.probs_a,
                                              self.probs_b, self.outcomes)]

    def to_json(self) -> dict[str, Any]:
        return {"a": self.name_a, "b": self.name_b, "judge": self.judge, "margin": self.margin,
                **{name: t.to_json() for name, t in self.rows()}}


def checkpoint_answerer(path: Path | str, *, max_new_tokens: int = 128, temperature: float = 0.1,
                        top_p: float = 0.9, seed: int = 0, device: str = "cpu", batch_size: int = 8,
                        quiet: bool = False) -> Answerer:
    """A function answering prompts with the checkpoint (or training run) at `path` through the Generator."""
    def answer(prompts: Sequence[PromptItem]) -> list[str]:
        return chat_answers(path, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            seed=seed, device=device, batch_size=batch_size, quiet=quiet)

    return answer


def compare_models(a: Path | str | Answerer, b: Path | str | Answerer, judge: Any, prompts: Sequence[PromptItem],
                   *, max_new_tokens: int = 128, temperature: float = 0.1, top_p: float = 0.9, seed: int = 0,
                   margin: float = TIE_MARGIN, device: str = "cpu", quiet: bool = False,
                   names: tuple[str, str] | None = None) -> Comparison:
    """Answer `prompts` with A and with B (checkpoint paths, or functions prompts -> answers) and judge each answer
    with the reward model `judge` (its path, a RewardModel, or anything with RewardModel's `probs(prompts,
    responses)`). See the module docstring."""
    if not prompts:
        raise Llama2Error("no prompts to compare the models on")
    if not margin >= 0:
        raise Llama2Error(f"the tie margin must be >= 0, got {margin}")
    if max_new_tokens < 1:
        raise Llama2Error(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    prompts = list(prompts)

    def answers(model: Path | str | Answerer) -> list[str]:
        if callable(model):
            got = list(model(prompts))
            if len(got) != len(prompts) or not all(isinstance(x, str) for x in got):
                raise Llama2Error("an answering function must return one string per prompt")
            return got
        if not Path(model).exists():
            raise Llama2Error(f"checkpoint {model} does not exist; check the path")
        return checkpoint_answerer(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                   seed=seed, device=device, quiet=quiet)(prompts)

    def name(model: Any) -> str:
        return str(model) if not callable(model) else getattr(model, "__name__", "model")

    judge_name = str(judge) if isinstance(judge, (str, Path)) else type(judge).__name__
    if isinstance(judge, (str, Path)):
        if not Path(judge).exists():
            raise Llama2Error(f"reward model {judge} does not exist; give the directory of a trained reward model")
        judge = RewardModel.load(judge, device=device)
    answers_a, answers_b = answers(a), answers(b)
    messages = [p.messages for p in prompts]
    probs_a, probs_b = judge.probs(messages, answers_a), judge.probs(messages, answers_b)
    name_a, name_b = names or (name(a), name(b))
    return Comparison(name_a, name_b, judge_name, prompts, answers_a, answers_b, probs_a, probs_b, margin)


def comparison_plot(cmp: Comparison, path: Path | str) -> Path:
    """A horizontal stacked bar per prompt kind: A wins / tie / B wins as % of the prompts (PNG)."""
    plt = pyplot()


    rows = cmp.rows()
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.6 * len(rows)))
    labels = [name for name, _ in rows][::-1]
    tallies = [t for _, t in rows][::-1]
    left = [0.0] * len(rows)
    for key, label, colour in (("wins", f"A ({Path(cmp.name_a).name}) wins", "tab:green"), ("ties", "tie", "tab:gray"),
                               ("losses", f"B ({Path(cmp.name_b).name}) wins", "tab:red")):
        share = [100 * getattr(t, key) / t.n if t.n else 0.0 for t in tallies]
        ax.barh(labels, share, left=left, color=colour, label=label)
        for y, (x0, s) in enumerate(zip(left, share)):
            if s >= 6:
                ax.text(x0 + s / 2, y, f"{s:.0f}%", ha="center", va="center", color="white", fontsize=9)
        left = [x + s for x, s in zip(left, share)]
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of prompts")
    ax.set_title(f"judged by {Path(cmp.judge).name}: A = {Path(cmp.name_a).name}, B = {Path(cmp.name_b).name}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.05 * len(rows)), ncol=3, fontsize=8, frameon=False)
    path = Path(path)
    save_png(fig, path)
    return path


def write_comparison(cmp: Comparison, output: Path | str) -> list[Path]:
    """FILE.md (the table), FILE.png (the bars) and FILE.jsonl (every prompt's answers, scores, outcome)."""
    output = Path(output)
    atomic_write_text(output, f"# Model comparison\n\n{cmp.markdown()}")
    jsonl = output.with_suffix(".jsonl")
    atomic_write_text(jsonl, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in cmp.records()))
    return [output, comparison_plot(cmp, output.with_suffix(".png")), jsonl]


@torch.no_grad()
def sampled_kl(model: Any, reference: Any, tok: Any, prompts: Sequence[Sequence[dict[str, str]]], *,
               max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0, batch: int = 64) -> float:
    """KL(model || reference) estimated on the model's own samples: one answer per prompt (chat messages), sampled
    at `temperature` (prompt i with seed `seed + i`), and the mean over prompts of log model(answer) - log
    reference(answer), summed over the answer's tokens (its EOS included when it stopped on one) with the
    log-probabilities at the same temperature. Both models share the tokenizer."""
    if not prompts:
        raise Llama2Error("sampled_kl needs at least one prompt")
    ids = [encode_dialog(tok, list(m)) for m in prompts]
    params = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, seed=seed + i)
              for i in range(len(ids))]
    done = Generator(model, tok, max_batch_size=min(batch, len(ids))).generate(ids, params)
    rows = [(p, list(c.tokens) + ([tok.eos_id] if c.finish_reason == "stop" else [])) for p, c in zip(ids, done)]
    total = 0.0
    for lo in range(0, len(rows), batch):
        chunk = rows[lo:lo + batch]
        tokens, lengths = pad_rows([p + a for p, a in chunk], 0)
        positions = torch.arange(tokens.shape[1])[None, :]
        real = positions < lengths[:, None]
        answer = (positions[:, 1:] >= torch.tensor([len(p) for p, _ in chunk])[:, None]) & real[:, 1:]
        ratio = (sequence_logprobs(model, tokens, real, temperature=temperature)
                 - sequence_logprobs(reference, tokens, real, temperature=temperature))
        total += float((ratio * answer).sum())
    return total / len(rows)


__all__ = ["TIE_MARGIN", "Comparison", "Tally", "outcome", "tally", "wilson_interval", "compare_models",
           "checkpoint_answerer", "comparison_plot", "write_comparison", "sampled_kl"]
