"""Supervised fine-tuning (paper section 3.1): the base model learns to answer from dialogue annotations.

As the paper does, every training dialogue is tokenised in the chat format (`llama2.chat`) and the dialogues are
packed into sequences of `max_seq_len` tokens; the loss is zeroed on the user-prompt tokens, so only answer
tokens (and each answer's EOS) are back-propagated. Here a packed row keeps each dialogue to itself: attention is
block-diagonal causal and rotary positions restart at 0 for every dialogue, so a packed dialogue is trained on
exactly as it would be alone (the tests check losses and gradients against one-dialogue-at-a-time runs).
Paper settings (configs/7B/sft.yaml): cosine schedule from lr 2e-5, weight decay 0.1, batch 64 x 4096, 2 epochs.

    recipe = load_recipe(SFTRecipe, "configs/tiny/sft.yaml", ["max_steps=50"])
    result = sft(recipe)                       # builds the built-in dialogues when missing (pipeline.run: the base too)
    result = sft(recipe, dialogues=[...])      # later stages: dialogues in memory (Dialogue or message lists)

`text_replay: {path, fraction}` replays plain text documents as that share of each epoch's rows, trained with the
loss on all their tokens (no chat template), against forgetting what pretraining taught.

`mask: last_assistant` (or a dialogue's own "mask") trains only the final answer (Ghost Attention). `lora.rank
> 0` trains LoRA adapters on the frozen base and checkpoints only them, in PEFT's layout. Each evaluation writes
the held-out assistant-token loss (val_loss) to metrics.jsonl and greedy answers to a few fixed held-out prompts
to out_dir/samples.jsonl, generated through `llama2.inference.generate.Generator` from the weights being
trained. Under FSDP2 every process generates inside `gathered_for_generation` (full weights, no per-token
all-gather) and rank 0 writes the file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import Tensor, nn

from ..atomic import atomic_write_text
from ..chat import encode_dialog, encode_dialog_for_training
from ..checkpoint import AdapterCheckpointIO, detect_layout, load_config, load_model
from ..checkpoint.runs import load_tokenizer, require_checkpoint
from ..data.adversarial import builtin_adversarial
from ..data.dialogues import Dialogue, check_dialogue, ensure_dialogues, read_dialogues
from ..data.mix import WeightedSource, check_mix, draw, epoch_counts
from ..data.packing import Example, SFTBatches, packed_attention, text_examples, validation_batches
from ..data.sources import file_documents
from ..data.world import data_path
from ..errors import Llama2Error
from ..fused_ops import IGNORE_INDEX
from ..inference.generate import Generator, SamplingParams, gathered_for_generation
from ..lora import LoRASpec, apply_lora, bitsandbytes, quantize_base_4bit
from ..model import Transformer
from ..recipe import check
from ..train.config import FineTuneRecipe, OptimConfig
from ..train.distributed import DistEnv, barrier, init_distributed
from ..train.loop import HFCheckpointIO, LossOutput, Trainer, TrainResult
from ..train.metrics import flops_per_token

Mask = Literal["all_assistant", "last_assistant"]

# ---------------------------------------------------------------------------------------------------------------
# The recipe


DIALOGUE_BUILTINS = ("builtin:dialogues", "builtin:safety")


@dataclass
class DialogueSource(WeightedSource):
    """A dialogue source: a dialogues JSONL file, `builtin:dialogues` (the built-in dialogues) or `builtin:safety`
    (safety SFT data: the built-in adversarial prompts with their reference answers, refusals for the harmful
    ones and helpful answers for the benign look-alikes)."""


@dataclass
class DialogueDataConfig:
    """Training and held-out dialogues (JSONL, see llama2.data.dialogues); unset: the built-in dialogues; or
    `sources`, a weighted mix (DialogueSource)."""

    path: str | None = None  # training dialogues (JSONL); unset: the built-in dialogues
    val_path: str | None = None  # unset with path set: no held-out loss and samples only from samples.prompts
    on_bad_line: Literal["error", "skip"] = "error"  # error, or skip (counted and printed)
    # a weighted mix instead: [{path, val_path, weight | share}]; path may be builtin:dialogues or builtin:safety
    sources: list[DialogueSource] = field(default_factory=list)

    def validate(self, prefix: str = "data") -> None:
        if self.val_path is not None and self.path is None:
            raise Llama2Error(f"recipe key '{prefix}.val_path' is set but '{prefix}.path' is not; give the training "
                              "file too (or unset both for the built-in dialogues)")
        if self.sources and self.path is not None:
            raise Llama2Error(f"recipe keys '{prefix}.path' and '{prefix}.sources' are both set; give one")
        check_mix(self.sources, f"{prefix}.sources", f"a dialogues JSONL file or one of {list(DIALOGUE_BUILTINS)}")


@dataclass
class SamplesSpec:
    """Greedy answers written to out_dir/samples.jsonl at every evaluation. prompts: user messages; unset: the
    prompts of the first `count` held-out dialogues (with their answers as references)."""

    # fixed prompts answered at each evaluation; empty: the first `count` held-out dialogues
    prompts: list[str] = field(default_factory=list)
    count: int = 4  # held-out prompts answered (0 = no samples)
    max_new_tokens: int = 64  # tokens per sample answer

    def validate(self, prefix: str = "samples") -> None:
        check(self.count >= 0, f"{prefix}.count", self.count, "an integer >= 0 (0 = no samples)")
        check(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", self.max_new_tokens, "an integer >= 1")


@dataclass
class TextReplaySpec:
    """Plain text replayed among the dialogues against forgetting: documents as a `fraction` of each epoch's
    training rows, trained with a plain LM loss on all their tokens (no chat template). Off unless both are set."""

    path: str | None = None  # a .jsonl ("text" per line) or .txt (one document) file, or a directory; null: off
    fraction: float = 0.0  # share of each epoch's training rows that are replayed text, in [0, 1); 0: off

    def validate(self, prefix: str = "text_replay") -> None:
        check(0 <= self.fraction < 1, f"{prefix}.fraction", self.fraction, "a number in [0, 1) (0 = off)")
        if self.fraction > 0 and not self.path:
            raise Llama2Error(f"recipe key '{prefix}.fraction' is {self.fraction} but '{prefix}.path' is not set; "
                              "give the text to replay (or set the fraction to 0)")

    @property
    def on(self) -> bool:
        return bool(self.path) and self.fraction > 0


def _sft_optim() -> OptimConfig:
    return OptimConfig(lr=2e-5, weight_decay=0.1, warmup_steps=0, min_lr_ratio=0.0)


@dataclass
class FinetuneSpec:
    """How a later stage (rejection sampling, GAtt, safety distillation) fine-tunes through this one: an SFT recipe
    and overrides (base, out_dir, data are set by that stage), from the previous iteration's policy or the first."""

    recipe: str = "configs/tiny/sft.yaml"  # the SFT recipe each fine-tuning runs
    overrides: list[str] = field(default_factory=list)  # key=value overrides for that recipe
    # previous: from the last iteration's policy; base: always from the first
    start: Literal["previous", "base"] = "previous"


@dataclass
class SFTRecipe(FineTuneRecipe):
    """`llama2 sft`: the shared loop's keys (TrainRecipe, FineTuneRecipe) plus what SFT needs; see
    configs/*/sft.yaml. max_steps caps the optimiser steps (default: `epochs` passes over the data); batch_size
    counts packed rows of max_seq_len tokens (default: the base's context)."""

    out_dir: str = "runs/sft"  # the run directory: recipe.yaml, metrics.jsonl, samples.jsonl, plots, checkpoints/
    epochs: int = 2
    data: DialogueDataConfig = field(default_factory=DialogueDataConfig)
    # all_assistant, or last_assistant (Ghost Attention); a dialogue's own "mask" overrides it
    mask: Mask = "all_assistant"
    packing: bool = True  # pack dialogues into rows (attention kept inside each); false: one per row, right-padded
    # truncate (drop the earliest exchanges, keep the system message) or skip
    overlong: Literal["truncate", "skip"] = "truncate"
    # plain text at a share of the rows, loss on all its tokens: {path, fraction}; null / 0: off
    text_replay: TextReplaySpec = field(default_factory=TextReplaySpec)
    lora: LoRASpec = field(default_factory=LoRASpec)
    samples: SamplesSpec = field(default_factory=SamplesSpec)
    optim: OptimConfig = field(default_factory=_sft_optim)

    def validate(self) -> None:
        super().validate()
        self.data.validate()
        self.text_replay.validate()
        self.lora.validate()
        self.samples.validate()


# ---------------------------------------------------------------------------------------------------------------
# Dialogues -> tokens


@dataclass
class EncodeStats:
    dialogues: int = 0
    truncated: int = 0  # earliest exchanges dropped to fit
    skipped: int = 0  # longer than max_seq_len (overlong=skip, or even the last exchange alone is too long)
    tokens: int = 0
    trained_tokens: int = 0

    def line(self, name: str, max_seq_len: int) -> str:
        extra = ""
        if self.truncated:
            extra += f", {self.truncated} truncated to their last exchanges"
        if self.skipped:
            extra += f", {self.skipped} skipped as longer than max_seq_len {max_seq_len}"
        return (f"{name}: {self.dialogues} dialogues, {self.tokens:,} tokens ({self.trained_tokens:,} trained)"
                f"{extra}")


def _exchanges(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[list[dict[str, str]]]]:
    """(the system message or [], the (user, assistant) pairs)."""
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    return system, [rest[i:i + 2] for i in range(0, len(rest), 2)]


def encode_dialogue(tokenizer: Any, dialogue: Dialogue, default_mask: Mask, max_seq_len: int,
                    overlong: str) -> tuple[Example | None, bool]:
    """(the example or None if skipped, whether it was truncated). A dialogue longer than max_seq_len tokens is
    skipped (overlong="skip") or loses its earliest exchanges until it fits, the system message staying first
    (merged into the new first user turn, as the chat format requires)."""
    mask = dialogue.mask or default_mask
    if dialogue.uses_tools:  # one answer spans several messages: kept whole, or skipped when too long
        ids, trained = encode_dialog_for_training(tokenizer, dialogue.messages, train_on=mask, tools=dialogue.tools)
        if len(ids) > max_seq_len:
            return None, False
        return Example(np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool)), False
    system, pairs = _exchanges(dialogue.messages)
    for drop in range(len(pairs)):
        if drop and overlong == "skip":
            return None, False
        messages = system + [m for p in pairs[drop:] for m in p]
        ids, trained = encode_dialog_for_training(tokenizer, messages, train_on=mask)
        if len(ids) <= max_seq_len:
            return Example(np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool)), drop > 0
    return None, False


def encode_dialogues(tokenizer: Any, dialogues: Sequence[Dialogue], mask: Mask, max_seq_len: int,
                     overlong: str) -> tuple[list[Example], EncodeStats]:
    stats = EncodeStats()
    out = []
    for d in dialogues:
        ex, truncated = encode_dialogue(tokenizer, d, mask, max_seq_len, overlong)
        if ex is None:
            stats.skipped += 1
            continue
        stats.dialogues += 1
        stats.truncated += truncated
        stats.tokens += len(ex.ids)
        stats.trained_tokens += int(ex.trained[1:].sum())  # the first token (BOS) is never a target
        out.append(ex)
    return out, stats


# ---------------------------------------------------------------------------------------------------------------
# Packing and batches


# ---------------------------------------------------------------------------------------------------------------
# The loss


def sft_loss(model: nn.Module, batch: dict[str, Tensor]) -> LossOutput:
    """Mean cross-entropy over the trained (assistant) tokens of a micro-batch, through the fused LM head:
    `model(tokens, positions=, mask=, targets=)` returns the sum, divided here by the count; the Trainer weighs
    micro-batches by that count, so the step optimises the mean over every trained token of the global batch."""
    segments, labels = batch["segments"], batch["labels"]
    packed = batch.get("packed")
    if packed is None:
        packed = bool((segments.amax(dim=1) > 0).any())
    mask = packed_attention(segments) if packed else None  # one dialogue per row: plain causal attention
    positions = batch["positions"] if packed else None
    loss_sum = model(batch["tokens"], positions=positions, mask=mask, targets=labels)
    count = (labels != IGNORE_INDEX).sum()
    return LossOutput(loss_sum / count.clamp(min=1), count, tokens=(segments >= 0).sum(), perplexity=True)


# ---------------------------------------------------------------------------------------------------------------
# Data, base model and samples


def check_quantize(spec: LoRASpec, env: DistEnv | None = None) -> None:
    """QLoRA's 4-bit base: LoRA on, bitsandbytes importable, one process (not under FSDP2)."""
    if spec.quantize_base == "none":
        return
    if spec.rank == 0:
        raise Llama2Error("lora.quantize_base: 4bit needs LoRA (set lora.rank > 0): a 4-bit base cannot be trained")

    bitsandbytes()
    if env is not None and env.enabled:
        raise Llama2Error("lora.quantize_base: 4bit runs in one process (a 4-bit base cannot be sharded with "
                          "FSDP2 here); run without torchrun, or set lora.quantize_base=none")


def quantize_after_load(trainer: Trainer) -> None:
    """Trainer.after_start hook of a QLoRA run: the frozen base to NF4 once its weights are loaded."""
    before, after = quantize_base_4bit(trainer.model)
    if trainer.env.is_main and not trainer.quiet:
        print(f"QLoRA: the LoRA layers' base weights in 4-bit NF4, {before / 2**20:.1f} MiB -> {after / 2**20:.1f} "
              "MiB", flush=True)


@dataclass
class SamplePrompt:
    messages: list[dict[str, str]]  # ends with the user message to answer
    reference: str | None


def sample_prompts(spec: SamplesSpec, held_out: Sequence[Dialogue]) -> list[SamplePrompt]:
    """The fixed prompts answered at each evaluation: samples.prompts, else the first held-out dialogues' last
    user turns (with their history) and their answers as references."""
    if spec.prompts:
        return [SamplePrompt([{"role": "user", "content": p}], None) for p in spec.prompts]
    return [SamplePrompt(d.messages[:-1], d.messages[-1]["content"]) for d in held_out[:spec.count]]


class SampleWriter:
    """eval_fn: greedy answers to the fixed prompts through the one generation path, appended to
    out_dir/samples.jsonl as {"step", "prompt", "answer", "reference"} (rank 0 writes)."""

    def __init__(self, prompts: Sequence[SamplePrompt], tokenizer: Any, max_new_tokens: int, path: Path,
                 env: DistEnv) -> None:
        self.prompts, self.tokenizer, self.max_new_tokens = list(prompts), tokenizer, max_new_tokens
        self.path, self.env = path, env

    def trim(self, step: int) -> None:
        """Drop records after `step` (a resumed run writes them again)."""
        if not self.env.is_main or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(self.path, "".join(keep))

    def __call__(self, trainer: Trainer) -> dict[str, float]:
        if not self.prompts:
            return {}
        model = trainer.model
        ids = [encode_dialog(self.tokenizer, p.messages) for p in self.prompts]
        params = SamplingParams(temperature=0.0, max_new_tokens=self.max_new_tokens, truncate=True)
        with gathered_for_generation(model):
            done = Generator(model, self.tokenizer, max_batch_size=len(ids)).generate(ids, params)
        answers = [c.text.strip() for c in done]
        if self.env.is_main:
            old = self.path.read_text() if self.path.is_file() else ""
            new = "".join(json.dumps({"step": trainer.step, "prompt": p.messages[-1]["content"], "answer": a,
                                      "reference": p.reference}, ensure_ascii=False) + "\n"
                          for p, a in zip(self.prompts, answers))
            atomic_write_text(self.path, old + new)
        return {"sample_tokens": float(np.mean([len(c.tokens) for c in done]))}


# ---------------------------------------------------------------------------------------------------------------
# The stage


def _as_dialogues(items: Sequence[Dialogue | Sequence[dict[str, str]]] | None) -> list[Dialogue] | None:
    if items is None:
        return None
    return [d if isinstance(d, Dialogue) else check_dialogue(list(d)) for d in items]


def _source_dialogues(src: DialogueSource, on_bad_line: str, quiet: bool) -> tuple[list[Dialogue], list[Dialogue]]:
    if src.path == "builtin:safety":
        return tuple([check_dialogue(p.messages + [{"role": "assistant", "content": p.reference}])  # type: ignore
                      for p in split if p.reference] for split in builtin_adversarial())
    if src.path == "builtin:dialogues":
        train_path, val_path = ensure_dialogues(quiet=quiet)
    else:
        train_path, val_path = data_path(src.path), (data_path(src.val_path) if src.val_path else None)
    train = read_dialogues(train_path, on_bad_line=on_bad_line).dialogues
    return train, (read_dialogues(val_path, on_bad_line=on_bad_line).dialogues if val_path else [])


def mix_sources(recipe: SFTRecipe, quiet: bool = False) -> tuple[list[Dialogue], list[Dialogue]]:
    """The weighted mix of data.sources (training: each source's epoch_counts share, drawn with the recipe's
    seed; held-out: every source's held-out dialogues)."""
    parts = [_source_dialogues(src, recipe.data.on_bad_line, quiet) for src in recipe.data.sources]
    for src, (train, _) in zip(recipe.data.sources, parts):
        if not train:
            raise Llama2Error(f"data source {src.path} has no training dialogues")
    weights = [src.weight if src.weight is not None or src.share is not None else 1.0 for src in recipe.data.sources]
    counts = epoch_counts([len(t) for t, _ in parts], weights, [src.share for src in recipe.data.sources])
    rng = np.random.default_rng([recipe.seed, 1])
    train = [t[i] for (t, _), n in zip(parts, counts) for i in draw(len(t), n, rng)]
    order = rng.permutation(len(train))
    if not quiet:
        print("dialogue mix: " + ", ".join(f"{src.path} {n:,}" for src, n in zip(recipe.data.sources, counts)),
              flush=True)
    return [train[i] for i in order], [d for _, v in parts for d in v]


def load_data(recipe: SFTRecipe, quiet: bool = False) -> tuple[list[Dialogue], list[Dialogue]]:
    """The recipe's training and held-out dialogues (the built-in ones when data.path is unset; the weighted mix
    of data.sources when given)."""
    d = recipe.data
    if d.sources:
        return mix_sources(recipe, quiet)
    if d.path is None:
        train_path, val_path = ensure_dialogues(quiet=quiet)
    else:
        train_path = data_path(d.path)
        val_path = data_path(d.val_path) if d.val_path else None
    files = [read_dialogues(train_path, on_bad_line=d.on_bad_line)]
    if val_path is not None:
        files.append(read_dialogues(val_path, on_bad_line=d.on_bad_line))
    if not quiet:
        for f in files:
            if f.skipped:
                print(f.summary(), flush=True)
    return files[0].dialogues, (files[1].dialogues if len(files) > 1 else [])


def replay_examples(spec: TextReplaySpec, tokenizer: Any, max_seq_len: int) -> list[Example]:
    """The documents of text_replay.path as examples with every token trained (llama2.data.packing.text_examples)."""
    assert spec.path is not None
    path = data_path(spec.path)
    if not path.exists():
        raise Llama2Error(f"text_replay.path {path} does not exist; give a .jsonl file (a \"text\" field per line), "
                          "a .txt file (one document) or a directory of them")
    texts = [t for t in file_documents([path]) if t.strip()]
    if not texts:
        raise Llama2Error(f"text_replay.path {path} holds no text; give documents to replay or set "
                          "text_replay.fraction=0")
    return text_examples(tokenizer, texts, max_seq_len)


class _TrainedTokens:
    """The running count of trained (assistant) tokens, checkpointed with the run."""

    def __init__(self) -> None:
        self.total = 0.0

    def state_dict(self) -> dict[str, float]:
        return {"total": self.total}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.total = float(state["total"])


@dataclass
class SFTRun:
    """What build_sft sets up: the Trainer, the samples writer (its eval_fn), the trained-token counter and the
    tokenizer."""

    trainer: Trainer
    samples: SampleWriter
    trained_tokens: _TrainedTokens
    tokenizer: Any


def build_sft(recipe: SFTRecipe, *, dialogues: Sequence[Dialogue | Sequence[dict]] | None = None,
              val_dialogues: Sequence[Dialogue | Sequence[dict]] | None = None, env: DistEnv | None = None,
              quiet: bool = False) -> SFTRun:
    """Everything `llama2 sft` sets up: the base, dialogues (from the recipe unless given),
    tokenised and packed batches, the model (with LoRA adapters if asked), samples, the Trainer."""
    env = env or init_distributed(recipe.device)
    check_quantize(recipe.lora, env)
    base = require_checkpoint(recipe.base, "base checkpoint")
    if env.is_main and dialogues is None and recipe.data.path is None:
        ensure_dialogues(quiet=quiet)
    barrier(env)
    cfg = load_config(base)
    tokenizer = load_tokenizer(base)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise Llama2Error(f"the tokenizer beside {base} has {tokenizer.vocab_size} pieces, the model's vocabulary "
                          f"{cfg.vocab_size}; use the base's own tokenizer.model")
    seq_len = recipe.max_seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise Llama2Error(f"max_seq_len {seq_len} is longer than the base's context ({cfg.max_seq_len}); lower it")
    lora = recipe.lora
    if lora.rank > 0 and detect_layout(base) != "hf":
        raise Llama2Error(f"LoRA fine-tuning needs the base in the Hugging Face layout (the adapter names it, and "
                          f"resuming reads its weights from it); convert it first: llama2 convert {base} "
                          f"{base.name}-hf --to hf")

    if dialogues is None:
        train_d, val_d = load_data(recipe, quiet=quiet or not env.is_main)
    else:
        train_d, val_d = _as_dialogues(dialogues) or [], _as_dialogues(val_dialogues) or []
    train_ex, train_stats = encode_dialogues(tokenizer, train_d, recipe.mask, seq_len, recipe.overlong)
    val_ex, val_stats = encode_dialogues(tokenizer, val_d, recipe.mask, seq_len, recipe.overlong)
    replay = replay_examples(recipe.text_replay, tokenizer, seq_len) if recipe.text_replay.on else []
    accum = recipe.accumulation(env.world_size)
    batches = SFTBatches(train_ex, seq_len, recipe.batch_size, accum, packing=recipe.packing, rank=env.rank,
                         world_size=env.world_size, seed=recipe.seed, pad_id=tokenizer.eos_id, replay=replay,
                         replay_fraction=recipe.text_replay.fraction if replay else 0.0)
    total = recipe.epochs * batches.steps_per_epoch
    run = dataclasses.replace(recipe, max_steps=min(recipe.max_steps or total, total))
    if env.is_main and not quiet:
        print(train_stats.line("train", seq_len), flush=True)
        if val_d:
            print(val_stats.line("held-out", seq_len), flush=True)
        if replay:
            print(f"text replay: {recipe.text_replay.path}: {sum(len(e.ids) for e in replay):,} tokens in "
                  f"{len(batches.replay_rows)} rows, {batches.replay_count} of each epoch's "
                  f"{len(batches.rows) + batches.replay_count} rows", flush=True)
        print(f"{len(batches.rows)} {'packed ' if recipe.packing else ''}rows of <= {seq_len} tokens, "
              f"{batches.steps_per_epoch} steps per epoch of {batches.global_size} rows; training {run.max_steps} "
              f"steps", flush=True)

    val_fn = None
    if val_ex:
        val = validation_batches(val_ex, seq_len, recipe.batch_size, packing=recipe.packing, rank=env.rank,
                                 world_size=env.world_size, pad_id=tokenizer.eos_id)
        val_fn = lambda: val  # noqa: E731

    def build_model() -> nn.Module:
        model = Transformer(cfg)
        if lora.rank > 0:
            apply_lora(model, lora.rank, lora.alpha, lora.dropout, lora.modules, base_model=str(base))
        return model

    def initial() -> dict[str, Tensor]:
        return load_model(base, device="cpu").state_dict()

    if lora.rank > 0:
        io: Any = AdapterCheckpointIO(base, tokenizer)
        fresh = ["*.lora_A.weight", "*.lora_B.weight"]
    else:
        io, fresh = HFCheckpointIO(tokenizer), []
    writer = SampleWriter(sample_prompts(recipe.samples, val_d), tokenizer, recipe.samples.max_new_tokens,
                          Path(run.out_dir) / "samples.jsonl", env)
    counter = _TrainedTokens()

    def step(t: Trainer) -> dict[str, float]:
        totals = t.backward(t.batches.next())
        counter.total += totals.count
        return {**totals.stats(), **t.optimizer_step(), "trained_tokens": counter.total}

    trainer = Trainer(run, build_model, sft_loss, batches, val_batches=val_fn, initial_weights=initial,
                      checkpoint_io=io, env=env, flops_per_token=flops_per_token(cfg, seq_len), quiet=quiet,
                      fresh=fresh, step_fn=step, eval_fn=writer if writer.prompts else None,
                      state={"trained_tokens": counter})
    if lora.quantize_base == "4bit":
        trainer.after_start.append(quantize_after_load)
    return SFTRun(trainer, writer, counter, tokenizer)


def sft(recipe: SFTRecipe, quiet: bool = False, *, dialogues: Sequence[Dialogue | Sequence[dict]] | None = None,
        val_dialogues: Sequence[Dialogue | Sequence[dict]] | None = None) -> TrainResult:
    """Run (or resume) supervised fine-tuning as the recipe says (building the built-in dialogues when missing;
    llama2.pipeline builds a missing base); prints a one-line summary unless quiet. Later stages may pass `dialogues` (and
    `val_dialogues`) in memory: Dialogue objects or lists of {"role", "content"} messages."""
    run = build_sft(recipe, dialogues=dialogues, val_dialogues=val_dialogues, quiet=quiet)
    run.trainer.start()
    run.samples.trim(run.trainer.step)
    result = run.trainer.fit()
    if run.trainer.env.is_main and not quiet:
        print(summary_line(result, run.trained_tokens.total), flush=True)
    return result


def summary_line(result: TrainResult, trained_tokens: float) -> str:
    last = result.last
    loss = f"loss {last['loss']:.4f}" if "loss" in last else "loss n/a"
    val = f", held-out loss {last['val_loss']:.4f}" if "val_loss" in last else ""
    return (f"sft: {result.step} steps, {trained_tokens:,.0f} trained tokens, {loss}{val}; checkpoint "
            f"{result.checkpoint}")
