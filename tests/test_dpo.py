"""DPO: the loss (DPO's sigmoid, its length-normalised form and IPO) and its gradient against TRL's DPOTrainer
computing through transformers on the same checkpoints and pairs (our answers packed, TRL's padded); the paper's
margin by hand; tiny runs that learn a computable preference, resume exactly, and train LoRA adapters with the
adapters disabled as the reference (PEFT layout); recipe errors."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llama2.config import ModelConfig
from llama2.errors import Llama2Error
from llama2.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16, max_seq_len=96)
RATINGS = ["significantly_better", "better", "slightly_better", "negligibly_better"]


@pytest.fixture(scope="module")
def tokenizer(sp_model_path):
    from llama2.tokenizer import Tokenizer

    return Tokenizer(sp_model_path)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """Two random tiny chat models in the HF layout: a policy and a reference."""
    from llama2.checkpoint import save_model

    d = tmp_path_factory.mktemp("dpo-models")
    for seed, name in ((0, "policy"), (1, "reference")):
        torch.manual_seed(seed)
        save_model(Transformer(CFG), d / name, tokenizer)
    return d / "policy", d / "reference"


def yes_no(n: int, offset: int = 0) -> list[dict]:
    """The chosen answer says yes, the rejected one says no (a preference a program can compute)."""
    topics = ["lists", "tuples", "sets", "dicts", "loops", "files", "strings", "bytes"]
    return [{"prompt": f"Question {i}: can Python handle {topics[i % 8]}?",
             "chosen": f"Yes, it handles {topics[i % 8]} well.", "rejected": f"No, it cannot handle {topics[i % 8]}.",
             "rating": RATINGS[i % 4]} for i in range(offset, offset + n)]


def _trl_loss(loss_type: str | list, beta: float, policy, reference, pairs, tokenizer,
              weights: list[float] | None = None) -> torch.Tensor:
    """TRL's DPOTrainer._compute_loss through transformers' models (with TRL's fused LM head) on its padded rows:
    the chosen answers, then the rejected ones."""
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from llama2.reward import encode_scored

    add_fused_lm_head(policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(reference)
    enc = [encode_scored(tokenizer, p["prompt"], p["chosen"]) for p in pairs] + \
          [encode_scored(tokenizer, p["prompt"], p["rejected"]) for p in pairs]
    P = max(start for _, start in enc)  # prompts left-padded to the longest, answers right-padded (TRL's layout)
    T = P + max(len(ids) - start for ids, start in enc)
    input_ids = torch.zeros(len(enc), T, dtype=torch.long)
    attention = torch.zeros(len(enc), T, dtype=torch.long)
    completion = torch.zeros(len(enc), T, dtype=torch.long)
    for i, (ids, start) in enumerate(enc):
        lo, hi = P - start, P - start + len(ids)
        input_ids[i, lo:hi] = torch.tensor(ids)
        attention[i, lo:hi] = 1
        completion[i, P:hi] = 1
    ident = lambda x: x  # noqa: E731
    fake = SimpleNamespace(
        model=policy, ref_model=reference, accelerator=SimpleNamespace(device=torch.device("cpu"), gather=ident,
                                                                      gather_for_metrics=ident),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=False, f_divergence_type="reverse_kl",
        loss_types=loss_type if isinstance(loss_type, list) else [loss_type], loss_weights=weights or [1.0],
        beta=beta, use_weighting=False, label_smoothing=0.0,
        _total_train_tokens=0, _tp_size=1, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=SimpleNamespace(gradient_checkpointing_kwargs=None))
    inputs = {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}
    return DPOTrainer._compute_loss(fake, policy, inputs, False)


@pytest.mark.parametrize("ours,trls", [({"loss": "sigmoid"}, "sigmoid"),
                                       ({"loss": "sigmoid", "length_normalize": True}, "sigmoid_norm"),
                                       ({"loss": "ipo"}, "ipo"),
                                       ({"loss": "sigmoid", "sft_weight": 0.5}, ["sigmoid", "sft"])])
def test_loss_and_gradient_equal_trls_dpo_trainer(models, tokenizer, ours, trls):
    from transformers import LlamaForCausalLM

    from llama2.checkpoint import load_checkpoint
    from llama2.reward import encode_scored
    from llama2.stages.dpo import chosen_nll, dpo_loss, response_logprobs
    from llama2.stages.reward import collate_pairs

    pairs = yes_no(6)
    beta = 0.3
    enc = [(encode_scored(tokenizer, p["prompt"], p["chosen"]), encode_scored(tokenizer, p["prompt"], p["rejected"]))
           for p in pairs]
    batch = collate_pairs([(c[0], r[0]) for c, r in enc], [0.0] * len(pairs), 0, pack_len=96,
                          starts=[(c[1], r[1]) for c, r in enc])
    assert batch["tokens"].shape[0] < 2 * len(pairs)  # packed: several answers per row
    policy = load_checkpoint(models[0], kind="causal_lm").float().train()
    reference = load_checkpoint(models[1], kind="causal_lm").float().eval()
    logps, counts = response_logprobs(policy, batch)
    with torch.no_grad():
        ref, _ = response_logprobs(reference, batch)
    n = len(pairs)
    ours = dict(ours)
    sft_weight = ours.pop("sft_weight", 0.0)
    per_pair, _ = dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta=beta, chosen_tokens=counts[:n],
                           rejected_tokens=counts[n:], **ours)
    mine = per_pair.mean() + sft_weight * chosen_nll(logps[:n], counts[:n])
    mine.backward()
    hf_policy = LlamaForCausalLM.from_pretrained(models[0]).float().train()
    hf_ref = LlamaForCausalLM.from_pretrained(models[1]).float().eval()
    theirs = _trl_loss(trls, beta, hf_policy, hf_ref, pairs, tokenizer, [1.0, sft_weight] if sft_weight else None)
    theirs.backward()
    assert float(mine) == pytest.approx(float(theirs.detach()), rel=1e-4, abs=1e-6)
    assert float(mine) != pytest.approx(math.log(2), abs=1e-3) or trls == "ipo"  # the models differ: a real test
    torch.testing.assert_close(policy.lm_head.weight.grad, hf_policy.lm_head.weight.grad, rtol=1e-3, atol=1e-6)


def test_the_papers_margin_by_hand():
    from llama2.stages.dpo import dpo_loss

    c, r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    rc, rr = torch.tensor([-3.5, -5.0]), torch.tensor([-3.5, -3.0])
    m = torch.tensor([1.0, 0.0])
    per_pair, rewards = dpo_loss(c, r, rc, rr, beta=0.5, margin=m)
    # Delta_c - Delta_r = (0.5 - -0.5) = 1.0 and (0 - -1) = 1.0; the first pair must also clear its margin of 1
    want = [-math.log(1 / (1 + math.exp(-(0.5 * 1.0 - 1.0)))), -math.log(1 / (1 + math.exp(-0.5)))]
    assert per_pair.tolist() == pytest.approx(want)
    assert rewards["reward_chosen"].tolist() == pytest.approx([0.25, 0.0])


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("dpo-data")
    (d / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in yes_no(64)))
    (d / "val.jsonl").write_text("".join(json.dumps(c) + "\n" for c in yes_no(16, offset=100)))
    return d / "train.jsonl", d / "val.jsonl"


def make_recipe(tmp_path: Path, base: Path, data: tuple[Path, Path], name: str = "run", overrides=()):
    from llama2.recipe import load_recipe
    from llama2.stages.dpo import DPORecipe

    return load_recipe(DPORecipe, None, [f"base={base}", f"out_dir={tmp_path / name}", f"data.path={data[0]}",
                                         f"data.val_path={data[1]}", "max_seq_len=96", "batch_size=8", "device=cpu",
                                         "precision=fp32", "optim.lr=3e-3", "optim.warmup_steps=0", "seed=1",
                                         "peak_tflops=1", "log_every=1", "eval_every=8", "save_every=8",
                                         *overrides])


def test_dpo_learns_a_computable_preference_and_resumes_exactly(tmp_path, models, data_files, capsys):
    from transformers import LlamaForCausalLM

    from llama2.stages.dpo import dpo
    from llama2.train.metrics import read_metrics

    const = ["epochs=2", "optim.schedule=constant", "optim.warmup_ratio=0"]  # a resumed run plans the same rates
    dpo(make_recipe(tmp_path, models[0], data_files, overrides=const))
    out = capsys.readouterr().out
    assert "dpo: 16 steps" in out and "held-out accuracy" in out
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    first, last = rows[0], rows[-1]
    # at step 0 the policy is the reference: every log-ratio is 0, the loss log 2
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["val_margin"] == pytest.approx(0.0, abs=1e-6) and first["val_accuracy"] == 0.5  # all ties
    assert last["step"] == 16 and last["val_accuracy"] == 1.0 and last["val_margin"] > 0.5
    assert {"accuracy", "margin", "reward_chosen", "reward_rejected"} <= set(rows[1])
    LlamaForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-000016")
    # resume: 8 steps, then 8 more, equal the 16-step run's losses
    dpo(make_recipe(tmp_path, models[0], data_files, "cut", [*const, "max_steps=8"]), quiet=True)
    resumed = dpo(make_recipe(tmp_path, models[0], data_files, "cut", const), quiet=True)
    assert resumed.resumed_from == 8
    a = {r["step"]: r for r in rows if "loss" in r}
    b = {r["step"]: r for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if "loss" in r}
    for s in (9, 16):
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5)


def test_lora_dpo_uses_the_disabled_adapters_as_reference_and_saves_peft(tmp_path, models, data_files):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from llama2.stages.dpo import DPO, dpo
    from llama2.train.metrics import read_metrics

    run = DPO(make_recipe(tmp_path, models[0], data_files, "probe", ["lora.rank=4"]), quiet=True)
    assert run.reference is None  # no second model in memory
    dpo(make_recipe(tmp_path, models[0], data_files, overrides=["lora.rank=4", "lora.alpha=8", "epochs=2",
                                                                  "optim.lr=1e-2"]), quiet=True)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA starts at B = 0: the reference
    assert rows[-1]["val_accuracy"] > 0.9
    ckpt = tmp_path / "run" / "checkpoints" / "step-000016"
    assert (ckpt / "adapter_config.json").is_file()
    PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(models[0]), ckpt)


def test_recipe_errors(tmp_path, models, data_files):
    with pytest.raises(Llama2Error, match="'beta'"):
        make_recipe(tmp_path, models[0], data_files, overrides=["beta=0"])
    with pytest.raises(Llama2Error, match="'loss'"):
        make_recipe(tmp_path, models[0], data_files, overrides=["loss=kto"])
    with pytest.raises(Llama2Error, match="margin=none"):
        make_recipe(tmp_path, models[0], data_files, overrides=["loss=ipo", "margin=small"])
    with pytest.raises(Llama2Error, match="unknown recipe key|'nonsense'"):
        make_recipe(tmp_path, models[0], data_files, overrides=["nonsense=1"])


DRIVER = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_dpo import make_recipe
from llama2.stages.dpo import dpo
from llama2.train.distributed import shutdown
try:
    data = (Path({train!r}), Path({val!r}))
    dpo(make_recipe(Path(sys.argv[1]).parent, Path({base!r}), data, Path(sys.argv[1]).name,
                    ["max_steps=3", "eval_every=3", "save_every=3", "batch_size=4"]), quiet=True)
finally:
    shutdown()
"""


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path, models, data_files):
    """The same 3 steps on 1 process (batch 8) and on 2 (FSDP2 over gloo, 4 pairs each): the same losses and
    held-out figures."""
    from helpers import one_and_two_processes

    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(tests=str(Path(__file__).parent), base=str(models[0]), train=str(data_files[0]),
                                    val=str(data_files[1])))
    (tmp_path / "driver1.py").write_text(script.read_text().replace('"batch_size=4"', '"batch_size=8"'))
    a, b = one_and_two_processes(tmp_path, [str(tmp_path / "driver1.py")], [str(script)])
    for s in (1, 2, 3):
        for key in ("loss", "accuracy", "margin"):
            assert b[s][key] == pytest.approx(a[s][key], rel=1e-4, abs=1e-5), (s, key)
    for key in ("val_loss", "val_accuracy", "val_margin"):
        assert b[3][key] == pytest.approx(a[3][key], rel=1e-4, abs=1e-5), key


def test_every_dpo_recipe_loads_with_its_settings():
    from llama2.recipe import load_recipe
    from llama2.stages.dpo import DPORecipe

    root = Path(__file__).parents[1] / "configs"
    recipes = {size: load_recipe(DPORecipe, root / size / "dpo.yaml") for size in ("tiny", "world", "7B", "13B", "70B")}
    for size in ("7B", "13B", "70B"):  # the DPO paper's and Zephyr's beta, lr, warm-up and global batch
        r = recipes[size]
        assert (r.beta, r.optim.lr, r.optim.warmup_ratio, r.global_batch_size, r.loss) == (0.1, 5e-7, 0.1, 64,
                                                                                          "sigmoid")
    assert recipes["world"].data.sources[0].path == "builtin:world/comparisons-helpfulness.jsonl"


def test_sigkill_mid_save_then_resume_gives_the_same_run(tmp_path, models, data_files):
    """`llama2 rlhf dpo` killed (SIGKILL) while writing checkpoint 4, then rerun: it resumes from checkpoint 2 and
    ends with an uninterrupted run's losses, bit for bit."""
    from helpers import killed_mid_save_and_rerun

    from llama2.train.metrics import read_metrics

    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"base: {models[0]}\ndata: {{path: {data_files[0]}, val_path: {data_files[1]}}}\n"
                      "max_seq_len: 96\nbatch_size: 8\nmax_steps: 6\nsave_every: 2\neval_every: 3\nlog_every: 1\n"
                      "device: cpu\nprecision: fp32\npeak_tflops: 1\noptim: {lr: 3.0e-3}\n")
    ref, run = killed_mid_save_and_rerun(["rlhf", "dpo", "--config", str(recipe), "--quiet"], tmp_path)
    a, b = ([(r["step"], r.get("loss"), r.get("val_loss")) for r in read_metrics(d / "metrics.jsonl")]
            for d in (ref, run))
    assert b == a and [s for s, loss, _ in b if loss is not None] == list(range(1, 7))
