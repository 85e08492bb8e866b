"""SFT training throughput: our stage (packed rows, block-diagonal attention, assistant-only loss through the fused
LM head, the shared Trainer) against TRL's SFTTrainer (BFD packing, which TRL runs padding-free: every batch
flattened into one row with position_ids restarting per dialogue; labels -100 outside the assistant masks) on the
same random model (default dim 256, 4 layers, vocab 32000), the same tokenised built-in dialogues, the same
batch (rows of max_length tokens), optimiser (AdamW, lr 2e-5, weight decay 0.1, clipping 1.0) and threads, each
in its own subprocess, in the same run. Reports tokens/s (every real token processed, prompts included), the
trained (assistant) tokens per step, and the peak resident memory (ru_maxrss) of each process. It also checks, on
one packed TRL batch, whether transformers' sdpa attention kept the dialogues apart (position_ids-based
packed-sequence detection) and prints the answer.

    .venv/bin/python benchmarks/sft_throughput.py --threads 1 [--steps 20] [--batch 4] [--seq 512]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _peers import run_sides, run_worker, step_clock  # benchmarks/ is on sys.path when run as a script


def prepare(work: Path, seq: int) -> Path:
    """Tokenise the built-in dialogues once (the tiny 4096-piece tokenizer, built into the cache if needed, or a
    quick one trained here) and store ids + masks for both runners."""
    import torch

    from llama2.chat import encode_dialog_for_training
    from llama2.data.dialogues import build_dialogues, read_dialogues
    from llama2.tokenizer import Tokenizer
    build_dialogues(work / "dialogues.jsonl", safety=True, quiet=True)
    dialogues = read_dialogues(work / "dialogues.jsonl").dialogues
    from llama2.train.config import PretrainRecipe
    from llama2.paths import expand_path
    from llama2.recipe import load_recipe

    tiny = load_recipe(PretrainRecipe, Path(__file__).parents[1] / "configs/tiny/pretrain.yaml")
    cached = expand_path(tiny.data.build.dir) / "tokenizer"  # the tiny recipe's tokenizer, when it was built
    if (cached / "tokenizer.model").is_file():
        tok_dir = cached
    else:
        from llama2.data.tokenizer_training import train_tokenizer

        text = work / "text.jsonl"
        text.write_text("".join(json.dumps({"text": m["content"]}) + "\n" for d in dialogues for m in d.messages))
        tok_dir = work / "tokenizer"
        train_tokenizer([text], 4096, tok_dir, quiet=True)
    tok = Tokenizer(tok_dir)
    tok.save(work / "tokenizer")  # with tokenizer_config.json: AutoTokenizer opens it (TRL's processing_class)
    ids, masks = [], []
    for d in dialogues:
        i, m = encode_dialog_for_training(tok, d.messages)
        if len(i) <= seq:
            ids.append(i)
            masks.append([int(x) for x in m])
    torch.save({"ids": ids, "masks": masks, "eos": tok.eos_id, "bos": tok.bos_id}, work / "data.pt")
    return work / "data.pt"


def _timed(step_times: list[float], tokens: list[float], trained: list[float], warmup: int) -> dict:
    t, n = step_times[warmup:], tokens[warmup:]
    return {"tokens_per_s": sum(n) / sum(t), "step_s": sum(t) / len(t), "tokens_per_step": sum(n) / len(n),
            "trained_per_step": sum(trained[warmup:]) / len(n), "steps": len(t)}


def run_ours(args: argparse.Namespace, data: dict, work: Path) -> dict:
    import numpy as np

    from llama2.config import ModelConfig
    from llama2.model import Transformer
    from llama2.stages.sft import Example, SFTBatches, sft_loss
    from llama2.train.config import OptimConfig, TrainRecipe
    from llama2.train.loop import Trainer

    examples = [Example(np.asarray(i, dtype=np.int64), np.asarray(m, dtype=bool))
                for i, m in zip(data["ids"], data["masks"])]
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=args.vocab,
                      max_seq_len=args.seq)
    total = args.warmup + args.steps
    recipe = TrainRecipe(out_dir=str(work / "ours-run"), max_steps=total, batch_size=args.batch, device="cpu",
                         precision="fp32", log_every=10**9, peak_tflops=1.0,
                         optim=OptimConfig(lr=2e-5, weight_decay=0.1, warmup_steps=0, grad_clip=1.0))
    batches = SFTBatches(examples, args.seq, args.batch, 1, seed=0, pad_id=data["eos"])
    trainer = Trainer(recipe, lambda: Transformer(cfg), sft_loss, batches, quiet=True)
    trainer.start()
    times, tokens, trained = [], [], []
    for _ in range(total):
        micro = batches.next()
        trained.append(float(sum(int((b["labels"] != -100).sum()) for b in micro)))
        t0 = time.perf_counter()
        stats = trainer.train_step(micro)
        times.append(time.perf_counter() - t0)
        tokens.append(float(stats["tokens"]))
    return _timed(times, tokens, trained, args.warmup)


def run_trl(args: argparse.Namespace, data: dict, work: Path) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=_hidden(args.dim),
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.heads, max_position_embeddings=args.seq, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, pad_token_id=data["eos"], bos_token_id=data["bos"],
                      eos_token_id=data["eos"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    ds = Dataset.from_dict({"input_ids": data["ids"], "assistant_masks": data["masks"]})
    total = args.warmup + args.steps
    config = SFTConfig(output_dir=str(work / "trl-run"), max_steps=total, per_device_train_batch_size=args.batch,
                       packing=True, packing_strategy="bfd", max_length=args.seq, learning_rate=2e-5,
                       weight_decay=0.1, max_grad_norm=1.0, lr_scheduler_type="cosine", warmup_steps=0,
                       logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                       dataloader_num_workers=0, bf16=False, fp16=False, dataset_num_proc=None)
    times: list[float] = []

    trainer = SFTTrainer(model=model, args=config, train_dataset=ds, processing_class=tok, callbacks=[step_clock(times)])
    tokens: list[float] = []
    trained: list[float] = []
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        tokens.append(float(batch["input_ids"].numel()))
        trained.append(float((batch["labels"] != -100).sum()))
        return batch

    trainer.data_collator = counting
    isolated = _trl_isolates_dialogues(trainer, collate, model)
    trainer.train()
    out = _timed(times, tokens[:len(times)], trained[:len(times)], args.warmup)
    out.update({"trl": trl.__version__, "padding_free": bool(trainer.padding_free), "isolated": isolated})
    return out


def _trl_isolates_dialogues(trainer, collate, model) -> bool | None:
    """On one packed padding-free batch: the second dialogue's logits equal those of the dialogue run alone
    (so it did not attend to the first); None when the batch holds a single dialogue (not checked)."""
    import torch

    feats = [trainer.train_dataset[i] for i in range(2)]
    batch = collate(feats)
    pos = batch["position_ids"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    if len(starts) < 2:
        return None
    a, b = starts[1], starts[2] if len(starts) > 2 else len(pos)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, a:b]
        alone = model(input_ids=batch["input_ids"][:, a:b]).logits[0]
    return bool((packed - alone).abs().max() < 1e-3)


def _hidden(dim: int) -> int:
    from llama2.config import ModelConfig

    return ModelConfig(dim=dim, n_layers=1, n_heads=8, vocab_size=256, max_seq_len=8).hidden_dim


def worker(args: argparse.Namespace) -> None:
    import torch

    run_worker(args, {"ours": run_ours, "trl": run_trl}, lambda work: torch.load(work / "data.pt"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="rows per step")
    p.add_argument("--seq", type=int, default=512, help="row length (max_length)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--only", choices=["ours", "trl"], default=None)
    p.add_argument("--worker", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    from llama2.cpu import cpu_banner

    print(cpu_banner())
    print(f"model dim {args.dim}, {args.layers} layers, vocab {args.vocab}; batch {args.batch} rows x {args.seq} "
          f"tokens; {args.threads} thread(s); {args.steps} timed steps after {args.warmup}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.seq)
        passthrough = [f"--{k}={getattr(args, k)}" for k in ("threads", "steps", "warmup", "batch", "seq", "dim",
                                                            "layers", "heads", "vocab")]
        results = run_sides(__file__, work, passthrough, args.threads, args.only)
    for name, r in results.items():
        extra = ""
        if name == "trl":
            extra = (f"  (TRL {r['trl']}, padding_free={r['padding_free']}, dialogues kept apart by sdpa: "
                     f"{ {True: 'yes', False: 'NO', None: 'not checked'}[r['isolated']] })")
        print(f"{name:5s}: {r['tokens_per_s']:8.0f} tokens/s, {r['step_s'] * 1000:7.1f} ms/step, "
              f"{r['tokens_per_step']:6.0f} tokens ({r['trained_per_step']:5.0f} trained) per step, peak RSS "
              f"{r['max_rss_mib']:6.0f} MiB{extra}")
    if {"ours", "trl"} <= set(results):
        o, t = results["ours"], results["trl"]
        print(f"ours / TRL: {o['tokens_per_s'] / t['tokens_per_s']:.2f}x tokens/s, "
              f"{t['max_rss_mib'] / o['max_rss_mib']:.2f}x less peak memory")


if __name__ == "__main__":
    main()
