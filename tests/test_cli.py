"""The `llama2` command as a whole: every verb registers, help is light, errors are one line; every verb is run
through the command line by some test (the inventory below says which module; the verbs no other module runs that
way run here, for real, on tiny inputs); every training stage's command lists its recipe keys (--keys) and asks for
--config with argparse's usage message."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from llama2.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TESTS = Path(__file__).resolve().parent


def test_parser_registers_verbs_without_importing_torch():
    code = ("import sys; from llama2.cli import build_parser; p = build_parser(); "
            "print(sorted(p._subparsers._group_actions[0].choices)); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    verbs = eval(out[0])
    for verb in ("convert", "tokenizer", "generate", "chat", "data", "pretrain", "plot"):
        assert verb in verbs
    assert out[1] == "False"


def test_user_error_is_one_line_without_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llama2", "generate", str(tmp_path / "nope"), "--prompt", "hi"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llama2: error:") and "nope" in lines[0]


# ---------------------------------------------------------------------------------------------------------------
# The inventory: every verb (and sub-verb) the parser has, and the test module that runs it through the CLI


COVERED = {
    "chat": "test_chat", "convert": "test_checkpoint", "demo": "test_demo", "generate": "test_generate",
    "gatt": "test_cli", "lora merge": "test_sft", "plot": "test_train", "plan": "test_plan", "pretrain": "test_train",
    "reward": "test_cli", "score": "test_reward", "serve": "test_serve", "sft": "test_cli",
    "data corpus": "test_data", "data prepare": "test_data", "data info": "test_data",
    "data dialogues": "test_dialogues", "data comparisons": "test_comparisons", "data adversarial": "test_cli",
    "eval run": "test_eval_harness", "eval compare": "test_eval_compare", "eval gatt": "test_gatt",
    "eval redteam": "test_safety", "eval score-code": "test_eval_code", "eval gold": "test_gold",
    "eval tools": "test_tools",
    "data world": "test_world",
    "rlhf rejection-sampling": "test_cli", "rlhf ppo": "test_cli", "rlhf distill-safety": "test_cli",
    "rlhf dpo": "test_cli", "rlhf grpo": "test_cli", "compare-methods": "test_demo",
    "tokenizer train": "test_tokenizer", "tokenizer from-gguf": "test_tokenizer", "tokenizer encode": "test_tokenizer",
    "tokenizer decode": "test_tokenizer",
}
SHORTHAND = {"eval run": "--tasks"}  # `llama2 eval CKPT --tasks ...` is `llama2 eval run CKPT --tasks ...`
STAGES = {  # stage command -> its recipe class (module, name), written out here rather than read from llama2
    "pretrain": ("llama2.train.config", "PretrainRecipe"), "sft": ("llama2.stages.sft", "SFTRecipe"),
    "reward": ("llama2.stages.reward", "RewardRecipe"), "gatt": ("llama2.stages.gatt", "GattRecipe"),
    "rlhf rejection-sampling": ("llama2.stages.rejection", "RejectionRecipe"),
    "rlhf ppo": ("llama2.stages.ppo", "PPORecipe"),
    "rlhf dpo": ("llama2.stages.dpo", "DPORecipe"), "rlhf grpo": ("llama2.stages.grpo", "GRPORecipe"),
    "rlhf distill-safety": ("llama2.stages.safety", "DistillSafetyRecipe"),
}


def leaf_verbs(parser, prefix: str = "") -> list[str]:
    """Every runnable command path of an argparse parser: 'pretrain', 'data corpus', ..."""
    import argparse

    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [prefix.strip()]
    return [v for name, p in subs[0].choices.items() for v in leaf_verbs(p, f"{prefix} {name}")]


def test_every_verb_is_run_through_the_cli_by_a_named_test_module():
    from llama2.cli import build_parser

    verbs = leaf_verbs(build_parser())
    assert len(verbs) == len(set(verbs))
    assert sorted(verbs) == sorted(COVERED), "a new verb needs a CLI test and a line in COVERED"
    for verb, module in COVERED.items():
        text = (TESTS / f"{module}.py").read_text()
        word = SHORTHAND.get(verb, verb.split()[-1])
        assert f'"{word}"' in text or f"'{word}'" in text, (verb, module)


# ---------------------------------------------------------------------------------------------------------------
# Every stage command: --keys, and --config is required


def recipe_class(verb: str) -> type:
    import importlib

    module, name = STAGES[verb]
    return getattr(importlib.import_module(module), name)


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every key a recipe file may set, nested sections as dotted keys, in declaration order."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        optional = [a for a in typing.get_args(hints[f.name]) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(default):
            out += dotted_keys(type(default), f"{prefix}{f.name}.")
        elif default is None and optional:  # an optional section (`Section | None`): itself, then its keys
            out += [f"{prefix}{f.name}", *dotted_keys(optional[0], f"{prefix}{f.name}.")]
        else:
            out.append(f"{prefix}{f.name}")
    return out


@pytest.mark.parametrize("verb", list(STAGES))
def test_stage_keys_prints_every_recipe_key_as_a_markdown_table(verb, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written (no runs/ directory)
    assert main([*verb.split(), "--keys"]) == 0
    out = capsys.readouterr().out
    lines = out.rstrip("\n").splitlines()
    assert lines[:2] == ["| key | allowed | default | meaning |", "|---|---|---|---|"]
    rows = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines[2:]]
    assert all(len(r) == 4 for r in rows), lines
    cls = recipe_class(verb)
    assert [r[0].strip("`") for r in rows] == dotted_keys(cls)
    shown = {r[0].strip("`"): r for r in rows}
    assert shown["out_dir"][2] == f"`{next(f for f in dataclasses.fields(cls) if f.name == 'out_dir').default}`"
    assert shown["seed"][1] == "an integer" and all(r[1] for r in rows)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", list(STAGES))
def test_stage_without_config_is_argparse_usage_error(verb, capsys):
    for extra in ([], ["max_steps=1"]):
        with pytest.raises(SystemExit) as e:
            main([*verb.split(), *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert " ".join(err.split()).startswith(f"usage: llama2 {verb} [-h] [--config CONFIG]")
        assert err.rstrip("\n").splitlines()[-1] == (f"llama2 {verb}: error: the following arguments are required: "
                                                     "--config/-c")
        assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------------
# The verbs no other module runs through the CLI, for real on tiny inputs


def one_line_error(capsys, *words: str) -> str:
    """The command's stderr: exactly one line, `llama2: error: ...`, holding every word."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llama2: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def metrics(run: Path) -> list[dict]:
    return jsonl(run / "metrics.jsonl")


TOPICS = ["lists", "tuples", "sets", "dicts", "loops", "files", "strings", "bytes"]
FT = """max_steps: 1
batch_size: 2
max_seq_len: 256
precision: fp32
optim: {lr: 1.0e-3, warmup_steps: 1}
log_every: 1
eval_every: 0
save_every: 0
keep_last: 1
peak_tflops: 1
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory, sp_model_path):
    """A random tiny chat model and a random tiny reward model (the test tokenizer), dialogues, comparisons,
    prompts, adversarial prompts and the recipe files of every stage command over them; LLAMA2_CACHE inside."""
    import torch

    from llama2.checkpoint import save_model
    from llama2.classifier import SequenceClassifier
    from llama2.config import ModelConfig
    from llama2.data.adversarial import builtin_adversarial, write_adversarial
    from llama2.model import Transformer
    from llama2.tokenizer import Tokenizer

    d = tmp_path_factory.mktemp("cli")
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=256)
    tok = Tokenizer(sp_model_path)
    torch.manual_seed(0)
    save_model(Transformer(cfg), d / "chat", tok)
    save_model(SequenceClassifier(cfg), d / "rm", tok)

    def dialogue(i: int) -> list[dict]:
        return [{"role": "user", "content": f"What are {TOPICS[i % 8]} for ({i})?"},
                {"role": "assistant", "content": f"Python {TOPICS[i % 8]} hold values."},
                {"role": "user", "content": "And more?"}, {"role": "assistant", "content": "Yes, more."}]

    for name, rng in (("dialogues.jsonl", range(8)), ("dialogues.val.jsonl", range(100, 102))):
        (d / name).write_text("".join(json.dumps({"messages": dialogue(i)}) + "\n" for i in rng))
    ratings = ["significantly_better", "better", "slightly_better", "negligibly_better"]
    for name, rng in (("pairs.jsonl", range(8)), ("pairs.val.jsonl", range(100, 104))):
        (d / name).write_text("".join(json.dumps(
            {"prompt": f"Can Python handle {TOPICS[i % 8]} ({i})?", "chosen": f"Yes, it handles {TOPICS[i % 8]}.",
             "rejected": "No.", "rating": ratings[i % 4]}) + "\n" for i in rng))
    for name, rng in (("prompts.jsonl", range(8)), ("prompts.val.jsonl", range(100, 102))):
        (d / name).write_text("".join(json.dumps({"prompt": f"Name some {TOPICS[i % 8]} ({i})."}) + "\n" for i in rng))
    train, val = builtin_adversarial()
    write_adversarial(d / "adversarial.jsonl", [p for p in train if p.attack == "direct"][:8])
    write_adversarial(d / "adversarial.val.jsonl", [p for p in val if p.attack == "direct"][:4])
    (d / "ft.yaml").write_text(FT)
    common = "device: cpu\nseed: 0\n"
    trained = common + "precision: fp32\npeak_tflops: 1\nlog_every: 1\n"
    (d / "sft.yaml").write_text(f"base: {d / 'chat'}\ndata: {{path: {d / 'dialogues.jsonl'}, val_path: "
                                f"{d / 'dialogues.val.jsonl'}}}\nmax_seq_len: 128\nbatch_size: 2\nmax_steps: 2\n"
                                f"eval_every: 2\nsamples: {{count: 0}}\n{trained}")
    (d / "reward.yaml").write_text(f"base: {d / 'chat'}\nkind: helpfulness\ndata: {{path: {d / 'pairs.jsonl'}, "
                                   f"val_path: {d / 'pairs.val.jsonl'}}}\nmax_seq_len: 128\nbatch_size: 4\n"
                                   f"max_steps: 2\neval_every: 2\n{trained}")
    (d / "gatt.yaml").write_text(f"base: {d / 'chat'}\ndata_path: {d / 'dialogues.jsonl'}\nfamilies: [upper_case]\n"
                                 f"turns: 2\nmax_dialogues: 4\nmax_new_tokens: 4\nmax_steps: 1\n"
                                 f"finetune: {{recipe: {d / 'ft.yaml'}}}\n{common}")
    rms = f"helpfulness_rm: {d / 'rm'}\nsafety_rm: {d / 'rm'}\n"
    prompts = f"prompts: {{path: {d / 'prompts.jsonl'}, val_path: {d / 'prompts.val.jsonl'}, held_out: 2}}\n"
    (d / "rejection.yaml").write_text(f"base: {d / 'chat'}\n{rms}{prompts}iterations: 1\nsamples_per_prompt: 2\n"
                                      f"max_prompts: 4\ntemperature: 1.0\nmax_new_tokens: 4\nbatch_prompts: 4\n"
                                      f"max_steps: 1\nfinetune: {{recipe: {d / 'ft.yaml'}}}\n{common}")
    (d / "ppo.yaml").write_text(f"base: {d / 'chat'}\n{rms}{prompts}max_steps: 2\nbatch_size: 4\nmini_batch: 2\n"
                                f"max_new_tokens: 4\neval_every: 2\nsave_every: 2\n"
                                f"optim: {{lr: 1.0e-3, warmup_steps: 0}}\n{trained}")
    (d / "dpo.yaml").write_text(f"base: {d / 'chat'}\ndata: {{path: {d / 'pairs.jsonl'}, val_path: "
                                f"{d / 'pairs.val.jsonl'}}}\nmax_seq_len: 128\nbatch_size: 4\nmax_steps: 2\n"
                                f"eval_every: 2\n{trained}")
    (d / "grpo.yaml").write_text(f"base: {d / 'chat'}\n{rms}{prompts}max_steps: 2\nbatch_size: 2\ngroup_size: 2\n"
                                 f"mini_batch: 4\nmax_new_tokens: 4\neval_every: 2\nsave_every: 2\n"
                                 f"optim: {{lr: 1.0e-3, warmup_steps: 0}}\n{trained}")
    (d / "distill.yaml").write_text(f"base: {d / 'chat'}\nsafety_rm: {d / 'rm'}\nprompts: {{path: "
                                    f"{d / 'adversarial.jsonl'}, val_path: {d / 'adversarial.val.jsonl'}, "
                                    f"max_prompts: 3, held_out: 4}}\nmax_new_tokens: 4\nbatch_prompts: 8\n"
                                    f"max_steps: 1\nfinetune: {{recipe: {d / 'ft.yaml'}}}\n{common}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLAMA2_CACHE", str(d / "cache"))
        yield d
    cache = d / "cache"  # every input was given: no built-in data was built (compiled kernels may be cached)
    assert not cache.exists() or {p.name for p in cache.iterdir()} <= {"kernels"}


def test_sft_command_fine_tunes_resumes_and_refuses_bad_input(world, tmp_path, capsys):
    out = tmp_path / "sft"
    args = ["sft", "--config", str(world / "sft.yaml"), f"out_dir={out}"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    records = metrics(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    last = [r for r in records if r["step"] == 2]
    ckpt = out / "checkpoints" / "step-000002"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "tokenizer.model").is_file()
    summary = printed.strip().splitlines()[-1]
    assert summary.startswith("sft: 2 steps, ") and summary.endswith(f"checkpoint {ckpt}")
    loss = [r["loss"] for r in last if "loss" in r][0]
    val = [r["val_loss"] for r in last if "val_loss" in r][0]
    assert f"loss {loss:.4f}, held-out loss {val:.4f}" in summary
    # one step more resumes from step 2 (options may follow the overrides)
    assert main([*args, "max_steps=3", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1, 2, 3]
    assert (out / "checkpoints" / "step-000003" / "model.safetensors").is_file()
    # bad input: one line, exit 2
    assert main([*args, "--bogus"]) == 2
    one_line_error(capsys, "unknown option '--bogus'")
    assert main([*args, f"data.path={tmp_path / 'none.jsonl'}"]) == 2
    one_line_error(capsys, str(tmp_path / "none.jsonl"))
    assert main(["sft", "--config", str(tmp_path / "none.yaml")]) == 2
    one_line_error(capsys, "recipe not found", str(tmp_path / "none.yaml"))
    # a finished run is not rewritten from another base: its recipe.yaml keeps saying where it came from
    recipe = (out / "recipe.yaml").read_text()
    shutil.copytree(world / "chat", tmp_path / "another-chat")
    assert main([*args, "max_steps=3", f"base={tmp_path / 'another-chat'}"]) == 2
    one_line_error(capsys, "started from base=", "choose another out_dir")
    assert (out / "recipe.yaml").read_text() == recipe
    # a recipe that is not text, or is empty
    (tmp_path / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    (tmp_path / "empty.yaml").write_text("# nothing but a comment\n")
    assert main(["sft", "--config", str(tmp_path / "binary.yaml")]) == 2
    one_line_error(capsys, "not a text file")
    assert main(["sft", "--config", str(tmp_path / "empty.yaml")]) == 2
    one_line_error(capsys, "is empty", "--keys")


def test_reward_command_trains_a_reward_model_and_refuses_bad_lines(world, tmp_path, capsys):
    from llama2.reward import RewardModel

    out = tmp_path / "rm"
    assert main(["reward", "--config", str(world / "reward.yaml"), f"out_dir={out}"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    ckpt = out / "checkpoints" / "step-000002"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
    last = {k: v for r in metrics(out) if r["step"] == 2 for k, v in r.items()}
    assert summary == (f"reward (helpfulness): 2 steps, loss {last['loss']:.4f}, held-out accuracy "
                       f"{100 * last['val_accuracy']:.1f}%; checkpoint {ckpt}")
    scores = RewardModel.load(out).score(["Can Python handle sets?"], ["Yes, it handles sets."])
    assert len(scores) == 1 and scores[0] == scores[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "chosen": "y", "rejected": "z"}) + "\n" + json.dumps({"prompt": "x"}))
    assert main(["reward", "--config", str(world / "reward.yaml"), f"out_dir={tmp_path / 'x'}",
                 f"data.path={bad}", "--quiet"]) == 2
    one_line_error(capsys, f"{bad}:2", '"chosen"')


def test_gatt_command_writes_the_instruction_once_and_fine_tunes(world, tmp_path, capsys):
    out = tmp_path / "gatt"
    assert main(["gatt", "--config", str(world / "gatt.yaml"), f"out_dir={out}"]) == 0
    printed = capsys.readouterr().out
    saved = jsonl(out / "gatt_dialogues.jsonl")
    assert len(saved) == 4
    for row in saved:
        msgs = row["messages"]
        assert row["mask"] == "last_assistant" and msgs[0]["role"] == "system"
        assert sum(m["role"] == "user" for m in msgs) == 2
        assert all(m["content"] == m["content"].upper() for m in msgs if m["role"] == "assistant")  # enforced
    ckpt = out / "sft" / "checkpoints" / "step-000001"
    assert (ckpt / "model.safetensors").is_file()
    assert "gatt: 4 of 4 dialogues kept, 2 turns each" in printed
    assert f"gatt: fine-tuned 1 steps on the last answers; checkpoint {ckpt}" in printed
    assert main(["gatt", "--config", str(world / "gatt.yaml"), f"out_dir={tmp_path / 'x'}", "families=[rhymes]"]) == 2
    one_line_error(capsys, "families")


def test_rejection_sampling_command_keeps_the_best_of_k(world, tmp_path, capsys):
    out = tmp_path / "rs"
    assert main(["rlhf", "rejection-sampling", "--config", str(world / "rejection.yaml"), f"out_dir={out}"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    samples = jsonl(out / "iter-1" / "samples.jsonl")
    assert len(samples) == 4 and all(len(s["samples"]) == len(s["reward"]) == 2 for s in samples)
    selected = jsonl(out / "iter-1" / "selected.jsonl")
    assert [x["reward"] for x in selected] == pytest.approx([max(s["reward"]) for s in samples])
    records = {r["iteration"]: r for r in metrics(out)}
    assert sorted(records) == [0, 1]
    policy = out / "iter-1" / "sft" / "checkpoints" / "step-000001"
    assert (policy / "model.safetensors").is_file()
    assert summary == (f"rejection sampling: 1 iterations, held-out reward {records[0]['heldout_reward']:.3f} -> "
                       f"{records[1]['heldout_reward']:.3f}; policy {policy}")
    assert main(["rlhf", "rejection-sampling", "--config", str(world / "rejection.yaml"), f"out_dir={tmp_path / 'x'}",
                 f"helpfulness_rm={world / 'chat'}", "-q"]) == 2
    one_line_error(capsys, str(world / "chat"), "not a reward model")


def test_ppo_command_trains_policy_and_value(world, tmp_path, capsys):
    out = tmp_path / "ppo"
    assert main(["rlhf", "ppo", "--config", str(world / "ppo.yaml"), f"out_dir={out}"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    steps = {r["step"]: r for r in metrics(out) if "reward" in r}
    assert sorted(steps) == [1, 2] and all(0 < r["reward"] < 1 for r in steps.values())
    ckpt = out / "checkpoints" / "step-000002"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "value" / "model.safetensors").is_file()
    assert summary == (f"ppo: 2 iterations, reward {steps[2]['reward']:.3f}, KL to pi_0 {steps[2]['kl']:.3f}; "
                       f"checkpoint {ckpt}")
    assert main(["rlhf", "ppo", "--config", str(world / "ppo.yaml"), f"out_dir={tmp_path / 'x'}", "mini_batch=5"]) == 2
    one_line_error(capsys, "mini_batch")  # more rows per step than the 4 prompts of an iteration
    assert main(["rlhf", "ppo", "--config", str(world / "ppo.yaml"), f"out_dir={tmp_path / 'x'}",
                 f"base={tmp_path / 'missing'}"]) == 2
    one_line_error(capsys, str(tmp_path / "missing"))


def test_dpo_command_trains_against_the_reference_and_refuses_bad_keys(world, tmp_path, capsys):
    out = tmp_path / "dpo"
    assert main(["rlhf", "dpo", "--config", str(world / "dpo.yaml"), f"out_dir={out}"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    records = metrics(out)
    assert records[0]["step"] == 0 and records[0]["val_loss"] == pytest.approx(0.6931, abs=1e-3)  # pi = pi_ref
    last = [r for r in records if "val_accuracy" in r][-1]
    ckpt = out / "checkpoints" / "step-000002"
    assert (ckpt / "model.safetensors").is_file()
    assert summary == (f"dpo: 2 steps, loss {[r for r in records if 'loss' in r][-1]['loss']:.4f}, held-out accuracy "
                       f"{100 * last['val_accuracy']:.1f}%; checkpoint {ckpt}")
    assert main(["rlhf", "dpo", "--config", str(world / "dpo.yaml"), f"out_dir={tmp_path / 'x'}", "loss=ipo",
                 "margin=large"]) == 2
    one_line_error(capsys, "margin")


def test_grpo_command_answers_in_groups(world, tmp_path, capsys):
    out = tmp_path / "grpo"
    assert main(["rlhf", "grpo", "--config", str(world / "grpo.yaml"), f"out_dir={out}"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    steps = {r["step"]: r for r in metrics(out) if "reward" in r}
    assert sorted(steps) == [1, 2] and steps[1]["kl"] == 0.0
    ckpt = out / "checkpoints" / "step-000002"
    assert (ckpt / "model.safetensors").is_file() and (out / "rewards.png").is_file()
    assert summary == (f"grpo: 2 iterations, reward {steps[2]['reward']:.3f} (rm), KL to pi_0 {steps[2]['kl']:.3f}; "
                       f"checkpoint {ckpt}")
    assert main(["rlhf", "grpo", "--config", str(world / "grpo.yaml"), f"out_dir={tmp_path / 'x'}",
                 "group_size=1"]) == 2
    one_line_error(capsys, "group_size")
    assert main(["rlhf", "grpo", "--config", str(world / "grpo.yaml"), f"out_dir={tmp_path / 'x'}",
                 "reward=gold"]) == 2
    one_line_error(capsys, "prompts.path: builtin:world/prompts.jsonl")


def test_distill_safety_command_keeps_preprompted_answers_the_rm_prefers(world, tmp_path, capsys):
    out = tmp_path / "ds"
    assert main(["rlhf", "distill-safety", "--config", str(world / "distill.yaml"), f"out_dir={out}"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    rows = jsonl(out / "distill.jsonl")
    assert len(rows) == 3
    assert [r["kept"] for r in rows] == [r["preprompted_score"] > r["plain_score"] for r in rows]
    records = {r["step"]: r for r in metrics(out)}
    assert sorted(records) == [0, 1]
    for name in ("kept.md", "redteam.md", "redteam.json"):
        assert (out / name).is_file()
    assert summary.startswith(f"safety distillation: kept {sum(r['kept'] for r in rows)} of 3 pre-prompted answers; "
                              f"held-out safety score {records[0]['heldout_safety']:.3f} -> "
                              f"{records[1]['heldout_safety']:.3f}, ")
    benign = tmp_path / "benign.jsonl"
    benign.write_text(json.dumps({"prompt": "How do I kill a process?", "category": "c", "safety": False}) + "\n")
    assert main(["rlhf", "distill-safety", "--config", str(world / "distill.yaml"), f"out_dir={tmp_path / 'x'}",
                 f"prompts.path={benign}"]) == 2
    one_line_error(capsys, "no adversarial prompts")


def test_data_adversarial_command_writes_both_splits_and_says_what(tmp_path, capsys):
    from llama2.data.adversarial import read_adversarial

    out = tmp_path / "adv.jsonl"
    assert main(["data", "adversarial", "--output", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    train, val = read_adversarial(out), read_adversarial(tmp_path / "adv.val.jsonl")
    for line, split, path in ((printed[0], train, out), (printed[1], val, tmp_path / "adv.val.jsonl")):
        m = re.match(r"(train|held-out): (\d+) prompts \((\d+) adversarial, (\d+) benign look-alikes; .*\) -> (.+)$",
                     line)
        assert m, line
        assert (int(m[2]), int(m[3]), int(m[4])) == (len(split), sum(p.safety for p in split),
                                                     sum(not p.safety for p in split))
        assert m[5] == str(path)
    assert len(printed) == 2 and len(train) > len(val) > 0
    assert {p.text for p in train}.isdisjoint({p.text for p in val})
    assert {p.attack for p in train} == {"direct", "role_play", "hypothetical"}
    assert all(p.category for p in train + val) and any(p.safety for p in val) and any(not p.safety for p in val)
    before = out.read_bytes()
    assert main(["data", "adversarial", "--output", str(out), "--quiet"]) == 0  # the same seed: the same file
    assert capsys.readouterr().out == "" and out.read_bytes() == before
    assert main(["data", "adversarial", "--output", str(out), "--seed", "1", "-q"]) == 0  # another split, same set
    again = read_adversarial(out) + read_adversarial(tmp_path / "adv.val.jsonl")
    assert out.read_bytes() != before and sorted(p.text for p in again) == sorted(p.text for p in train + val)


def test_data_adversarial_command_into_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["data", "adversarial", "--output", str(tmp_path / "file" / "adv.jsonl"), "-q"]) == 2
    one_line_error(capsys, str(tmp_path / "file"))


def test_demo_refuses_a_bad_budget_or_steps_before_running(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--budget-minutes", "0"]) == 2
    one_line_error(capsys, "--budget-minutes must be positive")
    assert main(["demo", "--out", str(out), "--steps", "0"]) == 2
    one_line_error(capsys, "--steps must be at least 1")
    assert not out.exists()
