"""DPO (beyond the paper): direct preference optimisation on the comparisons the reward models read, with no reward
model and no sampling. The policy's implicit reward of an answer is beta x log(pi_theta(y | x) / pi_ref(y | x)),
pi_ref the frozen starting model (with LoRA: the same model with its adapters disabled), and the loss asks the
chosen answer's implicit reward to exceed the rejected one's:

    sigmoid (DPO):  -log sigmoid(beta x (Delta_chosen - Delta_rejected) - m(r))
    ipo (IPO):      (Delta_chosen / |y_c| - Delta_rejected / |y_r| - 1 / (2 beta))^2

Delta = log pi_theta(y | x) - log pi_ref(y | x) summed over the answer's tokens (its EOS included);
`length_normalize` averages it over the answer's tokens instead (IPO always does). m(r) is the paper's rating margin
(Table 27; `margin: none | small | large`, as the reward stage), our extension: a pair rated "significantly better"
must be won by more. `sft_weight` adds that weight x the chosen answers' mean token negative log-likelihood (RPO).
The data path is the reward stage's: the same comparison JSONL files and sources, packed
micro-batches (each answer attends only to itself), the same epoch mix.

metrics.jsonl gets, per step, the loss, accuracy (the chosen answer's implicit reward higher; a tie counts half),
margin (the mean implicit reward gap), reward_chosen and reward_rejected; every eval_every steps the same on each
held-out set (val_accuracy/NAME ...).

    recipe = load_recipe(DPORecipe, "configs/world/dpo.yaml")
    result = pipeline.run(recipe)            # builds the SFT model when missing
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import AdapterCheckpointIO, detect_layout, load_checkpoint, load_config
from ..checkpoint.runs import load_tokenizer, require_checkpoint
from ..classifier import DEFAULT_PAD_ID
from ..data.comparisons import ensure_comparisons
from ..data.mix import epoch_counts
from ..data.packing import packed_attention
from ..errors import Llama2Error
from ..lora import LoRASpec, adapters_disabled, apply_lora
from ..model import Transformer
from ..recipe import check
from ..train.config import FineTuneRecipe, OptimConfig
from ..train.distributed import barrier, init_distributed
from ..train.loop import HFCheckpointIO, LossOutput, Trainer, TrainResult
from ..train.metrics import flops_per_token
from .reward import (BUILTIN, MARGINS, ComparisonDataConfig, EncodedPair, MarginVariant, PairBatches, collate_pairs,
                     encode_sources, load_sources)

# ---------------------------------------------------------------------------------------------------------------
# The pieces of the objective (tested against TRL's DPOTrainer)


def response_logprobs(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(2n,) the summed log-probability of each answer's tokens (from its response start to its last token) and
    (2n,) their counts, for a micro-batch of collate_pairs: padded rows, or packed rows (`read_at`)."""
    tokens = batch["tokens"]
    targets = torch.roll(tokens, -1, dims=1)  # position j scores token j + 1
    if "read_at" in batch:
        lp = model(tokens, positions=batch["positions"], mask=packed_attention(batch["segments"]), targets=targets,
                   output="logprobs")
        ends, starts = batch["read_at"], batch["response_from"]
    else:
        lp = model(tokens, targets=targets, output="logprobs")
        row = torch.arange(tokens.shape[0], device=tokens.device) * tokens.shape[1]
        ends, starts = row + batch["lengths"] - 1, row + batch["response_from"]
    counts = ends - starts + 1
    if bool((counts < 1).any()):
        raise Llama2Error("a comparison's answer has no tokens to score")
    n = counts.shape[0]
    owner = torch.repeat_interleave(torch.arange(n, device=tokens.device), counts)
    first = torch.repeat_interleave(starts - 1 - (torch.cumsum(counts, 0) - counts), counts)
    scored = lp.reshape(-1)[first + torch.arange(owner.shape[0], device=tokens.device)]
    sums = torch.zeros(n, dtype=scored.dtype, device=scored.device).index_add(0, owner, scored)
    return sums, counts


def dpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, beta: float,
             loss: str = "sigmoid", margin: Tensor | float = 0.0, chosen_tokens: Tensor | None = None,
             rejected_tokens: Tensor | None = None, length_normalize: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses (n,) from summed log-probabilities (the module docstring), and the implicit rewards
    (beta x Delta) of the chosen and rejected answers."""
    d_c, d_r = chosen - ref_chosen, rejected - ref_rejected
    if loss == "ipo" or length_normalize:
        if chosen_tokens is None or rejected_tokens is None:
            raise Llama2Error("length normalisation needs the answers' token counts")
        d_c, d_r = d_c / chosen_tokens.clamp(min=1), d_r / rejected_tokens.clamp(min=1)
    if loss == "sigmoid":
        per_pair = -F.logsigmoid(beta * (d_c - d_r) - margin)
    elif loss == "ipo":
        per_pair = (d_c - d_r - 1 / (2 * beta)) ** 2
    else:
        raise Llama2Error(f"loss must be sigmoid or ipo, got {loss!r}")
    return per_pair, {"reward_chosen": beta * d_c.detach(), "reward_rejected": beta * d_r.detach()}


def chosen_nll(chosen: Tensor, tokens: Tensor) -> Tensor:
    """The chosen answers' mean token negative log-likelihood: summed log-probabilities (n,) over their token
    counts (n,), as one mean over every token (RPO's term)."""
    return -chosen.sum() / tokens.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# The recipe


def _dpo_optim() -> OptimConfig:
    return OptimConfig(lr=1e-6, weight_decay=0.0, warmup_steps=0, warmup_ratio=0.1, schedule="linear",
                       min_lr_ratio=0.0)


@dataclass
class DPORecipe(FineTuneRecipe):
    """`llama2 rlhf dpo`: the shared loop's keys (TrainRecipe, FineTuneRecipe: base is the chat model, also the
    reference) plus DPO's; batch_size counts comparisons (two sequences each). See configs/world/dpo.yaml."""

    out_dir: str = "runs/dpo"
    beta: float = 0.1  # the strength of the pull to the reference (DPO's beta; IPO's tau)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    margin: MarginVariant = "none"  # the paper's rating margin m(r) inside the sigmoid loss (none, small, large)
    length_normalize: bool = False  # average the log-ratios over the answers' tokens (IPO always does)
    # add this x the chosen answers' mean token negative log-likelihood (RPO; TRL's loss_type [.., "sft"]): keeps
    # the chosen answers likely, where DPO alone lowers both answers of a pair (refusals included)
    sft_weight: float = 0.0
    packing: bool = True  # pack each micro-batch's answers into rows of max_seq_len (else pad every answer)
    data: ComparisonDataConfig = field(default_factory=ComparisonDataConfig)
    lora: LoRASpec = field(default_factory=LoRASpec)
    optim: OptimConfig = field(default_factory=_dpo_optim)

    def validate(self) -> None:
        super().validate()
        check(self.beta > 0, "beta", self.beta, "a positive number")
        check(self.sft_weight >= 0, "sft_weight", self.sft_weight, "a number >= 0 (0 turns it off)")
        check(self.loss in ("sigmoid", "ipo"), "loss", self.loss, "sigmoid or ipo")
        check(self.margin in MARGINS, "margin", self.margin, f"one of {sorted(MARGINS)}")
        if self.loss == "ipo" and self.margin != "none":
            raise Llama2Error("recipe key 'margin' applies to loss=sigmoid; IPO's target gap is 1 / (2 beta): set "
                              "margin=none")
        self.data.validate()
        self.lora.validate()
        if self.lora.quantize_base != "none":
            raise Llama2Error("lora.quantize_base is for SFT; DPO trains on the full-precision base")


# ---------------------------------------------------------------------------------------------------------------
# The stage


class DPO:
    """Builds the Trainer: the policy (LoRA adapters if asked), the reference, the comparisons' batches."""

    def __init__(self, recipe: DPORecipe, quiet: bool = False) -> None:
        env = init_distributed(recipe.device)
        base = require_checkpoint(recipe.base, "chat model")
        if env.is_main and any(s.path in BUILTIN for s in recipe.data.resolved()):
            ensure_comparisons(quiet=quiet)
        barrier(env)
        cfg = load_config(base)
        self.tokenizer = load_tokenizer(base)
        seq_len = recipe.max_seq_len or cfg.max_seq_len
        if seq_len > cfg.max_seq_len:
            raise Llama2Error(f"max_seq_len {seq_len} is longer than the base's context ({cfg.max_seq_len}); lower it")
        lora = recipe.lora
        if lora.rank > 0 and detect_layout(base) != "hf":
            raise Llama2Error(f"LoRA needs the base in the Hugging Face layout; convert it first: llama2 convert "
                              f"{base} {base.name}-hf --to hf")
        self.recipe, self.env = recipe, env
        sources = load_sources(recipe.data, quiet=quiet or not env.is_main)
        encoded, held = encode_sources(sources, self.tokenizer, seq_len, quiet=quiet or not env.is_main)
        counts = epoch_counts([len(e) for e in encoded], [s.weight for s in sources], [s.share for s in sources])
        accum = recipe.accumulation(env.world_size)
        self.pack_len = seq_len if recipe.packing else None
        batches = PairBatches(encoded, counts, recipe.batch_size, accum, recipe.margin, rank=env.rank,
                              world_size=env.world_size, seed=recipe.seed, pad_id=DEFAULT_PAD_ID,
                              pack_len=self.pack_len)
        total = recipe.epochs * batches.steps_per_epoch
        run = dataclasses.replace(recipe, max_steps=min(recipe.max_steps or total, total))
        val = {name: self.held_out_batches(pairs) for name, pairs in held.items() if pairs}
        if env.is_main and not quiet:
            mix = ", ".join(f"{s.train_label or s.label} {c:,} of {len(e):,}"
                            for s, c, e in zip(sources, counts, encoded))
            tests = ", ".join(f"{k} {len(v):,}" for k, v in held.items() if v) or "none"
            print(f"dpo ({recipe.loss}, beta {recipe.beta}): an epoch mixes {mix} comparisons; held-out: {tests}; "
                  f"{batches.steps_per_epoch} steps per epoch of {batches.global_size} pairs; training "
                  f"{run.max_steps} steps", flush=True)

        def build() -> nn.Module:
            model = Transformer(cfg)
            if lora.rank > 0:
                apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.modules, base_model=str(base))
            return model

        if lora.rank > 0:
            io: Any = AdapterCheckpointIO(base, self.tokenizer)
            fresh = ["*.lora_A.weight", "*.lora_B.weight"]
        else:
            io, fresh = HFCheckpointIO(self.tokenizer), []
        def initial() -> dict[str, Tensor]:
            return load_checkpoint(base, kind="causal_lm", device="cpu").state_dict()

        self.trainer = Trainer(run, build, self._loss, batches, val_batches=(lambda: val) if val else None,
                               initial_weights=initial,
                               checkpoint_io=io, env=env, flops_per_token=flops_per_token(cfg, seq_len), quiet=quiet,
                               fresh=fresh)
        # the reference: the base itself, frozen; with LoRA the trained model with its adapters disabled
        self.reference = None if lora.rank > 0 else self.trainer.add_reference_model(
            "reference", lambda: Transformer(cfg))

    def held_out_batches(self, pairs: Sequence[EncodedPair]) -> list[dict[str, Tensor]]:
        """This process's share of a held-out set, in micro-batches of batch_size pairs."""
        mine = list(pairs)[self.env.rank::self.env.world_size]
        table, size = MARGINS[self.recipe.margin], self.recipe.batch_size
        return [collate_pairs([(p.chosen, p.rejected) for p in chunk],
                              [table[p.rating] if p.rating else 0.0 for p in chunk], DEFAULT_PAD_ID, self.pack_len,
                              [p.starts for p in chunk])
                for chunk in (mine[i:i + size] for i in range(0, len(mine), size))]

    def _loss(self, model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
        r = self.recipe
        logps, counts = response_logprobs(model, batch)
        with torch.no_grad():
            if self.reference is not None:
                ref, _ = response_logprobs(self.reference, batch)
            else:
                with adapters_disabled(model) if r.lora.rank > 0 else contextlib.nullcontext():
                    ref, _ = response_logprobs(model, batch)
        n = batch["margin"].shape[0]
        per_pair, rewards = dpo_loss(logps[:n].float(), logps[n:].float(), ref[:n].float(), ref[n:].float(),
                                     beta=r.beta, loss=r.loss, margin=batch["margin"], chosen_tokens=counts[:n],
                                     rejected_tokens=counts[n:], length_normalize=r.length_normalize)
        loss = per_pair.mean()
        if r.sft_weight:
            loss = loss + r.sft_weight * chosen_nll(logps[:n], counts[:n])
        c, j = rewards["reward_chosen"], rewards["reward_rejected"]
        metrics = {"accuracy": ((c > j).float() + 0.5 * (c == j).float()).mean(),  # a tie counts half, as for RMs
                   "margin": (c - j).mean(), "reward_chosen": c.mean(), "reward_rejected": j.mean()}
        return LossOutput(loss, n, tokens=batch["lengths"].sum(), metrics=metrics)


def evaluate_at_start(run: DPO) -> None:
    """Start the trainer (resuming if it can); a fresh run is evaluated on the held-out pairs as step 0."""
    t = run.trainer
    t.start()
    if t.step == 0 and t.val_batches is not None:
        t.metrics.append({"step": 0, **t.evaluate()})


def dpo(recipe: DPORecipe, quiet: bool = False) -> TrainResult:
    """Train (or resume) DPO as the recipe says; evaluates the held-out comparisons before the first step and at
    every evaluation; prints a one-line summary unless quiet."""
    run = DPO(recipe, quiet=quiet)
    t = run.trainer
    evaluate_at_start(run)
    result = t.fit()
    if t.env.is_main and not quiet:
        last = result.last
        acc = f", held-out accuracy {100 * last['val_accuracy']:.1f}%" if "val_accuracy" in last else ""
        print(f"dpo: {result.step} steps, loss {last.get('loss', float('nan')):.4f}{acc}; checkpoint "
              f"{result.checkpoint}", flush=True)
    return result


__all__ = ["DPORecipe", "DPO", "dpo", "dpo_loss", "chosen_nll", "response_logprobs", "evaluate_at_start"]
