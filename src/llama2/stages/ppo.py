"""PPO (paper section 6, RLHF-V5): the policy maximises the combined reward of the two reward models minus a
per-token KL penalty to the frozen initial policy pi_0.

    R(g | p) = WHITEN(LOGIT(R_c(g | p))) - beta * KL(pi_theta(g | p) || pi_0(g | p))

Each iteration (one Trainer step, `step_fn`):
  1. rollout: a batch of prompts answered by the policy through the one generation path (each answer its own
     seed), the response's EOS kept when the answer stopped on it (never added to a cut answer);
  2. scoring, without gradients: the policy's and pi_0's log-probabilities of every response token with the
     sampling temperature (`sequence_logprobs`), the value model's per-token values, and R_c of the two RMs
     (`llama2.reward`), whitened after LOGIT with batch or running statistics (checkpointed);
  3. rewards: -beta * (log pi - log pi_0) on every real response token, the whitened score added on the last
     real response token (a padded position never gets it), `truncation_penalty` added to answers cut by the
     length limit;
  4. GAE (gamma, lambda) per row over its response tokens; advantages whitened over the real tokens only;
  5. `ppo_epochs` passes of mini-batches, one AdamW step each: the clipped policy objective (clip 0.2) plus
     `value_coef` x the clipped value loss.
metrics.jsonl gets, per iteration: reward (R_c), reward_helpfulness, reward_safety, kl (summed over the response,
to pi_0), policy_loss, value_loss, clip_frac, approx_kl (to the rollout's policy), entropy (the sampled tokens'
mean negative log-probability, an estimate), response_length, truncated, and the seconds spent generating
(time_generate), scoring (time_score: logprobs, values, RMs) and updating (time_update); every eval_every
iterations heldout_reward (greedy answers to held-out prompts, mean R_c), with early stopping after `patience`
evaluations without a better one.
The policy and the value model train together (`ActorCritic`, one optimiser); the value model starts from the
helpfulness RM (`value_init: helpfulness_rm`) or from the policy's backbone with a fresh head (`policy`). The
checkpoint directory holds the policy in the HF causal-LM layout and the value model in `value/`. The two RMs are
loaded whole on every process, or sharded over the processes with FSDP2 (`reward_models: sharded`, for models whose
RMs do not fit whole beside the rest; `reward_models()`, llama2.reward).

    recipe = load_recipe(PPORecipe, "configs/tiny/ppo.yaml")
    result = pipeline.run(recipe)            # builds the SFT model and both RMs when missing, then ppo(recipe)
    result = ppo(recipe, scorer=my_scorer)   # any (prompts, responses, is_safety) -> CombinedScores
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..chat import encode_dialog
from ..atomic import atomic_directory
from ..checkpoint import load_checkpoint, load_config, read_rows_into, save_model
from ..checkpoint.runs import load_tokenizer, require_checkpoint
from ..classifier import LIKELIHOOD_KEYS, SequenceClassifier
from ..data.prompts import PromptItem, PromptsSpec, load_prompt_sets, prompt_key, sample_seed, take
from ..data.world.tools import check_tools, world_toolbox
from ..errors import Llama2Error
from ..figures import pyplot, save_png
from ..inference.generate import Generator, SamplingParams, gathered_for_generation
from ..inference.remote import VllmColocated, VllmServer, check_rollout_engine, server_url
from ..inference.scoring import sequence_logprobs
from ..model import Transformer
from ..recipe import check
from ..reward import SAFETY_THRESHOLD, CombinedScores, Whitener, check_reward_models, logit, reward_models
from ..train.config import OptimConfig, TrainRecipe
from ..train.checkpoints import gathered_state
from ..train.distributed import all_gather_object, all_reduce_sum, barrier, init_distributed
from ..train.loop import LossOutput, Trainer, TrainResult
from ..tools import Toolbox
from ..train.metrics import read_metrics

Scorer = Callable[[Sequence[Any], Sequence[str], Sequence[bool]], CombinedScores]

# ---------------------------------------------------------------------------------------------------------------
# The pieces of the objective (tested against hand-computed examples)


def token_rewards(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, scores: Tensor, beta: float
                  ) -> tuple[Tensor, Tensor]:
    """(rewards, kl), both (B, N) over action positions: kl = log pi - log pi_0 on real tokens (0 elsewhere),
    rewards = -beta * kl, plus each row's score on its last real token."""
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m
    rewards = -beta * kl
    last = last_real(mask)
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards, kl


def last_real(mask: Tensor) -> Tensor:
    """(B,) index of each row's last True position (every row must have one)."""
    if not bool(mask.any(dim=1).all()):
        raise Llama2Error("a rollout row has no response token")
    positions = torch.arange(mask.shape[1], device=mask.device)
    return torch.where(mask, positions, -1).amax(dim=1)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimates and returns (B, N) over each row's real positions; the value after the last
    real token is 0 (the episode ends), masked positions get 0. Masked positions inside a response (tool results
    the engine appended, not actions) are skipped: the recursion carries over them, so a call is credited with
    what comes after its result."""
    B, N = rewards.shape
    adv = torch.zeros_like(rewards)
    m = mask.to(rewards.dtype)
    real = mask.bool()
    inside = torch.arange(N, device=mask.device)[None, :] <= last_real(mask)[:, None]
    zero = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    running, next_value = zero, zero
    for t in range(N - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # past a row's last real token (padding): reset; a gap inside it: carry on unchanged
        running = torch.where(real[:, t], delta + gamma * lam * running, torch.where(inside[:, t], running, zero))
        adv[:, t] = running * m[:, t]
        next_value = torch.where(real[:, t], values[:, t], torch.where(inside[:, t], next_value, zero))
    return adv, (adv + values) * m


def masked_whiten(x: Tensor, mask: Tensor, eps: float = 1e-8, env: Any = None) -> Tensor:
    """(x - mean) / std over the True positions only (of every process's batch, with env under torchrun); masked
    positions become 0."""
    m = mask.to(x.dtype)
    total, square, count = (float(v) for v in ((x * m).sum(), (x * x * m).sum(), m.sum()))
    if env is not None and env.enabled:
        total, square, count = all_reduce_sum([total, square, count], env)
    n = max(count, 1.0)
    mean = total / n
    var = max(square / n - mean * mean, 0.0)
    return (x - mean) / (math.sqrt(var) + eps) * m


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped surrogate objective, as a loss: mean over real tokens of max(-A r, -A clip(r, 1-e, 1+e)),
    r = exp(log pi - log pi_old); also the clip fraction and the approximate KL to the old policy."""
    m = mask.to(logprobs.dtype)
    n = m.sum().clamp(min=1)
    log_ratio = (logprobs - old_logprobs) * m
    ratio = log_ratio.exp()
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    clipped = ((ratio - 1).abs() > clip).to(m.dtype)
    stats = {"clip_frac": (clipped * m).sum() / n, "approx_kl": (((ratio - 1) - log_ratio) * m).sum() / n}
    return (loss * m).sum() / n, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> Tensor:
    """0.5 x mean over real tokens of max((v - R)^2, (v_clipped - R)^2), v_clipped = v_old + clamp(v - v_old)."""
    m = mask.to(values.dtype)
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    loss = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * (loss * m).sum() / m.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# The policy and the value model, trained together


class ActorCritic(nn.Module):
    """`policy` (a Transformer) and `value` (a SequenceClassifier read at every position), one module for the
    Trainer (one optimiser, one checkpoint). forward(tokens, mask, temperature) -> (logprobs (B, T-1) of each
    next token, values (B, T-1) of each position's state before that token)."""

    def __init__(self, policy: Transformer, value: SequenceClassifier) -> None:
        super().__init__()
        self.policy, self.value = policy, value
        self.config = policy.config

    def forward(self, tokens: Tensor, mask: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        lp = sequence_logprobs(self.policy, tokens, mask, temperature=temperature)
        values = self.value(tokens, per_token=True)[:, :-1].float()
        return lp, values

    def init_weights(self) -> None:
        self.policy.init_weights()
        self.value.init_weights()


class ActorCriticIO:
    """Checkpoint directory: the policy in the HF causal-LM layout (with the tokenizer), the value model in
    value/ (LlamaForSequenceClassification)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def save(self, model: nn.Module, path: Path, fetch: Callable[[str], Tensor] | None = None) -> None:
        for name, part, tok in (("policy", model.policy, self.tokenizer), ("value", model.value, None)):
            where = path if name == "policy" else path / "value"
            sub = None if fetch is None else (lambda n, p=name: fetch(f"{p}.{n}"))
            save_model(part, where, tokenizer=tok, fetch=sub)

    def load_into(self, path: Path, targets: dict[str, tuple[Tensor, int]]) -> None:
        for name, where in (("policy", path), ("value", path / "value")):
            part = {k[len(name) + 1:]: v for k, v in targets.items() if k.startswith(name + ".")}
            read_rows_into(where, part)


# ---------------------------------------------------------------------------------------------------------------
# The recipe


def _ppo_optim() -> OptimConfig:
    return OptimConfig(lr=1e-6, weight_decay=0.1, schedule="constant", warmup_steps=0)


@dataclass
class PPORecipe(TrainRecipe):
    """`llama2 rlhf ppo`: see configs/tiny/ppo.yaml and the module docstring. max_steps = PPO iterations;
    batch_size = prompts per iteration; mini_batch = rows per gradient step."""

    base: str = ""  # the policy to start from: a rejection-sampling or SFT checkpoint (also pi_0)
    base_recipe: str | None = None  # an SFT recipe that builds `base` when it is missing
    helpfulness_rm: str = ""  # the helpfulness reward model (checkpoint or run)
    helpfulness_rm_recipe: str | None = None  # a reward recipe that builds it when missing
    safety_rm: str = ""  # the safety reward model (checkpoint or run)
    safety_rm_recipe: str | None = None  # a reward recipe that builds it when missing
    # the value model starts from the helpfulness RM, or from the policy
    value_init: Literal["helpfulness_rm", "policy"] = "helpfulness_rm"
    out_dir: str = "runs/ppo"
    max_steps: int = 200  # PPO iterations (rollouts + updates)
    batch_size: int = 512  # prompts per iteration
    mini_batch: int = 64  # rollouts per gradient step
    ppo_epochs: int = 1  # passes over each batch of rollouts
    beta: float = 0.01  # KL penalty to the initial policy pi_0, on every response token
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2  # value prediction clip
    value_coef: float = 0.1  # weight of the value loss
    gamma: float = 1.0  # discount (GAE)
    lam: float = 0.95  # GAE lambda
    whiten: Literal["batch", "running"] = "running"  # whiten LOGIT(R_c) per batch, or with running statistics
    truncation_penalty: float = -1.0  # added to the whitened score of an answer cut by max_new_tokens
    temperature: float = 1.0  # sampling temperature of the rollouts (and of every logprob)
    top_p: float = 1.0  # nucleus sampling of the rollouts
    max_new_tokens: int = 128  # longest answer (tool results included)
    # tools the policy may call in its rollouts (calculator, search: the world's), listed in every prompt; their
    # results are masked out of the loss
    tools: list[str] = field(default_factory=list)
    # rollouts through our engine, or through vLLM (vllm_mode: a server, or colocated), whose weights the
    # stage replaces after every update
    rollout_engine: Literal["ours", "vllm"] = "ours"
    # rollout_engine vllm: a vLLM server started separately (at vllm_url), or vLLM colocated in the stage's own
    # processes (llama2.inference.colocate: the weights handed over in memory, asleep while training on a GPU)
    vllm_mode: Literal["server", "colocate"] = "server"
    vllm_url: str | None = None  # vllm_mode server: the server's address (unset: http://127.0.0.1:8000)
    vllm_gpu_memory: float = 0.3  # colocate on CUDA: the share of each GPU's memory vLLM takes (weights, KV cache)
    # the two RMs whole on every process, or sharded with FSDP2 over the processes (what the 13B and 70B recipes
    # need: whole, they do not fit beside the rest; `llama2 plan`)
    reward_models: Literal["whole", "sharded"] = "whole"
    threshold: float = SAFETY_THRESHOLD  # R_s below this makes the safety RM decide (the paper's 0.15)
    patience: int = 0  # stop after this many evaluations without a better held-out reward (0 = never)
    prompts: PromptsSpec = field(default_factory=PromptsSpec)
    optim: OptimConfig = field(default_factory=_ppo_optim)

    def validate(self) -> None:
        for key in ("base", "helpfulness_rm", "safety_rm"):
            check(bool(getattr(self, key)), key, getattr(self, key), "a checkpoint directory or run")
        super().validate()
        check(1 <= self.mini_batch <= self.batch_size, "mini_batch", self.mini_batch,
               f"an integer in 1..batch_size ({self.batch_size})")
        check(self.ppo_epochs >= 1, "ppo_epochs", self.ppo_epochs, "an integer >= 1")
        check(self.beta >= 0, "beta", self.beta, "a number >= 0")
        for key in ("clip", "value_clip"):
            check(getattr(self, key) > 0, key, getattr(self, key), "a positive number")
        check(self.value_coef >= 0, "value_coef", self.value_coef, "a number >= 0")
        check(0 <= self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", (self.gamma, self.lam),
               "gamma and lam in [0, 1]")
        check(self.temperature > 0, "temperature", self.temperature, "a positive number")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check(0 < self.threshold < 1, "threshold", self.threshold, "a number in (0, 1)")
        check(self.patience >= 0, "patience", self.patience, "an integer >= 0")
        check_tools(self.tools)
        check_rollout_engine(self)
        check_reward_models(self)
        self.prompts.validate()


# ---------------------------------------------------------------------------------------------------------------
# Prompts, rollouts


class PromptBatches:
    """Epochs over the training prompts in a seeded order; next() gives the next `batch` prompts. The state is
    (epoch, position): a resumed run continues with the same prompts."""

    def __init__(self, prompts: Sequence[PromptItem], batch: int, seed: int) -> None:
        if len(prompts) < batch:
            raise Llama2Error(f"{len(prompts)} training prompts, fewer than one batch of {batch}; lower batch_size "
                              "or give more prompts")
        self.prompts, self.batch, self.seed = list(prompts), batch, seed
        self.epoch, self.position = 0, 0

    def next(self) -> list[PromptItem]:
        per_epoch = len(self.prompts) // self.batch
        if self.position >= per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))
        lo = self.position * self.batch
        self.position += 1
        return [self.prompts[i] for i in order[lo:lo + self.batch]]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "prompts": len(self.prompts), "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (int(state["prompts"]), int(state["batch"])) != (len(self.prompts), self.batch):
            raise Llama2Error("the checkpoint was trained on another prompt set or batch size; resume with the same "
                              "prompts and batch_size, or use a new out_dir")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


@dataclass
class Rollout:
    """A padded batch of (prompt + response) rows with everything the update needs, over action positions
    (index j scores token j + 1): mask (response tokens), old/ref logprobs, values, advantages, returns."""

    tokens: Tensor
    attention: Tensor
    mask: Tensor
    old_logprobs: Tensor
    values: Tensor
    advantages: Tensor
    returns: Tensor
    stats: dict[str, float]

    def rows(self, idx: Tensor) -> Rollout:
        pick = {f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self) if f.name != "stats"}
        return Rollout(**pick, stats={})


def pad_rollout(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int,
                appended: Sequence[Sequence[tuple[int, int]]] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens (B, T) right-padded, attention (B, T) real tokens, mask (B, T-1) True where the target token
    is a response token the policy sampled: `appended` [start, end) ranges of a response, the tool results the
    engine added, are not)."""
    seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    T = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), T), dtype=torch.bool)
    mask = torch.zeros((len(seqs), T - 1), dtype=torch.bool)
    for i, (p, s) in enumerate(zip(prompt_ids, seqs)):
        tokens[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = True
        mask[i, len(p) - 1:len(s) - 1] = True
        for a, b in (appended[i] if appended else ()):
            mask[i, len(p) + a - 1:len(p) + b - 1] = False
    return tokens, attention, mask


@dataclass
class Answers:
    """Sampled answers: prompt ids, response ids (with the EOS kept when the answer stopped on it), texts,
    whether the length limit cut each, and the token ranges of each response that tools appended."""

    prompt_ids: list[list[int]]
    responses: list[list[int]]
    texts: list[str]
    cut: list[bool]
    appended: list[list[tuple[int, int]]]


@torch.no_grad()
def sample_answers(root: nn.Module, policy: Transformer, tokenizer: Any, prompts: Sequence[PromptItem],
                   seeds: Sequence[int], *, temperature: float, top_p: float, max_new_tokens: int,
                   tools: Toolbox | None = None, server: VllmServer | VllmColocated | None = None) -> Answers:
    """One answer per prompt (a prompt listed K times gets K answers, one per seed) through the one generation
    path, with the trained model's weights gathered once under FSDP2 (`root`: the Trainer's model, `policy` the
    Transformer inside it); a prompt longer than the context keeps its last tokens. tools: listed in each prompt
    and run by the engine as the policy calls them. server: a vLLM server generates instead (`RolloutServer`
    keeps its weights current)."""
    context = policy.config.max_seq_len
    prompt_ids, params = [], []
    for p, seed in zip(prompts, seeds):
        ids = encode_dialog(tokenizer, p.messages, tools=tools.specs if tools else None)
        ids = ids[-(context - 1):] if len(ids) >= context else ids
        prompt_ids.append(ids)
        greedy = temperature == 0
        params.append(SamplingParams(temperature=temperature, top_p=1.0 if greedy else top_p,
                                     max_new_tokens=max(1, min(max_new_tokens, context - len(ids))), seed=seed,
                                     tools=tools))
    if server is not None:
        done = server.generate(prompt_ids, params)
    else:
        was = policy.training
        policy.eval()
        try:
            with gathered_for_generation(root):  # under FSDP2: the weights gathered once
                done = Generator(policy, tokenizer, max_batch_size=len(prompts)).generate(prompt_ids, params)
        finally:
            policy.train(was)
    out = Answers(prompt_ids, [], [], [], [])
    for c in done:
        stopped = c.finish_reason == "stop"
        out.responses.append(list(c.tokens) + ([tokenizer.eos_id] if stopped else []))
        out.texts.append(c.text.strip())
        out.cut.append(not stopped)
        out.appended.append(list(c.tool_spans))
    return out


class RolloutServer:
    """`rollout_engine: vllm` for a training stage, and the trained policy's weights sent to vLLM before the first
    rollout of every step (gathered: under FSDP2 every process takes part).
    vllm_mode server: a client of the vLLM server on every process; rank 0 writes the weights as a Hugging Face
    checkpoint into OUT/rollout-weights (atomically), the server reloads them from there.
    vllm_mode colocate: vLLM in every process (`VllmColocated`, started on `start`, the starting checkpoint); each
    process streams the gathered tensors into its own engine in memory, nothing written to disk."""

    def __init__(self, recipe: Any, tokenizer: Any, env: Any, start: Path | str | None = None) -> None:
        self.colocated = recipe.vllm_mode == "colocate"
        if self.colocated:
            if start is None:
                raise Llama2Error("internal: vllm_mode=colocate needs the starting checkpoint to start vLLM on")
            self.server: VllmServer | VllmColocated = VllmColocated(
                start, tokenizer, device=env.device, max_model_len=load_config(start).max_seq_len,
                gpu_memory=recipe.vllm_gpu_memory, seed=recipe.seed)
        else:
            self.server = VllmServer(server_url(recipe), tokenizer)
        self.tokenizer, self.env = tokenizer, env
        self.dir = Path(recipe.out_dir) / "rollout-weights"
        self.synced: int | None = None

    def sync(self, policy: nn.Module, step: int) -> VllmServer | VllmColocated:
        """vLLM, holding `policy`'s weights of `step` (sent once per step)."""
        if self.synced != step:
            if self.colocated:
                self._stream(policy)
            else:
                self._write(policy)
            barrier(self.env)
            self.synced = step
        return self.server

    def _stream(self, policy: nn.Module) -> None:
        tensors = gathered_state(policy, True)  # every process feeds its own engine
        try:
            self.server.load_state(tensors)
        finally:
            for _ in tensors:  # every process must run every gather
                pass

    def _write(self, policy: nn.Module) -> None:
        tensors = gathered_state(policy, self.env.is_main)
        try:
            if self.env.is_main:
                with atomic_directory(self.dir, what="rollout weights") as tmp:
                    with torch.device("meta"):
                        skeleton = Transformer(policy.config)
                    save_model(skeleton, tmp, fetch=lambda name: _named(next(tensors), name))  # weights only
                self.server.load_weights(self.dir)
        finally:
            for _ in tensors:  # every process must run every gather
                pass


def _named(item: tuple[str, Tensor], name: str) -> Tensor:
    if item[0] != name:
        raise Llama2Error(f"internal: gathered {item[0]!r} while writing {name!r}")
    return item[1]


def policy_start(recipe: Any) -> tuple[Any, Path, Any, Any]:
    """What PPO and GRPO set up first: the process group (batch_size and mini_batch split evenly over its
    processes), then the starting policy's checkpoint, config and tokenizer."""
    env = init_distributed(recipe.device)
    if recipe.batch_size % env.world_size or recipe.mini_batch % env.world_size:
        raise Llama2Error(f"batch_size {recipe.batch_size} and mini_batch {recipe.mini_batch} must be multiples of "
                          f"the {env.world_size} processes (each takes an equal share of every batch)")
    base = require_checkpoint(recipe.base, "starting policy")
    return env, base, load_config(base), load_tokenizer(base)


# ---------------------------------------------------------------------------------------------------------------
# The stage


class PPO:
    """Builds the Trainer (policy + value, reference pi_0, scorer) and runs PPO iterations as its step_fn."""

    def __init__(self, recipe: PPORecipe, *, scorer: Scorer | None = None, quiet: bool = False) -> None:
        env, self.base, cfg, self.tokenizer = policy_start(recipe)
        self.recipe, self.quiet, self.env = recipe, quiet, env
        self.device = env.device
        h_path = s_path = None
        if scorer is None or recipe.value_init == "helpfulness_rm":
            h_path = require_checkpoint(recipe.helpfulness_rm, "helpfulness RM")
        if scorer is None:
            s_path = require_checkpoint(recipe.safety_rm, "safety RM")
        self.whitener = Whitener(recipe.whiten)
        train, val = load_prompt_sets(recipe.prompts, quiet)
        self.eval_prompts = val[:recipe.prompts.held_out]
        self.batches = PromptBatches(take(train, None), recipe.batch_size, recipe.seed)
        if recipe.value_init == "helpfulness_rm":
            value_cfg = load_config(h_path)
            if (value_cfg.vocab_size, value_cfg.max_seq_len) != (cfg.vocab_size, cfg.max_seq_len):
                raise Llama2Error(f"the helpfulness RM {h_path} does not share the policy's vocabulary and context; "
                                  "set value_init=policy")
        else:
            value_cfg = cfg

        def build() -> nn.Module:
            return ActorCritic(Transformer(cfg), SequenceClassifier(value_cfg))

        def initial() -> dict[str, Tensor]:
            policy = load_checkpoint(self.base, kind="causal_lm").state_dict()
            value_src = h_path if recipe.value_init == "helpfulness_rm" else self.base
            value = {k: v for k, v in load_checkpoint(value_src, kind="classifier").state_dict().items()
                     if k not in LIKELIHOOD_KEYS}  # the value model reads its scalar head only
            return {**{f"policy.{k}": v for k, v in policy.items()}, **{f"value.{k}": v for k, v in value.items()}}

        self.trainer = Trainer(recipe, build, lambda m, b: self._loss(m, b), self.batches, initial_weights=initial,
                               checkpoint_io=ActorCriticIO(self.tokenizer), env=env, quiet=quiet,
                               step_fn=self.iteration, eval_fn=self.evaluate if self.eval_prompts else None,
                               state={"whitener": self.whitener})
        self.reference = self.trainer.add_reference_model(
            "reference", lambda: Transformer(cfg),
            weights=lambda: load_checkpoint(self.base, kind="causal_lm").state_dict())
        self.scorer = scorer if scorer is not None else reward_models(recipe, self.trainer, h_path, s_path)
        self._root_ran = False
        self.tools = world_toolbox(recipe.tools) if recipe.tools else None
        self.rollouts = RolloutServer(recipe, self.tokenizer, env, self.base) if recipe.rollout_engine == "vllm" \
            else None
        self.best_heldout: float | None = None
        self.bad_evals = 0

    # ------------------------------------------------------------ rollout

    @torch.no_grad()
    def generate(self, prompts: Sequence[PromptItem], temperature: float, step: int
                 ) -> Answers:
        """The prompts answered (with the recipe's tools, if any)."""
        r = self.recipe
        if not self._root_ran:  # FSDP2 sets itself up on the first forward, which must be the root's
            one = torch.tensor([[self.tokenizer.bos_id] * 2], device=self.trainer.device)
            self.trainer.model(one, torch.ones_like(one, dtype=torch.bool))
            self._root_ran = True
        seeds = [sample_seed(r.seed, step, prompt_key(p), 0) for p in prompts]
        server = self.rollouts.sync(self.trainer.model.policy, self.trainer.step) if self.rollouts else None
        return sample_answers(self.trainer.model, self.trainer.model.policy, self.tokenizer, prompts, seeds,
                              temperature=temperature, top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                              tools=self.tools, server=server)

    @torch.no_grad()
    def rollout(self, prompts: Sequence[PromptItem]) -> Rollout:
        """This process's share of the batch (an equal contiguous slice under torchrun), scored; the score
        whitening, the advantage whitening and the logged means are over the whole batch."""
        r, t, env = self.recipe, self.trainer, self.env
        per = len(prompts) // env.world_size
        prompts = list(prompts)[env.rank * per:(env.rank + 1) * per]
        clock = time.perf_counter()
        answers = self.generate(prompts, r.temperature, t.step)
        prompt_ids, responses, texts, cut = answers.prompt_ids, answers.responses, answers.texts, answers.cut
        generated = time.perf_counter()
        tokens, attention, mask = pad_rollout(prompt_ids, responses, pad_id=0, appended=answers.appended)
        dev = t.device
        tokens, attention, mask = tokens.to(dev), attention.to(dev), mask.to(dev)
        scores = self.scorer([p.messages for p in prompts], texts, [p.safety for p in prompts])
        everyone = all_gather_object([scores.combined, scores.helpfulness, scores.safety], env)
        combined = [x for part in everyone for x in part[0]]  # the whole batch, in rank order
        mine = sum(len(part[0]) for part in everyone[:env.rank])
        white_all = self.whitener([logit(x) for x in combined])
        white = torch.tensor(white_all[mine:mine + len(scores.combined)], device=dev)
        white = white + torch.tensor([r.truncation_penalty if c else 0.0 for c in cut], device=dev)
        t.model.eval()
        with t.autocast():
            old_lp, values = t.model(tokens, attention, temperature=r.temperature)
            ref_lp = sequence_logprobs(self.reference, tokens, attention, temperature=r.temperature)
        t.model.train()
        old_lp, values, ref_lp = old_lp.float(), values.float() * mask, ref_lp.float()
        rewards, kl = token_rewards(old_lp, ref_lp, mask, white, r.beta)
        adv, returns = gae(rewards, values, mask, r.gamma, r.lam)
        adv = masked_whiten(adv, mask, env=env)
        n_tokens = mask.sum(dim=1).float()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        rows, kl_sum, length, n_cut, lp_sum, n_act = all_reduce_sum(
            [float(len(cut)), float(kl.sum()), float(n_tokens.sum()), float(sum(cut)), float((old_lp * mask).sum()),
             float(mask.sum())], env)
        stats = {"reward": statistics.fmean(combined),
                 "reward_helpfulness": statistics.fmean(x for part in everyone for x in part[1]),
                 "reward_safety": statistics.fmean(x for part in everyone for x in part[2]),
                 "kl": kl_sum / rows, "score_whitened": statistics.fmean(white_all), "response_length": length / rows,
                 "truncated": n_cut / rows, "entropy": -lp_sum / max(n_act, 1.0),
                 "time_generate": generated - clock, "time_score": time.perf_counter() - generated}
        return Rollout(tokens, attention, mask, old_lp, values, adv, returns, stats)

    # ------------------------------------------------------------ update

    def _loss(self, model: nn.Module, batch: Rollout) -> LossOutput:
        r = self.recipe
        lp, values = model(batch.tokens, batch.attention, temperature=r.temperature)
        pg, stats = policy_loss(lp.float(), batch.old_logprobs, batch.advantages, batch.mask, r.clip)
        vf = value_loss(values.float(), batch.values, batch.returns, batch.mask, r.value_clip)
        n = batch.mask.sum()
        metrics = {"policy_loss": pg.detach(), "value_loss": vf.detach(), **{k: v.detach() for k, v in stats.items()}}
        return LossOutput(pg + r.value_coef * vf, n, tokens=batch.attention.sum(), metrics=metrics)

    def iteration(self, t: Trainer) -> dict[str, float]:
        r = self.recipe
        roll = self.rollout(self.batches.next())
        clock = time.perf_counter()
        totals: dict[str, list[float]] = {}
        rows = roll.tokens.shape[0]
        gen = torch.Generator().manual_seed(r.seed * 100_003 + t.step * 101 + self.env.rank)
        local = r.mini_batch // self.env.world_size  # each process's share of a mini-batch
        for _ in range(r.ppo_epochs):
            order = torch.randperm(rows, generator=gen)
            for lo in range(0, rows, local):
                mb = roll.rows(order[lo:lo + local].to(roll.tokens.device))
                step_totals = t.backward([mb])
                for k, v in {**step_totals.stats(), **t.optimizer_step()}.items():
                    totals.setdefault(k, []).append(float(v))
        out = {k: statistics.fmean(v) for k, v in totals.items()}
        if roll.tokens.device.type == "cuda":
            torch.cuda.synchronize(roll.tokens.device)
        out["time_update"] = time.perf_counter() - clock
        out["tokens"] = float(roll.attention.sum())
        out["iteration"] = float(t.step + 1)
        return {**out, **roll.stats}

    # ------------------------------------------------------------ held-out evaluation

    @torch.no_grad()
    def evaluate(self, t: Trainer) -> dict[str, float]:
        """Greedy answers to the held-out prompts: mean R_c (heldout_reward), R_h, R_s; early stopping."""
        texts = self.generate(self.eval_prompts, 0.0, 0).texts
        s = self.scorer([p.messages for p in self.eval_prompts], texts, [p.safety for p in self.eval_prompts])
        reward = statistics.fmean(s.combined)
        if self.recipe.patience:
            if self.best_heldout is None or reward > self.best_heldout:
                self.best_heldout, self.bad_evals = reward, 0
            else:
                self.bad_evals += 1
                if self.bad_evals >= self.recipe.patience and t.step < t.recipe.max_steps:
                    if not self.quiet:
                        print(f"early stop at iteration {t.step}: no better held-out reward in {self.bad_evals} "
                              "evaluations", flush=True)
                    t.recipe.max_steps = t.step
                    t.save()
        return {"heldout_reward": reward, "heldout_helpfulness": statistics.fmean(s.helpfulness),
                "heldout_safety": statistics.fmean(s.safety)}


def reward_kl_figure(records: Sequence[dict[str, Any]], path: Path, series: Sequence[tuple[str, str]], *,
                     ylabel: str, held_label: str, kl_label: str, title: str) -> Path | None:
    """A two-panel PNG of an RL run's metrics: the reward `series` (metric key, label) per iteration with the
    held-out reward (heldout_reward), and the KL to pi_0 (kl). None when no iteration was logged."""
    rows = [r for r in records if "reward" in r]
    if not rows:
        return None
    plt = pyplot()
    fig, (ax, kx) = plt.subplots(1, 2, figsize=(11, 3.8))
    steps = [r["step"] for r in rows]
    for key, label in series:
        ax.plot(steps, [r[key] for r in rows], label=label)
    held = [r for r in records if "heldout_reward" in r]
    if held:
        ax.plot([r["step"] for r in held], [r["heldout_reward"] for r in held], "ko--", label=held_label)
    ax.set(xlabel="iteration", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    kx.plot(steps, [r["kl"] for r in rows], color="tab:purple")
    kx.set(xlabel="iteration", ylabel=kl_label)
    kx.grid(alpha=0.3)
    fig.suptitle(title)
    save_png(fig, path)
    return path


def reward_curves(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """rewards.png: mean R_c, R_h and R_s of the rollouts per iteration, the held-out R_c, and the KL to pi_0."""
    return reward_kl_figure(records, path, (("reward", "rollouts R_c"), ("reward_helpfulness", "rollouts R_h"),
                                            ("reward_safety", "rollouts R_s")), ylabel="reward (sigmoid)",
                            held_label="held-out R_c (greedy)", kl_label="KL to pi_0 (per answer)",
                            title="PPO: reward and KL")


def evaluate_at_start(run: PPO) -> dict[str, float]:
    """Start the trainer (resuming if it can); a fresh run's held-out reward is logged as step 0."""
    t = run.trainer
    t.start()
    if t.step > 0 or not run.eval_prompts:
        return {}
    record = {"step": 0, **run.evaluate(t)}
    t.metrics.append(record)
    return record


def ppo(recipe: PPORecipe, quiet: bool = False, *, scorer: Scorer | None = None) -> TrainResult:
    """Run (or resume) PPO as the recipe says; prints a one-line summary unless quiet."""
    run = PPO(recipe, scorer=scorer, quiet=quiet)
    evaluate_at_start(run)
    result = run.trainer.fit()
    if run.env.is_main:
        reward_curves(read_metrics(run.trainer.run_dir / "metrics.jsonl"), run.trainer.run_dir / "rewards.png")
    if not quiet:
        last = result.last
        print(f"ppo: {result.step} iterations, reward {last.get('reward', math.nan):.3f}, KL to pi_0 "
              f"{last.get('kl', math.nan):.3f}; checkpoint {result.checkpoint}", flush=True)
    return result


__all__ = ["PPORecipe", "ppo", "PPO", "ActorCritic", "token_rewards", "gae", "policy_loss", "value_loss",
           "masked_whiten", "pad_rollout", "Answers", "sample_answers", "PromptBatches", "reward_kl_figure",
           "policy_start"]
