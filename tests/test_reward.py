"""Reward models (paper section 5): the ranking loss against its formula for each margin of Table 27, the per-rating
accuracy bookkeeping on hand-made scores, the data mix, the batches, the scoring API against transformers'
LlamaForSequenceClassification, and the stage end to end (eval.md, histogram, resume, LoRA, the CLI)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama2.config import ModelConfig
from llama2.errors import Llama2Error
from llama2.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=96)
RATINGS = ["significantly_better", "better", "slightly_better", "negligibly_better"]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def tokenizer(sp_model_path):
    from llama2.tokenizer import Tokenizer

    return Tokenizer(sp_model_path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    """A random tiny chat model (causal LM) in the HF layout, with its tokenizer."""
    from llama2.checkpoint import save_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("base") / "base"
    save_model(Transformer(CFG), d, tokenizer)
    return d


def yes_no_comparisons(n: int, offset: int = 0) -> list[dict]:
    """A preference a program can compute: the chosen answer says yes, the rejected one says no."""
    topics = ["lists", "tuples", "sets", "dicts", "loops", "files", "strings", "bytes", "classes", "modules"]
    out = []
    for i in range(offset, offset + n):
        t = topics[i % len(topics)]
        out.append({"prompt": f"Question {i}: can Python handle {t}?", "chosen": f"Yes, it handles {t} well.",
                    "rejected": f"No, it cannot handle {t}.", "rating": RATINGS[i % 4]})
    return out


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("comparisons")
    train, val = d / "train.jsonl", d / "val.jsonl"
    train.write_text("".join(json.dumps(c) + "\n" for c in yes_no_comparisons(64)))
    val.write_text("".join(json.dumps(c) + "\n" for c in yes_no_comparisons(16, offset=100)))
    return train, val


def make_recipe(tmp_path: Path, base: Path, data: tuple[Path, Path], name: str = "run", overrides=()):
    from llama2.stages.reward import RewardRecipe
    from llama2.recipe import load_recipe

    return load_recipe(RewardRecipe, None, [f"base={base}", f"out_dir={tmp_path / name}", f"data.path={data[0]}",
                                            f"data.val_path={data[1]}", "max_seq_len=96", "batch_size=8",
                                            "device=cpu", "precision=fp32", "optim.lr=3e-3", "seed=1",
                                            "peak_tflops=1", *overrides])


# ---------------------------------------------------------------------------------------------------------------
# The loss and the bookkeeping, against the formulas


@pytest.mark.parametrize("variant,table", [("none", [0, 0, 0, 0]), ("small", [1, 2 / 3, 1 / 3, 0]),
                                           ("large", [3, 2, 1, 0])])
def test_ranking_loss_is_the_papers_formula_for_each_margin(variant, table):
    from llama2.stages.reward import margins, ranking_loss

    chosen, rejected = [0.5, 2.0, -1.0, 0.3], [0.1, -1.0, -0.2, 0.3]
    m = margins(RATINGS, variant)
    assert m.tolist() == pytest.approx(table)
    got = ranking_loss(torch.tensor(chosen), torch.tensor(rejected), m).tolist()
    want = [-math.log(sig(c - r - mm)) for c, r, mm in zip(chosen, rejected, table)]
    assert got == pytest.approx(want, rel=1e-6)
    assert margins([None], variant).tolist() == [0.0]  # unrated: as "negligibly better / unsure"


def test_the_margin_weighs_most_on_well_separated_pairs():
    """At the same score gap, the margin raises the loss and its gradient most for significantly-better pairs and
    not at all for negligibly-better ones: the model is pushed to separate clearly different answers further."""
    from llama2.stages.reward import margins, ranking_loss

    gap = torch.full((4,), 1.0, requires_grad=True)
    for variant in ("small", "large"):
        with_m = ranking_loss(gap, torch.zeros(4), margins(RATINGS, variant))
        (g_with,) = torch.autograd.grad(with_m.sum(), gap)
        without = ranking_loss(gap, torch.zeros(4))
        (g_without,) = torch.autograd.grad(without.sum(), gap)
        extra_loss = (with_m - without).tolist()
        extra_push = (g_without - g_with).tolist()  # how much harder the gap is pushed up (grads are negative)
        assert extra_loss[0] > extra_loss[1] > extra_loss[2] > extra_loss[3] == 0
        assert extra_push[0] > extra_push[1] > extra_push[2] > extra_push[3] == 0
        # d/d(gap) of -log sigmoid(gap - m) is -(1 - sigmoid(gap - m))
        m = margins(RATINGS, variant).tolist()
        assert g_with.tolist() == pytest.approx([-(1 - sig(1 - mm)) for mm in m], rel=1e-6)


def test_accuracy_by_rating_on_hand_made_scores():
    from llama2.stages.reward import accuracy_by_rating

    chosen = [2.0, 1.0, 0.0, 0.5, 0.5, 1.0, -1.0, 3.0]
    rejected = [1.0, 2.0, -1.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    ratings = ["significantly_better", "significantly_better", "better", "better", "slightly_better",
               "negligibly_better", "negligibly_better", None]
    got = accuracy_by_rating(chosen, rejected, ratings)
    assert list(got) == [*RATINGS, "unrated", "all"]
    assert got["significantly_better"] == (0.5, 2)
    assert got["better"] == (0.75, 2)  # one right, one tie (half)
    assert got["slightly_better"] == (1.0, 1)
    assert got["negligibly_better"] == (0.5, 2)
    assert got["unrated"] == (1.0, 1)
    assert got["all"] == (pytest.approx(5.5 / 8), 8)


def test_epoch_mix_by_weight_and_share():
    from llama2.data.mix import draw, epoch_counts

    assert epoch_counts([1000, 300], [1.0, None], [None, 0.5]) == [1000, 1000]  # "an equal amount" of the other
    assert epoch_counts([400, 3000], [1.0, None], [None, 0.1]) == [400, round(0.1 * 400 / 0.9)]  # 90/10
    assert epoch_counts([100, 50], [0.5, 2.0], [None, None]) == [50, 100]
    idx = draw(10, 25, __import__("numpy").random.default_rng(0))
    counts = __import__("collections").Counter(idx.tolist())
    assert len(idx) == 25 and set(counts) == set(range(10)) and sorted(counts.values()) == [2] * 5 + [3] * 5


def test_pair_batches_put_chosen_first_sort_by_length_and_resume(tokenizer):
    from llama2.data.comparisons import check_comparison
    from llama2.stages.reward import MARGINS, PairBatches, encode_comparisons
    from llama2.reward import encode_pair

    comps = [check_comparison(c["prompt"], c["chosen"] + " x" * (i % 7), c["rejected"], c["rating"])
             for i, c in enumerate(yes_no_comparisons(24))]
    pairs, skipped = encode_comparisons(tokenizer, comps, 96)
    assert skipped == 0 and pairs[0].chosen == encode_pair(tokenizer, comps[0].prompt, comps[0].chosen)
    batches = PairBatches([pairs], [24], 4, 2, "large", seed=3)
    assert batches.steps_per_epoch == 3
    micro = batches.next()
    assert len(micro) == 2 and micro[0]["tokens"].shape[0] == 8 and micro[0]["margin"].shape == (4,)
    m = micro[0]
    order = [p for p in batches.order(0)[:8]]
    order.sort(key=lambda p: p.longest)
    first = order[:4]
    for i, p in enumerate(first):  # chosen rows 0..3, rejected rows 4..7, padded with 0 after each length
        assert m["tokens"][i, :len(p.chosen)].tolist() == p.chosen and m["lengths"][i] == len(p.chosen)
        assert m["tokens"][4 + i, :len(p.rejected)].tolist() == p.rejected
        assert m["margin"][i] == MARGINS["large"][p.rating]
    longest = [max(p.longest for p in order[:4]), max(p.longest for p in order[4:])]
    assert [micro[0]["tokens"].shape[1], micro[1]["tokens"].shape[1]] == longest and longest[0] <= longest[1]
    state = batches.state_dict()
    after = [b["tokens"] for b in batches.next()]
    again = PairBatches([pairs], [24], 4, 2, "large", seed=3)
    again.load_state_dict(state)
    assert all(torch.equal(a, b["tokens"]) for a, b in zip(after, again.next()))
    with pytest.raises(Llama2Error, match="same global batch"):
        PairBatches([pairs], [24], 2, 2, "large").load_state_dict(state)
    with pytest.raises(Llama2Error, match="fewer than one global batch"):
        PairBatches([pairs], [24], 16, 2, "large")


# ---------------------------------------------------------------------------------------------------------------
# Scoring: against transformers


def test_reward_model_scores_equal_transformers_on_a_padded_batch(tmp_path, base_dir, tokenizer):
    """Pairs encoded as the completed chat turn, scored at the final EOS; transformers' classifier reading the same
    directory scores the right-padded batch at each row's last non-pad token."""
    from transformers import LlamaForSequenceClassification

    from llama2.checkpoint import load_checkpoint, save_checkpoint
    from llama2.chat import encode_dialog_for_training
    from llama2.reward import RewardModel, encode_pair, pad_rows

    torch.manual_seed(5)
    rm = load_checkpoint(base_dir, kind="classifier")
    with torch.no_grad():
        rm.score.weight.normal_()  # a trained-looking head, so scores differ clearly
    save_checkpoint(rm, tmp_path / "rm", tokenizer=tokenizer)
    prompts = ["What is a set?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
               [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "B."},
                {"role": "user", "content": "And C?"}]]
    responses = ["An unordered collection of unique items, with fast membership tests.", "Hello.", "C is C."]
    ours = RewardModel.load(tmp_path / "rm", max_batch_tokens=64)  # small batches: bucketing and reordering
    got = ours.score(prompts, responses)
    assert ours.probs(prompts, responses) == pytest.approx([sig(s) for s in got])
    ids = [encode_pair(tokenizer, p, r) for p, r in zip(prompts, responses)]
    assert ids[1] == encode_dialog_for_training(tokenizer, [{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": "Hi"},
                                                            {"role": "assistant", "content": "Hello."}])[0]
    assert ids[0][0] == tokenizer.bos_id and ids[0][-1] == tokenizer.eos_id
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert hf.config.pad_token_id == 0 and hf.config.num_labels == 1
    tokens, _ = pad_rows(ids, 0)
    with torch.no_grad():
        want = hf(input_ids=tokens).logits.squeeze(-1).tolist()
    assert got == pytest.approx(want, abs=1e-5)
    assert len({round(s, 4) for s in got}) == 3
    with pytest.raises(Llama2Error, match="one response per prompt"):
        ours.score(prompts, responses[:2])
    with pytest.raises(Llama2Error, match="not a reward model"):
        RewardModel.load(base_dir)


def test_length_buckets_cover_every_index_within_the_budget():
    from llama2.reward import length_buckets

    lengths = [5, 50, 7, 30, 30, 2, 100, 9]
    batches = length_buckets(lengths, 100)
    assert sorted(i for b in batches for i in b) == list(range(8))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)


# ---------------------------------------------------------------------------------------------------------------
# The stage


def test_reward_stage_learns_a_computable_preference_and_writes_table_8(tmp_path, base_dir, data_files, capsys):
    """From a random chat model, the RM learns yes-over-no (held-out accuracy from about chance to 1); step 0 is
    evaluated before training with scores near zero (loss about log 2 + margins); eval.md, the histogram and the
    per-pair scores are written; the checkpoint is transformers' sequence-classifier layout."""
    from transformers import LlamaForSequenceClassification

    from llama2.reward import RewardModel
    from llama2.stages.reward import reward
    from llama2.train.metrics import read_metrics

    result = reward(make_recipe(tmp_path, base_dir, data_files, overrides=["margin=none", "epochs=6",
                                                                              "optim.lr=1e-2"]))
    out = capsys.readouterr().out
    assert "reward (helpfulness): 48 steps" in out and "held-out accuracy" in out
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    first, last = records[0], records[-1]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(math.log(2), abs=0.05)
    assert last["step"] == 48 and last["val_accuracy"] == 1.0 and last["val_loss"] < 0.45
    assert {f"val_accuracy/val/{r}" for r in RATINGS} <= set(last)
    md = (run / "eval.md").read_text()
    assert "| val (ours) | 100.0 (4) | 100.0 (4) | 100.0 (4) | 100.0 (4) | 100.0 | 16 |" in md
    assert "| paper: Helpfulness RM on Meta Helpful | 80.7 | 67.5 | 60.9 | 54.7 | 63.2 | - |" in md
    assert (run / "score_histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "loss.png").is_file()
    scores = [json.loads(x) for x in (run / "heldout_scores.jsonl").read_text().splitlines()]
    assert len(scores) == 16 and all(s["chosen"] > s["rejected"] for s in scores)
    # the saved RM scores like transformers and like the evaluation did
    rm = RewardModel.load(run)
    held = yes_no_comparisons(16, offset=100)
    ours = rm.score([c["prompt"] for c in held], [c["chosen"] for c in held])
    assert ours == pytest.approx([s["chosen"] for s in scores], abs=1e-4)
    hf = LlamaForSequenceClassification.from_pretrained(result.checkpoint).eval()
    ids = [rm.encode([held[0]["prompt"]], [held[0]["chosen"]])[0][0]]
    with torch.no_grad():
        assert hf(input_ids=torch.tensor(ids)).logits.item() == pytest.approx(ours[0], abs=1e-4)


def test_reward_resumes_exactly(tmp_path, base_dir, data_files):
    from llama2.stages.reward import reward
    from llama2.train.metrics import read_metrics

    args = ["optim.schedule=constant", "optim.warmup_steps=0", "optim.warmup_ratio=0", "save_every=2",
            "eval_every=2"]
    reward(make_recipe(tmp_path, base_dir, data_files, "full", ["max_steps=4", *args]), quiet=True)
    reward(make_recipe(tmp_path, base_dir, data_files, "cut", ["max_steps=2", *args]), quiet=True)
    resumed = reward(make_recipe(tmp_path, base_dir, data_files, "cut", ["max_steps=4", *args]), quiet=True)
    assert resumed.resumed_from == 2
    a = {r["step"]: r for r in read_metrics(tmp_path / "full" / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")}
    assert sorted(b) == [0, 1, 2, 3, 4]
    assert [a[s]["loss"] for s in range(1, 5)] == [b[s]["loss"] for s in range(1, 5)]
    assert a[4]["val_accuracy"] == b[4]["val_accuracy"]


def test_lora_reward_model_keeps_its_head_in_peft_layout(tmp_path, base_dir, data_files):
    from llama2.reward import RewardModel
    from llama2.stages.reward import reward

    result = reward(make_recipe(tmp_path, base_dir, data_files, "lora", ["max_steps=3", "lora.rank=4"]), quiet=True)
    cfg = json.loads((result.checkpoint / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    rm = RewardModel.load(tmp_path / "lora")
    scores = [json.loads(x) for x in (tmp_path / "lora" / "heldout_scores.jsonl").read_text().splitlines()]
    held = yes_no_comparisons(16, offset=100)
    got = rm.score([c["prompt"] for c in held[:3]], [c["rejected"] for c in held[:3]])
    assert got == pytest.approx([s["rejected"] for s in scores[:3]], abs=1e-4)


def test_val_max_scores_the_first_held_out_pairs_and_records_the_step(tmp_path, base_dir, data_files):
    """data.val_max=5: each evaluation scores the held-out file's first 5 pairs; heldout_scores.jsonl holds the
    last evaluation's scores with its step, equal to the saved RM's scores of those pairs."""
    from llama2.reward import RewardModel
    from llama2.stages.reward import reward

    result = reward(make_recipe(tmp_path, base_dir, data_files, "capped", ["max_steps=3", "data.val_max=5"]),
                    quiet=True)
    scores = [json.loads(x) for x in (tmp_path / "capped" / "heldout_scores.jsonl").read_text().splitlines()]
    held = yes_no_comparisons(16, offset=100)[:5]
    assert [s["step"] for s in scores] == [3] * 5 and [s["rating"] for s in scores] == [c["rating"] for c in held]
    rm = RewardModel.load(result.checkpoint)
    assert rm.score([c["prompt"] for c in held], [c["chosen"] for c in held]) == pytest.approx(
        [s["chosen"] for s in scores], abs=1e-4)


def test_recipe_errors_name_the_key(tmp_path, base_dir, data_files):
    from llama2.stages.reward import RewardRecipe, reward
    from llama2.recipe import load_recipe

    with pytest.raises(Llama2Error, match="'margin'"):
        make_recipe(tmp_path, base_dir, data_files, overrides=["margin=huge"])
    with pytest.raises(Llama2Error, match="'data.val_max' is 0"):
        make_recipe(tmp_path, base_dir, data_files, overrides=["data.val_max=0"])
    with pytest.raises(Llama2Error, match="marginn"):
        make_recipe(tmp_path, base_dir, data_files, overrides=["marginn=small"])
    with pytest.raises(Llama2Error, match="give at least one a weight"):
        load_recipe(RewardRecipe, None, [f"base={base_dir}", "data.sources=[{path: a.jsonl, share: 0.5}]"])
    with pytest.raises(Llama2Error, match="does not exist"):
        reward(make_recipe(tmp_path, tmp_path / "nowhere", data_files), quiet=True)
    for size in ("7B", "13B", "70B"):
        for kind in ("helpfulness", "safety"):
            r = load_recipe(RewardRecipe, Path(__file__).resolve().parents[1] / "configs" / size /
                            f"reward-{kind}.yaml")
            assert (r.kind, r.epochs, r.global_batch_size, r.optim.lr, r.optim.min_lr_ratio, r.optim.warmup_ratio,
                    r.optim.warmup_steps, r.margin) == (kind, 1, 512, 5e-6 if size == "70B" else 1e-5, 0.1, 0.03,
                                                        5, "small")
            shares = {s.name: s.share for s in r.data.sources}
            assert shares == ({"helpfulness": None, "safety": 0.5} if kind == "helpfulness" else
                              {"safety": None, "helpfulness": 0.1})


def test_the_log_names_the_training_files_of_the_mix_and_the_held_out_sets(tmp_path, base_dir, data_files, capsys):
    """The epoch-mix line names each source by its training file (the held-out file names only the test set)."""
    from llama2.stages.reward import build_reward

    d = tmp_path / "mix"
    d.mkdir()
    (d / "extra.jsonl").write_text("".join(json.dumps(c) + "\n" for c in yes_no_comparisons(8, offset=200)))
    sources = (f"data.sources=[{{path: {data_files[0]}, val_path: {data_files[1]}, weight: 1.0}}, "
               f"{{path: {d / 'extra.jsonl'}, share: 0.2}}]")
    recipe = make_recipe(tmp_path, base_dir, data_files, overrides=["data.path=null", "data.val_path=null", sources])
    build_reward(recipe)
    line = next(x for x in capsys.readouterr().out.splitlines() if "an epoch mixes" in x)
    assert "an epoch mixes train.jsonl 64 of 64, extra.jsonl 16 of 8 comparisons; held-out: val 16;" in line, line


def test_score_cli_prints_raw_and_sigmoid_and_json_lines(tmp_path, base_dir, data_files):
    from helpers import SUB_ENV

    from llama2.stages.reward import reward

    reward(make_recipe(tmp_path, base_dir, data_files, "cli", ["max_steps=2"]), quiet=True)
    run = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "llama2", "score", str(run), "--prompt", "Can Python handle sets?",
                        "--response", "Yes, it handles sets well.", "--device", "cpu"], capture_output=True,
                       text=True, env=SUB_ENV)
    assert r.returncode == 0, r.stderr
    raw, prob = float(r.stdout.split()[1]), float(r.stdout.split()[3])
    assert prob == pytest.approx(sig(raw), abs=1e-4)
    lines = tmp_path / "pairs.jsonl"
    lines.write_text(json.dumps({"prompt": "Can Python handle sets?", "response": "Yes, it handles sets well."})
                     + "\n" + json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "response": "No."}) + "\n")
    r = subprocess.run([sys.executable, "-m", "llama2", "score", str(run), "--input", str(lines), "--device", "cpu"],
                       capture_output=True, text=True, env=SUB_ENV)
    assert r.returncode == 0, r.stderr
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(out) == 2 and out[0]["score"] == pytest.approx(raw, abs=1e-4)
    assert out[1]["prob"] == pytest.approx(sig(out[1]["score"]), abs=1e-5)
    lines.write_text(json.dumps({"prompt": "x"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "llama2", "score", str(run), "--input", str(lines)],
                       capture_output=True, text=True, env=SUB_ENV)
    assert r.returncode != 0 and f"{lines}:1: no \"response\" field" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_tiny_rms_on_the_builtin_comparisons_beat_chance_where_the_paper_says(tmp_path, monkeypatch):
    """Both tiny recipes on the built-in comparisons (built into a fresh cache), from a random chat model of a tiny
    shape with a 4,096-piece tokenizer trained on the built-in dialogues: the helpfulness RM beats chance clearly on
    held-out pairs, more on significantly-better pairs than on negligibly-better ones (Table 8's shape); the safety
    RM prefers the refusal on held-out harmful requests and the helpful answer on held-out benign look-alikes, where
    the same answer styles are rejected for the other kind."""
    from llama2.checkpoint import save_model
    from llama2.data.dialogues import dialogue_texts, read_dialogues
    from llama2.data.tokenizer_training import train_tokenizer
    from llama2.stages.reward import RewardRecipe, reward
    from llama2.data.dialogues import ensure_dialogues
    from llama2.recipe import load_recipe

    monkeypatch.setenv("LLAMA2_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "dialogues.txt"
    text.write_text("\n".join(dialogue_texts(read_dialogues(ensure_dialogues(quiet=True)[0]).dialogues)))
    tokenizer = train_tokenizer([text], 4096, tmp_path / "tok", quiet=True)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=4096, multiple_of=32, max_seq_len=256)
    torch.manual_seed(0)
    save_model(Transformer(cfg), tmp_path / "chat", tokenizer)
    configs = Path(__file__).resolve().parents[1] / "configs" / "tiny"
    results = {}
    for kind, extra in (("helpfulness", ["max_steps=150", "optim.lr=2e-3"]), ("safety", [])):
        recipe = load_recipe(RewardRecipe, configs / f"reward-{kind}.yaml",
                             [f"base={tmp_path / 'chat'}", f"out_dir={tmp_path / kind}", "base_recipe=null",
                              "device=cpu", "eval_every=0", "save_every=0", *extra])
        reward(recipe, quiet=True)
        results[kind] = [json.loads(x) for x in (tmp_path / kind / "heldout_scores.jsonl").read_text().splitlines()]

    def accuracy(lines, **where):
        mine = [x for x in lines if all(x[k] == v for k, v in where.items())]
        assert mine, where
        return sum(x["chosen"] > x["rejected"] for x in mine) / len(mine)

    help_rm = results["helpfulness"]
    assert accuracy(help_rm, set="helpfulness") > 0.7
    assert accuracy(help_rm, set="helpfulness", rating="significantly_better") > \
        accuracy(help_rm, set="helpfulness", rating="negligibly_better") + 0.2
    safety_rm = results["safety"]
    assert accuracy(safety_rm, set="safety", source="safety:harmful") > 0.75
    assert accuracy(safety_rm, set="safety", source="safety:benign") > 0.75


@pytest.mark.parametrize("apart", [False, True], ids=["mask", "apart"])
def test_packed_pairs_score_as_each_answer_alone_in_transformers(tmp_path, base_dir, tokenizer, monkeypatch, apart):
    """A packed micro-batch (several answers per row, attention kept inside each, positions from 0) gives every
    answer the score transformers gives it alone, and the same loss and gradients as the padded batch; both with
    the block-diagonal mask and with the answers taken out of their rows (PackedRows)."""
    from transformers import LlamaForSequenceClassification

    from llama2.checkpoint import load_checkpoint, save_checkpoint
    from llama2.data import packing
    from llama2.data.comparisons import check_comparison
    from llama2.model import PackedRows
    from llama2.stages.reward import collate_pairs, encode_comparisons, reward_loss

    monkeypatch.setattr(packing, "APART_FROM_CPU", 1 if apart else 10**9)

    torch.manual_seed(2)
    rm = load_checkpoint(base_dir, kind="classifier")
    with torch.no_grad():
        rm.score.weight.normal_()
    save_checkpoint(rm, tmp_path / "rm", tokenizer=tokenizer)
    comps = [check_comparison(c["prompt"], c["chosen"] + " and more" * i, c["rejected"], c["rating"])
             for i, c in enumerate(yes_no_comparisons(6))]
    pairs, _ = encode_comparisons(tokenizer, comps, 96)
    ids = [(p.chosen, p.rejected) for p in pairs]
    packed = collate_pairs(ids, [1.0] * 6, 0, pack_len=96)
    padded = collate_pairs(ids, [1.0] * 6, 0)
    assert packed["tokens"].shape[0] < 12 and packed["tokens"].numel() < padded["tokens"].numel()
    attention = packing.packed_attention(packed["segments"])
    assert isinstance(attention, PackedRows) == apart
    with torch.no_grad():
        scores = rm(packed["tokens"], positions=packed["positions"], mask=attention, read_at=packed["read_at"])
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    seqs = [c for c, _ in ids] + [r for _, r in ids]
    with torch.no_grad():
        alone = [hf(input_ids=torch.tensor([s])).logits.item() for s in seqs]
    assert scores.tolist() == pytest.approx(alone, abs=1e-4)
    grads = []
    for batch in (packed, padded):
        rm.zero_grad()
        out = reward_loss(rm, batch)
        out.loss.backward()
        grads.append((out.loss.item(), rm.layers[0].self_attn.q_proj.weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)


def test_a_missing_chat_model_is_built_by_its_sft_recipe(tmp_path, base_dir, data_files, capsys):
    """base missing + base_recipe: the SFT recipe runs first (into base), then the RM trains from it."""
    import yaml

    from llama2 import pipeline

    dialogues = tmp_path / "d.jsonl"
    dialogues.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                                          {"role": "assistant", "content": f"A{i}."}]}) + "\n"
                                 for i in range(8)))
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump({
        "base": str(base_dir), "data": {"path": str(dialogues)}, "max_steps": 2, "batch_size": 2,
        "max_seq_len": 96, "device": "cpu", "precision": "fp32", "samples": {"count": 0}, "peak_tflops": 1}))
    recipe = make_recipe(tmp_path, tmp_path / "chat", data_files,
                         overrides=[f"base_recipe={tmp_path / 'sft.yaml'}", "max_steps=1"])
    result = pipeline.run(recipe)
    out = capsys.readouterr().out
    assert f"building the chat model: {tmp_path / 'sft.yaml'}" in out
    assert (tmp_path / "chat" / "checkpoints" / "step-000002" / "model.safetensors").is_file()
    assert result.step == 1


# ---------------------------------------------------------------------------------------------------------------
# The likelihood term (an extension: the RM adds w x log p(response) under the chat model's LM head)


def hf_likelihood_scores(path: Path, sequences, starts, weight: float, offset: float) -> list[float]:
    """The oracle: transformers' classifier score (it ignores the extra tensors) plus w x the summed log-probs of
    the response tokens from transformers' causal LM holding the same backbone and LM head, plus b."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    clf = LlamaForSequenceClassification.from_pretrained(path).eval()
    lm = LlamaForCausalLM(LlamaConfig.from_pretrained(path)).eval()
    state = load_file(str(path / "model.safetensors"))
    lm.load_state_dict({k: v for k, v in state.items() if k.startswith(("model.", "lm_head."))}, strict=True)
    out = []
    with torch.no_grad():
        for ids, start in zip(sequences, starts):
            t = torch.tensor([ids])
            logp = torch.log_softmax(lm(input_ids=t).logits[0].float(), -1)
            term = sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids)))
            out.append(clf(input_ids=t).logits.item() + weight * term + offset)
    return out


def test_likelihood_term_scores_equal_transformers_padded_packed_and_after_a_round_trip(tmp_path, base_dir,
                                                                                         tokenizer):
    """score = the scalar head at the final EOS + w x sum of log p(response token) (transformers' causal LM on the
    same weights); packed rows give each answer the same score; the term survives save and load, config.json
    says so, and PPO's value model (per_token) reads the scalar head only."""
    from llama2.checkpoint import load_checkpoint, save_checkpoint
    from llama2.classifier import LIKELIHOOD_INIT, SequenceClassifier
    from llama2.data.comparisons import check_comparison
    from llama2.data.packing import attention_mask
    from llama2.reward import RewardModel
    from llama2.stages.reward import collate_pairs, encode_comparisons

    torch.manual_seed(3)
    lm = load_checkpoint(base_dir)
    rm = SequenceClassifier(lm.config, likelihood=True)
    assert rm.likelihood_weight.tolist() == pytest.approx([LIKELIHOOD_INIT, 0.0])
    state = {k: v for k, v in lm.state_dict().items()}
    state["score.weight"] = torch.randn(1, lm.config.dim)
    state["likelihood_weight"] = torch.tensor([0.7, 2.5])
    rm.load_state_dict(state, strict=True)
    save_checkpoint(rm, tmp_path / "rm", tokenizer=tokenizer)
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["llama2_likelihood_term"] is True

    comps = [check_comparison(c["prompt"], c["chosen"] + " and more" * i, c["rejected"], c["rating"])
             for i, c in enumerate(yes_no_comparisons(4))]
    pairs, _ = encode_comparisons(tokenizer, comps, 96)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    starts = [p.starts[0] for p in pairs] + [p.starts[1] for p in pairs]
    assert all(tokenizer.decode(s[st:-1]).strip() in {c.chosen for c in comps} | {c.rejected for c in comps}
               for s, st in zip(seqs, starts))
    want = hf_likelihood_scores(tmp_path / "rm", seqs, starts, 0.7, 2.5)

    loaded = RewardModel.load(tmp_path / "rm", max_batch_tokens=64)
    assert loaded.model.likelihood
    got = loaded.score([c.prompt for c in comps] * 2, [c.chosen for c in comps] + [c.rejected for c in comps])
    assert got == pytest.approx(want, abs=1e-4)
    packed = collate_pairs([(p.chosen, p.rejected) for p in pairs], [0.0] * 4, 0, pack_len=96,
                           starts=[p.starts for p in pairs])
    with torch.no_grad():
        scores = loaded.model(packed["tokens"], positions=packed["positions"],
                              mask=attention_mask(packed["segments"]), read_at=packed["read_at"],
                              response_from=packed["response_from"])
    assert scores.tolist() == pytest.approx(want, abs=1e-4)
    with pytest.raises(Llama2Error, match="response_from"):
        loaded.model(torch.tensor([seqs[0]]))
    with torch.no_grad():
        values = loaded.model(torch.tensor([seqs[0]]), per_token=True)
        head_only = loaded.model.score(loaded.model.hidden(torch.tensor([seqs[0]]))).squeeze(-1)
    assert torch.allclose(values, head_only)


def test_reward_stage_with_the_likelihood_term_trains_resumes_and_loads(tmp_path, base_dir, data_files):
    """likelihood_term=true: the RM starts from the chat model's LM head, w = LIKELIHOOD_INIT and b = -w x the mean
    summed log-probability of the first 64 chosen training answers (transformers' causal LM on the base as the
    oracle), learns the preference, keeps b, saves (w, b) and the head; a resumed run continues with the same
    losses."""
    from transformers import LlamaForCausalLM

    from llama2.classifier import LIKELIHOOD_INIT
    from llama2.reward import RewardModel, encode_scored
    from llama2.stages.reward import reward
    from llama2.train.metrics import read_metrics

    args = ["likelihood_term=true", "optim.schedule=constant", "optim.warmup_steps=0", "optim.warmup_ratio=0",
            "save_every=2", "eval_every=2"]
    full = reward(make_recipe(tmp_path, base_dir, data_files, "full", ["max_steps=6", *args]), quiet=True)
    reward(make_recipe(tmp_path, base_dir, data_files, "cut", ["max_steps=2", *args]), quiet=True)
    resumed = reward(make_recipe(tmp_path, base_dir, data_files, "cut", ["max_steps=6", *args]), quiet=True)
    assert resumed.resumed_from == 2
    a = {r["step"]: r for r in read_metrics(tmp_path / "full" / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")}
    assert [a[s]["loss"] for s in range(1, 7)] == pytest.approx([b[s]["loss"] for s in range(1, 7)], abs=1e-6)
    assert a[6]["val_accuracy"] > a[0]["val_accuracy"]
    rm = RewardModel.load(full.checkpoint)
    w, b = rm.model.likelihood_weight.tolist()
    assert rm.model.likelihood and w != LIKELIHOOD_INIT
    hf = LlamaForCausalLM.from_pretrained(base_dir).eval()
    sums = []
    with torch.no_grad():
        for c in yes_no_comparisons(64):
            ids, start = encode_scored(rm.tokenizer, c["prompt"], c["chosen"])
            logp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            sums.append(sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids))))
    assert b == pytest.approx(-LIKELIHOOD_INIT * sum(sums) / len(sums), rel=1e-4)
    with pytest.raises(Llama2Error, match="lora.rank=0"):
        make_recipe(tmp_path, base_dir, data_files, "lora", ["likelihood_term=true", "lora.rank=4"])


def test_center_rewards_adds_trls_centring_penalty_to_the_ranking_loss(tmp_path, base_dir, tokenizer):
    """center_rewards = c: loss = mean(-log sigmoid(r_c - r_r - m)) + c x mean((r_c + r_r)^2) (TRL's
    center_rewards_coefficient), with every score taken from transformers' classifier reading each answer alone;
    a negative c is refused naming the key."""
    from transformers import LlamaForSequenceClassification

    from llama2.checkpoint import load_checkpoint, save_checkpoint
    from llama2.data.comparisons import check_comparison
    from llama2.stages.reward import collate_pairs, encode_comparisons, reward_loss

    torch.manual_seed(4)
    rm = load_checkpoint(base_dir, kind="classifier")
    with torch.no_grad():
        rm.score.weight.normal_()
    save_checkpoint(rm, tmp_path / "rm", tokenizer=tokenizer)
    comps = [check_comparison(c["prompt"], c["chosen"], c["rejected"], c["rating"]) for c in yes_no_comparisons(4)]
    pairs, _ = encode_comparisons(tokenizer, comps, 96)
    batch = collate_pairs([(p.chosen, p.rejected) for p in pairs], [0.5] * 4, 0, pack_len=96)
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        c = torch.tensor([hf(input_ids=torch.tensor([p.chosen])).logits.item() for p in pairs])
        r = torch.tensor([hf(input_ids=torch.tensor([p.rejected])).logits.item() for p in pairs])
        got = reward_loss(rm, batch, center=0.25).loss.item()
        plain = reward_loss(rm, batch).loss.item()
    want_plain = (-torch.nn.functional.logsigmoid(c - r - 0.5)).mean().item()
    # the centred loss is about 80 here (random scores): fp32 sums in another order (packed rows vs one answer at a
    # time) differ by ~1e-7 of it, more than 1e-5 absolute on a CPU without AVX-512
    assert plain == pytest.approx(want_plain, rel=1e-6, abs=1e-5)
    assert got == pytest.approx(want_plain + 0.25 * ((c + r) ** 2).mean().item(), rel=1e-6, abs=1e-5)
    with pytest.raises(Llama2Error, match="center_rewards"):
        make_recipe(tmp_path, base_dir, ("a", "b"), "neg", ["center_rewards=-1"])
