"""The SFT stage (paper section 3.1) against independent oracles: each dialogue run alone through the model with
the textbook cross-entropy (packing, masks, gradients), a hand-computed accumulation of token losses, an
uninterrupted run (resume), transformers' greedy generation (samples), and peft's merge_and_unload (LoRA merge)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama2.config import ModelConfig
from llama2.errors import Llama2Error
from llama2.model import Transformer

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=96)

DIALOGUES = [
    [{"role": "user", "content": "What does json.dumps do?"},
     {"role": "assistant", "content": "It serializes an object to a JSON formatted string."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "What is a list?"},
     {"role": "assistant", "content": "A mutable sequence."},
     {"role": "user", "content": "And a tuple?"},
     {"role": "assistant", "content": "An immutable sequence of objects."}],
    [{"role": "user", "content": "Explain the pydoc topic for loops."},
     {"role": "assistant", "content": "The for statement iterates over the elements of a sequence."}],
    [{"role": "user", "content": "How do I kill a Python process?"},
     {"role": "assistant", "content": "Use os.kill with the process id and a signal."}],
    [{"role": "user", "content": "What does range return?"},
     {"role": "assistant", "content": "An immutable sequence of numbers."},
     {"role": "user", "content": "Is it lazy?"},
     {"role": "assistant", "content": "Yes, it computes items on demand."}],
    [{"role": "user", "content": "Name a sorting function."},
     {"role": "assistant", "content": "sorted returns a new sorted list."}],
]


@pytest.fixture(scope="module")
def tokenizer(sp_model_path):
    from llama2.tokenizer import Tokenizer

    return Tokenizer(sp_model_path)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> Path:
    """A random tiny base model in the HF layout, with its tokenizer."""
    from llama2.checkpoint import save_model

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("base") / "base"
    save_model(Transformer(CFG), d, tokenizer)
    return d


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("dialogues")
    train, val = d / "train.jsonl", d / "val.jsonl"
    train.write_text("".join(json.dumps({"messages": m}) + "\n" for m in DIALOGUES * 3))
    val.write_text("".join(json.dumps({"messages": m}) + "\n" for m in DIALOGUES[:3]))
    return train, val


def make_recipe(tmp_path: Path, base: Path, data: tuple[Path, Path], name: str = "run", overrides=()):
    from llama2.stages.sft import SFTRecipe
    from llama2.recipe import load_recipe

    return load_recipe(SFTRecipe, None, [f"base={base}", f"out_dir={tmp_path / name}", f"data.path={data[0]}",
                                         f"data.val_path={data[1]}", "max_seq_len=96", "batch_size=2",
                                         "device=cpu", "precision=fp32", "optim.lr=1e-2", "optim.warmup_steps=1",
                                         "samples.max_new_tokens=6", "samples.count=2", "seed=1", "peak_tflops=1", *overrides])


def examples(tokenizer, dialogues=DIALOGUES, mask="all_assistant"):
    from llama2.data.dialogues import check_dialogue
    from llama2.stages.sft import encode_dialogues

    ex, _ = encode_dialogues(tokenizer, [check_dialogue(d) for d in dialogues], mask, 10_000, "truncate")
    return ex


def reference_sum(model, tokenizer, dialogues, mask="all_assistant") -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over trained tokens, each dialogue run alone through the model's
    logits (the oracle: no packing, no fused head)."""
    from llama2.chat import encode_dialog_for_training

    total, count = 0.0, 0
    for d in dialogues:
        ids, trained = encode_dialog_for_training(tokenizer, d, train_on=mask)
        x = torch.tensor([ids])
        logits = model(x)[0, :-1]
        keep = torch.tensor(trained[1:])
        total = total + F.cross_entropy(logits[keep], x[0, 1:][keep], reduction="sum")
        count += int(keep.sum())
    return total, count


# ------------------------------------------------------------------------------------------------ packing and loss


@pytest.mark.parametrize("apart", [False, True], ids=["mask", "apart"])
def test_packed_loss_and_gradients_equal_each_dialogue_alone(tokenizer, monkeypatch, apart):
    """Both ways of keeping packed dialogues apart: the block-diagonal mask, and each dialogue taken out of its row
    (PackedRows, grouped by length: the rows here hold dialogues of different lengths)."""
    from llama2.data import packing
    from llama2.data.packing import collate, pack_rows
    from llama2.model import PackedRows
    from llama2.stages.sft import sft_loss

    monkeypatch.setattr(packing, "APART_FROM_CPU", 1 if apart else 10**9)
    torch.manual_seed(0)
    model = Transformer(CFG)
    ex = examples(tokenizer)
    rows = pack_rows([len(e.ids) for e in ex], 96)
    assert len(rows) < len(ex), "the test needs rows holding several dialogues"
    batch = collate(ex, rows)
    assert batch["packed"] and batch["tokens"].shape[1] <= 96
    attention = packing.packed_attention(batch["segments"])
    assert isinstance(attention, PackedRows) == apart
    if apart:
        assert len(attention.groups) > 1, "the test needs dialogues of different length groups"
    out = sft_loss(model, batch)
    (out.loss * out.count).backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref, count = reference_sum(model, tokenizer, DIALOGUES)
    ref.backward()
    assert int(out.count) == count
    torch.testing.assert_close(out.loss * out.count, ref.detach(), rtol=1e-5, atol=1e-4)
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_last_assistant_trains_only_the_final_answer(tokenizer):
    from llama2.data.packing import collate, pack_rows
    from llama2.stages.sft import sft_loss

    model = Transformer(CFG)
    ex = examples(tokenizer, mask="last_assistant")
    out = sft_loss(model, collate(ex, pack_rows([len(e.ids) for e in ex], 96)))
    ref, count = reference_sum(model, tokenizer, DIALOGUES, mask="last_assistant")
    assert int(out.count) == count < sum(int(e.trained.sum()) for e in examples(tokenizer))
    torch.testing.assert_close(out.loss * out.count, ref.detach(), rtol=1e-5, atol=1e-4)


def test_labels_are_the_answers_tokens_by_hand(tokenizer):
    """The trained targets of a packed row are exactly each answer's text and EOS, found by hand here from
    the tokenizer: the pair encoding minus the encoding of its prompt."""
    from llama2.data.packing import collate

    ex = examples(tokenizer, DIALOGUES[:1] + DIALOGUES[2:3])
    batch = collate(ex, [[0, 1]])
    want = []
    for d in (DIALOGUES[0], DIALOGUES[2]):
        user, answer = d[0]["content"], d[1]["content"]
        prompt = tokenizer.encode(f"[INST] {user} [/INST]", bos=False)
        pair = tokenizer.encode(f"[INST] {user} [/INST] {answer} ", bos=False)
        assert pair[:len(prompt)] == prompt
        want += pair[len(prompt):] + [tokenizer.eos_id]
    got = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert got == want
    seg = batch["segments"][0].tolist()
    n0 = len(ex[0].ids)
    assert batch["positions"][0, n0].item() == 0 and seg[n0 - 1] == 0 and seg[n0] == 1


def test_accumulation_normalises_by_the_trained_tokens_of_the_global_batch(tmp_path, tokenizer):
    """Two micro-batches with very different numbers of trained tokens: the step's gradient is that of the mean
    over all trained tokens of both (not the mean of the two means)."""
    from llama2.data.packing import collate
    from llama2.stages.sft import sft_loss
    from llama2.train.config import OptimConfig, TrainRecipe
    from llama2.train.loop import Trainer

    ex = examples(tokenizer)
    micro = [collate(ex, [[0]]), collate(ex, [[1, 4], [2]])]
    torch.manual_seed(0)
    recipe = TrainRecipe(out_dir=str(tmp_path / "acc"), max_steps=1, device="cpu", precision="fp32",
                         optim=OptimConfig(lr=1e-3, warmup_steps=0))

    class Nothing:
        def next(self):
            raise AssertionError

        def state_dict(self):
            return {}

        def load_state_dict(self, s):
            pass

    trainer = Trainer(recipe, lambda: Transformer(CFG), sft_loss, Nothing(), quiet=True)
    trainer.start()
    totals = trainer.backward(micro)
    got = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.model.zero_grad()
    ref, count = reference_sum(trainer.model, tokenizer, [DIALOGUES[i] for i in (0, 1, 4, 2)])
    (ref / count).backward()
    assert totals.count == count
    assert totals.loss == pytest.approx(ref.item() / count, rel=1e-5)
    for n, p in trainer.model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_overlong_dialogue_drops_earliest_exchanges_and_keeps_the_system(tokenizer):
    from llama2.chat import encode_dialog_for_training
    from llama2.data.dialogues import check_dialogue
    from llama2.stages.sft import encode_dialogues

    long = [{"role": "system", "content": "Answer briefly."}]
    for i in range(6):
        long += [{"role": "user", "content": f"Question number {i} about Python lists?"},
                 {"role": "assistant", "content": f"Answer number {i}: lists are mutable sequences."}]
    last = [long[0]] + long[-2:]
    want, _ = encode_dialog_for_training(tokenizer, last)
    two = encode_dialog_for_training(tokenizer, [long[0]] + long[-4:])[0]
    limit = len(two) - 1  # the last two exchanges do not fit, the last one does
    ex, stats = encode_dialogues(tokenizer, [check_dialogue(long)], "all_assistant", limit, "truncate")
    assert ex[0].ids.tolist() == want and stats.truncated == 1 and stats.skipped == 0
    ex, stats = encode_dialogues(tokenizer, [check_dialogue(long)], "all_assistant", limit, "skip")
    assert ex == [] and stats.skipped == 1
    ex, stats = encode_dialogues(tokenizer, [check_dialogue(long)], "all_assistant", len(want) - 1, "truncate")
    assert ex == [] and stats.skipped == 1


def test_batches_state_resumes_and_epochs_reshuffle(tokenizer):
    from llama2.data.packing import SFTBatches

    ex = examples(tokenizer) * 4
    a = SFTBatches(ex, 96, 2, 2, seed=3)
    steps = [a.next() for _ in range(3 * a.steps_per_epoch)]
    b = SFTBatches(ex, 96, 2, 2, seed=3)
    for _ in range(a.steps_per_epoch + 1):
        b.next()
    c = SFTBatches(ex, 96, 2, 2, seed=3)
    c.load_state_dict(b.state_dict())
    for want in steps[a.steps_per_epoch + 1:]:
        got = c.next()
        assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(got, want))
    assert len(a.rows) >= 4 and list(a.order(0)) != list(a.order(1))  # each epoch has its own order
    assert sorted(a.order(1)) == list(range(len(a.rows)))  # ... of every row
    # two processes each take their slice of the same global batch
    r0 = SFTBatches(ex, 96, 2, 1, rank=0, world_size=2, seed=3)
    r1 = SFTBatches(ex, 96, 2, 1, rank=1, world_size=2, seed=3)
    assert r0.step_rows(0, 0) + r1.step_rows(0, 0) == a.step_rows(0, 0)
    with pytest.raises(Llama2Error, match="global batch"):
        SFTBatches(ex, 96, 4, 2, seed=3).load_state_dict(a.state_dict())


# ------------------------------------------------------------------------------------------------ the stage


def test_sft_trains_writes_samples_and_resumes_exactly(tmp_path, base_dir, data_files, tokenizer, capsys):
    """A run of 4 steps against one stopped after step 2 and run again (constant lr, so the two runs' schedules
    agree): the same losses, held-out loss and trained-token count; samples.jsonl at every evaluation."""
    from llama2.stages.sft import sft
    from llama2.train.metrics import read_metrics

    args = ["optim.schedule=constant", "eval_every=2", "save_every=2"]
    full = sft(make_recipe(tmp_path, base_dir, data_files, "full", ["max_steps=4", *args]))
    out = capsys.readouterr().out
    assert "sft: 4 steps" in out and "trained tokens" in out and "held-out loss" in out
    sft(make_recipe(tmp_path, base_dir, data_files, "cut", ["max_steps=2", *args]), quiet=True)
    resumed = sft(make_recipe(tmp_path, base_dir, data_files, "cut", ["max_steps=4", *args]), quiet=True)
    assert resumed.resumed_from == 2
    cut = tmp_path / "cut"
    a = {r["step"]: r for r in read_metrics(tmp_path / "full" / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(cut / "metrics.jsonl")}
    assert [a[s]["loss"] for s in range(1, 5)] == [b[s]["loss"] for s in range(1, 5)]
    assert a[4]["val_loss"] == b[4]["val_loss"] and a[4]["trained_tokens"] == b[4]["trained_tokens"]
    samples = [json.loads(line) for line in (cut / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 4, 4]
    assert samples[0]["prompt"] == DIALOGUES[0][0]["content"]
    assert samples[0]["reference"] == DIALOGUES[0][1]["content"]
    # the greedy answer is transformers' greedy generation from the step-4 checkpoint
    from transformers import LlamaForCausalLM

    from llama2.chat import encode_dialog

    hf = LlamaForCausalLM.from_pretrained(full.checkpoint).eval()
    ids = encode_dialog(tokenizer, DIALOGUES[0][:1])
    gen = hf.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_id,
                      pad_token_id=tokenizer.eos_id)[0, len(ids):].tolist()
    if tokenizer.eos_id in gen:
        gen = gen[:gen.index(tokenizer.eos_id)]
    full_samples = [json.loads(line) for line in (tmp_path / "full" / "samples.jsonl").read_text().splitlines()]
    assert full_samples[2]["answer"] == tokenizer.decode(gen).strip()


def test_lora_trains_only_adapters_saves_peft_layout_and_resumes(tmp_path, base_dir, data_files):
    from safetensors import safe_open

    from llama2.stages.sft import sft
    from llama2.train.metrics import read_metrics

    args = ["save_every=2", "lora.rank=4", "lora.alpha=8", "lora.dropout=0", "optim.lr=5e-2",
            "optim.schedule=constant", "lora.targets=[q, v, down]", "samples.count=0"]
    full = sft(make_recipe(tmp_path, base_dir, data_files, "full", ["max_steps=4", *args]), quiet=True)
    ckpt = full.checkpoint
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "tokenizer.model").is_file()
    assert not list(ckpt.glob("model*.safetensors"))
    with safe_open(ckpt / "adapter_model.safetensors", framework="pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert any("down_proj" in k for k in keys) and not any("k_proj" in k for k in keys)
    cfg = json.loads((ckpt / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base_dir) and cfg["r"] == 4
    sft(make_recipe(tmp_path, base_dir, data_files, "cut", ["max_steps=2", *args]), quiet=True)
    resumed = sft(make_recipe(tmp_path, base_dir, data_files, "cut", ["max_steps=4", *args]), quiet=True)
    assert resumed.resumed_from == 2
    a = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl")]
    b = [r["loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")]
    assert a == b and a[-1] < a[0]


def test_missing_base_is_built_by_its_recipe_and_builtin_dialogues_by_default(tmp_path, base_dir, monkeypatch,
                                                                               tokenizer):
    """base_recipe pretrains the base when it is missing (a 2-step pretraining here), and data.path unset builds
    the built-in dialogues into the cache (a small standard library here, to stay fast)."""
    import shutil
    import sysconfig

    from llama2.data import dialogues
    from llama2 import pipeline
    from llama2.data.dialogues import ensure_dialogues

    monkeypatch.setenv("LLAMA2_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "stdlib"
    shutil.copytree(Path(sysconfig.get_paths()["stdlib"]) / "json", root / "json")
    real = dialogues.build_dialogues
    monkeypatch.setattr(dialogues, "build_dialogues", lambda out, **kw: real(out, **kw, stdlib_root=root,
                                                                             val_fraction=0.3))
    tok = tmp_path / "tok"
    tokenizer.save(tok)
    shards = tmp_path / "shards"
    from llama2.data.prepare import prepare_shards
    from pydoc_data.topics import topics

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:40]))
    prepare_shards(tok, [text], shards, quiet=True)
    pre = tmp_path / "pretrain.yaml"
    pre.write_text(f"model: {{preset: tiny, dim: 32, n_layers: 1, n_heads: 4, n_kv_heads: 4, max_seq_len: 96}}\n"
                   f"data: {{tokenizer: {tok}, sources: [{{path: {shards}}}], eval_sequences: 0}}\n"
                   "batch_size: 2\nmax_steps: 2\ndevice: cpu\nprecision: fp32\npeak_tflops: 1\n")
    from llama2.recipe import load_recipe
    from llama2.stages.sft import SFTRecipe

    recipe = load_recipe(SFTRecipe, None, [f"base={tmp_path / 'pre-run'}", f"base_recipe={pre}",
                                           f"out_dir={tmp_path / 'sft'}", "max_steps=1", "batch_size=2",
                                           "device=cpu", "precision=fp32", "peak_tflops=1", "samples.count=1",
                                           "samples.max_new_tokens=2"])
    result = pipeline.run(recipe, quiet=True)
    assert result.step == 1 and (tmp_path / "pre-run" / "checkpoints" / "step-000002").is_dir()
    train, val = ensure_dialogues(quiet=True)
    assert str(train).startswith(str(tmp_path / "cache")) and train.is_file() and val.is_file()
    assert "val_loss" in result.last
    assert json.loads((tmp_path / "sft" / "samples.jsonl").read_text().splitlines()[0])["reference"]


def test_lora_merge_equals_peft_merge_and_unload(tmp_path, base_dir, tokenizer, capsys):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from llama2.checkpoint import load_model, save_checkpoint
    from llama2.cli import main
    from llama2.lora import apply_lora

    model = apply_lora(load_model(base_dir), r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                       base_model=str(base_dir))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_checkpoint(model, tmp_path / "adapter", tokenizer=tokenizer)
    assert main(["lora", "merge", str(base_dir), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    tokens = torch.tensor([[1, 5, 9, 200, 3, 77, 42, 11]])
    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    want = peft.merge_and_unload().eval()(tokens).logits
    merged = load_model(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(tokens)
    assert (got - want).abs().max().item() < 1e-4
    assert (tmp_path / "merged" / "tokenizer.model").is_file()
    # a base of another shape is a clear error
    other = tmp_path / "other"
    from llama2.checkpoint import save_model

    save_model(Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=1000, multiple_of=16,
                                       max_seq_len=96)), other, tokenizer)
    capsys.readouterr()
    assert main(["lora", "merge", str(other), str(tmp_path / "adapter"), str(tmp_path / "bad")]) != 0
    assert "the adapter does not match the base model" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_recipe_errors_and_what_qlora_needs(tmp_path, base_dir, data_files, monkeypatch):
    import sys

    from llama2.stages.sft import SFTRecipe, sft
    from llama2.recipe import load_recipe

    with pytest.raises(Llama2Error, match="unknown recipe key 'lora.rnk'"):
        make_recipe(tmp_path, base_dir, data_files, overrides=["lora.rnk=4"])
    with pytest.raises(Llama2Error, match="mask"):
        make_recipe(tmp_path, base_dir, data_files, overrides=["mask=everything"])
    with pytest.raises(Llama2Error, match="lora.targets"):
        make_recipe(tmp_path, base_dir, data_files, overrides=["lora.targets=[q, lm_head]"])
    recipe = make_recipe(tmp_path, base_dir, data_files, overrides=["lora.rank=4", "lora.quantize_base=4bit"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if it were not installed
    with pytest.raises(Llama2Error, match="needs bitsandbytes: pip install bitsandbytes"):
        sft(recipe, quiet=True)
    with pytest.raises(Llama2Error, match="needs LoRA"):
        sft(make_recipe(tmp_path, base_dir, data_files, overrides=["lora.quantize_base=4bit"]), quiet=True)
    with pytest.raises(Llama2Error, match="does not exist"):
        sft(make_recipe(tmp_path, tmp_path / "nowhere", data_files), quiet=True)
    for size in ("tiny", "7B", "13B", "70B"):
        r = load_recipe(SFTRecipe, Path(__file__).resolve().parents[1] / "configs" / size / "sft.yaml")
        if size != "tiny":
            assert (r.optim.lr, r.optim.weight_decay, r.optim.schedule, r.epochs, r.global_batch_size,
                    r.max_seq_len, r.precision) == (2e-5, 0.1, "cosine", 2, 64, 4096, "bf16")


@pytest.mark.slow
def test_fsdp_two_processes_match_one_with_samples_from_rank_0(tmp_path, base_dir, data_files):
    """The same global batch on 1 and 2 CPU processes (FSDP2, gloo): the same losses and held-out loss, and the
    same greedy samples, written once."""
    import subprocess
    import sys

    from helpers import SUB_ENV, two_process_launchers

    from llama2.train.metrics import read_metrics

    def start(launcher: list[str], out: Path) -> subprocess.Popen:
        cmd = [*launcher, "-m", "llama2", "sft", "--config", str(tmp_path / "empty.yaml"), "--quiet",
               f"base={base_dir}", f"out_dir={out}", f"data.path={data_files[0]}", f"data.val_path={data_files[1]}",
               "max_seq_len=96", "batch_size=1", "global_batch_size=4", "max_steps=3", "eval_every=3", "device=cpu",
               "precision=fp32", "optim.lr=1e-2", "peak_tflops=1", "samples.count=2", "samples.max_new_tokens=4"]
        return subprocess.Popen([sys.executable, *cmd], env=SUB_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    (tmp_path / "empty.yaml").write_text("{}\n")
    # the 2 processes as two simulated nodes (torchrun --nnodes 2, two launchers)
    procs = [start([], tmp_path / "one"), *(start(x, tmp_path / "two") for x in two_process_launchers(nodes=True))]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    a = {r["step"]: r for r in read_metrics(tmp_path / "one" / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(tmp_path / "two" / "metrics.jsonl")}
    for s in (1, 2, 3):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5)
    assert b[3]["val_loss"] == pytest.approx(a[3]["val_loss"], rel=1e-5)
    one = (tmp_path / "one" / "samples.jsonl").read_text().splitlines()
    two = (tmp_path / "two" / "samples.jsonl").read_text().splitlines()
    assert len(one) == len(two) == 2
    assert [json.loads(x)["prompt"] for x in one] == [json.loads(x)["prompt"] for x in two]


def test_later_stages_hand_dialogues_in_memory(tmp_path, base_dir, data_files):
    """GAtt / rejection sampling pass dialogues in memory; a per-dialogue mask overrides the recipe's."""
    from llama2.data.dialogues import Dialogue
    from llama2.stages.sft import build_sft, sft

    gatt = [Dialogue(DIALOGUES[1], mask="last_assistant"), Dialogue(DIALOGUES[4], mask="last_assistant")]
    run = build_sft(make_recipe(tmp_path, base_dir, data_files, "mem", ["max_steps=1", "samples.count=0"]),
                    dialogues=gatt + DIALOGUES[:1], quiet=True)
    trained = sum(int(e.trained[1:].sum()) for e in run.trainer.batches.examples)
    want = sum(int(e.trained[1:].sum()) for e in examples(run.tokenizer, [DIALOGUES[1], DIALOGUES[4]],
                                                          "last_assistant") + examples(run.tokenizer, DIALOGUES[:1]))
    assert trained == want
    with pytest.raises(Llama2Error, match="roles out of order"):
        sft(make_recipe(tmp_path, base_dir, data_files, "bad"), dialogues=[DIALOGUES[0][::-1]], quiet=True)


# ------------------------------------------------------------------------------------------------ text replay


def replay_docs() -> list[str]:
    """Plain documents unlike the dialogues: paragraphs of the pydoc topics."""
    from conftest import corpus_text

    paras = [p.strip() for p in corpus_text(60_000).split("\n\n") if 300 < len(p.strip()) < 700]
    return paras[:4]


@pytest.fixture(scope="module")
def replay_dir(tmp_path_factory) -> Path:
    """Three documents in a .jsonl file and one in a .txt file."""
    d = tmp_path_factory.mktemp("replay")
    docs = replay_docs()
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[:3]))
    (d / "one.txt").write_text(docs[3])
    return d


def replay_chunks(sp_model_path: Path, max_seq_len: int = 96) -> list[tuple[int, ...]]:
    """Each document as SentencePiece itself encodes it (BOS ... EOS), cut into rows of max_seq_len overlapping
    by one token, so that every token after BOS is predicted once."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    out = []
    for doc in replay_docs():
        ids = [sp.bos_id(), *sp.encode(doc), sp.eos_id()]
        out += [tuple(ids[lo:lo + max_seq_len]) for lo in range(0, len(ids) - 1, max_seq_len - 1)]
    return out


def test_text_replay_rows_hold_the_documents_with_every_token_in_the_loss(tmp_path, base_dir, data_files,
                                                                          replay_dir, sp_model_path):
    from llama2.recipe import load_recipe
    from llama2.stages.sft import SFTRecipe, build_sft

    off = build_sft(make_recipe(tmp_path, base_dir, data_files, "off", ["samples.count=0"]), quiet=True)
    assert off.trainer.batches.replay_count == 0  # the default: no replay, the dialogues alone
    run = build_sft(make_recipe(tmp_path, base_dir, data_files, "on", [
        f"text_replay.path={replay_dir}", "text_replay.fraction=0.4", "samples.count=0"]), quiet=True)
    b = run.trainer.batches
    assert b.rows == off.trainer.batches.rows and b.replay_count == round(0.4 * len(b.rows) / 0.6)
    chunks = replay_chunks(sp_model_path)
    assert len(chunks) > len(replay_docs())  # the documents are longer than a row
    seen, replay_rows, dialogue_rows = [], 0, 0
    for _ in range(b.steps_per_epoch):
        for mb in b.next():
            for r in range(mb["tokens"].shape[0]):
                kinds = set()
                for s in range(int(mb["segments"][r].max()) + 1):
                    at = mb["segments"][r] == s
                    tokens, labels = mb["tokens"][r][at].tolist(), mb["labels"][r][at].tolist()
                    if tuple(tokens) in chunks:
                        kinds.add("text")
                        seen.append(tuple(tokens))
                        assert labels == tokens[1:] + [-100]  # every next token is in the loss
                    else:
                        kinds.add("dialogue")
                        assert -100 in labels[:-1]  # the prompt is not trained
                assert len(kinds) <= 1  # text rows are packed apart from dialogue rows
                replay_rows += kinds == {"text"}
                dialogue_rows += kinds == {"dialogue"}
    assert (replay_rows, dialogue_rows) == (b.replay_count, len(b.rows))
    assert b.replay_count >= len(b.replay_rows) and set(seen) == set(chunks)  # every document is replayed
    with pytest.raises(Llama2Error, match="text_replay.path' is not set"):
        load_recipe(SFTRecipe, None, [f"base={base_dir}", "text_replay.fraction=0.2"])
    with pytest.raises(Llama2Error, match="text_replay.fraction"):
        load_recipe(SFTRecipe, None, [f"base={base_dir}", f"text_replay.path={replay_dir}", "text_replay.fraction=1"])
    with pytest.raises(Llama2Error, match="text_replay.path .*nowhere.jsonl does not exist"):
        build_sft(make_recipe(tmp_path, base_dir, data_files, "x", [f"text_replay.path={tmp_path / 'nowhere.jsonl'}",
                                                                    "text_replay.fraction=0.2"]), quiet=True)


def test_text_replay_keeps_the_loss_on_the_documents_lower(tmp_path, base_dir, data_files, replay_dir,
                                                          sp_model_path):
    """Two short SFT runs, alike but for text_replay: transformers, loading each final checkpoint, gives the
    documents a lower loss after the run that replayed them."""
    from transformers import LlamaForCausalLM

    from llama2.stages.sft import sft

    args = ["max_steps=12", "samples.count=0", "optim.schedule=constant"]
    plain = sft(make_recipe(tmp_path, base_dir, data_files, "plain", args), quiet=True)
    replayed = sft(make_recipe(tmp_path, base_dir, data_files, "replayed", [
        *args, f"text_replay.path={replay_dir}", "text_replay.fraction=0.3"]), quiet=True)

    def doc_loss(checkpoint: Path) -> float:
        hf = LlamaForCausalLM.from_pretrained(checkpoint).eval()
        losses = []
        with torch.no_grad():
            for chunk in replay_chunks(sp_model_path):
                x = torch.tensor([chunk])
                losses.append(F.cross_entropy(hf(x).logits[0, :-1], x[0, 1:]).item())
        return sum(losses) / len(losses)

    with_replay, without = doc_loss(replayed.checkpoint), doc_loss(plain.checkpoint)
    assert with_replay < without - 0.3, (with_replay, without)
