"""Safety context distillation (paper section 8): teach the model to answer adversarial prompts as it does when a
safety pre-prompt tells it to be careful, without the pre-prompt.

1. For each adversarial training prompt (`safety: true` in the prompt set, `llama2.data.adversarial`), the model
   answers twice through the one generation path: plainly, and with a safety pre-prompt as the system message:
   `preprompt: generic` (one text for every prompt), `per_category` (the generic text plus the prompt's answer
   template, or its category's, `ANSWER_TEMPLATES`), or any other text. `prefill: true` also starts the
   pre-prompted answer with the answer template itself, and the model continues it (an addition of ours: a small
   model follows a started answer far more reliably than an instruction).
2. The safety RM scores both answers (to the prompt without the pre-prompt); the pre-prompted answer is kept only
   where it scores higher than the plain one (the paper's rule: context distillation can make answers worse, and
   the RM decides). `distill.jsonl` holds every prompt's two answers, scores and whether it was kept; `kept.md`
   the counts per category and attack style.
3. The SFT stage fine-tunes the model on (prompt without the pre-prompt -> kept answer) (`finetune.recipe`, its
   own resumable run in `out_dir/sft`), with `replay` dialogues of the SFT data mixed in so helpfulness is kept.
   `benign: reference` (default) also trains on the benign look-alikes of the training set with their reference
   answers (the prompt set's `reference`, helpful answers; prompts without one are left out), `benign: plain` on
   the model's own plain answers to them (those the refusal detector does not flag): anchors, so the refusals
   distilled for "How do I kill my neighbour?" do not spread to "How do I kill a Python process?". `benign: skip`
   is the paper's setting, adversarial prompts only; the false-refusal rate shows what each costs.
4. Red-team evaluation (`llama2.eval.redteam`) of the model before and after on the held-out prompts: violation
   rates per category and attack style, and false refusals on the benign look-alikes (`redteam.json`,
   `redteam.md`, `redteam.png`); `safety_scores.png` is the paper's Figure 16: the safety RM's scores of the answers
   without and with the pre-prompt, and of the held-out answers before and after distillation.
metrics.jsonl: step 0 the model before, step 1 after (`heldout_safety`, `violation_rate`, `false_refusal_rate`),
plus the distillation's counts. Rerunning continues: answers, the fine-tuning run and the evaluation are each
reused once written.

    recipe = load_recipe(DistillSafetyRecipe, "configs/tiny/distill-safety.yaml")
    result = pipeline.run(recipe)          # builds the chat model and the safety RM when missing, then this stage
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..atomic import atomic_write_text, make_dir
from ..checkpoint import load_checkpoint
from ..checkpoint.runs import load_tokenizer, require_checkpoint, resolve_base
from ..data.adversarial import (
    ANSWER_TEMPLATES,
    ATTACK_STYLES,
    RISK_CATEGORIES,
    AdversarialPrompt,
    builtin_adversarial,
    read_adversarial,
)
from ..data.dialogues import ensure_dialogues, exchanges, read_dialogues
from ..data.jsonl import write_jsonl
from ..data.world import data_path
from ..device import resolve_device
from ..errors import Llama2Error
from ..eval.adherence import TurnByTurn
from ..eval.answering import answer
from ..eval.redteam import (
    THRESHOLD,
    JudgedAnswer,
    RedTeamReport,
    RewardModelJudge,
    bar_chart,
    is_refusal,
    markdown_table,
    red_team,
)
from ..figures import pyplot, save_png
from ..paths import config_path, expand_path
from ..recipe import check, load_recipe, to_dict
from ..reward import RewardModel
from ..train.metrics import MetricsLog, read_metrics
from .sft import FinetuneSpec, SFTRecipe, sft

GENERIC_PREPROMPT = ("You are a safe and responsible assistant. You never help anyone hurt people, break the law or "
                     "put themselves at risk; you decline such requests briefly and kindly and point to safe help. "
                     "You answer harmless questions helpfully.")


@dataclass
class SafetyPromptsSpec:
    """The adversarial prompt set (llama2.data.adversarial): training and held-out prompts; unset: built-in."""

    path: str | None = None  # adversarial prompts (JSONL); unset: the built-in set
    val_path: str | None = None  # held-out adversarial prompts (JSONL)
    on_bad_line: Literal["error", "skip"] = "error"  # error, or skip (counted and printed)
    max_prompts: int | None = None  # the first N adversarial training prompts (null: all)
    held_out: int | None = None  # the first N held-out prompts evaluated, adversarial and benign (null: all)

    def validate(self, prefix: str = "prompts") -> None:
        if self.val_path is not None and self.path is None:
            raise Llama2Error(f"recipe key '{prefix}.val_path' is set but '{prefix}.path' is not")
        for key in ("max_prompts", "held_out"):
            v = getattr(self, key)
            check(v is None or v >= 1, f"{prefix}.{key}", v, "an integer >= 1 or null (all)")


def _distill_finetune() -> FinetuneSpec:
    return FinetuneSpec(recipe="configs/tiny/sft.yaml")


@dataclass
class DistillSafetyRecipe:
    """`llama2 rlhf distill-safety`: see configs/tiny/distill-safety.yaml and the module docstring."""

    base: str = ""  # the chat model to distil into (HF or Meta layout, or a run)
    base_recipe: str | None = None  # an SFT recipe that builds `base` when it is missing
    safety_rm: str = ""  # the safety reward model that keeps or drops each distilled answer
    safety_rm_recipe: str | None = None  # a reward recipe that builds it when missing
    helpfulness_rm: str | None = None  # optional: its scores of benign answers in the evaluation
    helpfulness_rm_recipe: str | None = None  # a reward recipe that builds it when missing
    out_dir: str = "runs/distill-safety"  # the run directory: answers, kept set, red-team reports, sft/
    preprompt: str = "generic"  # generic | per_category | any other text (used as it is)
    generic_preprompt: str = GENERIC_PREPROMPT  # the text of the generic pre-prompt
    prefill: bool = False  # start the pre-prompted answer with the answer template (the model continues it)
    temperature: float = 0.7  # sampling of both answers (0: greedy)
    top_p: float = 0.9  # nucleus sampling
    max_new_tokens: int = 96  # longest answer
    batch_prompts: int = 32  # prompts answered together
    replay: int = 0  # SFT training dialogues mixed into the fine-tuning (built-in ones, or replay_path's)
    replay_answers: Literal["reference", "own"] = "reference"  # the replay's replies, or the base model's own answers
    benign: Literal["reference", "plain", "skip"] = "reference"  # anchors on the benign look-alikes
    replay_path: str | None = None  # dialogues JSONL to replay (null: the built-in ones)
    threshold: float = THRESHOLD  # the evaluation's violation threshold on the safety RM's score
    max_steps: int | None = None  # caps the fine-tuning's steps (null: the finetune recipe's)
    seed: int = 0  # seeds sampling and the replay draw
    device: str = "auto"  # auto, cpu or cuda
    prompts: SafetyPromptsSpec = field(default_factory=SafetyPromptsSpec)
    finetune: FinetuneSpec = field(default_factory=_distill_finetune)

    def validate(self) -> None:
        for key in ("base", "safety_rm"):
            check(bool(getattr(self, key)), key, getattr(self, key), "a checkpoint directory or run")
        check(bool(self.out_dir), "out_dir", self.out_dir, "a directory path")
        check(bool(self.preprompt.strip()), "preprompt", self.preprompt, "generic, per_category or a text")
        check(self.temperature >= 0, "temperature", self.temperature, "a number >= 0 (0 = greedy)")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check(self.batch_prompts >= 1, "batch_prompts", self.batch_prompts, "an integer >= 1")
        check(self.replay >= 0, "replay", self.replay, "an integer >= 0")
        check(0 < self.threshold < 1, "threshold", self.threshold, "a number in (0, 1)")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1 or null")
        self.prompts.validate()

    def finetune_recipe(self, base: Path | str, out_dir: Path) -> Any:
        extra = [f"max_steps={self.max_steps}"] if self.max_steps is not None else []
        return load_recipe(SFTRecipe, config_path(self.finetune.recipe),
                           [*self.finetune.overrides, *extra, f"base={base}", "base_recipe=null", f"out_dir={out_dir}",
                            "data.path=null", "data.val_path=null", "samples.count=0", f"seed={self.seed}", f"device={self.device}"])


# ---------------------------------------------------------------------------------------------------------------
# The pre-prompt and the keep rule


def preprompt_for(recipe: DistillSafetyRecipe, prompt: AdversarialPrompt) -> str:
    """The safety pre-prompt (system message) for one prompt."""
    if recipe.preprompt == "generic":
        return recipe.generic_preprompt
    if recipe.preprompt == "per_category":
        what = RISK_CATEGORIES.get(prompt.category, prompt.category.replace("_", " "))
        return (f"{recipe.generic_preprompt} The request may involve {what}; a safe answer reads like this: "
                f"\"{template_for(prompt)}\"")
    return recipe.preprompt


def template_for(prompt: AdversarialPrompt) -> str:
    """The prompt's own answer template, else its category's (else the illicit-activities one)."""
    return prompt.answer_template or ANSWER_TEMPLATES.get(prompt.category, ANSWER_TEMPLATES["illicit_criminal"])


def keep_if_better(plain: Sequence[float], preprompted: Sequence[float]) -> list[bool]:
    """The paper's rule: keep the pre-prompted answer only where the safety RM scores it strictly higher."""
    return [b > a for a, b in zip(plain, preprompted, strict=True)]


def kept_table(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{group: {"prompts": n, "kept": n}} per category and per attack style (keys "category:X", "attack:Y")."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        for key in (f"category:{r['category']}", f"attack:{r['attack']}"):
            c = out.setdefault(key, {"prompts": 0, "kept": 0})
            c["prompts"] += 1
            c["kept"] += int(r["kept"])
    return dict(sorted(out.items()))


def kept_markdown(table: dict[str, dict[str, int]]) -> str:
    lines = ["| group | prompts | kept | kept % |", "|---|---|---|---|"]
    for key, c in table.items():
        kind, name = key.split(":", 1)
        label = RISK_CATEGORIES.get(name, name) if kind == "category" else f"attack: {ATTACK_STYLES.get(name, name)}"
        lines.append(f"| {label} | {c['prompts']} | {c['kept']} | {100 * c['kept'] / max(1, c['prompts']):.0f}% |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class DistillResult:
    model: Path  # the distilled checkpoint
    kept: int
    prompts: int
    before: dict[str, Any]  # red-team summaries
    after: dict[str, Any]


def load_prompt_sets(spec: SafetyPromptsSpec) -> tuple[list[AdversarialPrompt], list[AdversarialPrompt]]:
    if spec.path is None:
        return builtin_adversarial()
    train = read_adversarial(data_path(spec.path), on_bad_line=spec.on_bad_line)
    val = read_adversarial(data_path(spec.val_path), on_bad_line=spec.on_bad_line) if spec.val_path else []
    return train, val


class SafetyDistillation:
    """One run (module docstring); `run()` does or resumes every step."""

    def __init__(self, recipe: DistillSafetyRecipe, *, quiet: bool = False, judge: Any = None,
                 unchanged_if_empty: bool = False) -> None:
        self.recipe, self.quiet, self.unchanged_if_empty = recipe, quiet, unchanged_if_empty
        self.out = make_dir(expand_path(recipe.out_dir))
        self.device = str(resolve_device(recipe.device))
        self.base = require_checkpoint(recipe.base, "chat model")
        recipe.finetune_recipe(self.base, self.out / "check")  # a bad finetune key fails now
        if judge is None:
            rm = require_checkpoint(recipe.safety_rm, "safety RM")
            judge = RewardModelJudge.load(rm, device=self.device)
        self.judge = judge
        self.helpfulness = None
        if recipe.helpfulness_rm:
            h = require_checkpoint(recipe.helpfulness_rm, "helpfulness RM")
            self.helpfulness = RewardModel.load(h, device=self.device)
        train, val = load_prompt_sets(recipe.prompts)
        adversarial = [p for p in train if p.safety]
        if not adversarial:
            raise Llama2Error("the prompt set has no adversarial prompts (\"safety\": true) to distil on")
        n = recipe.prompts.max_prompts
        self.train = adversarial[:n] if n else adversarial
        benign = [p for p in train if not p.safety] if recipe.benign != "skip" else []
        self.benign = benign[:n] if n else benign
        if not val:
            raise Llama2Error("no held-out prompts: set prompts.val_path (or use the built-in prompts)")
        self.val = val[:recipe.prompts.held_out] if recipe.prompts.held_out else val

    def _answers(self, model: Any, prompts: Sequence[AdversarialPrompt], *, system: bool, seed: int,
                 temperature: float) -> list[str]:
        r = self.recipe
        if not system:
            return answer(model, prompts, max_new_tokens=r.max_new_tokens, temperature=temperature, top_p=r.top_p,
                          seed=seed, batch_size=r.batch_prompts, device=self.device, quiet=self.quiet)
        # per-prompt pre-prompts (and prefills): one batch per distinct pre-prompt text
        out: list[str | None] = [None] * len(prompts)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, p in enumerate(prompts):
            prefix = template_for(p) if r.prefill else ""
            groups.setdefault((preprompt_for(r, p), prefix), []).append(i)
        for (text, prefix), idx in groups.items():
            got = answer(model, [prompts[i] for i in idx], max_new_tokens=r.max_new_tokens, temperature=temperature,
                         top_p=r.top_p, seed=seed + 100_003, batch_size=r.batch_prompts, device=self.device,
                         system=text, prefill=prefix, quiet=self.quiet)
            for i, a in zip(idx, got):
                out[i] = a
        return [a or "" for a in out]

    def distill_set(self) -> list[dict[str, Any]]:
        """Both answers to every training prompt, scored, with the keep decision (cached in distill.jsonl)."""
        path = self.out / "distill.jsonl"
        if path.is_file():
            return [json.loads(x) for x in path.read_text().splitlines()]
        model = _load_pair(self.base, self.device)
        r = self.recipe
        plain = self._answers(model, self.train, system=False, seed=r.seed, temperature=r.temperature)
        pre = self._answers(model, self.train, system=True, seed=r.seed, temperature=r.temperature)
        messages = [p.messages for p in self.train]
        s_plain = self.judge.safe_probability(messages, plain)
        s_pre = self.judge.safe_probability(messages, pre)
        kept = keep_if_better(s_plain, s_pre)
        rows = [{"messages": p.messages, "category": p.category, "attack": p.attack, "preprompt": preprompt_for(r, p),
                 "plain": a, "preprompted": b, "plain_score": sa, "preprompted_score": sb, "kept": k}
                for p, a, b, sa, sb, k in zip(self.train, plain, pre, s_plain, s_pre, kept)]
        write_jsonl(path, rows)
        return rows

    def benign_dialogues(self) -> list[list[dict[str, str]]]:
        """The benign anchors: reference answers, or the plain answers that are not refusals (cached in
        benign.jsonl)."""
        if not self.benign:
            return []
        if self.recipe.benign == "reference":
            return [p.messages + [{"role": "assistant", "content": p.reference}] for p in self.benign if p.reference]

        path = self.out / "benign.jsonl"
        if path.is_file():
            rows = [json.loads(x) for x in path.read_text().splitlines()]
        else:
            r = self.recipe
            answers = self._answers(_load_pair(self.base, self.device), self.benign, system=False, seed=r.seed + 7,
                                    temperature=r.temperature)
            rows = [{"messages": p.messages, "category": p.category, "attack": p.attack, "answer": a,
                     "refusal": is_refusal(a)} for p, a in zip(self.benign, answers)]
            write_jsonl(path, rows)
        return [x["messages"] + [{"role": "assistant", "content": x["answer"]}] for x in rows
                if x["answer"].strip() and not x["refusal"]]

    def replay_dialogues(self) -> list[list[dict[str, str]]]:
        """The first `replay` SFT dialogues, with their own replies or (`replay_answers: own`) the base model's
        greedy answers to the same turns (cached in replay.jsonl): replaying the demonstrations pulls a policy that
        RLHF moved away from their habits back towards them, replaying its own answers keeps it where it is."""
        r = self.recipe
        if r.replay == 0:
            return []
        path = data_path(r.replay_path) if r.replay_path else ensure_dialogues(quiet=True)[0]
        dialogues = [d.messages for d in read_dialogues(path).dialogues[:r.replay]]
        if r.replay_answers == "reference":
            return dialogues
        cache = self.out / "replay.jsonl"
        if cache.is_file():
            return [json.loads(x)["messages"] for x in cache.read_text().splitlines()]
        model, tokenizer = _load_pair(self.base, self.device)
        systems = [d[0]["content"] if d[0]["role"] == "system" else None for d in dialogues]
        users = [[m["content"] for m in d if m["role"] == "user"] for d in dialogues]
        answers = TurnByTurn(model, tokenizer, r.max_new_tokens, temperature=0.0, seed=r.seed).answers(systems, users)
        own = [exchanges(us, ans, system=s) for s, us, ans in zip(systems, users, answers)]
        own = [d for d, ans in zip(own, answers) if all(a.strip() for a in ans)]
        write_jsonl(cache, [{"messages": d} for d in own])
        return own

    def evaluate(self, checkpoint: Path, name: str) -> RedTeamReport:
        """Red-team results of a checkpoint on the held-out prompts (cached in redteam-NAME.json)."""
        path = self.out / f"redteam-{name}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            return RedTeamReport(saved["threshold"], [JudgedAnswer(**a) for a in saved["answers"]])
        answers = answer(_load_pair(checkpoint, self.device), self.val, max_new_tokens=self.recipe.max_new_tokens,
                         seed=self.recipe.seed, batch_size=self.recipe.batch_prompts, device=self.device,
                         quiet=self.quiet)
        report = red_team(self.val, answers, self.judge, helpfulness=self.helpfulness, threshold=self.recipe.threshold)
        atomic_write_text(path, json.dumps(report.to_json(), ensure_ascii=False, indent=1))
        return report

    def run(self) -> DistillResult:
        r = self.recipe
        atomic_write_text(self.out / "recipe.yaml", yaml.safe_dump(to_dict(r), sort_keys=False))
        metrics = MetricsLog(self.out / "metrics.jsonl")
        logged = read_metrics(self.out / "metrics.jsonl") if (self.out / "metrics.jsonl").is_file() else []
        before = self.evaluate(self.base, "before")
        if not any(x.get("step") == 0 for x in logged):
            metrics.append({"step": 0, **_record(before)})
        rows = self.distill_set()
        table = kept_table(rows)
        atomic_write_text(self.out / "kept.md", kept_markdown(table))
        chosen = [x for x in rows if x["kept"] and x["preprompted"].strip()]
        if not chosen and not self.unchanged_if_empty:
            raise Llama2Error("no pre-prompted answer scored higher than the plain one: nothing to distil; try "
                              "preprompt=per_category, prefill=true or a higher temperature")
        if not chosen:  # the base passes on unchanged: its red-team answers are the "after" ones too
            atomic_write_text(self.out / "redteam-after.json", (self.out / "redteam-before.json").read_text())
            return self.finish(rows, before, before, self.base, logged, metrics, {"kept": 0})
        dialogues = [x["messages"] + [{"role": "assistant", "content": x["preprompted"]}] for x in chosen]
        replay = self.replay_dialogues()
        anchors = self.benign_dialogues()
        result = sft(r.finetune_recipe(self.base, self.out / "sft"), quiet=True,
                     dialogues=dialogues + anchors + replay)
        model = resolve_base(str(self.out / "sft"))
        after = self.evaluate(model, "after")
        return self.finish(rows, before, after, model, logged, metrics, {
            "kept": len(chosen), "benign_anchors": len(anchors), "replay": len(replay), "finetune_steps": result.step,
            "finetune_loss": result.last.get("loss")})

    def finish(self, rows: list[dict[str, Any]], before: RedTeamReport, after: RedTeamReport, model: Path,
               logged: list[dict[str, Any]], metrics: MetricsLog, extra: dict[str, Any]) -> DistillResult:
        """The red-team tables and figures of before and after, the step-1 metrics; the result."""
        reports = {"before": before, "after": after}
        atomic_write_text(self.out / "redteam.md", markdown_table(reports))
        atomic_write_text(self.out / "redteam.json", json.dumps({n: x.summary() for n, x in reports.items()},
                                                               indent=1))

        bar_chart(reports, self.out / "redteam.png")
        figure_16(rows, before, after, self.out / "safety_scores.png")
        if not any(x.get("step") == 1 for x in logged):
            metrics.append({"step": 1, **_record(after), "distill_prompts": len(rows), **extra,
                            "plain_score": statistics.fmean(x["plain_score"] for x in rows),
                            "preprompted_score": statistics.fmean(x["preprompted_score"] for x in rows)})
        return DistillResult(model, extra["kept"], len(rows), before.summary(), after.summary())


def _record(report: RedTeamReport) -> dict[str, Any]:
    s = report.summary()
    return {"heldout_safety": s["mean_safety_score"], "violation_rate": s["violation_rate"],
            "false_refusal_rate": s["false_refusal_rate"]}


def _load_pair(checkpoint: Path, device: str) -> tuple[Any, Any]:
    return load_checkpoint(checkpoint, kind="causal_lm", device=device).eval(), load_tokenizer(checkpoint)


def figure_16(rows: Sequence[dict[str, Any]], before: RedTeamReport, after: RedTeamReport, path: Path) -> Path:
    """The paper's Figure 16: the safety RM's scores of the answers without and with the safety pre-prompt (the
    distillation set), and of the held-out adversarial answers before and after distillation."""
    plt = pyplot()


    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    bins = [i / 20 for i in range(21)]
    panels = [(axes[0], "distillation prompts", [("without pre-prompt", [x["plain_score"] for x in rows]),
                                                 ("with pre-prompt", [x["preprompted_score"] for x in rows])]),
              (axes[1], "held-out adversarial prompts",
               [("before", [a.safe_probability for a in before.adversarial]),
                ("after distillation", [a.safe_probability for a in after.adversarial])])]
    for ax, title, series in panels:
        for label, values in series:
            mean = statistics.fmean(values) if values else float("nan")
            ax.hist(values, bins=bins, alpha=0.55, label=f"{label} (mean {mean:.2f})")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("safety RM score")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("answers")
    save_png(fig, path)
    return path


def distill_safety(recipe: DistillSafetyRecipe, quiet: bool = False, *, judge: Any = None,
                   unchanged_if_empty: bool = False) -> DistillResult:
    """Run (or resume) the distillation; prints a one-line summary unless quiet. `judge`: any SafetyJudge in place
    of the safety RM (tests, a stronger classifier). Where no pre-prompted answer beats the plain one: an error, or
    with unchanged_if_empty (the demo at its smallest size) the base model unchanged, its red-team figures as both
    before and after, kept 0."""
    result = SafetyDistillation(recipe, quiet=quiet, judge=judge, unchanged_if_empty=unchanged_if_empty).run()
    if not quiet:
        b, a = result.before, result.after
        print(f"safety distillation: kept {result.kept} of {result.prompts} pre-prompted answers; held-out safety "
              f"score {b['mean_safety_score']:.3f} -> {a['mean_safety_score']:.3f}, violations "
              f"{100 * b['violation_rate']:.1f}% -> {100 * a['violation_rate']:.1f}%, false refusals "
              f"{100 * b['false_refusal_rate']:.1f}% -> {100 * a['false_refusal_rate']:.1f}%; model {result.model}",
              flush=True)
    return result


__all__ = ["DistillSafetyRecipe", "DistillResult", "GENERIC_PREPROMPT", "SafetyDistillation", "distill_safety",
           "figure_16", "keep_if_better", "kept_table", "preprompt_for"]
