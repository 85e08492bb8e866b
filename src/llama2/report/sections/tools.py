"""11. Tool use (the paper's section 5.1 and Table 15): the chat model fine-tuned on the world's tool dialogues
(calls to the calculator and the search tool, their results masked out of the loss), then the held-out calculation
and lookup questions answered without and with the tools, the engine running the calls, judged by their gold
numbers."""

from __future__ import annotations

from ...atomic import make_dir
from ...checkpoint import load_checkpoint
from ...data.world.tools import world_toolbox
from ...errors import Llama2Error
from ...eval.tools import ToolRun, tool_eval, world_problems
from ...figures import pyplot, save_png
from ...stages.sft import SFTRecipe, build_sft
from ...tokenizer import Tokenizer
from ...train.distributed import shutdown
from ..budget import fit_within
from ..report import Section
from .artifacts import ChatModel
from .common import Demo, Done, plan_text, run_figures, sized

# The smallest run that shows the tools at work: 300 steps (docs/tools.md: 0% after 164 steps, about half right
# after 340); with 20 problems a family that is ~26 s on the reference machine (0.24 s a step at pace 3.3 on a
# 2-core Xeon). Full size: 100 problems a family and the recipe's steps.
MIN_STEPS = 300
FLOOR_S, FULL_S = 26.0, 240.0
SAMPLES = 4


def run(demo: Demo, section: Section, chat: ChatModel | None) -> Done[ChatModel | None]:
    if demo.world != "world" or chat is None:
        section.text("Tool use is measured in the built-in world (its calculation and lookup questions have gold "
                     "answers); this demo ran on other data" if chat is not None else
                     "No chat model to fine-tune (SFT did not run).")
        return Done("tools: not run here", None)
    f = demo.fraction("tools", FLOOR_S, FULL_S)
    run_dir = demo.run_dir("tools")
    recipe = demo.load(SFTRecipe, "sft-tools.yaml", [f"base={chat.checkpoint}", f"out_dir={run_dir}",
                                                     "save_every=0", "keep_last=1", "samples.count=0"])
    problems = world_problems(sized(100, 20, f))
    toolbox = world_toolbox()
    try:
        trainer = build_sft(recipe, quiet=True).trainer
        cap = trainer.recipe.max_steps
        trainer.start()
        budget_s = demo.budget.left("tools")
        # one held-out evaluation (at the end) and no thread timing: the steps teach the copying, not the tokens
        result, plan = fit_within(trainer, demo.budget.deadline("tools"), cap=cap, reserve_s=10.0 + 0.2 * len(problems),
                                  quiet=demo.quiet, desc="tools", min_steps=MIN_STEPS, evals=1, choose_threads=False)
    finally:
        shutdown()
    if result.checkpoint is None:
        raise Llama2Error("the demo's tool fine-tuning saved no checkpoint")
    tok = Tokenizer(result.checkpoint)
    before = tool_eval(load_checkpoint(chat.checkpoint).eval(), tok, problems, toolbox, quiet=demo.quiet)
    after = tool_eval(load_checkpoint(result.checkpoint).eval(), tok, problems, toolbox, quiet=demo.quiet)
    section.text(f"The chat model fine-tuned (`llama2 sft`, `{demo.recipe_name('sft-tools.yaml')}`) on the world's "
                 "tool dialogues: multi-digit sums, differences and products (plain and as word problems) answered "
                 "with a calculator call, and house numbers (never in the pretraining corpus) answered with a search "
                 "of the world's directory, with the world's ordinary dialogues replayed. The tools are listed in "
                 "the system message; a call is `<call>{\"name\": ..., \"arguments\": {...}}</call>`, the engine "
                 "runs it and appends `<result>...</result>`, and the answer goes on; the results are masked out of "
                 f"the loss. Training: {plan_text(plan, budget_s, False)}.")
    rows = []
    for name, r in (("chat model (before)", before), ("after tool fine-tuning", after)):
        for family, s in list(r.by_family().items()):
            wf = "-" if s["well_formed"] is None else f"{100 * s['well_formed']:.0f}"
            rows.append([name, family, s["n"], _pct(s["without"]), _pct(s["with"]),
                         f"{100 * s['answers_with_a_call']:.0f}", wf])
    section.table(["model", "family", "n", "gold accuracy without tools (%)", "with tools (%)",
                   "answers with a call (%)", "well-formed calls (%)"], rows,
                  caption="Held-out questions (their numbers never trained on), greedy; an answer is right when the "
                          "last number after its last tool result is the gold number; 95% Wilson intervals")
    _figure(section, demo, after)
    run_figures(section, run_dir, demo.out, "tools", "tool fine-tuning")
    picks = [r for fam in ("calculation", "lookup") for r in [x for x in after.rows if x["family"] == fam][:2]]
    section.samples([r["question"] for r in picks[:SAMPLES]],
                    {"without tools": [r["without"]["answer"] for r in picks[:SAMPLES]],
                     "with tools (calls and results shown)": [r["with"]["answer"] for r in picks[:SAMPLES]]},
                    references=[r["gold"] for r in picks[:SAMPLES]],
                    caption="The tool-tuned model on held-out questions, without and with tools")
    calc = after.by_family().get("calculation", after.summary())
    demo.results.setdefault("gold", {})["tools"] = {
        "steps": result.step, "before": before.by_family(), "after": after.by_family(),
        "checkpoint": str(result.checkpoint)}
    return Done(f"tools: {result.step} steps in {plan.wall_s:.0f} s; held-out calculation gold "
                f"{100 * calc['without']['accuracy']:.0f}% without tools -> {100 * calc['with']['accuracy']:.0f}% "
                f"with the calculator, well-formed calls {100 * (calc['well_formed'] or 0):.0f}%",
                ChatModel(result.checkpoint))


def _pct(s: dict) -> str:
    lo, hi = s["ci95"]
    return f"{100 * s['accuracy']:.1f} [{100 * lo:.0f}-{100 * hi:.0f}]"


def _figure(section: Section, demo: Demo, run: ToolRun) -> None:
    plt = pyplot()
    fams = list(run.by_family().items())
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    xs = range(len(fams))
    for k, (mode, colour) in enumerate((("without", "#bbbbbb"), ("with", "#3b75af"))):
        ax.bar([x + 0.38 * (k - 0.5) for x in xs], [100 * s[mode]["accuracy"] for _, s in fams], 0.38,
               label=f"{mode} tools", color=colour)
    ax.set_xticks(list(xs), [f for f, _ in fams])
    ax.set_ylabel("gold accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(frameon=False)
    ax.set_title("Held-out questions, the tool-tuned model")
    path = save_png(fig, make_dir(demo.out / "figures" / "tools") / "accuracy.png")
    section.figure(path, "Gold accuracy without and with tools (the same model, the same questions)")
