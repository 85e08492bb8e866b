"""Wall time of one GRPO iteration (sample K answers to each of B prompts, score them, one policy update): our GRPO
stage (`llama2.stages.grpo.GRPO`, one `trainer.train_step()`) against TRL's `GRPOTrainer`, on the same random tiny
policy, the same prompts, the same B x K answers per iteration, each side in its own subprocess, in the same run.

Both sides: B prompts x K answers (ours: batch_size B, group_size K, mini_batch B*K: one optimiser step per
iteration, epochs 1; TRL: per_device_train_batch_size B*K, num_generations K, gradient_accumulation_steps 1,
num_iterations 1), temperature 1, top_p 1 (TRL: top_k 0), beta 0.04 with a frozen reference model on both sides,
clip 0.2, the `grpo` loss (per-answer mean, then the mean over answers; TRL's default is `dapo`, set to `grpo`
here), group-scaled advantages, the reward the share of the letter 'a' (ours passes LOGIT of it, a monotone
transform that changes nothing in time), AdamW lr 1e-5, betas 0.9/0.95, eps 1e-5, weight decay 0.1, clipping 1.0,
constant rate, fp32 (or --precision bf16 where the CPU has native bf16), gradient checkpointing off, no vLLM. The
policy, prompts and tokenizer are benchmarks/ppo_step.py's (a random Llama of dim 128, 4 layers, the tiny
recipe's 4096-piece tokenizer; all prompts of one token length). A random policy rarely samples EOS, so nearly
every answer runs to --max-new-tokens on both sides (the mean answer length is printed). The timed iterations come
after --warmup; the median seconds/iteration of each side is compared.

What each side computes per iteration:
  ours: (generate) encode, sample B*K answers through the one generation path (a fixed-slot KV cache, every answer
        its own seed); (score) the reward, the policy's and the reference's log-probabilities (two forwards),
        group advantages; (update) one forward + backward of the policy with the k3 KL, clipping, one AdamW step.
  TRL:  (generate) the chat template, left padding, transformers' `generate` (dynamic cache, no continuous
        batching); (score) the reward function, the reference's log-probabilities (with num_iterations 1 TRL skips
        the old policy's forward), advantages; (update) one forward + backward (through its fused LM head, with
        entropy), clipping, AdamW.

    .venv/bin/python benchmarks/grpo_step.py --threads 1 [--batch 4] [--k 8] [--max-new-tokens 32] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _peers import TRLRolloutClock, run_sides, run_worker, step_clock  # benchmarks/ is on sys.path when run as a script
from ppo_step import _summary, a_share, add_common_args, passthrough, prepare, trl_inputs


def run_ours(args: argparse.Namespace, data: dict, work: Path) -> dict:
    from llama2.reward import CombinedScores
    from llama2.stages.grpo import GRPO, GRPORecipe
    from llama2.train.config import OptimConfig

    class AScorer:
        def __call__(self, prompts, responses, is_safety):
            r = [a_share(t) for t in responses]
            return CombinedScores(r, r, r)

    total = args.warmup + args.steps
    recipe = GRPORecipe(base=str(work / "policy"), helpfulness_rm=str(work / "none"), safety_rm=str(work / "none"),
                        out_dir=str(work / "ours-run"), max_steps=total + 1, batch_size=args.batch,
                        group_size=args.k, mini_batch=args.batch * args.k, epochs=1, beta=0.04, clip=0.2,
                        loss="grpo", max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0, device="cpu",
                        precision=args.precision, peak_tflops=1.0, log_every=10**9, eval_every=0,
                        save_every=10**9,
                        optim=OptimConfig(lr=1e-5, weight_decay=0.1, grad_clip=1.0, schedule="constant",
                                          warmup_steps=0, warmup_ratio=0.0))
    recipe.prompts.path, recipe.prompts.val_path = str(work / "train.jsonl"), str(work / "val.jsonl")
    recipe.prompts.held_out = 1
    recipe.validate()
    run = GRPO(recipe, scorer=AScorer(), quiet=True)
    run.trainer.start()  # fit() is never called: no checkpoint, no evaluation
    times, lengths, rewards = [], [], []
    parts: dict[str, list[float]] = {"generate": [], "score": [], "update": []}
    for _ in range(total):
        t0 = time.perf_counter()
        stats = run.trainer.train_step()
        times.append(time.perf_counter() - t0)
        for k in parts:
            parts[k].append(float(stats[f"time_{k}"]))
        lengths.append(float(stats["response_length"]))
        rewards.append(float(stats["reward"]))
    out = _summary(times, args, parts, lengths, [data["prompt_len"]])
    out.update({"reward": rewards, "params": sum(p.numel() for p in run.trainer.model.parameters())})
    return out


def run_trl(args: argparse.Namespace, data: dict, work: Path) -> dict:
    import trl
    from trl import GRPOConfig, GRPOTrainer

    tok, model, ds, a_reward, mean_rewards = trl_inputs(work, data)
    total = args.warmup + args.steps
    n = args.batch * args.k
    config = GRPOConfig(output_dir=str(work / "trl-run"), max_steps=total, per_device_train_batch_size=n,
                        gradient_accumulation_steps=1, num_generations=args.k, num_iterations=1,
                        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.04,
                        epsilon=0.2, loss_type="grpo", scale_rewards="group", use_vllm=False,
                        use_transformers_continuous_batching=False, learning_rate=1e-5, weight_decay=0.1,
                        max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-5,
                        lr_scheduler_type="constant", warmup_steps=0, logging_steps=10**6, save_strategy="no",
                        eval_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                        bf16=args.precision == "bf16", fp16=False, gradient_checkpointing=False, disable_tqdm=True,
                        log_completions=False)
    times: list[float] = []
    trainer = GRPOTrainer(model=model, reward_funcs=[a_reward], args=config, train_dataset=ds, processing_class=tok,
                          callbacks=[step_clock(times)])
    clock = TRLRolloutClock(trainer)
    trainer.train()
    out = _summary(times, args, clock.parts(times), clock.lengths, [data["prompt_len"]])
    out.update({"trl": trl.__version__, "loss_type": trainer.loss_type, "beta": trainer.beta,
                "ref_model": type(trainer.ref_model).__name__ if trainer.ref_model is not None else None,
                "num_generations": trainer.num_generations, "rollouts": len(clock.rollout_s), "steps": len(times),
                "params": sum(p.numel() for p in model.parameters()), "reward": mean_rewards})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--batch", type=int, default=4, help="B: prompts per iteration (each answered K times)")
    p.add_argument("--k", type=int, default=8, help="K: answers per prompt")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    args = p.parse_args()
    if args.k < 2:
        p.error("--k must be >= 2 (a group's advantages compare its answers)")
    if args.worker:
        run_worker(args, {"ours": run_ours, "trl": run_trl}, lambda work: json.loads((work / "data.json").read_text()))
        return
    from llama2.cpu import cpu_banner

    print(cpu_banner(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(work, args)
        print(f"policy dim {args.dim}, {args.layers} layers, {args.heads} heads, vocab {data['vocab']}, context "
              f"{args.seq}; {args.batch} prompts x K={args.k} answers per iteration, prompts of {data['prompt_len']} "
              f"tokens; max_new_tokens {args.max_new_tokens}, temperature 1.0; beta 0.04 (reference model on both "
              f"sides), loss grpo, one AdamW step per iteration; {args.precision}; {args.threads} thread(s); median "
              f"of {args.steps} iterations after {args.warmup} warm-up", flush=True)
        results = run_sides(__file__, work, passthrough(args), args.threads, args.only)
    for name, r in results.items():
        s = r["split"]
        extra = (f"TRL {r['trl']}, loss {r['loss_type']}, beta {r['beta']}, reference {r['ref_model']}, "
                 f"{r['rollouts']} rollouts for {r['steps']} steps" if name == "trl" else "")
        print(f"{name:5s}: {r['iter_s']:7.3f} s/iteration (median; mean {r['iter_mean_s']:.3f}), "
              f"{r['samples_per_s']:6.1f} answers/s; generate {s['generate']:.3f} s, score {s['score']:.3f} s, "
              f"update {s['update']:.3f} s; answers {r['answer_len']:.1f} tokens on average; "
              f"{r['params'] / 1e6:.2f}M parameters; peak RSS {r['max_rss_mib']:.0f} MiB {extra}")
    if {"ours", "trl"} <= set(results):
        o, t = results["ours"], results["trl"]
        print(f"ratio (ours / TRL GRPOTrainer): {t['iter_s'] / o['iter_s']:.2f}x iterations/s (goal >= 2x); by "
              f"part (TRL's seconds / ours): generate {t['split']['generate'] / o['split']['generate']:.2f}x, "
              f"score {t['split']['score'] / o['split']['score']:.2f}x, update "
              f"{t['split']['update'] / o['split']['update']:.2f}x")


if __name__ == "__main__":
    main()
