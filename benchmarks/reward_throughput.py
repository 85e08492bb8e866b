"""Reward-model training throughput: our stage (`llama2.stages.reward.build_reward`: SequenceClassifier, the
ranking loss, PairBatches, the shared Trainer) against TRL's RewardTrainer on the same random model (default dim
256, 4 layers, 4 heads, the tiny 4096-piece vocabulary, context = --seq), the same comparisons, the same pairs in
every step, the same batch (--batch pairs = 2 x batch sequences), optimiser (AdamW lr 1e-5, betas 0.9/0.95, eps
1e-5, weight decay 0.1, clipping 1.0, constant rate), precision and threads, each in its own subprocess, in the
same run. Reports comparisons/s, real (non-padding) tokens/s, seconds per optimiser step and the peak resident
memory (ru_maxrss) of each process, and checks once that both compute the same loss on the first batch at the
same initial weights.

Data: the built-in comparisons (helpfulness + safety, `ensure_comparisons`), encoded as `encode_pair` does (the
completed chat turn, ending at EOS) with the tiny recipe's tokenizer (or a quick one trained here when it is not in
the cache), keeping the pairs whose longer side fits --seq. They are written to a JSONL file, `data.path` of our
recipe; our PairBatches (seed 0) shuffles them and sorts each step's pairs by length, and TRL is given exactly those
pairs, step after step, already tokenised (`chosen_ids` / `rejected_ids` columns, which make RewardTrainer skip its
own tokenisation and EOS handling) with a sequential sampler, so both sides train on identical batches.

What each side does per step:
  ours: batches.next() (collate_pairs; the recipe's default `packing: true`: the 2B sequences packed best-fit
        into rows of --seq tokens, each attending only to itself with positions from 0, so almost nothing is
        padding; `--packing off`: chosen rows then rejected rows right-padded with 0 to the batch's longest, plus
        per-row lengths), one forward, the score head applied only at each sequence's last token, loss
        mean(-log sigmoid(r_c - r_r - m)), backward, clip, fused AdamW. The timed call is trainer.train_step(),
        collation included.
  TRL:  DataCollatorForPreference: chosen rows then rejected rows concatenated into one batch of 2B rows,
        right-padded with pad_token_id (set to 0, <unk>: the token our classifier pads with) to the longest row
        in the batch (pad_to_multiple_of None on CPU), plus an attention mask; one forward of
        LlamaForSequenceClassification (sdpa attention), which applies the score head at every position and picks
        the last non-pad token; loss mean(-log sigmoid(r_c - r_r [- margin])) + center_rewards_coefficient *
        mean((r_c + r_r)^2), where the centering term is off (None, TRL's default); it also gathers reward
        min/mean/max, accuracy and margin metrics (.item()) every step. Timed from on_step_begin to on_step_end
        (forward, backward, clipping, optimiser and scheduler step), so its data loading and collation fall outside
        the timing, unlike ours. RewardConfig defaults to gradient_checkpointing=True and bf16=True; both are set
        explicitly here (checkpointing off, as ours; bf16 only with --precision bf16).

Margin: `--margin none` (default) trains without margins on both sides (TRL adds none unless the data has a
"margin" column); `--margin small` uses the paper's small margin (Table 27) on both sides: ours from the ratings,
TRL through the "margin" column it supports.

    .venv/bin/python benchmarks/reward_throughput.py --threads 1 [--steps 20] [--batch 16] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _peers import run_sides, run_worker, step_clock  # benchmarks/ is on sys.path when run as a script


def find_tokenizer(work: Path, comparisons) -> Path:
    """The tiny recipe's 4096-piece tokenizer when it was built into the cache, else a quick one trained here on
    the comparisons' text."""
    from llama2.train.config import PretrainRecipe
    from llama2.paths import expand_path
    from llama2.recipe import load_recipe

    tiny = load_recipe(PretrainRecipe, Path(__file__).parents[1] / "configs/tiny/pretrain.yaml")
    cached = expand_path(tiny.data.build.dir) / "tokenizer"
    if (cached / "tokenizer.model").is_file():
        return cached
    from llama2.data.tokenizer_training import train_tokenizer

    text = work / "text.jsonl"
    lines = []
    for c in comparisons:
        lines += [m["content"] for m in c.prompt] + [c.chosen, c.rejected]
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    out = work / "trained-tokenizer"
    train_tokenizer([text], 4096, out, quiet=True)
    return out


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """Select and encode the comparisons, write them as our recipe's data file, save the random classifier (the
    base both sides start from) with the tokenizer, and lay out the pairs of every step as our PairBatches will
    draw them (for TRL, and to check that both sides saw the same batches)."""
    import torch

    from llama2.checkpoint import save_checkpoint
    from llama2.classifier import DEFAULT_PAD_ID, SequenceClassifier
    from llama2.config import ModelConfig
    from llama2.data.comparisons import read_comparisons, write_comparisons
    from llama2.reward import encode_pair
    from llama2.stages.reward import EncodedPair, PairBatches
    from llama2.data.comparisons import ensure_comparisons
    from llama2.tokenizer import Tokenizer

    train_path, _ = ensure_comparisons(quiet=True)
    comparisons = read_comparisons(train_path).comparisons
    tok = Tokenizer(find_tokenizer(work, comparisons))
    tok.save(work / "tokenizer")  # with tokenizer_config.json: AutoTokenizer opens it (TRL's processing_class)
    kept = [c for c in comparisons
            if max(len(encode_pair(tok, c.prompt, c.chosen)), len(encode_pair(tok, c.prompt, c.rejected))) <= args.seq]
    write_comparisons(work / "comparisons.jsonl", kept)
    encoded = [EncodedPair(encode_pair(tok, c.prompt, c.chosen), encode_pair(tok, c.prompt, c.rejected), c.rating,
                           c.source) for c in read_comparisons(work / "comparisons.jsonl").comparisons]

    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=tok.vocab_size,
                      max_seq_len=args.seq)
    torch.manual_seed(0)
    save_checkpoint(SequenceClassifier(cfg, pad_id=DEFAULT_PAD_ID), work / "base", kind="classifier", tokenizer=tok)

    total = args.warmup + args.steps
    batches = PairBatches([encoded], [len(encoded)], args.batch, 1, args.margin, seed=0, pad_id=DEFAULT_PAD_ID)
    steps = []
    for _ in range(total):
        (micro,) = batches.next()
        rows = [r[:n].tolist() for r, n in zip(micro["tokens"], micro["lengths"].tolist())]
        n = micro["margin"].shape[0]
        steps.append({"chosen": rows[:n], "rejected": rows[n:], "margin": micro["margin"].tolist()})
    data = {"steps": steps, "vocab": tok.vocab_size, "pairs": len(kept), "skipped": len(comparisons) - len(kept),
            "pad": DEFAULT_PAD_ID}
    torch.save(data, work / "data.pt")
    return data


def _timed(times: list[float], steps: list[dict], args: argparse.Namespace) -> dict:
    t = times[args.warmup:]
    real = [sum(map(len, s["chosen"])) + sum(map(len, s["rejected"])) for s in steps[args.warmup:len(times)]]
    pairs = [len(s["chosen"]) for s in steps[args.warmup:len(times)]]
    return {"pairs_per_s": sum(pairs) / sum(t), "tokens_per_s": sum(real) / sum(t), "step_s": sum(t) / len(t),
            "steps": len(t)}


def _same_batch(micro: dict, step: dict) -> bool:
    """The micro-batch holds exactly the step's sequences (chosen first), padded or packed."""
    from llama2.reward import pad_rows

    want = step["chosen"] + step["rejected"]
    if "read_at" in micro:  # packed: each sequence is the `length` tokens ending at its read_at position
        flat = micro["tokens"].reshape(-1)
        got = [flat[int(e) - int(n) + 1:int(e) + 1].tolist() for e, n in zip(micro["read_at"], micro["lengths"])]
        return got == [list(x) for x in want]
    tokens, lengths = pad_rows(want, 0)
    return (tuple(micro["tokens"].shape) == tuple(tokens.shape) and bool((micro["tokens"] == tokens).all())
            and bool((micro["lengths"] == lengths).all()))


def run_ours(args: argparse.Namespace, data: dict, work: Path) -> dict:
    from llama2.stages.reward import ComparisonDataConfig, RewardRecipe, build_reward
    from llama2.train.config import OptimConfig

    total = args.warmup + args.steps
    recipe = RewardRecipe(base=str(work / "base"), out_dir=str(work / "ours-run"), max_steps=total + 1,
                          batch_size=args.batch, grad_accum=1, device="cpu", precision=args.precision,
                          margin=args.margin, max_seq_len=args.seq, packing=args.packing == "on",
                          log_every=10**9, eval_every=0,
                          save_every=10**9, peak_tflops=1.0,
                          data=ComparisonDataConfig(path=str(work / "comparisons.jsonl")),
                          optim=OptimConfig(lr=1e-5, weight_decay=0.1, grad_clip=1.0, schedule="constant",
                                            warmup_steps=0, warmup_ratio=0.0))
    recipe.validate()
    trainer = build_reward(recipe, quiet=True).trainer
    trainer.start()  # max_steps is above the steps timed and fit() is never called: no checkpoint, no evaluation
    seen: list[list[dict]] = []
    draw = trainer.batches.next

    def recording():
        micro = draw()
        seen.append(micro)
        return micro

    trainer.batches.next = recording  # type: ignore[method-assign]
    times, first_loss = [], None
    for _ in range(total):
        t0 = time.perf_counter()
        stats = trainer.train_step()
        times.append(time.perf_counter() - t0)
        if first_loss is None:
            first_loss = float(stats["loss"])
    out = _timed(times, data["steps"], args)
    same = len(seen) == total and all(len(m) == 1 and _same_batch(m[0], s) for m, s in zip(seen, data["steps"]))
    out.update({"first_loss": first_loss, "same_batches": same})
    return out


def run_trl(args: argparse.Namespace, data: dict, work: Path) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    tok.pad_token = tok.convert_ids_to_tokens(data["pad"])  # <unk> (id 0): what our classifier pads with
    model = LlamaForSequenceClassification.from_pretrained(work / "base", dtype=torch.float32,
                                                           attn_implementation="sdpa")
    steps = data["steps"]
    columns: dict[str, list] = {"chosen_ids": [c for s in steps for c in s["chosen"]],
                                "rejected_ids": [r for s in steps for r in s["rejected"]]}
    if args.margin != "none":
        columns["margin"] = [m for s in steps for m in s["margin"]]
    ds = Dataset.from_dict(columns)
    total = args.warmup + args.steps
    bf16 = args.precision == "bf16"
    config = RewardConfig(output_dir=str(work / "trl-run"), max_steps=total, per_device_train_batch_size=args.batch,
                          gradient_accumulation_steps=1, learning_rate=1e-5, weight_decay=0.1, max_grad_norm=1.0,
                          adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5, lr_scheduler_type="constant",
                          warmup_steps=0, logging_steps=10**6, save_strategy="no", eval_strategy="no",
                          report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0, bf16=bf16, fp16=False,
                          gradient_checkpointing=False, max_length=args.seq, center_rewards_coefficient=None,
                          train_sampling_strategy="sequential", disable_tqdm=True)
    times: list[float] = []

    trainer = RewardTrainer(model=model, args=config, train_dataset=ds, processing_class=tok, callbacks=[step_clock(times)])
    collate = trainer.data_collator
    collated: list[dict] = []

    def recording(features):
        batch = collate(features)
        collated.append({"tokens": batch["input_ids"], "lengths": batch["attention_mask"].sum(1)})
        return batch

    trainer.data_collator = recording
    compute = trainer.compute_loss
    first: list[float] = []

    def first_loss(*a, **k):
        out = compute(*a, **k)
        if not first:
            first.append(float((out[0] if isinstance(out, tuple) else out).detach()))
        return out

    trainer.compute_loss = first_loss  # type: ignore[method-assign]
    kept = len(trainer.train_dataset)
    trainer.train()
    out = _timed(times, steps, args)
    same = kept == len(ds) and len(collated) >= total and all(
        _same_batch(m, s) for m, s in zip(collated, steps))
    pad_ok = bool(model.config.pad_token_id == data["pad"])
    out.update({"first_loss": first[0], "same_batches": same and pad_ok, "trl": trl.__version__,
                "optim": str(trainer.args.optim), "checkpointing": bool(trainer.args.gradient_checkpointing),
                "attn": str(model.config._attn_implementation), "center": trainer.args.center_rewards_coefficient})
    return out


def worker(args: argparse.Namespace) -> None:
    import torch

    run_worker(args, {"ours": run_ours, "trl": run_trl}, lambda work: torch.load(work / "data.pt"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=16, help="comparisons (pairs) per step")
    p.add_argument("--seq", type=int, default=256, help="the longest sequence kept (and the model's context)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast on both sides (needs a CPU with native bf16)")
    p.add_argument("--margin", choices=["none", "small"], default="none",
                   help="per-rating margin on both sides (TRL through its 'margin' column)")
    p.add_argument("--packing", choices=["on", "off"], default="on",
                   help="ours: pack the answers into rows (the recipe's default) or pad each one, as TRL does")
    p.add_argument("--only", choices=["ours", "trl"], default=None)
    p.add_argument("--worker", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from llama2.cpu import cpu_banner, has_native_bf16

    print(cpu_banner())
    if args.precision == "bf16" and not has_native_bf16():
        p.error("--precision bf16 needs a CPU with native bf16 (avx512_bf16 or amx_bf16); this one has neither")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(work, args)
        steps = data["steps"][args.warmup:]
        real = sum(sum(map(len, s["chosen"])) + sum(map(len, s["rejected"])) for s in steps) / len(steps)
        padded = sum(2 * len(s["chosen"]) * max(map(len, s["chosen"] + s["rejected"])) for s in steps) / len(steps)
        print(f"model dim {args.dim}, {args.layers} layers, {args.heads} heads, vocab {data['vocab']}, context "
              f"{args.seq}; {data['pairs']} built-in comparisons fit (skipped {data['skipped']} longer than "
              f"{args.seq}); batch {args.batch} pairs ({2 * args.batch} sequences, {real:.0f} real / {padded:.0f} "
              f"padded tokens per step); {args.precision}; margin {args.margin} on both sides; {args.threads} "
              f"thread(s); {args.steps} timed steps after {args.warmup}; our packing {args.packing}")
        passthrough = [f"--{k}={getattr(args, k)}" for k in ("threads", "steps", "warmup", "batch", "seq", "dim",
                                                            "layers", "heads", "precision", "margin", "packing")]
        results = run_sides(__file__, work, passthrough, args.threads, args.only)
    for name, r in results.items():
        extra = ""
        if name == "trl":
            extra = (f"  (TRL {r['trl']}, optim {r['optim']}, attention {r['attn']}, gradient checkpointing "
                     f"{'on' if r['checkpointing'] else 'off'}, center_rewards_coefficient {r['center']})")
        print(f"{name:5s}: {r['pairs_per_s']:7.1f} comparisons/s, {r['tokens_per_s']:8.0f} tokens/s (real), "
              f"{r['step_s']:6.3f} s/step, peak RSS {r['max_rss_mib']:6.0f} MiB, the planned pairs in every step: "
              f"{'yes' if r['same_batches'] else 'NO'}{extra}")
    if {"ours", "trl"} <= set(results):
        o, t = results["ours"], results["trl"]
        diff = abs(o["first_loss"] - t["first_loss"])
        print(f"loss on the first batch at the initial weights: ours {o['first_loss']:.8f}, TRL {t['first_loss']:.8f} "
              f"(|diff| {diff:.1e}; TRL's loss is the ranking loss alone: no centering term)")
        print(f"ratio (ours / TRL): {o['pairs_per_s'] / t['pairs_per_s']:.2f}x comparisons/s (goal >= 1.5x); "
              f"{t['max_rss_mib'] / o['max_rss_mib']:.2f}x less peak memory")


if __name__ == "__main__":
    main()
