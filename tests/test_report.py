"""The run report (report.md + report.html), the demo's budget and its training-to-a-deadline, and the demo's
held-out prompts."""

from __future__ import annotations

import base64
import json
import re
import time
from html.parser import HTMLParser

import pytest
import torch

from llama2.report.budget import Budget, ThreadChooser, fit_within
from llama2.report.sections.common import Demo, sized
from llama2.report.sections.pretrain import held_out_prompts
from llama2.report.report import Report, fmt, md_escape

EVIL = 'if a < b and c > d: <script>alert("x")</script> | *bold* _it_ `code` &amp;\n\n\nend'


class _Collect(HTMLParser):
    """Tags, <pre> texts, <img> sources and cell texts of an HTML document, as the standard parser reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.pre: list[str] = []
        self.imgs: list[str] = []
        self.h2: list[str] = []
        self.th: list[str] = []
        self._in: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self._in.append(tag)
        if tag == "pre":
            self.pre.append("")
        if tag == "h2":
            self.h2.append("")
        if tag == "th":
            self.th.append("")
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if self._in and self._in[-1] == tag:
            self._in.pop()

    def handle_data(self, data):
        if "pre" in self._in:
            self.pre[-1] += data
        if "h2" in self._in:
            self.h2[-1] += data
        if "th" in self._in:
            self.th[-1] += data


def _png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def _report(tmp_path):
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    png = _png(out / "figures" / "curve.png")
    r = Report(out, "demo <run>", intro="Intro with `code`.")
    s = r.section("1. Pretraining")
    s.text("Trained **fast**.")
    s.table(["measure", "before", "after"], [["loss", 8.3178, 4.25], ["steps", 1234, None]], caption="losses")
    s.figure(png, "loss curve")
    s.samples(["p1 <b>", "p2"], {"before": [EVIL, "x"], "after": ["y | z", "w"]}, references=["r1", "r2"],
              notes={"after": ["ROUGE-L 0.50", ""]})
    r.section("2. Later", status="running").text(EVIL, trusted=False)
    return r, out, png


def test_markdown_structure_and_escaping(tmp_path):
    r, out, png = _report(tmp_path)
    md_path, html_path = r.write()
    md = md_path.read_text()
    assert md.startswith("# demo &lt;run&gt;\n")
    headings = [line for line in md.splitlines() if line.startswith("## ")]
    assert headings == ["## 1. Pretraining", "## 2. Later (running)"]
    assert "<script>" not in md and "&lt;script&gt;" in md
    # the image reference is relative to report.md and names the real file
    refs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert refs == ["figures/curve.png"] and (md_path.parent / refs[0]).resolve() == png.resolve()
    # every table row has as many unescaped pipes as the header (the "|" in model text is escaped)
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    widths = [len(re.findall(r"(?<!\\)\|", line)) for line in rows]
    assert widths == [4, 4, 4] + [5, 5, 5]  # measure table (header + 2 rows), samples (header + 2 rows)
    assert "| loss | 8.318 | 4.250 |" in md and "| steps | 1,234 |  |" in md
    assert "| prompt | before | after | reference |" in md
    # newlines of model text stay visible, one arrow each; markdown emphasis characters are escaped
    assert md.count("↵<br>") == 3 * 2  # EVIL appears twice (samples, untrusted paragraph), 3 newlines each
    assert r"\*bold\*" in md and r"\_it\_" in md and r"\`code\`" in md and "&amp;amp;" in md
    assert not list(out.glob(".*.tmp"))


def test_html_is_self_contained_and_escaped(tmp_path):
    r, out, png = _report(tmp_path)
    _, html_path = r.write()
    page = html_path.read_text()
    assert "<script>" not in page and "</script>" not in page
    p = _Collect()
    p.feed(page)
    assert p.tags.count("section") == 2 and p.tags.count("figure") == 1 and "script" not in p.tags
    assert p.h2[0] == "1. Pretraining" and p.h2[1].startswith("2. Later")
    assert p.th[:3] == ["measure", "before", "after"]
    # the parser gives back exactly the model's text (with a return arrow before each newline)
    shown = EVIL.replace("\n", "↵\n")
    assert p.pre.count(shown) == 1 and "p1 <b>" in p.pre and "y | z" in p.pre
    assert p.pre.index("p1 <b>") < p.pre.index(shown)  # the row: prompt, before, after, reference
    # the image is embedded: its data URI decodes to the PNG file's bytes
    (src,) = p.imgs
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1]) == png.read_bytes()


def test_report_is_rewritten_whole(tmp_path):
    r, out, _ = _report(tmp_path)
    r.write()
    r.section("2. Later", status="done").text("finished")
    r.section("3. Last").text("more")
    md = (out / "report.md").read_text()
    assert "## 2. Later (running)" in md and "## 3. Last" not in md  # not written yet
    r.write()
    md = (out / "report.md").read_text()
    assert "## 2. Later\n" in md and "(running)" not in md and md.index("finished") < md.index("## 3. Last")
    assert (out / "report.html").read_text().count("<section") == 3


def test_samples_must_line_up(tmp_path):
    s = Report(tmp_path, "t").section("x")
    with pytest.raises(ValueError, match="2 entries for 1 prompts"):
        s.samples(["p"], {"a": ["1", "2"]})
    with pytest.raises(ValueError, match="references"):
        s.samples(["p"], {"a": ["1"]}, references=[])


def test_fmt_and_md_escape():
    assert fmt(8.31776) == "8.318" and fmt(123.456) == "123.5" and fmt(12345) == "12,345"
    assert fmt(1.5e-5) == "1.5e-05" and fmt(None) == "" and fmt(True) == "yes" and fmt("a") == "a"
    assert md_escape("- item", block=True) == "\\- item" and md_escape("3. x", block=True) == "3\\. x"
    assert md_escape("3. x") == "3. x" and md_escape("a  b") == "a&nbsp;&nbsp;b"


# ------------------------------------------------------------------------------------------------ budget


def test_budget_deadlines_are_cumulative_shares():
    b = Budget(100.0, {"a": 0.5, "b": 0.3, "c": 0.2}, start=1000.0)
    assert (b.deadline("a"), b.deadline("b"), b.deadline("c")) == (1050.0, 1080.0, 1100.0)
    with pytest.raises(KeyError):
        b.deadline("d")


def test_budget_counts_the_builds_and_keeps_the_later_floors():
    shares = {"a": 0.5, "b": 0.3, "c": 0.2}
    b = Budget(100.0, shares, start=1000.0, fixed_s=20.0)  # the builds took 20 s: the shares split 80
    assert (b.deadline("a"), b.deadline("b"), b.deadline("c")) == (1060.0, 1084.0, 1100.0)
    b = Budget(100.0, shares, start=1000.0, fixed_s=20.0, floors={"b": 5.0, "c": 5.0}, pace=2.0)
    assert (b.deadline("a"), b.deadline("b"), b.deadline("c")) == (1060.0, 1084.0, 1100.0)  # room enough
    b.pace = 6.0  # a slow machine: b and c need 30 s each at their smallest
    assert (b.deadline("a"), b.deadline("b"), b.deadline("c")) == (1040.0, 1070.0, 1100.0)


def test_sections_shrink_with_the_time_they_have(tmp_path):
    demo = Demo(tmp_path, Budget(100.0, {"a": 1.0}))
    assert demo.fraction("a", 20.0, 220.0) == pytest.approx(0.4, abs=0.01)  # 100 s left: 80 of the 200 s more
    assert demo.fraction("a", 20.0, 60.0) == 1.0 and demo.fraction("a", 120.0, 200.0) == 0.0
    demo.budget.pace = 2.0  # a machine twice as slow: the floor and the full size cost twice the seconds
    assert demo.fraction("a", 20.0, 220.0) == pytest.approx(0.15, abs=0.01)
    assert (sized(400, 16, 0.0), sized(400, 16, 0.5), sized(400, 16, 1.0), sized(8, 16, 0.5)) == (16, 208, 400, 8)


class _RandomBatches:
    def __init__(self, vocab, seq):
        self.g = torch.Generator().manual_seed(0)
        self.vocab, self.seq, self.n = vocab, seq, 0

    def next(self):
        self.n += 1
        return [torch.randint(0, self.vocab, (2, self.seq + 1), generator=self.g)]

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = s["n"]


def _trainer(tmp_path, max_steps=1000):
    from llama2 import ModelConfig, Transformer
    from llama2.stages.pretrain import causal_lm_loss
    from llama2.train.config import OptimConfig, TrainRecipe
    from llama2.train.loop import Trainer

    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, vocab_size=64, multiple_of=16, max_seq_len=16)
    recipe = TrainRecipe(out_dir=str(tmp_path / "run"), max_steps=max_steps, batch_size=2, device="cpu",
                         precision="fp32", optim=OptimConfig(lr=1e-3, warmup_steps=2))
    return Trainer(recipe, lambda: Transformer(cfg), causal_lm_loss, _RandomBatches(64, 16), quiet=True)


def test_fit_within_stops_by_the_deadline(tmp_path):
    t = _trainer(tmp_path)
    start = time.time()
    result, plan = fit_within(t, start + 3.0, cap=100_000, quiet=True)
    took = time.time() - start
    assert took < 3.0 + 2.5  # the last planned step, the final save; generous for a shared machine
    assert plan.seconds_per_step and plan.steps == result.step == t.recipe.max_steps > 3
    assert plan.stopped_by_deadline and result.checkpoint is not None
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 1 and records[-1]["step"] == result.step
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    assert f"max_steps: {result.step}\n" in saved
    assert t.step_fn is None and t.quiet  # the trainer is given back as it was


def test_fit_within_follows_a_deadline_that_moves(tmp_path):
    """A deadline given as a function is read after every step: moved into the past after step 10 (as the demo's
    budget moves pretraining's once it has measured the machine's pace), the run ends at step 10."""
    t = _trainer(tmp_path)
    far = time.time() + 3600
    result, plan = fit_within(t, lambda: far if t.step < 10 else time.time() - 1, cap=100_000, quiet=True)
    assert result.step == plan.steps == 10 and result.checkpoint.name == "step-000010"


def test_the_pace_is_measured_again_from_pretraining_steps(monkeypatch):
    """The probe said 4.7; steps 6-16 take 0.29 s each where the reference machine takes 0.145: the pace becomes
    2.0 and the deadline leaves the later section 2 x its floor instead of 4.7 x."""
    from types import SimpleNamespace

    from llama2.report.sections import pretrain

    now = [1000.0]
    monkeypatch.setattr(pretrain.time, "time", lambda: now[0])
    monkeypatch.setitem(pretrain.REF_STEP_S, "world", 0.145)
    budget = Budget(900.0, {"pretrain": 0.5, "sft": 0.5}, start=1000.0, floors={"sft": 100.0}, pace=4.7)
    trainer = SimpleNamespace(step=0)
    deadline = pretrain.PaceFromSteps(SimpleNamespace(budget=budget, world="world"), trainer)
    seen = []
    for step in range(1, 20):
        now[0] += 0.5 if step <= pretrain.PACE_STEPS[0] else 0.29
        trainer.step = step
        seen.append(deadline())
    assert seen[0] == 1000.0 + 900 - 4.7 * 100  # before: min(start + 450, start + 900 - 470)
    assert budget.pace == pytest.approx(2.0) and seen[-1] == pytest.approx(1000.0 + 450)  # the share now binds
    # so slow that the later floors fill the budget: pretraining, once begun, still gets pace x its own floor
    slow = Budget(900.0, {"pretrain": 0.5, "sft": 0.5}, start=1000.0, floors={"pretrain": 40.0, "sft": 300.0},
                  pace=3.0)
    now[0] = 1010.0
    slow.begin("pretrain")
    floor = pretrain.PaceFromSteps(SimpleNamespace(budget=slow, world="world"), SimpleNamespace(step=1))()
    assert floor == 1010.0 + 3.0 * 40 > 1000.0 + 900 - 3.0 * 300
    smoke = Budget(90.0, {"pretrain": 0.5, "sft": 0.5}, start=1000.0, floors={"pretrain": 40.0, "sft": 300.0},
                   pace=3.0)
    smoke.begin("pretrain")  # a budget that cannot hold the floors only shrinks its stages
    assert smoke.deadline("pretrain") == 1000.0 + 90 - 3.0 * 300
    stdlib = Budget(900.0, {"pretrain": 1.0}, pace=4.7)
    pretrain.PaceFromSteps(SimpleNamespace(budget=stdlib, world="stdlib"), SimpleNamespace(step=16))()
    assert stdlib.pace == 4.7  # no reference step time: the probe's pace stays


def test_fit_within_respects_the_cap(tmp_path):
    t = _trainer(tmp_path)
    result, plan = fit_within(t, time.time() + 3600, cap=5, quiet=True)
    assert result.step == plan.steps == 5 and not plan.stopped_by_deadline


def test_step_hook_that_stops_ends_the_run_with_a_checkpoint(tmp_path):
    t = _trainer(tmp_path, max_steps=50)
    seen = []

    def hook(trainer, info):
        assert trainer is t and info.step == t.step and info.seconds >= 0 and info.started <= time.time()
        seen.append((info.step, "loss" in info.stats))
        return info.step == 4

    result = t.fit(on_step=hook)
    assert result.step == t.step == 4 and seen == [(s, True) for s in (1, 2, 3, 4)]
    assert result.checkpoint is not None and result.checkpoint.name == "step-000004"
    assert (result.checkpoint / "model.safetensors").is_file()
    assert t.recipe.max_steps == 50  # stopping leaves the planned length (and the schedule) alone
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4


def test_step_hook_that_changes_max_steps_is_obeyed(tmp_path):
    t = _trainer(tmp_path, max_steps=3)
    calls = []

    def extend(trainer, info):
        calls.append(info.step)
        if info.step == 3 and trainer.recipe.max_steps == 3:
            trainer.recipe.max_steps = 7

    result = t.fit(on_step=[extend])
    assert result.step == 7 and calls == [1, 2, 3, 4, 5, 6, 7] and result.checkpoint.name == "step-000007"

    t = _trainer(tmp_path / "short", max_steps=100)

    def shorten(trainer, info):
        if info.step == 2:
            trainer.recipe.max_steps = 1  # below the current step: this step is the last

    result = t.fit(on_step=shorten)
    assert result.step == 2 and result.checkpoint is not None and result.checkpoint.name == "step-000002"


def test_thread_chooser_switches_to_the_faster_count():
    c = ThreadChooser(every=100, first=3)
    c.full = c.current = 2  # as on a 2-core machine
    assert [c.threads_for(s) for s in range(6)] == [2, 2, 2, 1, 1, 2]
    for step, seconds in [(0, 5.0), (1, 1.0), (2, 1.2), (3, 0.9), (4, 0.5)]:  # one thread: 0.5 < 0.85 x 1.2
        c.record(step, seconds)
    assert c.current == 1 and c.switches == 1 and c.threads_for(5) == 1
    assert [c.threads_for(s) for s in (14, 15, 16, 17)] == [1, 2, 2, 1]  # a switch is tried again 10 steps on
    for step in range(5, 15):
        c.record(step, 0.5)
    c.record(15, 0.48)
    c.record(16, 0.45)  # not 15% faster than 0.5: stays on one thread, the next trial 100 steps on
    assert c.current == 1 and c.switches == 1
    assert [c.threads_for(s) for s in (116, 117, 118, 119)] == [1, 2, 2, 1]
    wrong = ThreadChooser(every=100, first=3)  # all threads slowed for a while (another process): a switch, then back
    wrong.full = wrong.current = 2
    for step, seconds in [(0, 5.0), (1, 2.4), (2, 2.5), (3, 1.1), (4, 0.95)]:  # 0.95 < 0.85 x 2.4
        wrong.record(step, seconds)
    assert wrong.current == 1
    one_slow = ThreadChooser(every=100, first=3)  # one slow step among them is not enough: the lower median
    one_slow.full = one_slow.current = 2
    for step, seconds in [(0, 5.0), (1, 0.7), (2, 2.5), (3, 1.1), (4, 0.95)]:
        one_slow.record(step, seconds)
    assert one_slow.current == 2
    for step in range(5, 15):
        wrong.record(step, 1.0)
    wrong.record(15, 0.8)
    wrong.record(16, 0.6)  # all threads again: 0.6 < 0.85 x 1.0
    assert wrong.current == 2 and wrong.switches == 2
    slow = ThreadChooser(every=100, first=3)
    slow.full = slow.current = 2
    for step, seconds in [(0, 5.0), (1, 1.0), (2, 1.0), (3, 1.4), (4, 1.6)]:
        slow.record(step, seconds)
    assert slow.current == 2 and slow.switches == 0
    one = ThreadChooser()
    one.full = one.current = 1
    assert {one.threads_for(s) for s in range(300)} == {1}  # nothing to try on one core


# ------------------------------------------------------------------------------------------------ prompts


def test_held_out_prompts_come_from_the_val_split(tmp_path):
    docs = [
        "import os\n\ndef walk(top, topdown=True):\n    \"\"\"Walk.\"\"\"\n    stack = [top]\n    return stack\n",
        "Return the number of items in the sequence, counting nested ones too.\n\nMore.",
        "x = 1",
        "Build a parser for the given grammar file and return it ready to use.",
    ]
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prompts, refs = held_out_prompts(val, n_doc=4, n_code=2)
    assert prompts == ["Return the number of items", "Build a parser for the", "def walk(top, topdown=True):\n"]
    assert refs == ["in the sequence, counting nested ones too.", "given grammar file and return it ready to use.",
                    '    """Walk."""\n    stack = [top]\n    return stack']
    fallback, _ = held_out_prompts(tmp_path / "missing.jsonl")
    assert fallback[0] == "Return the number of"


def test_a_failed_section_is_reported_and_the_later_sections_still_run(tmp_path):
    """The demo's Driver: a section that raises is marked failed with its reason (its traceback in
    failed-NAME.txt), gives no artifact, and the next section runs; a section that needs the missing artifact
    fails with need()'s message; an essential section's failure stops the run."""
    from llama2.report.demo import Driver
    from llama2.report.report import Report
    from llama2.report.sections.common import Done, need

    budget = Budget(60.0, {"a": 0.3, "b": 0.3, "c": 0.4})
    demo = Demo(tmp_path, budget, quiet=True)
    report = Report(tmp_path, "test")
    driver = Driver(demo, report)

    def broken(section):
        raise ZeroDivisionError("the model blew up")

    assert driver.section("a", "A", broken) is None
    b = driver.section("b", "B", lambda s: Done("b: fine", "artifact B"))
    assert b == "artifact B"
    assert driver.section("c", "C", lambda s: Done("c", need(None, "C needs A, and it did not finish"))) is None
    assert driver.failed == ["A", "C"]
    statuses = {s.title: s.status for s in report.sections}
    assert statuses == {"A": "failed", "B": "done", "C": "failed"}
    md = (tmp_path / "report.md").read_text()
    assert "ZeroDivisionError: the model blew up" in md and "C needs A, and it did not finish" in md
    assert "ZeroDivisionError" in (tmp_path / "failed-a.txt").read_text()
    with pytest.raises(ZeroDivisionError):
        driver.section("a", "A again", broken, essential=True)
    with pytest.raises(KeyboardInterrupt):  # an interrupt is never swallowed
        driver.section("b", "B again", lambda s: (_ for _ in ()).throw(KeyboardInterrupt()))
