"""Training recipes: the sections every stage shares, and pretraining's own.

Every stage's recipe derives from `TrainRecipe` (the fields the shared loop reads: run directory, steps,
batching, optimiser, precision, checkpointing, logging) and adds its own sections (model, data, ...).
Loading and validation (YAML + `key=value` overrides) is `llama2.recipe.load_recipe`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import PRESETS, ModelConfig
from ..data.sources import expand_sources
from ..data.tokenizer_training import check_reserved
from ..errors import Llama2Error
from ..paths import expand_path
from ..recipe import check


# ---------------------------------------------------------------------------------------------------------------
# Sections shared by every stage


@dataclass
class OptimConfig:
    """AdamW with a warm-up + cosine (or constant / linear) schedule; defaults are the paper's (paper section 2.2)."""

    lr: float = 3e-4  # peak learning rate (AdamW)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-5  # AdamW epsilon
    weight_decay: float = 0.1  # applied to matrices only, never to norms or other 1-D parameters
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # after the warm-up: cosine or linear decay to min_lr_ratio * lr, or constant
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 2000  # linear warm-up steps
    warmup_ratio: float = 0.0  # warm-up = max(warmup_steps, ceil(warmup_ratio * max_steps))
    min_lr_ratio: float = 0.1  # the schedule ends at min_lr_ratio * lr
    fused: bool | None = None  # fused AdamW kernel; None = on for single-process runs, foreach under FSDP

    def validate(self, prefix: str = "optim") -> None:
        check(self.lr > 0, f"{prefix}.lr", self.lr, "a positive number")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            check(0 <= v < 1, f"{prefix}.{name}", v, "a number in [0, 1)")
        check(self.eps > 0, f"{prefix}.eps", self.eps, "a positive number")
        check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "a number >= 0")
        check(self.grad_clip >= 0, f"{prefix}.grad_clip", self.grad_clip, "a number >= 0 (0 = off)")
        check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", self.warmup_steps, "an integer >= 0")
        check(0 <= self.warmup_ratio <= 1, f"{prefix}.warmup_ratio", self.warmup_ratio, "a number in [0, 1]")
        check(0 <= self.min_lr_ratio <= 1, f"{prefix}.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")


@dataclass
class TrainRecipe:
    """What the shared training loop reads. Stages subclass it and add their own sections."""

    out_dir: str = "runs/train"  # the run directory: recipe.yaml, metrics.jsonl, plots, checkpoints/
    max_steps: int = 1000  # optimiser steps
    batch_size: int = 8  # micro-batch (sequences) per process
    grad_accum: int = 1  # micro-batches per optimiser step
    global_batch_size: int | None = None  # sequences per optimiser step; if set, grad_accum is derived
    seed: int = 0  # seeds data order, initialisation, dropout and sampling
    device: str = "auto"  # auto, cpu, cuda (under torchrun each process takes cuda:LOCAL_RANK)
    # bf16: autocast to bf16 for compute, fp32 master weights, gradients and optimizer state. auto: bf16 on CUDA
    # GPUs with bf16 and on CPUs with native bf16 (avx512_bf16 or amx_bf16 in /proc/cpuinfo, checked at run
    # time), fp32 otherwise
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    log_every: int = 1  # steps between lines of metrics.jsonl
    eval_every: int = 0  # 0 = evaluate only at the end (if there is validation data)
    save_every: int = 0  # 0 = save only at the end
    keep_last: int = 3  # checkpoints kept (oldest deleted first)
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile each block
    init_on_meta: bool = False  # build the model on the meta device and initialise it after sharding (huge models)
    # under torchrun: fsdp shards the model over all processes; hsdp shards it within groups of shard_size
    # processes (a node) and replicates it across the groups (nodes). Each process trains on its own data either way
    sharding: Literal["fsdp", "hsdp"] = "fsdp"
    shard_size: int | None = None  # processes per hsdp shard group; null: torchrun's processes per node
    peak_tflops: float | None = None  # per-device peak for MFU; None = table for known GPUs, measured on CPU
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        check(bool(self.out_dir), "out_dir", self.out_dir, "a directory path")
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            v = getattr(self, name)
            check(v >= 1, name, v, "an integer >= 1")
        for name in ("eval_every", "save_every"):
            v = getattr(self, name)
            check(v >= 0, name, v, "an integer >= 0 (0 = only at the end)")
        check(self.keep_last >= 1, "keep_last", self.keep_last, "an integer >= 1")
        if self.global_batch_size is not None:
            check(self.global_batch_size >= 1, "global_batch_size", self.global_batch_size,
                   "an integer >= 1 or null")
        check(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", self.peak_tflops,
               "a positive number or null")
        if self.shard_size is not None:
            check(self.sharding == "hsdp", "shard_size", self.shard_size,
                  "null with sharding=fsdp (set sharding=hsdp to shard within groups of shard_size processes)")
            check(self.shard_size >= 1, "shard_size", self.shard_size, "an integer >= 1, or null")
        self.optim.validate()

    def accumulation(self, world_size: int) -> int:
        """Micro-batches per optimiser step on each process."""
        if self.global_batch_size is None:
            return self.grad_accum
        per_step = self.batch_size * world_size
        if self.global_batch_size % per_step:
            raise Llama2Error(f"global_batch_size {self.global_batch_size} is not a multiple of batch_size "
                              f"{self.batch_size} x {world_size} process(es) = {per_step}; change one of them")
        return self.global_batch_size // per_step


@dataclass
class FineTuneRecipe(TrainRecipe):
    """The keys every stage that starts from a checkpoint shares (SFT, reward models, RLHF): `base` (HF or Meta
    layout, or a run directory: its latest checkpoint), `base_recipe` (builds `base` when missing), `epochs` over
    the stage's data with `max_steps` as a cap (null: the epochs decide), `max_seq_len` (null: the base's context)."""

    base: str = ""  # the starting checkpoint: HF or Meta layout, or a run directory (its latest checkpoint)
    # a recipe that builds `base` when it is missing (the llama2 command runs it first)
    base_recipe: str | None = None
    # a cap on the optimiser steps; null: `epochs` passes over the data decide
    max_steps: int | None = None  # type: ignore[assignment]
    epochs: int = 1  # passes over the stage's data
    max_seq_len: int | None = None  # row length in tokens; null: the base's context

    def validate(self) -> None:
        check(bool(self.base), "base", self.base, "the starting checkpoint directory")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", self.max_steps,
               "an integer >= 1, or null for `epochs` passes over the data")
        check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        check(self.max_seq_len is None or self.max_seq_len >= 8, "max_seq_len", self.max_seq_len,
               "an integer >= 8, or null for the base's context")
        steps = self.max_steps
        self.max_steps = steps or 1  # TrainRecipe checks the rest
        try:
            super().validate()
        finally:
            self.max_steps = steps


# ---------------------------------------------------------------------------------------------------------------
# Sections of the pretraining recipe (later stages reuse ModelSpec)


@dataclass
class ModelSpec:
    """A model shape: a preset name plus field overrides; vocab_size defaults to the tokenizer's."""

    preset: str | None = None  # a named shape (7B, 13B, 34B, 70B, tiny ...); the keys below override its fields
    dim: int | None = None  # model width
    n_layers: int | None = None  # transformer blocks
    n_heads: int | None = None  # query heads
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention when fewer than n_heads)
    vocab_size: int | None = None  # null: the tokenizer's
    multiple_of: int | None = None  # the feed-forward width is rounded up to a multiple of this
    ffn_dim_multiplier: float | None = None  # scales the feed-forward width (70B: 1.3)
    norm_eps: float | None = None  # RMSNorm epsilon
    rope_theta: float | None = None  # rotary embedding base
    max_seq_len: int | None = None  # context length
    hidden_dim: int | None = None  # the feed-forward width itself (overrides the rule above)

    def validate(self, prefix: str = "model") -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise Llama2Error(f"{prefix}.preset: unknown preset {self.preset!r}; allowed: {list(PRESETS)}")

    def build(self, vocab_size: int | None = None) -> ModelConfig:
        """The ModelConfig: the preset's fields, then the ones set here; vocab_size falls back to the argument."""
        base = dict(PRESETS[self.preset]) if self.preset else {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "preset" and v is not None:
                base[f.name] = v
        if self.vocab_size is None and vocab_size is not None:
            base["vocab_size"] = vocab_size
        if self.hidden_dim is None and any(getattr(self, k) is not None
                                           for k in ("dim", "multiple_of", "ffn_dim_multiplier")):
            base.pop("hidden_dim", None)  # derive it from the overridden shape
        return ModelConfig(**base)


@dataclass
class SourceConfig:
    """One prepared dataset (a directory with manifest.json + .bin shards) and its sampling weight."""

    path: str
    weight: float = 1.0
    name: str | None = None

    def validate(self, prefix: str = "data.sources") -> None:
        check(self.weight > 0, f"{prefix}.weight", self.weight, "a positive number")

    @property
    def label(self) -> str:
        return self.name or expand_path(self.path).name


@dataclass
class BuildConfig:
    """Build the corpus, tokenizer and shards into `dir` when they are missing (`dir/{corpus,tokenizer,shards}`)."""

    # corpus source names (default = stdlib + pydoc; the others: `llama2 data corpus --help`); [] for files only
    corpus: list[str] = field(default_factory=lambda: ["default"])
    # .txt (one document each) / .jsonl ("text" per line) files or directories of them, added to the corpus
    files: list[str] = field(default_factory=list)
    vocab_size: int = 4096  # pieces of the tokenizer trained on the corpus
    # strings the tokenizer keeps as one piece each (whole words, the chat tags [INST] [/INST] <<SYS>> <</SYS>>)
    reserved: list[str] = field(default_factory=list)
    dir: str = "{cache}/pretrain-default-v4096"  # where corpus/, tokenizer/ and shards/ are built
    val_fraction: float = 0.01  # share of the corpus held out for validation

    def validate(self, prefix: str = "data.build") -> None:
        check(bool(self.corpus or self.files), f"{prefix}.corpus", self.corpus,
              f"a non-empty list of corpus source names (or [] with {prefix}.files)")
        if "files" in self.corpus and not self.files:
            raise Llama2Error(f"{prefix}.corpus names the `files` source but {prefix}.files is empty; list the "
                              f"files in {prefix}.files")
        if self.corpus:
            try:
                expand_sources(list(self.corpus))
            except Llama2Error as e:
                raise Llama2Error(f"recipe key '{prefix}.corpus': {e}") from None
        check_reserved(self.reserved, f"{prefix}.reserved")
        minimum = 259 + len(self.reserved)
        check(self.vocab_size > minimum, f"{prefix}.vocab_size", self.vocab_size,
              f"an integer > {minimum} (256 bytes, 3 special pieces, the reserved strings)")
        check(0 < self.val_fraction < 1, f"{prefix}.val_fraction", self.val_fraction, "a number in (0, 1)")

    def sources(self) -> tuple[list[str], list[Path]]:
        """(the corpus source names, with `files` when files are given; the files, expanded)."""
        names = list(self.corpus) + (["files"] if self.files and "files" not in self.corpus else [])
        return names, [expand_path(f) for f in self.files]


@dataclass
class DataConfig:
    """The training mixture: prepared sources sampled by weight, the tokenizer they were made with."""

    sources: list[SourceConfig] = field(default_factory=list)  # prepared shard directories, each {path, weight, name}
    tokenizer: str | None = None  # the tokenizer.model the shards were made with
    build: BuildConfig | None = None  # build the corpus, tokenizer and shards when missing (instead of sources)
    eval_sequences: int = 64  # fixed validation sequences (split evenly over the sources' val splits)

    def validate(self, prefix: str = "data") -> None:
        if not self.sources and self.build is None:
            raise Llama2Error(f"{prefix}.sources: no training data; list prepared shard directories "
                              "(data.sources: [{path: DIR, weight: 1.0}]) or set data.build")
        if self.tokenizer is None and self.build is None:
            raise Llama2Error(f"{prefix}.tokenizer: not set; give the tokenizer directory the shards were made with")
        check(self.eval_sequences >= 0, f"{prefix}.eval_sequences", self.eval_sequences, "an integer >= 0")
        names = [s.label for s in self.sources]
        if len(set(names)) != len(names):
            raise Llama2Error(f"{prefix}.sources: two sources share a name ({names}); give each a distinct `name`")

    def resolved(self) -> tuple[list[SourceConfig], Path]:
        """Sources and tokenizer directory with `data.build` defaults filled in and paths expanded."""
        sources = list(self.sources)
        tok = self.tokenizer
        if self.build is not None:
            root = self.build.dir
            if not sources:
                sources = [SourceConfig(path=f"{root}/shards", name="default")]
            if tok is None:
                tok = f"{root}/tokenizer"
        assert tok is not None
        return ([SourceConfig(str(expand_path(s.path)), s.weight, s.name or expand_path(s.path).name)
                 for s in sources], expand_path(tok))


@dataclass
class PretrainRecipe(TrainRecipe):
    """`llama2 pretrain`: next-token prediction over packed sequences of a weighted mixture of shards."""

    out_dir: str = "runs/pretrain"
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    init_from: str | None = None  # a checkpoint directory to start from instead of random weights
    # row length in tokens; null: the model's context. Shorter rows cost less attention per token (the context stays)
    seq_len: int | None = None
    # share of steps whose rows are as long as the model's context (as many tokens per step, fewer rows): short rows
    # learn facts sooner, but never train attention further back than seq_len tokens, which a long dialogue needs
    long_rows: float = 0.0

    def validate(self) -> None:
        super().validate()
        self.model.validate()
        self.data.validate()
        check(self.seq_len is None or self.seq_len >= 8, "seq_len", self.seq_len,
              "an integer >= 8, or null for the model's context")
        check(0.0 <= self.long_rows <= 1.0, "long_rows", self.long_rows, "a share of steps between 0 and 1")


