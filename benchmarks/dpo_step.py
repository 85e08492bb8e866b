"""DPO training throughput: our DPO stage (`llama2.stages.dpo.DPO`, one `trainer.train_step()` per step) against
TRL's `DPOTrainer`, on the same random tiny policy, the same comparisons and the same batch, each side in its own
subprocess, in the same run. The figure is real (non-padding) tokens per second: every step trains on B pairs,
each a prompt with a chosen and a rejected answer.

Both sides: B comparisons per optimiser step (ours: batch_size B, packed into rows of --seq tokens, each answer
attending only to itself; TRL: per_device_train_batch_size B, its default padded batch, prompts left-padded,
answers right-padded), beta 0.1, the sigmoid loss, a frozen reference model computed every step (no precomputed
reference log-probabilities on either side), AdamW lr 1e-6, weight decay 0, clipping 1.0, constant rate, fp32,
gradient checkpointing off. The policy, tokenizer and prompts are benchmarks/ppo_step.py's (a random Llama of dim
128, 4 layers, the tiny recipe's 4096-piece tokenizer); the answers are 4 to 40 random words, seeded, so lengths
vary as real preference data does. Each side counts the tokens of its own batches (TRL's chat template is ours,
saved with the tokenizer, so the counts agree; both are printed). The timed steps come after --warmup; the
median seconds per step and the tokens per second over the timed steps are compared.

    .venv/bin/python benchmarks/dpo_step.py --threads 1 [--batch 16] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from _peers import run_sides, run_worker, step_clock  # benchmarks/ is on sys.path when run as a script
from ppo_step import SUBJECTS, add_common_args, passthrough, prepare


def comparisons(texts: list[str], n: int) -> list[dict]:
    rng = random.Random(0)
    words = SUBJECTS + ["the", "and", "of", "a", "very", "some", "with", "under", "over", "near"]
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(4, 40))) + "."  # noqa: E731
    return [{"prompt": texts[i % len(texts)], "chosen": say(), "rejected": say()} for i in range(n)]


def run_ours(args: argparse.Namespace, data: dict, work: Path) -> dict:
    import torch

    from llama2.stages.dpo import DPO, DPORecipe
    from llama2.train.config import OptimConfig

    recipe = DPORecipe(base=str(work / "policy"), out_dir=str(work / "ours-run"), beta=0.1, loss="sigmoid",
                       max_seq_len=args.seq, batch_size=args.batch, epochs=1, max_steps=args.warmup + args.steps,
                       device="cpu", precision="fp32", peak_tflops=1.0, log_every=10**9, eval_every=0,
                       save_every=10**9, optim=OptimConfig(lr=1e-6, weight_decay=0.0, grad_clip=1.0,
                                                           schedule="constant", warmup_steps=0, warmup_ratio=0.0))
    recipe.data.path = str(work / "pairs.jsonl")
    recipe.validate()
    run = DPO(recipe, quiet=True)
    t = run.trainer
    t.start()
    times, tokens = [], []
    for _ in range(args.warmup + args.steps):
        batch = t.batches.next()  # the step's micro-batches, counted here, then trained on
        tokens.append(sum(int(b["lengths"].sum()) for b in batch))
        t0 = time.perf_counter()
        t.backward(batch)
        t.optimizer_step()
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup:]
    return {"step_s": statistics.median(timed), "tokens_per_s": sum(tokens[args.warmup:]) / sum(timed),
            "tokens_per_step": statistics.fmean(tokens[args.warmup:]), "rows": int(batch[0]["tokens"].shape[0]),
            "params": sum(p.numel() for p in t.model.parameters()), "torch": torch.__version__}


def run_trl(args: argparse.Namespace, data: dict, work: Path) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    model = LlamaForCausalLM.from_pretrained(work / "policy", dtype=torch.float32, attn_implementation="sdpa")
    rows = [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines()]
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "chosen": [{"role": "assistant", "content": r["chosen"]}],
                             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    config = DPOConfig(output_dir=str(work / "trl-run"), max_steps=args.warmup + args.steps,
                       per_device_train_batch_size=args.batch, gradient_accumulation_steps=1, beta=0.1,
                       loss_type=["sigmoid"], learning_rate=1e-6, weight_decay=0.0, max_grad_norm=1.0,
                       lr_scheduler_type="constant", warmup_steps=0, logging_steps=10**6, save_strategy="no",
                       eval_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                       gradient_checkpointing=False, disable_tqdm=True, precompute_ref_log_probs=False,
                       max_length=args.seq)
    times: list[float] = []
    trainer = DPOTrainer(model=model, args=config, train_dataset=ds, processing_class=tok,
                         callbacks=[step_clock(times)])
    counted: list[int] = []
    compute = trainer._compute_loss

    def counting(model, inputs, return_outputs):
        counted.append(int(inputs["attention_mask"].sum()))
        return compute(model, inputs, return_outputs)

    trainer._compute_loss = counting  # type: ignore[method-assign]
    trainer.train()
    timed = times[args.warmup:]
    tokens = counted[args.warmup:args.warmup + len(timed)]
    return {"step_s": statistics.median(timed), "tokens_per_s": sum(tokens) / sum(timed),
            "tokens_per_step": statistics.fmean(tokens), "trl": trl.__version__,
            "padding_free": bool(getattr(trainer.args, "padding_free", False)),
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, steps=8)  # ours packs rows of --seq tokens
    p.add_argument("--batch", type=int, default=16, help="comparisons per optimiser step")
    args = p.parse_args()
    if args.worker:
        run_worker(args, {"ours": run_ours, "trl": run_trl}, lambda work: json.loads((work / "data.json").read_text()))
        return
    from llama2.cpu import cpu_banner

    print(cpu_banner(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(work, args)
        pairs = comparisons(data["texts"], args.batch * (args.warmup + args.steps))
        (work / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in pairs))
        print(f"policy dim {args.dim}, {args.layers} layers, {args.heads} heads, vocab {data['vocab']}, context "
              f"{args.seq}; {args.batch} comparisons per step, answers of 4-40 random words; beta 0.1, sigmoid loss, "
              f"reference model every step on both sides; fp32; {args.threads} thread(s); {args.steps} timed steps "
              f"after {args.warmup} warm-up", flush=True)
        results = run_sides(__file__, work, passthrough(args), args.threads, args.only)
    for name, r in results.items():
        extra = f"TRL {r['trl']}, padding_free {r['padding_free']}" if name == "trl" else f"{r['rows']} packed rows"
        print(f"{name:5s}: {r['step_s']:7.3f} s/step (median), {r['tokens_per_s']:8.0f} tokens/s, "
              f"{r['tokens_per_step']:.0f} real tokens per step; {r['params'] / 1e6:.2f}M parameters; peak RSS "
              f"{r['max_rss_mib']:.0f} MiB ({extra})")
    if {"ours", "trl"} <= set(results):
        o, t = results["ours"], results["trl"]
        print(f"ratio (ours / TRL DPOTrainer): {o['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s (goal >= 1.5x)")


if __name__ == "__main__":
    main()
