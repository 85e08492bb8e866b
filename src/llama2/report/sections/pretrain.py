"""1. Pretraining: held-out loss and greedy continuations at random init, training to the section's deadline,
the same measures at the end, curves."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from ...checkpoint import load_model
from ...errors import Llama2Error
from ...eval.gold import cloze_accuracy
from ...eval.text_metrics import mean_measures
from ...stages.pretrain import build_pretraining
from ...tokenizer import Tokenizer
from ...train.distributed import shutdown
from ...train.loop import Trainer
from ..budget import fit_within
from ..report import Section
from .artifacts import BuiltData, Pretrained
from .common import (
    Demo,
    Done,
    degenerate_count,
    generate,
    measure_notes,
    plan_text,
    run_figures,
    run_metrics,
)

FALLBACK_PROMPTS = ["Return the number of", "The default value is", "Raise ValueError if"]
CODE_FALLBACK_PROMPTS = ["def __init__(self, name):\n", "class Stack:\n"]
CONTINUATION_TOKENS = 40
PRETRAIN_CAP = 100_000  # the budget, not the recipe's max_steps, sets the demo's pretraining length
MIN_STEPS = 20  # however short the budget: enough for the loss to fall
# The held-out loss and continuations at random init on the reference machine (2 idle cores), per world: the
# world's recipe evaluates 64 windows of 64 tokens, the standard library's fewer, longer ones. The world's figures
# are the standard library's scaled by the two probes' ratio measured on one machine (0.31; the loss alone 0.12).
PROBE_S = {"stdlib": 0.3, "world": 0.094}
# Where known, the reference machine's seconds per pretraining step: after its first steps the pace is measured
# again from them. The probe is 0.3-0.45 s of small operations: a seed-1 demo's probe measured a pace of 4.71 where
# its pretraining steps ran as fast as another demo's at 3.49, and the budget took two thirds of pretraining's
# time. Calibrated on five world demos whose probe had measured 2.95-3.49: 0.134-0.155 s per step at pace 1.
REF_STEP_S = {"world": 0.145}
PACE_STEPS = (6, 16)  # the steps timed (after the first, which pays one-off costs, and ThreadChooser's first trial)
# Pretraining's floor in the world (~275 steps; 249 and 282 steps reached held-out loss 0.74 and 0.67): on a
# machine slow enough that the later sections' floors fill the budget it still trains this long (the demo then runs
# over its budget), not the 20 steps that left SFT nothing to build on
WORLD_FLOOR_S = 40.0
PROBE_ONE_THREAD_S = {"stdlib": 0.33, "world": 0.041}  # the held-out loss alone on one thread of it


def held_out_prompts(val_file: Path, n_doc: int = 4, n_code: int = 2) -> tuple[list[str], list[str]]:
    """Fixed prompts from the corpus's held-out documents, with what followed them there as references:
    openings (first 5 words) of docstring-like documents and function headers of held-out source modules.
    Falls back to fixed prompts when the split has none."""
    prompts, refs, code_p, code_r = [], [], [], []
    try:
        lines = val_file.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    for line in lines:
        text = json.loads(line)["text"]
        first = text.split("\n", 1)[0].strip()
        words = first.split()
        codey = any(c in first for c in "()=[]{}#*`:<>") or first.startswith(("import ", "from ", "def ", "class "))
        if len(prompts) < n_doc and len(words) >= 10 and first[:1].isupper() and not codey:
            prompts.append(" ".join(words[:5]))
            refs.append(" ".join(words[5:]))
        if len(code_p) < n_code and ("\ndef " in text or "\n    def " in text) and "import " in text:
            src = text.split("\n")
            for i, s in enumerate(src):
                if s.lstrip().startswith("def ") and s.rstrip().endswith(":") and i + 3 < len(src):
                    code_p.append(s + "\n")
                    code_r.append("\n".join(src[i + 1:i + 4]))
                    break
        if len(prompts) >= n_doc and len(code_p) >= n_code:
            break
    if not prompts:
        prompts, refs = list(FALLBACK_PROMPTS), [""] * len(FALLBACK_PROMPTS)
    if not code_p and n_code:
        code_p, code_r = list(CODE_FALLBACK_PROMPTS), [""] * len(CODE_FALLBACK_PROMPTS)
    return prompts + code_p, refs + code_r


def pace(trainer: Trainer, measure_s: float, world: str) -> float:
    """How much slower than the reference machine this one is now (the later sections' floors scale with it),
    from the fixed work at random init (measure_s). Where that looks slow, the machine is probably shared: there
    one thread is often several times faster than all of them (the budget planner's ThreadChooser switches to it
    and leaves it set), so the held-out loss is timed on one thread too and the faster pace counts."""
    slow = measure_s / PROBE_S[world]
    threads = torch.get_num_threads()
    if slow > 2.0 and threads > 1:
        torch.set_num_threads(1)
        t0 = time.time()
        trainer.evaluate()
        slow = min(slow, (time.time() - t0) / PROBE_ONE_THREAD_S[world])
        torch.set_num_threads(threads)
    return min(max(slow, 0.25), 50.0)


class PaceFromSteps:
    """Pretraining's deadline, for fit_within to read after every step: once steps PACE_STEPS are timed, the
    budget's pace is set from their seconds per step against the reference machine's (REF_STEP_S; worlds without
    one keep the probe's pace), and the deadline, which leaves the later sections pace x their floors, follows."""

    def __init__(self, demo: Demo, trainer: Trainer) -> None:
        self.demo, self.trainer = demo, trainer
        self.start: float | None = None  # when step PACE_STEPS[0] ended
        self.measured = demo.world not in REF_STEP_S

    def __call__(self) -> float:
        step, now = self.trainer.step, time.time()
        if not self.measured and step == PACE_STEPS[0]:
            self.start = now
        elif not self.measured and self.start is not None and step == PACE_STEPS[1]:
            seconds = (now - self.start) / (PACE_STEPS[1] - PACE_STEPS[0])
            self.demo.budget.pace = min(max(seconds / REF_STEP_S[self.demo.world], 0.25), 50.0)
            self.measured = True
        return self.demo.budget.deadline("pretrain")


def run(demo: Demo, section: Section, data: BuiltData) -> Done[Pretrained]:
    recipe = data.recipe
    run_dir = demo.run_dir("pretrain")
    try:
        trainer = build_pretraining(recipe, quiet=True)
        tok_path = recipe.data.resolved()[1]
        tok = Tokenizer(tok_path)
        prompts, refs = held_out_prompts(data.val_file or Path("-"), n_code=0 if demo.world == "world" else 2)
        precision = ("bf16 autocast with fp32 weights" if trainer.amp_dtype is not None else "fp32") + \
            f" (precision: {recipe.precision})"
        t1 = time.time()
        before = trainer.evaluate()
        before_text = generate(copy.deepcopy(trainer.model).eval(), tok, prompts, CONTINUATION_TOKENS)
        measure_s = time.time() - t1
        demo.budget.pace = pace(trainer, measure_s, demo.world)
        probe_pace = demo.budget.pace
        budget_s = demo.budget.left("pretrain")
        cap = demo.steps or PRETRAIN_CAP
        far = time.time() + 10 * 365 * 86400
        deadline = (lambda: far) if demo.steps else PaceFromSteps(demo, trainer)
        result, plan = fit_within(trainer, deadline, cap=cap, min_steps=demo.steps or MIN_STEPS,
                                  reserve_s=measure_s * 1.5 + 3.0 * demo.budget.pace, quiet=demo.quiet,
                                  desc="pretrain")
    finally:
        shutdown()
    if result.checkpoint is None:
        raise Llama2Error("the demo's pretraining saved no checkpoint")
    ckpt = Path(result.checkpoint)
    model = load_model(ckpt)
    after_text = generate(model, tok, prompts, CONTINUATION_TOKENS)
    losses = [r for r in run_metrics(run_dir) if "loss" in r]
    first_loss, last_loss = losses[0]["loss"], losses[-1]["loss"]
    after_val = result.last.get("val_loss")
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    tokens = result.tokens_seen
    train_s = result.last.get("elapsed_s") or plan.wall_s

    b_rows, b_notes = measure_notes(before_text)
    a_rows, a_notes = measure_notes(after_text)
    mb, ma = mean_measures(b_rows), mean_measures(a_rows)
    demo.results.update({"pretrain_steps": result.step, "first_loss": first_loss, "last_loss": last_loss,
                         "val_loss_before": before.get("val_loss"), "val_loss_after": after_val,
                         "checkpoint": str(ckpt), "pretrain_distinct_1": ma.get("distinct_1"),
                         "pretrain_degenerate": ma.get("degenerate"), "pretrain_seconds": round(plan.wall_s, 1),
                         # x the reference machine's floors; pace_probe: before the steps measured it again
                         "pace": round(demo.budget.pace, 2), "pace_probe": round(probe_pace, 2)})

    stats = data.stats
    per_source = stats.get("documents_per_source", {})
    section.text(
        f"A {n_params / 1e6:.2f}M-parameter Llama 2 (dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"vocabulary {cfg.vocab_size}, context {cfg.max_seq_len}) trained from random initialisation"
        + (f" on rows of {recipe.seq_len} tokens" if recipe.seq_len else "") + " with the "
        f"shared training loop (`{demo.recipe_name('pretrain.yaml')}`, {precision}) on "
        + ("the built-in world's corpus (every fact about its invented people and towns in several phrasings, "
           "question-answer pages, mayors by year, worked sums and examples): " if demo.world == "world" else
           "a corpus of Python's standard library: ")
        + ", ".join(f"{k} {v:,} documents" for k, v in per_source.items())
        + f"; {stats.get('documents_kept', 0):,} kept after de-duplication ({stats.get('exact_duplicates_removed', 0)} "
          f"exact and {stats.get('near_duplicates_removed', 0)} near duplicates removed), "
          f"{stats.get('splits', {}).get('train', {}).get('chars', 0) / 1e6:.1f} MB of training text, "
          f"held-out documents {stats.get('splits', {}).get('val', {}).get('documents', 0)}. "
          + (f"The corpus, tokenizer and token shards were in the cache ({data.root})." if data.pretrain_cached else
             f"Building the corpus, tokenizer and token shards (cached in {data.root}) took {data.pretrain_s:.0f} s."))
    section.text("Training: " + plan_text(plan, budget_s, demo.steps is not None)
                 + f"; {tokens:,.0f} tokens ({tokens / max(train_s, 1e-9):,.0f} tokens/s). The machine's pace (how "
                 "much slower than the reference machine it ran, which sizes every later section): "
                 f"{probe_pace:.2f} from the work at random init"
                 + (f", {demo.budget.pace:.2f} from steps {PACE_STEPS[0]}-{PACE_STEPS[1]} of this training"
                    if demo.budget.pace != probe_pace else "") + ".")
    section.table(["measure", "at random init", "after pretraining"], [
        ["held-out loss (nats/token)", before.get("val_loss"), after_val],
        ["held-out perplexity", before.get("val_ppl"), result.last.get("val_ppl")],
        ["training loss (first / last logged step)", first_loss, last_loss],
        ["distinct-1 of the continuations (mean)", mb.get("distinct_1"), ma.get("distinct_1")],
        ["distinct-2 of the continuations (mean)", mb.get("distinct_2"), ma.get("distinct_2")],
        ["degenerate continuations", degenerate_count(b_rows), degenerate_count(a_rows)],
    ], caption="Held-out loss over fixed windows of the corpus's held-out documents")
    if demo.gold is not None:  # what pretraining memorised of the world, before any chat format
        cloze = cloze_accuracy(model, tok, demo.gold.world, seed=demo.seed)
        demo.results["gold"] = {"pretrain_cloze": cloze}
        lo, hi = cloze["ci95"]
        section.text(f"**Gold: the world's facts memorised.** Completing the first phrasing of each fact cut before "
                     f"its value (\"... lives in\"), greedy: **{100 * cloze['accuracy']:.1f}%** of {cloze['n']} facts "
                     f"right (95% interval {100 * lo:.0f}-{100 * hi:.0f}%; chance is about 1 in 8 to 1 in 55 by "
                     "attribute). The chat model is asked about these facts in questions it never saw.")
    run_figures(section, run_dir, demo.out, "pretrain", "pretraining", before.get("val_loss"))
    section.text(f"Greedy continuations ({CONTINUATION_TOKENS} new tokens, no stop string) of openings of "
                 "held-out documents (docstrings and function headers the model never saw), at random "
                 "initialisation and after pretraining; the reference is what followed in the document.")
    section.samples(prompts, {"at random init": before_text, "after pretraining": after_text}, references=refs,
                    notes={"at random init": b_notes, "after pretraining": a_notes})
    section.text(f"Checkpoint: `{ckpt}`.")
    val_b, val_a = before.get("val_loss"), after_val
    summary = (f"pretraining: {result.step} steps in {plan.wall_s:.0f} s, held-out loss {val_b:.3f} -> {val_a:.3f}, "
               f"distinct-1 of continuations {mb.get('distinct_1', 0):.2f} -> {ma.get('distinct_1', 0):.2f}"
               if val_b is not None and val_a is not None else f"pretraining: {result.step} steps")
    return Done(summary, Pretrained(ckpt, Path(tok_path), data.val_file))
