"""GRPO (beyond the paper): group-relative policy optimisation, PPO without a value model. For each prompt the
policy answers K times; an answer's advantage is its reward against the others of its group,

    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)        (scale_rewards: group; batch: the batch's std;
                                                                 none: no division)

the same advantage on every token of the answer, and the policy minimises the clipped surrogate with a KL penalty
to the frozen starting policy pi_0 added to the loss (not to the reward, as PPO does):

    loss_t = -min(rho_t A, clip(rho_t, 1 - clip, 1 + clip_high) A) + beta * (exp(q_t) - q_t - 1),
    rho_t = pi_theta / pi_old,  q_t = log pi_0 - log pi_theta                    (the k3 estimator of the KL)

averaged per answer then over answers (`loss: grpo`, DeepSeekMath's form), over every token of the mini-batch
(`loss: token`, DAPO's), or summed per answer over max_new_tokens (`loss: dr_grpo`). The rewards come from the
two reward models (`reward: rm`: LOGIT(R_c), the paper's combined reward on the logit scale) or, in the built-in
world, from the gold judge itself (`reward: gold`, a verifiable reward: 0.7 correct + 0.2 concise + 0.1 tidy).

Each iteration (one Trainer step): `batch_size` prompts x `group_size` answers through the one generation path
(each answer its own seed), scored without gradients (rewards, pi_old's and pi_0's log-probabilities with the
sampling temperature), then `epochs` passes of mini-batches of `mini_batch` answers, one AdamW step each.
metrics.jsonl gets reward (mean), reward_std (within groups), uniform_groups (share of groups whose rewards all
equal: no signal), kl (k3 summed per answer), policy_loss, clip_frac, approx_kl, response_length, truncated, the
times spent, and every eval_every iterations heldout_reward (greedy answers to held-out prompts, mean reward).

    recipe = load_recipe(GRPORecipe, "configs/world/grpo.yaml")
    result = pipeline.run(recipe)            # builds the SFT model (and the RMs for reward: rm) when missing
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..checkpoint import load_checkpoint
from ..checkpoint.runs import require_checkpoint
from ..data.prompts import PromptItem, PromptsSpec, load_prompt_sets, prompt_key, sample_seed, take
from ..data.world.tools import check_tools, world_toolbox
from ..errors import Llama2Error
from ..eval.gold import GoldReward
from ..inference.remote import check_rollout_engine
from ..inference.scoring import sequence_logprobs
from ..model import Transformer
from ..recipe import check
from ..reward import SAFETY_THRESHOLD, check_reward_models, logit, reward_models
from ..train.config import OptimConfig, TrainRecipe
from ..train.distributed import all_gather_object, all_reduce_sum
from ..train.loop import HFCheckpointIO, LossOutput, Trainer, TrainResult
from ..train.metrics import read_metrics
from .ppo import (Answers, PromptBatches, RolloutServer, Scorer, pad_rollout, policy_start, reward_kl_figure,
                  sample_answers)

WORLD = "builtin:world/"  # the gold reward's prompts come from the built-in world
STD_EPS = 1e-4  # added to the standard deviation that scales the advantages (as TRL's GRPOTrainer)

# ---------------------------------------------------------------------------------------------------------------
# The pieces of the objective (tested against hand-computed examples and TRL's GRPOTrainer)


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", batch_std: Tensor | None = None
                     ) -> Tensor:
    """(N,) rewards of N = prompts x group_size answers, grouped consecutively -> (N,) advantages: the reward
    minus its group's mean, divided by the group's standard deviation (`group`, unbiased, + 1e-4), the whole
    batch's (`batch`: `batch_std` when the batch spans processes, else these rewards'), or not at all (`none`)."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise Llama2Error(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = (grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1]))
        std = std.expand_as(grouped).reshape(-1)
    elif scale == "batch":
        std = batch_std if batch_std is not None else rewards.std() if rewards.numel() > 1 else torch.zeros(())
    else:
        raise Llama2Error(f"scale_rewards must be group, batch or none, got {scale!r}")
    return centred / (std + STD_EPS)


def grpo_loss(logprobs: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor | None, advantages: Tensor,
              mask: Tensor, *, clip: float, clip_high: float, beta: float, form: str = "grpo",
              max_new_tokens: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO loss over (B, N) action positions (the module docstring), with the clip fraction, the approximate
    KL to the rollout's policy and the mean k3 KL to pi_0. advantages: (B,) one per answer."""
    m = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs) * m
    ratio = log_ratio.exp()
    a = advantages.to(logprobs.dtype).unsqueeze(1)
    per_token = -torch.minimum(ratio * a, ratio.clamp(1 - clip, 1 + clip_high) * a)
    kl = torch.zeros_like(per_token)
    if beta and ref_logprobs is not None:
        q = (ref_logprobs - logprobs) * m
        kl = q.exp() - q - 1
        per_token = per_token + beta * kl
    n = m.sum().clamp(min=1)
    if form == "grpo":
        loss = ((per_token * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)).mean()
    elif form == "token":
        loss = (per_token * m).sum() / n
    elif form == "dr_grpo":
        loss = (per_token * m).sum() / (m.shape[0] * max(max_new_tokens, 1))
    else:
        raise Llama2Error(f"loss must be grpo, token or dr_grpo, got {form!r}")
    low, high = (ratio < 1 - clip) & (a < 0), (ratio > 1 + clip_high) & (a > 0)
    stats = {"clip_frac": (((low | high).to(m.dtype)) * m).sum() / n,
             "approx_kl": (((ratio - 1) - log_ratio) * m).sum() / n, "kl_ref": (kl * m).sum() / n}
    return loss, stats


def answers_start(mask: Tensor) -> int:
    """The first action position holding an answer token in any row (the shortest prompt's length - 1): the
    log-probabilities before it are never needed."""
    return int(mask.any(dim=0).float().argmax())


# ---------------------------------------------------------------------------------------------------------------
# The recipe


def _grpo_optim() -> OptimConfig:
    return OptimConfig(lr=1e-6, weight_decay=0.1, schedule="constant", warmup_steps=0)


@dataclass
class GRPORecipe(TrainRecipe):
    """`llama2 rlhf grpo`: see configs/tiny/grpo.yaml and the module docstring. max_steps = iterations;
    batch_size = prompts per iteration (each answered group_size times); mini_batch = answers per gradient step."""

    base: str = ""  # the policy to start from (also pi_0): an SFT or rejection-sampling checkpoint
    base_recipe: str | None = None  # an SFT recipe that builds `base` when it is missing
    reward: Literal["rm", "gold"] = "rm"  # the two reward models (LOGIT(R_c)), or the world's gold judge
    helpfulness_rm: str = ""  # reward: rm
    helpfulness_rm_recipe: str | None = None
    safety_rm: str = ""
    safety_rm_recipe: str | None = None
    out_dir: str = "runs/grpo"
    max_steps: int = 200  # iterations
    batch_size: int = 64  # prompts per iteration
    group_size: int = 8  # K answers per prompt
    mini_batch: int = 128  # answers per gradient step
    epochs: int = 1  # passes over each iteration's answers (TRL's num_iterations)
    beta: float = 0.04  # KL penalty to pi_0 in the loss (DeepSeekMath's value; 0 skips the reference model)
    clip: float = 0.2  # ratio clip below (and above, unless clip_high)
    clip_high: float | None = None  # DAPO's higher upper clip (e.g. 0.28); null: = clip
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss: Literal["grpo", "token", "dr_grpo"] = "grpo"
    temperature: float = 1.0  # sampling temperature of the answers (and of every log-probability)
    top_p: float = 1.0
    max_new_tokens: int = 128  # longest answer (tool results included)
    tools: list[str] = field(default_factory=list)  # tools the policy may call (calculator, search), as in PPO
    # rollouts through our engine, or through vLLM (vllm_mode: a server, or colocated), whose weights the
    # stage replaces after every update
    rollout_engine: Literal["ours", "vllm"] = "ours"
    # rollout_engine vllm: a vLLM server started separately (at vllm_url), or vLLM colocated in the stage's own
    # processes (llama2.inference.colocate: the weights handed over in memory, asleep while training on a GPU)
    vllm_mode: Literal["server", "colocate"] = "server"
    vllm_url: str | None = None  # vllm_mode server: the server's address (unset: http://127.0.0.1:8000)
    vllm_gpu_memory: float = 0.3  # colocate on CUDA: the share of each GPU's memory vLLM takes (weights, KV cache)
    # reward: rm, the two RMs whole on every process, or sharded with FSDP2 over the processes (as in PPO)
    reward_models: Literal["whole", "sharded"] = "whole"
    threshold: float = SAFETY_THRESHOLD  # reward: rm, R_s below this makes the safety RM decide
    prompts: PromptsSpec = field(default_factory=PromptsSpec)
    optim: OptimConfig = field(default_factory=_grpo_optim)

    def validate(self) -> None:
        check(bool(self.base), "base", self.base, "a checkpoint directory or run")
        check(self.reward in ("rm", "gold"), "reward", self.reward, "rm or gold")
        if self.reward == "rm":
            for key in ("helpfulness_rm", "safety_rm"):
                check(bool(getattr(self, key)), key, getattr(self, key),
                      "a checkpoint directory or run (reward: rm scores with both RMs)")
        super().validate()
        check(self.group_size >= 2, "group_size", self.group_size, "an integer >= 2 (advantages compare answers)")
        rows = self.batch_size * self.group_size
        check(1 <= self.mini_batch <= rows, "mini_batch", self.mini_batch,
              f"an integer in 1..batch_size x group_size ({rows})")
        check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check_tools(self.tools)
        check_rollout_engine(self)
        check_reward_models(self)
        check(self.beta >= 0, "beta", self.beta, "a number >= 0")
        check(self.clip > 0, "clip", self.clip, "a positive number")
        check(self.clip_high is None or self.clip_high > 0, "clip_high", self.clip_high, "a positive number or null")
        check(self.scale_rewards in ("group", "batch", "none"), "scale_rewards", self.scale_rewards,
              "group, batch or none")
        check(self.loss in ("grpo", "token", "dr_grpo"), "loss", self.loss, "grpo, token or dr_grpo")
        check(self.temperature > 0, "temperature", self.temperature, "a positive number")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check(0 < self.threshold < 1, "threshold", self.threshold, "a number in (0, 1)")
        self.prompts.validate()


# ---------------------------------------------------------------------------------------------------------------
# The stage


@dataclass
class Groups:
    """One iteration's answers (rows grouped by prompt, group_size consecutive rows each) with what the update
    needs, over action positions: mask (answer tokens), old and reference log-probabilities, advantages (B,)."""

    tokens: Tensor
    attention: Tensor
    mask: Tensor
    old_logprobs: Tensor | None  # None: one update per iteration, the update's own forward gives them
    ref_logprobs: Tensor | None  # None: beta 0, no reference model
    advantages: Tensor
    stats: dict[str, float]

    def rows(self, idx: Tensor) -> Groups:
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return Groups(self.tokens[idx], self.attention[idx], self.mask[idx], pick(self.old_logprobs),
                      pick(self.ref_logprobs), self.advantages[idx], {})


class GRPO:
    """Builds the Trainer (the policy, pi_0 when beta > 0, the reward) and runs GRPO iterations as its step_fn."""

    def __init__(self, recipe: GRPORecipe, *, scorer: Scorer | None = None, quiet: bool = False) -> None:
        env, self.base, cfg, self.tokenizer = policy_start(recipe)
        self.recipe, self.quiet, self.env = recipe, quiet, env
        if recipe.reward == "gold" and scorer is None and not str(recipe.prompts.path or "").startswith(WORLD):
            raise Llama2Error("reward: gold scores with the built-in world's judge, which knows only the world's "
                              f"questions; set prompts.path: {WORLD}prompts.jsonl (and prompts.val_path: "
                              f"{WORLD}prompts.val.jsonl) or reward: rm")
        rm_paths = None
        if scorer is None and recipe.reward == "gold":
            scorer = GoldReward()
        elif scorer is None:
            rm_paths = (require_checkpoint(recipe.helpfulness_rm, "helpfulness RM"),
                        require_checkpoint(recipe.safety_rm, "safety RM"))
        train, val = load_prompt_sets(recipe.prompts, quiet)
        self.eval_prompts = val[:recipe.prompts.held_out]
        if recipe.reward == "gold" and isinstance(scorer, GoldReward):
            for p in train[:1] + self.eval_prompts[:1]:
                scorer.item(p.messages)  # fails now, naming the fix, rather than after the first rollout
        self.batches = PromptBatches(take(train, None), recipe.batch_size, recipe.seed)
        self.trainer = Trainer(recipe, lambda: Transformer(cfg), self._loss, self.batches,
                               initial_weights=lambda: load_checkpoint(self.base, kind="causal_lm").state_dict(),
                               checkpoint_io=HFCheckpointIO(self.tokenizer), env=env, quiet=quiet,
                               step_fn=self.iteration, eval_fn=self.evaluate if self.eval_prompts else None)
        self.reference = self.trainer.add_reference_model("reference", lambda: Transformer(cfg)) \
            if recipe.beta > 0 else None
        self.scorer = scorer if rm_paths is None else reward_models(recipe, self.trainer, *rm_paths)
        self._root_ran = False
        self.tools = world_toolbox(recipe.tools) if recipe.tools else None
        self.rollouts = RolloutServer(recipe, self.tokenizer, env, self.base) if recipe.rollout_engine == "vllm" \
            else None
        rows = recipe.batch_size * recipe.group_size
        self.one_step = recipe.epochs == 1 and recipe.mini_batch >= rows  # one optimiser step per iteration
        self.first_forward: tuple[Tensor, Tensor | None, Tensor] | None = None

    def reward_of(self, combined: float) -> float:
        """The reward GRPO optimises: the judge's score, or LOGIT(R_c) for the RMs."""
        return combined if self.recipe.reward == "gold" else logit(combined)

    # ------------------------------------------------------------ rollout

    def generate(self, prompts: Sequence[PromptItem], temperature: float, step: int, group: int
                 ) -> Answers:
        """Each prompt answered `group` times (consecutive rows), each answer its own seed (with the recipe's
        tools, if any)."""
        r = self.recipe
        if not self._root_ran:  # FSDP2 sets itself up on the first forward, which must be the root's
            with torch.no_grad():
                self.trainer.model(torch.tensor([[self.tokenizer.bos_id] * 2], device=self.trainer.device))
            self._root_ran = True
        rows = [p for p in prompts for _ in range(group)]
        seeds = [sample_seed(r.seed, step, prompt_key(p), k) for p in prompts for k in range(group)]
        server = self.rollouts.sync(self.trainer.model, self.trainer.step) if self.rollouts else None
        return sample_answers(self.trainer.model, self.trainer.model, self.tokenizer, rows, seeds,
                              temperature=temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                              tools=self.tools, server=server)

    @torch.no_grad()
    def rollout(self, prompts: Sequence[PromptItem]) -> Groups:
        """This process's share of the prompts (whole groups), answered and scored; batch-scaled advantages and
        the logged means are over the whole batch."""
        r, t, env = self.recipe, self.trainer, self.env
        per = len(prompts) // env.world_size
        prompts = list(prompts)[env.rank * per:(env.rank + 1) * per]
        K = r.group_size
        clock = time.perf_counter()
        answers = self.generate(prompts, r.temperature, t.step, K)
        prompt_ids, responses, texts, cut = answers.prompt_ids, answers.responses, answers.texts, answers.cut
        generated = time.perf_counter()
        rows = [p for p in prompts for _ in range(K)]
        scores = self.scorer([p.messages for p in rows], texts, [p.safety for p in rows])
        rewards = torch.tensor([self.reward_of(x) for x in scores.combined], dtype=torch.float64)
        everyone = all_gather_object(rewards.tolist(), env)
        batch = torch.tensor([x for part in everyone for x in part], dtype=torch.float64)
        adv = group_advantages(rewards, K, r.scale_rewards, batch_std=batch.std())
        grouped = batch.view(-1, K)
        tokens, attention, mask = (x.to(t.device) for x in pad_rollout(prompt_ids, responses, pad_id=0,
                                                                        appended=answers.appended))
        t.model.eval()
        with t.autocast():
            # with one update per iteration the policy has not moved when the update's forward runs: that forward
            # gives pi_old's log-probabilities, and this one is skipped (as TRL does)
            start = answers_start(mask)
            old_lp = None if self.one_step else sequence_logprobs(t.model, tokens, attention, start=start,
                                                                   temperature=r.temperature).float()
            ref_lp = (sequence_logprobs(self.reference, tokens, attention, start=start,
                                        temperature=r.temperature).float() if self.reference is not None else None)
        t.model.train()
        rows_n, length, n_cut = all_reduce_sum([float(len(cut)), float(mask.sum()), float(sum(cut))], env)
        stats = {"reward": float(batch.mean()), "reward_std": float(grouped.std(dim=1).mean()),
                 "uniform_groups": float((grouped.std(dim=1) == 0).float().mean()),
                 "response_length": length / rows_n, "truncated": n_cut / rows_n,
                 "time_generate": generated - clock, "time_score": time.perf_counter() - generated}
        return Groups(tokens, attention, mask, old_lp, ref_lp, adv.float().to(t.device), stats)

    def policy_stats(self, old_lp: Tensor, ref_lp: Tensor | None, mask: Tensor) -> dict[str, float]:
        """kl (k3 to pi_0, summed per answer) and entropy (the sampled tokens' mean negative log-probability) of
        the rollout's policy, over the whole batch."""
        m = mask.to(old_lp.dtype)
        q = (ref_lp - old_lp) * m if ref_lp is not None else torch.zeros_like(old_lp)
        kl = (q.exp() - q - 1) * m
        rows, kl_sum, lp_sum, n_act = all_reduce_sum(
            [float(mask.shape[0]), float(kl.sum()), float((old_lp * m).sum()), float(m.sum())], self.env)
        return {"kl": kl_sum / rows, "entropy": -lp_sum / max(n_act, 1.0)}

    # ------------------------------------------------------------ update

    def _loss(self, model: nn.Module, batch: Groups) -> LossOutput:
        r = self.recipe
        lp = sequence_logprobs(model, batch.tokens, batch.attention, start=answers_start(batch.mask),
                               temperature=r.temperature).float()
        old = batch.old_logprobs
        if old is None:
            old = lp.detach()
            self.first_forward = (old, batch.ref_logprobs, batch.mask)
        loss, stats = grpo_loss(lp, old, batch.ref_logprobs, batch.advantages, batch.mask, clip=r.clip,
                                clip_high=r.clip_high or r.clip, beta=r.beta, form=r.loss,
                                max_new_tokens=r.max_new_tokens)
        count = batch.mask.sum() if r.loss == "token" else batch.tokens.shape[0]
        return LossOutput(loss, count, tokens=batch.attention.sum(),
                          metrics={"policy_loss": loss.detach(), **{k: v.detach() for k, v in stats.items()}})

    def iteration(self, t: Trainer) -> dict[str, float]:
        r = self.recipe
        groups = self.rollout(self.batches.next())
        clock = time.perf_counter()
        totals: dict[str, list[float]] = {}
        n = groups.tokens.shape[0]
        gen = torch.Generator().manual_seed(r.seed * 100_003 + t.step * 101 + self.env.rank)
        local = r.mini_batch // self.env.world_size
        for _ in range(r.epochs):
            order = torch.randperm(n, generator=gen)
            for lo in range(0, n, local):
                step_totals = t.backward([groups.rows(order[lo:lo + local].to(groups.tokens.device))])
                for k, v in {**step_totals.stats(), **t.optimizer_step()}.items():
                    totals.setdefault(k, []).append(float(v))
        out = {k: statistics.fmean(v) for k, v in totals.items()}
        out["time_update"] = time.perf_counter() - clock
        out["tokens"] = float(groups.attention.sum())
        out["iteration"] = float(t.step + 1)
        first = (groups.old_logprobs, groups.ref_logprobs, groups.mask) if groups.old_logprobs is not None \
            else self.first_forward
        return {**out, **groups.stats, **self.policy_stats(*first)}

    # ------------------------------------------------------------ held-out evaluation

    @torch.no_grad()
    def evaluate(self, t: Trainer) -> dict[str, float]:
        """Greedy answers to the held-out prompts: their mean reward (heldout_reward)."""
        texts = self.generate(self.eval_prompts, 0.0, 0, 1).texts
        s = self.scorer([p.messages for p in self.eval_prompts], texts, [p.safety for p in self.eval_prompts])
        return {"heldout_reward": statistics.fmean(self.reward_of(x) for x in s.combined)}


def reward_curves(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """rewards.png: the answers' mean reward per iteration and the held-out reward; the KL to pi_0."""
    return reward_kl_figure(records, path, (("reward", "answers (sampled)"),), ylabel="reward",
                            held_label="held-out (greedy)", kl_label="KL to pi_0 (k3, per answer)",
                            title="GRPO: reward and KL")


def evaluate_at_start(run: GRPO) -> None:
    """Start the trainer (resuming if it can); a fresh run's held-out reward is logged as step 0."""
    t = run.trainer
    t.start()
    if t.step == 0 and run.eval_prompts:
        t.metrics.append({"step": 0, **run.evaluate(t)})


def grpo(recipe: GRPORecipe, quiet: bool = False, *, scorer: Scorer | None = None) -> TrainResult:
    """Run (or resume) GRPO as the recipe says; prints a one-line summary unless quiet."""
    run = GRPO(recipe, scorer=scorer, quiet=quiet)
    t = run.trainer
    evaluate_at_start(run)
    result = t.fit()
    if run.env.is_main:
        reward_curves(read_metrics(t.run_dir / "metrics.jsonl"), t.run_dir / "rewards.png")
    if not quiet:
        last = result.last
        print(f"grpo: {result.step} iterations, reward {last.get('reward', math.nan):.3f} ({recipe.reward}), KL to "
              f"pi_0 {last.get('kl', math.nan):.3f}; checkpoint {result.checkpoint}", flush=True)
    return result


__all__ = ["GRPORecipe", "GRPO", "grpo", "group_advantages", "grpo_loss", "evaluate_at_start", "reward_curves"]
