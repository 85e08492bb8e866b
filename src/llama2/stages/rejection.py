"""Rejection-sampling fine-tuning (paper section 6, RLHF-V1..V4): for each prompt, draw K answers from the latest
policy, score them with the combined reward of the two reward models, keep the best, fine-tune on those.

One iteration (V_i) is:
  1. the sampling temperature: fixed, or re-tuned by a sweep (`temperature: sweep`) that samples K answers to a
     few held-out prompts at each candidate temperature and keeps the one with the highest mean best-of-K reward
     (the paper found the best temperature moves as the policy changes);
  2. K samples per prompt through the one generation path (`llama2.inference.generate.Generator`, batched, each
     sample with its own seed), scored by R_c (`llama2.reward.combine_rewards`: the safety RM's score for a safety
     prompt or when it falls below 0.15, else the helpfulness RM's), written batch by batch to
     `iter-N/samples.jsonl`: a killed run continues from the last finished batch;
  3. the best sample per prompt, pooled: `pool: latest` trains on this iteration's best, `pool: all` on each
     prompt's best over every iteration so far (the paper's fix for the regressions of training on the last
     iteration alone);
  4. supervised fine-tuning on the selection through the SFT stage (`finetune.recipe`, its own resumable run in
     `iter-N/sft`), from the previous iteration's policy (`finetune.start: previous`) or the first one (`base`);
  5. the new policy's greedy answers to the held-out prompts, scored: `heldout_reward` (mean R_c),
     `helpfulness` and `safety` (mean R_h, R_s).
`sampler:` samples from another checkpoint every iteration (distilling a larger model's best answers into the
policy, as the paper samples with 70B). metrics.jsonl gets one record per iteration (iteration 0: the starting
policy's held-out reward), with `reward_by_k` ({K: the mean over prompts of the best reward among the first K
samples}, nested subsets of the same samples) and `median_by_k`; `reward_by_k.png` is the paper's Figure 7.

Under torchrun (N processes; gloo on CPU, NCCL on GPUs) every process samples its own contiguous slice of each
batch of prompts (our engine: the policy whole in each process; `rollout_engine: vllm`: each sends its slice to the
server) and scores it; the rows are all-gathered, so every process holds every prompt's samples in prompt order
(each sample's seed depends on (seed, iteration, prompt, index) only: the samples do not depend on N). The two RMs
are whole in every process, or sharded over the processes with FSDP2 (`reward_models: sharded`, as PPO shards
them: every process scores every batch, an empty slice too). Rank 0 writes the files; each iteration's
fine-tuning is the SFT stage run in every process (FSDP2 over the same processes).

    recipe = load_recipe(RejectionRecipe, "configs/tiny/rejection.yaml")
    result = pipeline.run(recipe)           # builds the SFT model and both RMs when missing, then this stage
    result = rejection_sampling(recipe, scorer=my_scorer)   # any (prompts, responses, is_safety) -> CombinedScores
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from tqdm import tqdm

from ..atomic import atomic_open, atomic_write_text, make_dir
from ..chat import answer_messages, encode_dialog
from ..checkpoint import load_checkpoint, load_config
from ..checkpoint.runs import load_tokenizer, require_checkpoint, resolve_base
from ..data.dialogues import Dialogue
from ..data.prompts import PromptItem, PromptsSpec, load_prompt_sets, prompt_key, sample_seed, take
from ..data.world.tools import check_tools, world_toolbox
from ..errors import Llama2Error
from ..figures import pyplot, save_png
from ..inference.generate import Generator, SamplingParams
from ..inference.remote import VllmColocated, VllmServer, check_rollout_engine, server_url
from ..paths import config_path, expand_path
from ..recipe import check, load_recipe, to_dict
from ..reward import SAFETY_THRESHOLD, CombinedScores, check_reward_models, reward_models
from ..train.config import TrainRecipe
from ..train.distributed import all_gather_object, barrier, broadcast_object, init_distributed
from ..train.loop import FrozenModels
from ..train.metrics import MetricsLog, read_metrics
from .sft import FinetuneSpec, SFTRecipe, sft

Scorer = Callable[[Sequence[Any], Sequence[str], Sequence[bool]], CombinedScores]
STATE = "state.json"

# ---------------------------------------------------------------------------------------------------------------
# Best-of-K and pooling


def best_of_k(rewards: Sequence[Sequence[float]], k: int) -> list[float]:
    """Per prompt, the best reward among its first k samples."""
    return [max(r[:k]) for r in rewards]


def reward_by_k(rewards: Sequence[Sequence[float]]) -> tuple[dict[int, float], dict[int, float]]:
    """({K: mean over prompts of the max of the first K rewards}, {K: mean of their median}) for K = 1..K_max: the
    paper's Figure 7 on nested subsets of the same samples."""
    k_max = min(len(r) for r in rewards)
    best = {k: statistics.fmean(best_of_k(rewards, k)) for k in range(1, k_max + 1)}
    median = {k: statistics.fmean(statistics.median(r[:k]) for r in rewards) for k in range(1, k_max + 1)}
    return best, median


@dataclass
class Best:
    """One prompt's kept sample: its text, reward and the iteration that drew it."""

    key: str
    prompt: PromptItem
    text: str
    reward: float
    iteration: int


def select_best(prompts: Sequence[PromptItem], texts: Sequence[Sequence[str]], rewards: Sequence[Sequence[float]],
                iteration: int) -> dict[str, Best]:
    """The best sample of each prompt (the first of equal rewards), keyed by the prompt."""
    out = {}
    for p, t, r in zip(prompts, texts, rewards):
        i = max(range(len(r)), key=lambda j: (r[j], -j))
        out[prompt_key(p)] = Best(prompt_key(p), p, t[i], r[i], iteration)
    return out


def pool_selection(per_iteration: Sequence[dict[str, Best]], pool: str) -> list[Best]:
    """The fine-tuning set: the last iteration's best (`latest`) or each prompt's best over all iterations (`all`;
    on a tie the later sample)."""
    if pool == "latest":
        return list(per_iteration[-1].values())
    merged: dict[str, Best] = {}
    for it in per_iteration:
        for key, b in it.items():
            if key not in merged or b.reward >= merged[key].reward:
                merged[key] = b
    return list(merged.values())


# ---------------------------------------------------------------------------------------------------------------
# The recipe


@dataclass
class SweepSpec:
    """`temperature: sweep`: the candidate temperatures and how many held-out prompts each is tried on."""

    temperatures: list[float] = field(default_factory=lambda: [0.7, 1.0, 1.3])  # candidate temperatures
    prompts: int = 8  # held-out prompts each candidate is tried on

    def validate(self, prefix: str = "sweep") -> None:
        check(bool(self.temperatures) and all(t > 0 for t in self.temperatures), f"{prefix}.temperatures",
               self.temperatures, "a non-empty list of positive numbers")
        check(self.prompts >= 1, f"{prefix}.prompts", self.prompts, "an integer >= 1")


@dataclass
class RejectionRecipe:
    """`llama2 rlhf rejection-sampling`: see configs/tiny/rejection.yaml and the module docstring."""

    base: str = ""  # the policy to start from (V0): a chat model, HF or Meta layout, or an SFT run
    base_recipe: str | None = None  # an SFT recipe that builds `base` when it is missing
    helpfulness_rm: str = ""  # the helpfulness reward model (checkpoint or run)
    helpfulness_rm_recipe: str | None = None  # a reward recipe that builds it when missing
    safety_rm: str = ""  # the safety reward model (checkpoint or run)
    safety_rm_recipe: str | None = None  # a reward recipe that builds it when missing
    sampler: str | None = None  # sample from this checkpoint instead of the current policy (distillation)
    out_dir: str = "runs/rejection"  # the run directory: one iter-N/ per iteration
    iterations: int = 2  # RLHF versions V1..Vn
    samples_per_prompt: int = 8  # K
    max_prompts: int | None = None  # the first N training prompts (null: all)
    # sampling temperature, or sweep: chosen on held-out prompts each iteration
    temperature: float | Literal["sweep"] = 1.0
    top_p: float = 1.0  # nucleus sampling
    sweep: SweepSpec = field(default_factory=SweepSpec)
    pool: Literal["latest", "all"] = "all"  # fine-tune on the best of this iteration (latest) or of all so far (all)
    max_new_tokens: int = 128  # longest answer (tool results included)
    # tools the samples may call (calculator, search: the world's), listed in every prompt; a kept answer is
    # fine-tuned on with its calls, its results masked out of the loss
    tools: list[str] = field(default_factory=list)
    batch_prompts: int = 8  # prompts sampled together (batch_prompts x K sequences per generation batch)
    rollout_quantize: Literal["none", "int8"] = "none"  # int8: the K samples come from weight-only int8 layers
    # samples from our engine, or from vLLM (vllm_mode: a server, or colocated), which loads each iteration's
    # policy checkpoint before sampling from it
    rollout_engine: Literal["ours", "vllm"] = "ours"
    # rollout_engine vllm: a vLLM server started separately (at vllm_url), or vLLM colocated in the stage's own
    # processes (llama2.inference.colocate: the weights handed over in memory, asleep while training on a GPU)
    vllm_mode: Literal["server", "colocate"] = "server"
    vllm_url: str | None = None  # vllm_mode server: the server's address (unset: http://127.0.0.1:8000)
    vllm_gpu_memory: float = 0.3  # colocate on CUDA: the share of each GPU's memory vLLM takes (weights, KV cache)
    # the two RMs whole in every process, or sharded with FSDP2 over the torchrun processes (the 70B recipe: two
    # 70B RMs do not fit whole on one GPU); with one process sharded is whole
    reward_models: Literal["whole", "sharded"] = "whole"
    threshold: float = SAFETY_THRESHOLD  # R_s below this makes the safety RM decide (the paper's 0.15)
    max_steps: int | None = None  # caps each iteration's fine-tuning steps (null: the finetune recipe's)
    seed: int = 0  # seeds every sample (fixed per prompt, iteration and index)
    device: str = "auto"  # auto, cpu or cuda
    prompts: PromptsSpec = field(default_factory=PromptsSpec)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)

    def validate(self) -> None:
        for key in ("base", "helpfulness_rm", "safety_rm"):
            check(bool(getattr(self, key)), key, getattr(self, key), "a checkpoint directory or run")
        check(bool(self.out_dir), "out_dir", self.out_dir, "a directory path")
        check(self.iterations >= 1, "iterations", self.iterations, "an integer >= 1")
        check(self.samples_per_prompt >= 1, "samples_per_prompt", self.samples_per_prompt, "an integer >= 1 (K)")
        check(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", self.max_prompts,
               "an integer >= 1 or null (all)")
        check(self.temperature == "sweep" or (isinstance(self.temperature, float) and self.temperature > 0),
               "temperature", self.temperature, "a positive number or 'sweep'")
        check(0 < self.top_p <= 1, "top_p", self.top_p, "a number in (0, 1]")
        check(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check_tools(self.tools)
        check_rollout_engine(self)
        check_reward_models(self)
        check(self.rollout_quantize == "none" or self.rollout_engine == "ours", "rollout_quantize",
              self.rollout_quantize, "none with rollout_engine=vllm (the server holds the weights)")
        check(self.batch_prompts >= 1, "batch_prompts", self.batch_prompts, "an integer >= 1")
        check(0 < self.threshold < 1, "threshold", self.threshold, "a number in (0, 1)")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1 or null")
        self.prompts.validate()
        self.sweep.validate()

    def finetune_recipe(self, base: Path | str, out_dir: Path, iteration: int) -> Any:
        """The SFT recipe of one iteration's fine-tuning (checked when the recipe is loaded, so a bad key fails
        before any sampling)."""
        extra = [f"max_steps={self.max_steps}"] if self.max_steps is not None else []
        return load_recipe(SFTRecipe, config_path(self.finetune.recipe),
                           [*self.finetune.overrides, *extra, f"base={base}", "base_recipe=null",
                            f"out_dir={out_dir}", "data.path=null", "data.val_path=null", "samples.count=0",
                            f"seed={self.seed + iteration}", f"device={self.device}"])


# ---------------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class RejectionResult:
    iterations: int
    policy: Path  # the last iteration's checkpoint
    records: list[dict[str, Any]]


class RejectionSampling:
    """One run of the loop (module docstring); `run()` does (or resumes) every iteration."""

    def __init__(self, recipe: RejectionRecipe, *, scorer: Scorer | None = None, quiet: bool = False) -> None:
        self.recipe, self.quiet = recipe, quiet
        self.env = init_distributed(recipe.device)
        self.main = self.env.is_main
        self.out = expand_path(recipe.out_dir)
        if self.main:
            make_dir(self.out)
        barrier(self.env)
        self.device = self.env.device
        self.base = require_checkpoint(recipe.base, "starting policy")
        recipe.finetune_recipe(self.base, self.out / "check", 0)  # a bad finetune key fails now
        if scorer is None:
            h = require_checkpoint(recipe.helpfulness_rm, "helpfulness RM")
            s = require_checkpoint(recipe.safety_rm, "safety RM")
            # RewardModel.load_sharded's holder: FSDP2 over this job's processes, as a Trainer shards its models
            holder = FrozenModels(TrainRecipe(out_dir=str(self.out), device=recipe.device), self.env)
            scorer = reward_models(recipe, holder, h, s)
        self.scorer = scorer
        self.tools = world_toolbox(recipe.tools) if recipe.tools else None
        self.server: VllmServer | VllmColocated | None = None  # rollout_engine: vllm
        self.server_holds: Path | None = None  # the checkpoint the server last loaded
        self.sampler = None
        if recipe.sampler is not None:
            self.sampler = require_checkpoint(recipe.sampler, "sampler")
        train, val = load_prompt_sets(recipe.prompts, quiet)
        self.train_prompts = take(train, recipe.max_prompts)
        if not val:
            raise Llama2Error("no held-out prompts: set prompts.val_path (or use the built-in prompts)")
        n = recipe.prompts.held_out
        self.eval_prompts = val[:n]
        rest = val[n:] or val
        self.sweep_prompts = (rest * (recipe.sweep.prompts // len(rest) + 1))[:recipe.sweep.prompts]
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.main)

    # ------------------------------------------------------------ state

    def state(self) -> dict[str, Any]:
        path = self.out / STATE
        return json.loads(path.read_text()) if path.is_file() else {"done": 0, "policies": {"0": str(self.base)}}

    def save_state(self, state: dict[str, Any]) -> None:
        if self.main:
            atomic_write_text(self.out / STATE, json.dumps(state, indent=1))
        barrier(self.env)

    def write_text(self, path: Path, text: str) -> None:
        """Rank 0 writes the file (atomically)."""
        if self.main:
            atomic_write_text(path, text)

    # ------------------------------------------------------------ sampling and scoring

    def _load_policy(self, path: Path):
        model = load_checkpoint(path, kind="causal_lm", device=self.device).eval()
        return model, load_tokenizer(path)

    def _server(self, policy: Path, tok: Any) -> VllmServer | VllmColocated:
        """vLLM (rollout_engine: vllm), holding `policy`'s weights: the server (one process reloads it), or each
        process's colocated engine (vllm_mode: colocate; started on the first policy, each reloads its own)."""
        r = self.recipe
        if self.server is None:
            if r.vllm_mode == "colocate":
                self.server = VllmColocated(policy, tok, device=self.device,
                                            max_model_len=load_config(policy).max_seq_len,
                                            gpu_memory=r.vllm_gpu_memory, seed=r.seed)
                self.server_holds = Path(policy)
            else:
                self.server = VllmServer(server_url(r), tok)
        if self.server_holds != Path(policy):
            if self.main or r.vllm_mode == "colocate":  # one process reloads the server; the others wait for it
                self.server.load_weights(policy)
            barrier(self.env)
            self.server_holds = Path(policy)
        return self.server

    def sample(self, policy: Path, prompts: Sequence[PromptItem], iteration: int, temperature: float,
               k: int, path: Path | None, desc: str) -> list[dict[str, Any]]:
        """K samples per prompt with their scores, batch by batch; with `path`, every finished batch is written
        (atomically, by rank 0) and a rerun continues after the last one. Under torchrun every process must call
        it: each samples and scores its own slice of every batch, and every process gets all the rows."""
        done = [json.loads(x) for x in path.read_text().splitlines()] if path is not None and path.is_file() else []
        if len(done) >= len(prompts):
            return done[:len(prompts)]
        r, env = self.recipe, self.env
        per = -(-min(r.batch_prompts, len(prompts)) // env.world_size)  # each process's share of a batch
        if r.rollout_engine == "vllm":
            tok, context = load_tokenizer(policy), load_config(policy).max_seq_len
            gen = self._server(policy, tok)
        else:
            model, tok = self._load_policy(policy)
            context = model.config.max_seq_len
            gen = Generator(model, tok, max_batch_size=per * k, quantize=r.rollout_quantize)
        bar = tqdm(total=len(prompts), initial=len(done), unit="prompt", desc=desc,
                   disable=self.quiet or not self.main, dynamic_ncols=True)
        try:
            for lo in range(len(done), len(prompts), r.batch_prompts):
                whole = prompts[lo:lo + r.batch_prompts]
                batch = whole[env.rank * per:(env.rank + 1) * per]  # may be empty: it still scores (a collective)
                ids, params = [], []
                for p in batch:
                    prompt_ids = encode_dialog(tok, p.messages, tools=self.tools.specs if self.tools else None)
                    room = max(1, min(r.max_new_tokens, context - min(len(prompt_ids), context - 1)))
                    for j in range(k):
                        ids.append(prompt_ids)
                        params.append(SamplingParams(temperature=temperature, top_p=r.top_p, max_new_tokens=room,
                                                     seed=sample_seed(r.seed, iteration, prompt_key(p), j),
                                                     truncate=True, tools=self.tools))
                with torch.no_grad():
                    completions = gen.generate(ids, params) if ids else []
                texts = [c.text.strip() for c in completions]
                finished = [c.finish_reason == "stop" for c in completions]
                flat_prompts = [p.messages for p in batch for _ in range(k)]
                scores = self.scorer(flat_prompts, texts, [p.safety for p in batch for _ in range(k)])
                mine = []
                for i, p in enumerate(batch):
                    s = slice(i * k, (i + 1) * k)
                    mine.append({"prompt": p.messages, "safety": p.safety, "samples": texts[s],
                                 "finished": finished[s], "reward": scores.combined[s],
                                 "helpfulness": scores.helpfulness[s], "safety_score": scores.safety[s]})
                done += [row for part in all_gather_object(mine, env) for row in part]  # in prompt order
                if path is not None:
                    self.write_text(path, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in done))
                bar.update(len(whole))
        finally:
            bar.close()
        barrier(env)  # the samples file is whole before any process reads it
        return done

    def evaluate(self, policy: Path) -> tuple[dict[str, float], list[str]]:
        """Greedy answers of `policy` to the held-out prompts: mean R_c, R_h, R_s."""
        rows = self.sample(policy, self.eval_prompts, 0, 0.0, 1, None, "held-out answers")
        reward = [d["reward"][0] for d in rows]
        return ({"heldout_reward": statistics.fmean(reward),
                 "helpfulness": statistics.fmean(d["helpfulness"][0] for d in rows),
                 "safety": statistics.fmean(d["safety_score"][0] for d in rows)},
                [d["samples"][0] for d in rows])

    def choose_temperature(self, policy: Path, iteration: int, it_dir: Path) -> tuple[float, dict[str, float]]:
        r = self.recipe
        if r.temperature != "sweep":
            return float(r.temperature), {}
        path = it_dir / "sweep.json"
        saved = broadcast_object(json.loads(path.read_text()) if self.main and path.is_file() else None, self.env)
        if saved is not None:
            return float(saved["temperature"]), saved["best_of_k"]
        result = {}
        for t in r.sweep.temperatures:
            rows = self.sample(policy, self.sweep_prompts, iteration, t, r.samples_per_prompt, None,
                               f"sweep T={t:g}")
            result[f"{t:g}"] = statistics.fmean(best_of_k([d["reward"] for d in rows], r.samples_per_prompt))
        best = max(r.sweep.temperatures, key=lambda t: result[f"{t:g}"])
        self.write_text(path, json.dumps({"temperature": best, "best_of_k": result}))
        return best, result

    # ------------------------------------------------------------ one iteration

    def iteration(self, i: int, state: dict[str, Any], selections: list[dict[str, Best]]) -> dict[str, Any]:
        r = self.recipe
        it_dir = self.out / f"iter-{i}"
        if self.main:
            make_dir(it_dir)
        barrier(self.env)
        policy = Path(state["policies"][str(i - 1)])
        sampler = self.sampler or policy
        temperature, sweep = self.choose_temperature(sampler, i, it_dir)
        rows = self.sample(sampler, self.train_prompts, i, temperature, r.samples_per_prompt,
                           it_dir / "samples.jsonl", f"V{i} samples (T={temperature:g})")
        rewards = [d["reward"] for d in rows]
        selections.append(select_best(self.train_prompts, [d["samples"] for d in rows], rewards, i))
        chosen = [b for b in pool_selection(selections, r.pool) if b.text]  # an empty answer teaches nothing
        if not chosen:
            raise Llama2Error(f"iteration {i}: every best sample is empty; raise max_new_tokens or the temperature")
        specs = [s.to_openai() for s in self.tools.specs] if self.tools else None
        dialogues = [Dialogue(b.prompt.messages + answer_messages(b.text), tools=specs) for b in chosen]
        if self.main:
            with atomic_open(it_dir / "selected.jsonl", "w") as f:
                for b in chosen:
                    f.write(json.dumps({"messages": b.prompt.messages, "answer": b.text, "reward": b.reward,
                                        "iteration": b.iteration}, ensure_ascii=False) + "\n")
        start = policy if r.finetune.start == "previous" else Path(state["policies"]["0"])
        # every process runs the SFT stage (FSDP2 over the same processes under torchrun)
        result = sft(r.finetune_recipe(start, it_dir / "sft", i), quiet=True, dialogues=dialogues)
        barrier(self.env)
        new_policy = resolve_base(str(it_dir / "sft"))
        by_k, median = reward_by_k(rewards)
        heldout, answers = self.evaluate(new_policy)
        self.write_text(it_dir / "heldout_answers.json", json.dumps(answers, ensure_ascii=False))
        record = {"step": i, "iteration": i, "temperature": temperature, "reward_by_k": by_k, "median_by_k": median,
                  **heldout, "selected": len(chosen), "selected_reward": statistics.fmean(b.reward for b in chosen),
                  "samples": sum(len(x) for x in rewards), "finetune_steps": result.step,
                  "finetune_loss": result.last.get("loss")}
        if sweep:
            record["temperature_sweep"] = sweep
        return {"record": record, "policy": str(new_policy)}

    def run(self) -> RejectionResult:
        self.write_text(self.out / "recipe.yaml", yaml.safe_dump(to_dict(self.recipe), sort_keys=False))
        state = self.state()
        self.metrics.truncate(state["done"])
        barrier(self.env)
        path = self.out / "metrics.jsonl"
        logged = read_metrics(path) if path.is_file() else []
        if not any(x.get("iteration") == 0 for x in logged):
            heldout, answers = self.evaluate(self.base)
            self.write_text(self.out / "heldout_answers.json", json.dumps(answers, ensure_ascii=False))
            self.metrics.append({"step": 0, "iteration": 0, **heldout})
        selections = self.previous_selections(state["done"])
        for i in range(state["done"] + 1, self.recipe.iterations + 1):
            out = self.iteration(i, state, selections)
            self.metrics.append(out["record"])
            state["done"] = i
            state["policies"][str(i)] = out["policy"]
            self.save_state(state)
            if not self.quiet and self.main:
                rec = out["record"]
                print(f"V{i}: best-of-{self.recipe.samples_per_prompt} reward "
                      f"{rec['reward_by_k'][self.recipe.samples_per_prompt]:.3f} (1 sample: "
                      f"{rec['reward_by_k'][1]:.3f}), held-out reward {rec['heldout_reward']:.3f}", flush=True)
        barrier(self.env)
        records = read_metrics(self.out / "metrics.jsonl")
        if self.main:
            figure_7(records, self.out / "reward_by_k.png")
        return RejectionResult(state["done"], Path(state["policies"][str(state["done"])]), records)

    def previous_selections(self, done: int) -> list[dict[str, Best]]:
        """The best samples of the finished iterations (for pooling after a resume), from their samples files."""
        out = []
        for i in range(1, done + 1):
            rows = [json.loads(x) for x in (self.out / f"iter-{i}" / "samples.jsonl").read_text().splitlines()]
            prompts = [PromptItem(d["prompt"], d["safety"]) for d in rows]
            out.append(select_best(prompts, [d["samples"] for d in rows], [d["reward"] for d in rows], i))
        return out


def figure_7(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Mean best-of-K (solid) and median (dashed) reward against K, one curve per iteration."""
    plt = pyplot()

    rows = [r for r in records if "reward_by_k" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ks = sorted(int(k) for k in r["reward_by_k"])
        line, = ax.plot(ks, [r["reward_by_k"][str(k)] if str(k) in r["reward_by_k"] else r["reward_by_k"][k]
                             for k in ks], "o-", markersize=3, label=f"V{r['iteration']} max")
        med = r.get("median_by_k", {})
        ax.plot(ks, [med.get(str(k), med.get(k)) for k in ks], "--", color=line.get_color(),
                label=f"V{r['iteration']} median")
    ax.set_xlabel("K (samples per prompt)")
    ax.set_ylabel("combined reward R_c")
    ax.set_title("Best-of-K reward (Figure 7)")
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)
    return path


def rejection_sampling(recipe: RejectionRecipe, quiet: bool = False, *, scorer: Scorer | None = None
                       ) -> RejectionResult:
    """Run (or resume) every iteration as the recipe says; prints a one-line summary unless quiet."""
    run = RejectionSampling(recipe, scorer=scorer, quiet=quiet)
    result = run.run()
    if not quiet and run.main:
        first = next((r for r in result.records if r.get("iteration") == 0), {})
        last = result.records[-1] if result.records else {}
        print(f"rejection sampling: {result.iterations} iterations, held-out reward "
              f"{first.get('heldout_reward', float('nan')):.3f} -> {last.get('heldout_reward', float('nan')):.3f}; "
              f"policy {result.policy}", flush=True)
    return result


__all__ = ["RejectionRecipe", "rejection_sampling", "RejectionSampling", "best_of_k", "reward_by_k",
           "select_best", "pool_selection", "figure_7"]
