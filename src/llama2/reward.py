"""Scoring (prompt, response) pairs with a reward model, and the paper's combined reward of the helpfulness and
safety RMs: the API every RLHF stage scores through.

A pair is read as the completed chat turn SFT trains on (llama2.chat): the prompt's messages (an optional system
message merged into the first user turn, earlier turns encoded as `encode_dialog` does) followed by
`BOS + tokenize("[INST] {prompt} [/INST] {response} ") + EOS`, and the reward model's scalar head is read at
that final EOS (`SequenceClassifier`, right padding, one length per row).

    rm = RewardModel.load("runs/tiny-rm-helpfulness")             # a run directory or a checkpoint directory
    rm.score(["What does os.getcwd() do?"], ["Return a string ..."])   # -> [1.93]  raw scores (logits)
    rm.probs(prompts, responses)                                   # sigmoid(score): the paper's R_h / R_s
    rm.score([[{"role": "system", ...}, {"role": "user", ...}]], [answer])   # prompts as chat messages

Scoring is batched and length-bucketed: sequences are sorted by length and cut into batches of at most
`max_batch_tokens` padded tokens, so short pairs are not padded to the longest one; results come back in input
order. A pair longer than the model's context keeps its BOS and its last `max_seq_len - 1` tokens (the response
end, where the score is read) and is counted in `truncated`.

A reward model too large to sit whole on every GPU is sharded with FSDP2 over a Trainer's processes like its
frozen reference model (`RewardModel.load_sharded`: each process reads only its rows of every tensor). Each
process then scores its own pairs; as every forward gathers the weights (a collective), the processes agree on
the number of forwards first and those with fewer batches run one-row dummies, whose scores are dropped.

The combined reward (paper section 6; rejection sampling and PPO): R_c = R_s if the prompt is a safety prompt or
R_s < 0.15, else R_h (`combine_rewards`), and WHITEN(LOGIT(R_c)) with batch or running statistics (`Whitener`):

    reward = CombinedReward(RewardModel.load(helpful_dir), RewardModel.load(safety_dir), whiten="running")
    scores = reward(prompts, responses, is_safety)     # .helpfulness, .safety, .combined, .whitened
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .chat import Message, encode_dialog_for_training
from .checkpoint import detect_kind, load_checkpoint
from .checkpoint.runs import load_tokenizer, resolve_base
from .classifier import SequenceClassifier
from .errors import Llama2Error
from .recipe import check

if TYPE_CHECKING:
    from .train.distributed import DistEnv
    from .train.loop import Trainer

Prompt = str | Sequence[Message]


def prompt_messages(prompt: Prompt) -> list[Message]:
    """A prompt as chat messages: text becomes one user message; messages must end with a user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)):
        return [dict(m) for m in prompt]
    raise Llama2Error(f"a prompt must be text or a list of chat messages, got {type(prompt).__name__}")


def encode_pair(tokenizer: Any, prompt: Prompt, response: str) -> list[int]:
    """Token ids of (prompt, response) as the completed chat turn (see the module docstring)."""
    return encode_scored(tokenizer, prompt, response)[0]


def encode_scored(tokenizer: Any, prompt: Prompt, response: str) -> tuple[list[int], int]:
    """(encode_pair's token ids, the position of the response's first token): what a reward model with the
    likelihood term reads (llama2.classifier)."""
    if not isinstance(response, str):
        raise Llama2Error(f"a response must be text, got {type(response).__name__}")
    messages = prompt_messages(prompt) + [{"role": "assistant", "content": response}]
    ids, trained = encode_dialog_for_training(tokenizer, messages, train_on="last_assistant")
    return ids, trained.index(True)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """(tokens (B, T) right-padded with pad_id, lengths (B,))."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return tokens, torch.tensor([len(r) for r in rows], dtype=torch.long)


def length_buckets(lengths: Sequence[int], max_batch_tokens: int, max_rows: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first, each with rows x longest <= max_batch_tokens
    (at least one row per batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        if batches:
            b = batches[-1]
            fits = (len(b) + 1) * lengths[b[0]] <= max_batch_tokens and (max_rows is None or len(b) < max_rows)
            if fits:
                b.append(i)
                continue
        batches.append([i])
    return batches


class RewardModel:
    """A sequence classifier with its tokenizer, scoring (prompt, response) pairs; see the module docstring.

    `model` may be a plain SequenceClassifier or the one a Trainer is training (FSDP-wrapped too: every forward
    goes through the module's own call, so under FSDP every process must score the same inputs), or one sharded
    over `sharded_over`'s processes, each scoring its own inputs (load_sharded, the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_batch_tokens: int = 16_384,
                 max_seq_len: int | None = None, autocast_dtype: torch.dtype | None = None,
                 sharded_over: DistEnv | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.sharded_over = sharded_over if sharded_over is not None and sharded_over.enabled else None
        self.max_batch_tokens = max_batch_tokens
        config = getattr(model, "config", None)
        self.max_seq_len = max_seq_len or (config.max_seq_len if config is not None else 4096)
        self.pad_id = int(getattr(model, "pad_id", 0))
        self.autocast_dtype = autocast_dtype
        self.truncated = 0

    @classmethod
    def load(cls, path: Path | str, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
             **kwargs: Any) -> RewardModel:
        """A reward model from a checkpoint directory (LlamaForSequenceClassification layout) or a training run
        (its latest checkpoint), with the tokenizer.model saved beside it."""
        ckpt = resolve_base(str(path))
        kind = detect_kind(ckpt)
        model = load_checkpoint(ckpt, device=device, dtype=dtype) if kind != "causal_lm" else None
        if not isinstance(model, SequenceClassifier):
            what = "a causal LM" if kind == "causal_lm" else "a causal-LM adapter"
            raise Llama2Error(f"{ckpt} holds {what}, not a reward model (a sequence classifier); train one with "
                              "`llama2 reward` or give its directory")
        return cls(model.eval(), load_tokenizer(ckpt), **kwargs)

    @classmethod
    def load_sharded(cls, path: Path | str, trainer: Trainer, name: str, **kwargs: Any) -> RewardModel:
        """A reward model sharded with FSDP2 over `trainer`'s processes as its frozen reference models are
        (Trainer.add_reference_model, registered as `name`): built on the meta device in the checkpoint's dtype,
        each process reading only its rows of every tensor; gathered in the compute dtype on GPUs. Every process
        must load it, and score whenever another does. With one process: RewardModel.load, on the trainer's
        device."""
        ckpt = resolve_base(str(path))
        if not trainer.env.enabled:
            return cls.load(ckpt, device=trainer.device, **kwargs)
        skeleton = reward_skeleton(ckpt)
        model = trainer.add_reference_model(name, lambda: skeleton, checkpoint=ckpt)
        return cls(model, load_tokenizer(ckpt), sharded_over=trainer.env, **kwargs)

    def encode(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[tuple[list[int], int]]:
        if isinstance(prompts, str) or isinstance(responses, str):
            raise Llama2Error("score() takes lists: score([prompt, ...], [response, ...])")
        if len(prompts) != len(responses):
            raise Llama2Error(f"score() got {len(prompts)} prompts and {len(responses)} responses; give one "
                              "response per prompt")
        return [encode_scored(self.tokenizer, p, r) for p, r in zip(prompts, responses)]

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """Raw scores (logits), one per (prompt, response), in input order."""
        encoded = self.encode(prompts, responses)
        return self.score_ids([ids for ids, _ in encoded], [start for _, start in encoded])

    def probs(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        """sigmoid(score) per pair: the probabilities the paper combines (R_h, R_s)."""
        return [sigmoid(s) for s in self.score(prompts, responses)]

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[Sequence[int]], starts: Sequence[int] | None = None) -> list[float]:
        """Scores of already-encoded sequences (each ending with the EOS to score at), batched by length; `starts`:
        where each response begins (encode_scored), needed by a model with the likelihood term. Sharded, every
        process runs as many forwards as the one with the most batches (the module docstring)."""
        if not sequences and self.sharded_over is None:
            return []
        rows, firsts = [], []
        for n, s in enumerate(sequences):
            if not s:
                raise Llama2Error("cannot score an empty token sequence")
            start = starts[n] if starts is not None else 1
            if len(s) > self.max_seq_len:
                self.truncated += 1
                cut = len(s) - self.max_seq_len + 1
                s, start = [s[0], *s[cut:]], max(1, start - cut + 1)
            rows.append(list(s))
            firsts.append(start)
        device = next(self.model.parameters()).device
        out = [0.0] * len(rows)
        was_training = self.model.training
        self.model.eval()
        batches = length_buckets([len(r) for r in rows], self.max_batch_tokens)
        forwards = len(batches)
        if self.sharded_over is not None:
            from .train.distributed import all_gather_object

            forwards = max(all_gather_object(forwards, self.sharded_over))
        try:
            for _ in range(forwards - len(batches)):
                with _autocast(device, self.autocast_dtype):
                    self._dummy_forward(device)
            for batch in batches:
                tokens, lengths = pad_rows([rows[i] for i in batch], self.pad_id)
                extra = {"response_from": torch.tensor([firsts[i] for i in batch], device=device)} \
                    if starts is not None else {}
                with _autocast(device, self.autocast_dtype):
                    scores = self.model(tokens.to(device), lengths=lengths.to(device), **extra)
                for i, s in zip(batch, scores.float().tolist()):
                    out[i] = s
        finally:
            self.model.train(was_training)
        return out

    def _dummy_forward(self, device: torch.device) -> None:
        """A forward of one two-token row, its score dropped: keeps a sharded model's collectives in step."""
        tokens = torch.full((1, 2), self.pad_id, dtype=torch.long, device=device)
        extra = {"response_from": torch.ones(1, dtype=torch.long, device=device)} \
            if getattr(self.model, "likelihood", False) else {}
        self.model(tokens, lengths=torch.full((1,), 2, device=device), **extra)


def reward_skeleton(ckpt: Path) -> SequenceClassifier:
    """The reward model in checkpoint directory `ckpt` (Hugging Face layout) on the meta device, in its stored
    dtype (config.json is all that is read): what load_sharded fills."""
    from .checkpoint import hf

    kind = detect_kind(ckpt)
    if kind != "classifier":
        what = "a causal LM" if kind == "causal_lm" else "a LoRA adapter"
        fix = "train one with `llama2 reward`" if kind == "causal_lm" else \
            "merge it first (`llama2 lora merge`) or load the reward models whole (reward_models: whole)"
        raise Llama2Error(f"{ckpt} holds {what}, not a full reward model (a sequence classifier) to shard; {fix}")
    d = hf.read_json(ckpt / hf.CONFIG)
    cfg = hf.config_from_hf(d, ckpt / hf.CONFIG)
    with torch.device("meta"):
        model = SequenceClassifier(cfg, pad_id=hf.pad_id_of_config(d, cfg),
                                   likelihood=d.get(hf.LIKELIHOOD_FLAG) is True)
    return model.to(hf.config_dtype(d) or torch.float32)


def sigmoid(x: float) -> float:
    """A numerically safe logistic function."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)



# ---------------------------------------------------------------------------------------------------------------
# The combined reward of the two reward models (paper section 6; rejection sampling and PPO)

SAFETY_THRESHOLD = 0.15  # R_s below this means the answer is unsafe, whatever the prompt


def combine_rewards(helpfulness: Sequence[float], safety: Sequence[float], is_safety: Sequence[bool],
                    threshold: float = SAFETY_THRESHOLD) -> list[float]:
    """R_c per answer: R_s if the prompt is tagged safety or R_s < threshold, else R_h (all sigmoid probabilities;
    an R_s of exactly `threshold` on an untagged prompt gives R_h)."""
    if not len(helpfulness) == len(safety) == len(is_safety):
        raise Llama2Error(f"combine_rewards got {len(helpfulness)} helpfulness, {len(safety)} safety scores and "
                          f"{len(is_safety)} safety tags; give one of each per answer")
    return [s if tagged or s < threshold else h for h, s, tagged in zip(helpfulness, safety, is_safety)]


def logit(p: float, eps: float = 1e-6) -> float:
    """log(p / (1 - p)), with p clamped to [eps, 1 - eps] (a saturated RM gives a large finite value)."""
    p = min(max(p, eps), 1.0 - eps)
    return math.log(p / (1.0 - p))


class Whitener:
    """WHITEN(x) = (x - mean) / std. mode="batch": the statistics of the values being whitened; "running": of every
    value seen so far (each call adds its values first, then whitens with the updated mean and variance; Welford's
    algorithm, so the result does not depend on how the values were split into calls). state_dict() holds the
    running statistics (they are checkpointed with a run)."""

    def __init__(self, mode: str = "batch", eps: float = 1e-8) -> None:
        if mode not in ("batch", "running"):
            raise Llama2Error(f"whiten mode must be 'batch' or 'running', got {mode!r}")
        self.mode, self.eps = mode, eps
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: Sequence[float]) -> None:
        for x in values:
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    def __call__(self, values: Sequence[float]) -> list[float]:
        values = [float(v) for v in values]
        if not values:
            return []
        if self.mode == "batch":
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / len(values)
        else:
            self.update(values)
            mean, var = self.mean, self.m2 / max(self.count, 1)
        std = math.sqrt(var)
        return [(v - mean) / (std + self.eps) for v in values]

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


@dataclass
class CombinedScores:
    """Per answer: R_h and R_s (sigmoid probabilities), R_c, and WHITEN(LOGIT(R_c)) (None when not whitened)."""

    helpfulness: list[float]
    safety: list[float]
    combined: list[float]
    whitened: list[float] | None = None


class CombinedReward:
    """The paper's reward of an answer from the helpfulness and safety RMs: R_c (combine_rewards), and for PPO
    WHITEN(LOGIT(R_c)) with batch or running statistics (`whiten="none"` skips it)."""

    def __init__(self, helpfulness: RewardModel, safety: RewardModel, *, threshold: float = SAFETY_THRESHOLD,
                 whiten: str = "none") -> None:
        if not 0.0 < threshold < 1.0:
            raise Llama2Error(f"the safety threshold must be in (0, 1), got {threshold}")
        self.helpfulness_rm, self.safety_rm, self.threshold = helpfulness, safety, threshold
        self.whitener = Whitener(whiten) if whiten != "none" else None

    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str], is_safety: Sequence[bool]
                 ) -> CombinedScores:
        r_h = self.helpfulness_rm.probs(prompts, responses)
        r_s = self.safety_rm.probs(prompts, responses)
        r_c = combine_rewards(r_h, r_s, is_safety, self.threshold)
        white = self.whitener([logit(p) for p in r_c]) if self.whitener is not None else None
        return CombinedScores(r_h, r_s, r_c, white)


def check_reward_models(recipe: Any) -> None:
    """The recipe key `reward_models` (PPO, GRPO, rejection sampling)."""
    check(recipe.reward_models in ("whole", "sharded"), "reward_models", recipe.reward_models, "whole or sharded")


def reward_models(recipe: Any, trainer: Trainer, helpfulness: Path, safety: Path) -> CombinedReward:
    """The combined reward of a recipe's two RMs (PPO, GRPO, rejection sampling): each loaded whole on every
    process, or sharded over the trainer's processes (`reward_models: sharded`, RewardModel.load_sharded)."""
    def load(path: Path, name: str) -> RewardModel:
        if recipe.reward_models == "sharded":
            return RewardModel.load_sharded(path, trainer, name)
        return RewardModel.load(path, device=trainer.device)

    return CombinedReward(load(helpfulness, "helpfulness_rm"), load(safety, "safety_rm"), threshold=recipe.threshold)


__all__ = ["RewardModel", "reward_models", "check_reward_models", "reward_skeleton", "encode_pair", "encode_scored",
           "prompt_messages", "pad_rows", "length_buckets", "sigmoid", "logit", "combine_rewards", "Whitener",
           "CombinedReward", "CombinedScores", "SAFETY_THRESHOLD"]
