"""4. Supervised fine-tuning of the pretrained model on the built-in dialogues, within the section's budget;
held-out questions answered before (pretrained model) and after, scored with ROUGE-L against the real answers."""

from __future__ import annotations

import time

from ...chat import encode_dialog
from ...checkpoint import load_checkpoint, load_config, load_model
from ...data.dialogues import ensure_dialogues, read_dialogues
from ...data.world import data_path
from ...errors import Llama2Error
from ...eval.text_metrics import mean_measures
from ...stages.sft import SFTRecipe, build_sft
from ...tokenizer import Tokenizer
from ...train.distributed import shutdown
from ..budget import fit_within
from ..report import Section
from .artifacts import ChatModel, Pretrained
from .common import (
    ANSWER_TOKENS,
    Demo,
    Done,
    degenerate_count,
    generate,
    measure_notes,
    plan_text,
    run_figures,
)
from .gold import effect, gold_table, helpful_accuracy, run_results

QUESTIONS = 8
FLOOR_S = 12.0  # seconds at its smallest (the answers before and after, a few steps), 2 idle cores
# In the world every later stage starts from the SFT model, so its smallest useful size is most of its recipe's
# three epochs (496 steps, ~110 s at pace 3.3): on a slow hour (pace 3.49) a seed-0 demo left it 98 s for 326
# steps and gold accuracy 55.0%, where 496 steps reached 63-65% (the time comes from pretraining's share instead)
WORLD_FLOOR_S = 33.0


def run(demo: Demo, section: Section, pretrained: Pretrained) -> Done[ChatModel | None]:
    ckpt = pretrained.checkpoint
    run_dir = demo.run_dir("sft")
    # max_steps=null: the recipe's epochs cap the steps; the budget sets them
    recipe = demo.load(SFTRecipe, "sft.yaml", [f"base={ckpt}", f"out_dir={run_dir}", "save_every=0", "keep_last=1",
                                               "max_steps=null"])
    if recipe.data.path is not None and recipe.data.val_path is not None:
        train_path, val_path = data_path(recipe.data.path), data_path(recipe.data.val_path)
    else:
        train_path, val_path = ensure_dialogues(quiet=demo.quiet)
    tok = Tokenizer(ckpt)
    context = load_config(ckpt).max_seq_len
    # held-out dialogues whose prompt leaves room for the answer in the context, spread over the file (it is
    # ordered by source and module)
    fits = [(d, ids) for d in read_dialogues(val_path).dialogues
            if len(ids := encode_dialog(tok, d.messages[:-1])) + ANSWER_TOKENS <= context]
    if not fits:
        raise Llama2Error(f"no held-out dialogue of {val_path} fits the {context}-token context with a "
                          f"{ANSWER_TOKENS}-token answer")
    picks = sorted({round(i * (len(fits) - 1) / max(QUESTIONS - 1, 1)) for i in range(QUESTIONS)})
    held_out = [fits[i][0] for i in picks]
    prompt_ids = [fits[i][1] for i in picks]
    questions = [d.messages[:-1] for d in held_out]
    refs = [d.messages[-1]["content"] for d in held_out]
    t0 = time.time()
    before_text = generate(load_model(ckpt), tok, prompt_ids, ANSWER_TOKENS)
    answer_s = time.time() - t0
    try:
        trainer = build_sft(recipe, quiet=True).trainer
        cap = trainer.recipe.max_steps
        trainer.start()
        before_eval = trainer.evaluate() if trainer.val_batches is not None else {}
        budget_s = demo.budget.left("sft")
        result, plan = fit_within(trainer, demo.budget.deadline("sft"), cap=cap, reserve_s=answer_s * 1.5 + 2.0,
                                  quiet=demo.quiet, desc="sft")
    finally:
        shutdown()
    if result.checkpoint is None:
        raise Llama2Error("the demo's SFT saved no checkpoint")
    after_text = generate(load_checkpoint(result.checkpoint), tok, prompt_ids, ANSWER_TOKENS)
    b_rows, b_notes = measure_notes(before_text, refs)
    a_rows, a_notes = measure_notes(after_text, refs)
    mb, ma = mean_measures(b_rows), mean_measures(a_rows)
    demo.results.update({"sft_steps": result.step, "sft_rouge_l_before": mb["rouge_l_f1"],
                         "sft_rouge_l_after": ma["rouge_l_f1"], "sft_val_loss_before": before_eval.get("val_loss"),
                         "sft_val_loss_after": result.last.get("val_loss"), "sft_checkpoint": str(result.checkpoint)})
    n_train = len(read_dialogues(train_path).dialogues)
    section.text(f"Supervised fine-tuning (`llama2.stages.sft`, `{demo.recipe_name('sft.yaml')}`) of the pretrained "
                 f"model on {n_train:,} {'world' if demo.world == 'world' else 'built-in'} training dialogues in the Llama 2 chat format, loss on the answer tokens "
                 f"only. Training: {plan_text(plan, budget_s, False)} (at most {cap} steps: the recipe's epochs).")
    section.table(["measure", "pretrained model", "after SFT"], [
        ["held-out answer-token loss", before_eval.get("val_loss"), result.last.get("val_loss")],
        [f"ROUGE-L F1 against the real answer (mean of {len(refs)})", mb["rouge_l_f1"], ma["rouge_l_f1"]],
        ["distinct-1 of the answers (mean)", mb["distinct_1"], ma["distinct_1"]],
        ["distinct-2 of the answers (mean)", mb["distinct_2"], ma["distinct_2"]],
        ["degenerate answers", degenerate_count(b_rows), degenerate_count(a_rows)],
    ], caption="Held-out dialogues (never trained on), greedy answers of at most "
               f"{ANSWER_TOKENS} tokens")
    gold = None
    if demo.gold is not None:
        gold = {"pretrained": demo.gold.measure(ckpt), "after SFT": demo.gold.measure(result.checkpoint)}
        change = effect(gold["pretrained"], gold["after SFT"])
        demo.results.setdefault("gold", {})["sft"] = {"before": run_results(gold["pretrained"]),
                                                     "after": run_results(gold["after SFT"]), "change": change}
        gold_table(section, gold, f"Gold: held-out world questions (facts, mayors and the rest never asked in "
                                  f"SFT), greedy answers judged by the world's gold judge. Change over all helpfulness "
                                  f"families: {change['points']:+.1f} points (95% interval {change['ci95'][0]:+.1f} "
                                  f"to {change['ci95'][1]:+.1f}, paired)")
    run_figures(section, run_dir, demo.out, "sft", "SFT", before_eval.get("val_loss"))
    section.samples([q[-1]["content"] for q in questions], {"pretrained": before_text, "after SFT": after_text},
                    references=refs, notes={"pretrained": b_notes, "after SFT": a_notes},
                    caption="Held-out questions: the prompt is the whole dialogue up to the last user turn")
    section.text(f"Checkpoint: `{result.checkpoint}`.")
    gold_text = "" if gold is None else (f", gold accuracy {100 * helpful_accuracy(gold['pretrained']):.1f}% -> "
                                         f"{100 * helpful_accuracy(gold['after SFT']):.1f}%")
    return Done(f"sft: {result.step} steps in {plan.wall_s:.0f} s, ROUGE-L on {len(refs)} held-out questions "
                f"{mb['rouge_l_f1']:.3f} -> {ma['rouge_l_f1']:.3f}{gold_text}", ChatModel(result.checkpoint))
