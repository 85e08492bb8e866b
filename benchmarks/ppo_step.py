"""Wall time of one RLHF iteration (rollout + update): our PPO stage (`llama2.stages.ppo.PPO`, one
`trainer.train_step()`) against the closest trainer TRL has, on the same random tiny policy, the same prompts and
the same number of samples per iteration, each side in its own subprocess, in the same run.

TRL 1.16 no longer has a PPO trainer (PPOTrainer is gone); the comparison is with its RLOOTrainer, which has the
same rollout-then-update shape: sample completions, score them, then one policy-gradient update. RLOO (REINFORCE
leave-one-out) needs k >= 2 completions per prompt (its baseline is the mean reward of the other k - 1), so the
two sides are matched in *samples per iteration*: ours answers B*k distinct prompts once each (batch_size = B*k,
mini_batch = B*k: one gradient step per iteration, ppo_epochs 1), TRL answers B prompts k times each
(per_device_train_batch_size = B*k, num_generations = k, gradient_accumulation_steps 1, so steps_per_generation 1
and generation_batch_size B*k; num_iterations 1: one generate + one optimiser step per trainer step). All the
prompts have the same token length, so both sides generate from prompts of identical shape; a random policy
over 4096 pieces almost never samples EOS, so nearly every answer runs to --max-new-tokens on both sides (the mean
answer length is printed).

What each side computes per iteration:
  ours: (generate) encode the prompts with the Llama 2 chat format, sample B*k answers through the one generation
        path (`Generator`: a fixed-slot KV cache, every answer its own seed, temperature 1, top_p 1), decode;
        (score) the programmatic reward, LOGIT + running whitening, the policy's log-probs and the value model's
        per-token values (the ActorCritic forward: two models), the frozen reference pi_0's log-probs (a third
        forward), per-token KL rewards, GAE and advantage whitening; (update) one forward + backward of the
        policy *and* the value model (clipped surrogate + 0.1 x clipped value loss), gradient clipping, one fused
        AdamW step over both models (the value model starts from the policy's backbone, `value_init: policy`).
  TRL:  (generate) apply the tokenizer's chat template (our Llama 2 template, saved with the tokenizer), left-pad,
        `model.generate` (transformers' generate with its dynamic KV cache, do_sample, temperature 1, top_k 0,
        top_p 1; no vLLM, no continuous batching), decode; (score) the old log-probs of the policy and, as beta >
        0 (0.01), the reference model's (two forwards, through TRL's fused LM head), the reward function, the
        sequence-level KL penalty, the leave-one-out baselines, metrics; (update) one forward + backward of the
        policy (the clipped sequence-level objective, plus the entropy TRL always logs), clipping, one AdamW step
        (torch's fused AdamW, transformers' default optimiser on CPU), the constant scheduler.
  So per iteration ours does more model work than TRL: a third forward in scoring (the value model) and a
  backward through two models (the value model is the policy's backbone without the LM head plus a scalar
  head), while TRL trains one model and has no value function (its baseline is the other answers' reward).

Both sides: the same random policy (dim 128, 4 layers, 4 heads by default, the tiny recipe's 4096-piece tokenizer,
context 256), saved once with `save_model` (HF layout) and loaded by TRL with `LlamaForCausalLM.from_pretrained`
(sdpa attention; TRL builds its reference model from the same directory); the same reward, the share of the
letter 'a' among the answer's letters (clipped to [0.01, 0.99]; ours as `scorer=`, TRL as `reward_funcs=[f]`);
AdamW lr 1e-5, betas 0.9/0.95, eps 1e-5, weight decay 0.1, clipping 1.0, constant rate; fp32 (or --precision
bf16: autocast on both sides, only where the CPU has native bf16); gradient checkpointing off on both (TRL's
default is on). The timed iterations come after --warmup ones; the median seconds/iteration of each side is
compared. TRL's iteration is timed from on_step_begin to on_step_end (generate, score, update); its split comes
from wrapping its `_generate` (tokenise + generate + decode) and `_generate_and_score_completions` methods.

    .venv/bin/python benchmarks/ppo_step.py --threads 1 [--batch 8] [--k 4] [--max-new-tokens 32] [--steps 5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from _peers import TRLRolloutClock, run_sides, run_worker, step_clock  # benchmarks/ is on sys.path when run as a script

SUBJECTS = ["apples", "rivers", "stars", "clouds", "bread", "music", "trains", "birds", "maps", "lamps", "boats",
            "coins", "roads", "trees", "books", "cats", "dogs", "shoes", "cars", "fish", "stones", "bells", "kites",
            "doors", "hills", "ships", "clocks", "wolves", "seeds", "waves", "gardens", "horses", "rain", "snow",
            "wind", "fire", "glass", "paper", "salt", "honey", "milk", "cheese", "roses", "bees", "frogs", "owls",
            "bats", "ants", "moons", "planets", "forests", "deserts", "islands", "bridges", "towers", "castles",
            "candles", "mirrors", "pianos", "drums"]
ASKS = ["Tell me about", "Write a poem about", "Describe", "Explain", "List facts about", "Say something about",
        "Give advice about", "Write a story about"]


def a_share(text: str) -> float:
    """The reward of both sides: the share of 'a' among the letters, clipped to [0.01, 0.99] (ours applies LOGIT)."""
    letters = [c for c in text.lower() if c.isalpha()]
    share = letters.count("a") / len(letters) if letters else 0.0
    return min(max(share, 0.01), 0.99)


def find_tokenizer(work: Path) -> Path:
    """The tiny recipe's 4096-piece tokenizer when it was built into the cache, else a quick one trained here."""
    from llama2.train.config import PretrainRecipe
    from llama2.paths import expand_path
    from llama2.recipe import load_recipe

    tiny = load_recipe(PretrainRecipe, Path(__file__).parents[1] / "configs/tiny/pretrain.yaml")
    cached = expand_path(tiny.data.build.dir) / "tokenizer"
    if (cached / "tokenizer.model").is_file():
        return cached
    from llama2.data.dialogues import build_dialogues, read_dialogues
    from llama2.data.tokenizer_training import train_tokenizer

    build_dialogues(work / "dialogues.jsonl", safety=True, quiet=True)
    text = work / "text.jsonl"
    text.write_text("".join(json.dumps({"text": m["content"]}) + "\n"
                            for d in read_dialogues(work / "dialogues.jsonl").dialogues for m in d.messages))
    out = work / "trained-tokenizer"
    train_tokenizer([text], 4096, out, quiet=True)
    return out


def add_common_args(parser: argparse.ArgumentParser, steps: int = 5) -> None:
    """The options every online-RL and preference benchmark shares: threads, the random policy's shape (read by
    prepare), the timed steps, and the side-runner's (--only, and the hidden --worker / --work)."""
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=64, help="size of the prompt pool")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="the model's context")
    parser.add_argument("--steps", type=int, default=steps, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", choices=["ours", "trl"], default=None)
    parser.add_argument("--worker", choices=["ours", "trl"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)


def passthrough(args: argparse.Namespace) -> list[str]:
    """The options a side's subprocess gets: all of them but the side-runner's own."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("only", "worker", "work") and v is not None]


def prepare(work: Path, args: argparse.Namespace) -> dict:
    """The random policy (saved in the HF layout with the tokenizer), and --prompts chat prompts that all encode
    to the same number of tokens (written as our recipe's prompt file and kept for TRL)."""
    import torch

    from llama2.chat import encode_dialog
    from llama2.checkpoint import save_model
    from llama2.config import ModelConfig
    from llama2.model import Transformer
    from llama2.tokenizer import Tokenizer

    tok = Tokenizer(find_tokenizer(work))
    tok.save(work / "tokenizer")
    by_len: dict[int, list[str]] = {}
    for ask, subject in itertools.product(ASKS, SUBJECTS):
        text = f"{ask} {subject}."
        by_len.setdefault(len(encode_dialog(tok, [{"role": "user", "content": text}])), []).append(text)
    length, texts = max(by_len.items(), key=lambda kv: len(kv[1]))
    if len(texts) < args.prompts:
        raise SystemExit(f"only {len(texts)} candidate prompts of one length ({length} tokens); lower --prompts")
    texts = texts[:args.prompts]
    (work / "train.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    (work / "val.jsonl").write_text(json.dumps({"prompt": "Tell me a joke."}) + "\n")
    ids = [encode_dialog(tok, [{"role": "user", "content": t}]) for t in texts]
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=tok.vocab_size,
                      max_seq_len=args.seq)
    torch.manual_seed(0)
    save_model(Transformer(cfg), work / "policy", tok)
    data = {"texts": texts, "ids": ids, "prompt_len": length, "vocab": tok.vocab_size}
    (work / "data.json").write_text(json.dumps(data))
    return data


def _summary(times: list[float], args: argparse.Namespace, parts: dict[str, list[float]], lengths: list[float],
             prompt_lens: list[int]) -> dict:
    t = times[args.warmup:]
    med = statistics.median(t)
    samples = args.batch * args.k
    return {"iter_s": med, "iter_mean_s": statistics.fmean(t), "iters": len(t), "samples_per_s": samples / med,
            "split": {k: statistics.median(v[args.warmup:]) for k, v in parts.items()},
            "answer_len": statistics.fmean(lengths[args.warmup:]) if lengths else float("nan"),
            "prompt_lens": sorted(set(prompt_lens))}


def run_ours(args: argparse.Namespace, data: dict, work: Path) -> dict:
    from llama2.reward import CombinedScores
    from llama2.stages.ppo import PPO, PPORecipe
    from llama2.train.config import OptimConfig

    class AScorer:
        def __call__(self, prompts, responses, is_safety):
            r = [a_share(t) for t in responses]
            return CombinedScores(r, r, r)

    total = args.warmup + args.steps
    n = args.batch * args.k
    recipe = PPORecipe(base=str(work / "policy"), helpfulness_rm=str(work / "none"), safety_rm=str(work / "none"),
                       value_init="policy", out_dir=str(work / "ours-run"), max_steps=total + 1, batch_size=n,
                       mini_batch=n, ppo_epochs=1, beta=0.01, max_new_tokens=args.max_new_tokens, temperature=1.0,
                       top_p=1.0, device="cpu", precision=args.precision, peak_tflops=1.0, log_every=10**9,
                       eval_every=0, save_every=10**9,
                       optim=OptimConfig(lr=1e-5, weight_decay=0.1, grad_clip=1.0, schedule="constant",
                                         warmup_steps=0, warmup_ratio=0.0))
    recipe.prompts.path, recipe.prompts.val_path = str(work / "train.jsonl"), str(work / "val.jsonl")
    recipe.prompts.held_out = 1
    recipe.validate()
    run = PPO(recipe, scorer=AScorer(), quiet=True)
    run.trainer.start()  # fit() is never called: no checkpoint, no evaluation
    prompt_lens: list[int] = []
    same_ids: list[bool] = []
    gen = run.generate

    def recording(prompts, temperature, step):
        out = gen(prompts, temperature, step)
        prompt_lens.extend(len(p) for p in out.prompt_ids)
        same_ids.extend(list(i) == data["ids"][data["texts"].index(p.text)] for i, p in zip(out.prompt_ids, prompts))
        return out

    run.generate = recording  # type: ignore[method-assign]
    times, lengths = [], []
    parts: dict[str, list[float]] = {"generate": [], "score": [], "update": []}
    rewards, kls = [], []
    for _ in range(total):
        t0 = time.perf_counter()
        stats = run.trainer.train_step()
        times.append(time.perf_counter() - t0)
        for k in parts:
            parts[k].append(float(stats[f"time_{k}"]))
        lengths.append(float(stats["response_length"]))
        rewards.append(float(stats["reward"]))
        kls.append(float(stats["kl"]))
    out = _summary(times, args, parts, lengths, prompt_lens)
    out.update({"reward": rewards, "kl": kls, "same_prompt_ids": all(same_ids),
                "params": sum(p.numel() for p in run.trainer.model.parameters()),
                "policy_params": sum(p.numel() for p in run.trainer.model.policy.parameters())})
    return out


def trl_inputs(work: Path, data: dict) -> tuple[Any, Any, Any, Any, list[float]]:
    """TRL's side of an online-RL benchmark: the tokenizer (pad = unk, id 0), the policy in transformers (fp32,
    sdpa), the prompts as a conversational dataset, and the reward function (the share of 'a') with the list it
    appends each batch's mean reward to."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token  # id 0: only ever left of a prompt or right of an answer, masked out
    model = LlamaForCausalLM.from_pretrained(work / "policy", dtype=torch.float32, attn_implementation="sdpa")
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": t}] for t in data["texts"]]})
    mean_rewards: list[float] = []

    def a_reward(completions, **kwargs):
        r = [a_share((c[0]["content"] if isinstance(c, list) else c).strip()) for c in completions]
        mean_rewards.append(statistics.fmean(r))
        return r

    return tok, model, ds, a_reward, mean_rewards


def run_trl(args: argparse.Namespace, data: dict, work: Path) -> dict:
    import trl
    from trl import RLOOConfig, RLOOTrainer

    tok, model, ds, a_reward, mean_rewards = trl_inputs(work, data)
    total = args.warmup + args.steps
    n = args.batch * args.k
    bf16 = args.precision == "bf16"
    config = RLOOConfig(output_dir=str(work / "trl-run"), max_steps=total, per_device_train_batch_size=n,
                        gradient_accumulation_steps=1, num_generations=args.k, num_iterations=1,
                        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                        beta=0.01, use_vllm=False, use_transformers_continuous_batching=False,
                        learning_rate=1e-5, weight_decay=0.1, max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.95,
                        adam_epsilon=1e-5, lr_scheduler_type="constant", warmup_steps=0, logging_steps=10**6,
                        save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, seed=0,
                        dataloader_num_workers=0, bf16=bf16, fp16=False, gradient_checkpointing=False,
                        disable_tqdm=True, log_completions=False)
    times: list[float] = []

    trainer = RLOOTrainer(model=model, reward_funcs=[a_reward], args=config, train_dataset=ds,
                          processing_class=tok, callbacks=[step_clock(times)])
    model_generate_calls = [0]
    hf_generate = model.generate

    def counting_generate(*a, **k):
        model_generate_calls[0] += 1
        return hf_generate(*a, **k)

    model.generate = counting_generate  # type: ignore[method-assign]
    clock = TRLRolloutClock(trainer)
    trainer.train()
    out = _summary(times, args, clock.parts(times), clock.lengths, [len(p) for p in clock.prompt_ids])
    known = {tuple(i) for i in data["ids"]}
    ref = trainer.ref_model
    out.update({"trl": trl.__version__, "optim": str(trainer.args.optim),
                "attn": str(model.config._attn_implementation),
                "checkpointing": bool(trainer.args.gradient_checkpointing), "vllm": bool(trainer.use_vllm),
                "steps_per_generation": trainer.args.steps_per_generation,
                "generation_batch_size": trainer.args.generation_batch_size, "num_iterations": trainer.num_iterations,
                "generate_calls": model_generate_calls[0], "score_calls": len(clock.rollout_s), "steps": len(times),
                "same_prompt_ids": all(tuple(p) in known for p in clock.prompt_ids),
                "ref_model": ref is not None and type(ref).__name__, "beta": trainer.beta,
                "params": sum(p.numel() for p in model.parameters()),
                "reward": mean_rewards})
    return out


def worker(args: argparse.Namespace) -> None:
    run_worker(args, {"ours": run_ours, "trl": run_trl}, lambda work: json.loads((work / "data.json").read_text()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--batch", type=int, default=8, help="B: prompts per iteration on TRL's side (x k answers)")
    p.add_argument("--k", type=int, default=4, help="answers per prompt for RLOO (>= 2); ours answers B*k prompts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: autocast on both sides (needs a CPU with native bf16)")
    args = p.parse_args()
    if args.k < 2:
        p.error("--k must be >= 2 (RLOO's leave-one-out baseline needs two answers per prompt)")
    if args.batch * args.k > args.prompts:
        p.error(f"--batch x --k ({args.batch * args.k}) must not exceed --prompts ({args.prompts}): ours answers "
                "that many distinct prompts per iteration")
    if args.worker:
        worker(args)
        return
    from llama2.cpu import cpu_banner

    print(cpu_banner(), flush=True)
    if args.precision == "bf16" and "avx512_bf16" not in cpu_banner() and "amx_bf16" not in cpu_banner():
        print("warning: this CPU has no native bf16 (avx512_bf16 / amx_bf16); bf16 is emulated and slow")
    n = args.batch * args.k
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare(work, args)
        print(f"policy dim {args.dim}, {args.layers} layers, {args.heads} heads, vocab {data['vocab']}, context "
              f"{args.seq}; {args.prompts} chat prompts of {data['prompt_len']} tokens each (Llama 2 chat format); "
              f"{n} samples per iteration (ours: {n} prompts x 1 answer, batch_size = mini_batch = {n}; TRL RLOO: "
              f"{args.batch} prompts x k={args.k} answers); max_new_tokens {args.max_new_tokens}, temperature 1.0; "
              f"AdamW lr 1e-5 wd 0.1 clip 1.0, one optimiser step per iteration; beta 0.01 (KL to the reference "
              f"on both sides); {args.precision}; {args.threads} thread(s); median of {args.steps} iterations "
              f"after {args.warmup} warm-up", flush=True)
        print("TRL 1.16 has no PPO trainer: the comparison is with RLOOTrainer (REINFORCE leave-one-out, k answers "
              "per prompt, rollout-then-update), which trains no value model", flush=True)
        results = run_sides(__file__, work, passthrough(args), args.threads, args.only)
    for name, r in results.items():
        s = r["split"]
        print(f"{name:5s}: {r['iter_s']:7.3f} s/iteration (median; mean {r['iter_mean_s']:.3f}), "
              f"{r['samples_per_s']:6.1f} samples/s; generate {s['generate']:.3f} s, score {s['score']:.3f} s, "
              f"update {s['update']:.3f} s; answers {r['answer_len']:.1f} tokens on average, prompt lengths "
              f"{r['prompt_lens']}; {r['params'] / 1e6:.2f}M trained parameters; peak RSS {r['max_rss_mib']:.0f} MiB")
        if name == "ours":
            print(f"       (policy {r['policy_params'] / 1e6:.2f}M + value model "
                  f"{(r['params'] - r['policy_params']) / 1e6:.2f}M; prompt ids = encode_dialog's: "
                  f"{'yes' if r['same_prompt_ids'] else 'NO'}; reward per iteration "
                  f"{[round(x, 3) for x in r['reward']]}, KL {[round(x, 3) for x in r['kl']]})")
        else:
            print(f"       (TRL {r['trl']}, optim {r['optim']}, attention {r['attn']}, gradient checkpointing "
                  f"{'on' if r['checkpointing'] else 'off'}, vLLM {'on' if r['vllm'] else 'off'}; "
                  f"steps_per_generation {r['steps_per_generation']}, generation_batch_size "
                  f"{r['generation_batch_size']}, num_iterations {r['num_iterations']}: {r['generate_calls']} "
                  f"model.generate calls and {r['score_calls']} rollouts for {r['steps']} optimiser steps; "
                  f"reference model {r['ref_model']} (beta {r['beta']}); prompt ids = ours: "
                  f"{'yes' if r['same_prompt_ids'] else 'NO'}; reward per iteration "
                  f"{[round(x, 3) for x in r['reward']]})")
    if {"ours", "trl"} <= set(results):
        o, t = results["ours"], results["trl"]
        print(f"ratio (ours / TRL): {t['iter_s'] / o['iter_s']:.2f}x iterations/s (goal >= 2x); by part (TRL's "
              f"seconds / ours): generate {t['split']['generate'] / o['split']['generate']:.2f}x, score "
              f"{t['split']['score'] / o['split']['score']:.2f}x, update "
              f"{t['split']['update'] / o['split']['update']:.2f}x")


if __name__ == "__main__":
    main()
