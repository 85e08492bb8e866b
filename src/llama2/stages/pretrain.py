"""The pretraining stage: next-token cross-entropy over packed sequences of a weighted shard mixture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import atomic_directory
from ..checkpoint import load_config, load_model
from ..data.corpus import STATS_FILE, build_corpus
from ..data.packing import PackedBatches, validation_windows
from ..data.prepare import prepare_shards
from ..data.shards import TokenShards
from ..data.sources import expand_sources
from ..data.tokenizer_training import train_tokenizer
from ..errors import Llama2Error
from ..fused_ops import IGNORE_INDEX
from ..model import Transformer
from ..paths import expand_path
from ..tokenizer import Tokenizer
from ..train.config import BuildConfig, PretrainRecipe
from ..train.distributed import DistEnv, barrier, init_distributed
from ..train.loop import HFCheckpointIO, LossOutput, Trainer, TrainResult
from ..train.metrics import flops_per_token


def causal_lm_loss(model: nn.Module, batch: Any) -> LossOutput:
    """Mean next-token cross-entropy. `batch` is a LongTensor (B, T + 1) of packed tokens, or (tokens, labels)
    of equal shape with labels -100 where no loss is taken (SFT's prompts, padding); position t predicts t + 1."""
    if isinstance(batch, Tensor):
        tokens, labels = batch, None
    elif isinstance(batch, dict):
        tokens, labels = batch["tokens"], batch.get("labels")
    else:
        tokens, labels = batch
    targets = (tokens if labels is None else labels)[:, 1:]
    loss_sum = model(tokens[:, :-1], targets=targets)  # fused LM head + cross-entropy
    if labels is None:
        count: Tensor | int = targets.numel()
        return LossOutput(loss_sum / count, count, count, perplexity=True)
    count = (targets != IGNORE_INDEX).sum()
    return LossOutput(loss_sum / count.clamp(min=1), count, targets.numel(), perplexity=True)


def _atomic_build(target: Path, build) -> None:
    """Run build(tmp_dir) inside an atomic directory for `target` (a killed build is never mistaken for data)."""
    with atomic_directory(target, what="data directory") as tmp:
        build(tmp)


def _complete(shards: Path) -> bool:
    try:
        return bool(json.loads((shards / "manifest.json").read_text()).get("complete"))
    except (OSError, ValueError, AttributeError):
        return False


def _check_built(build: BuildConfig, root: Path, names: list[str], files: list[Path]) -> None:
    """A clear error when `dir` already holds a corpus or tokenizer built from other settings (the build only fills
    in what is missing, so a changed recipe would silently train on the old data)."""
    try:
        stats = json.loads((root / "corpus" / STATS_FILE).read_text())
    except (OSError, ValueError):
        stats = None
    want = (expand_sources(names), [str(f) for f in files])
    if isinstance(stats, dict) and (stats.get("sources"), stats.get("inputs", [])) != want:
        raise Llama2Error(f"data.build.dir {root} holds a corpus built from sources {stats.get('sources')} and files "
                          f"{stats.get('inputs', [])}, not {want[0]} and {want[1]}; set data.build.dir to a new "
                          "directory (or delete the old one)")
    if build.reserved and (root / "tokenizer" / "tokenizer.model").is_file():
        tok = Tokenizer(root / "tokenizer")
        split = [r for r in build.reserved if r not in [tok.id_to_piece(i) for i in tok.encode(r, bos=False)]]
        if split:
            raise Llama2Error(f"the tokenizer in {root / 'tokenizer'} was trained without reserving {split}; set "
                              "data.build.dir to a new directory (or delete the old one)")


def ensure_built_data(build: BuildConfig, quiet: bool = False) -> Path:
    """Build the corpus (named sources plus `files`), tokenizer (with the `reserved` pieces) and shards of
    `data.build` into its dir where missing; returns the dir."""
    root = expand_path(build.dir)
    corpus, tok, shards = root / "corpus", root / "tokenizer", root / "shards"
    names, files = build.sources()
    missing = [f for f in files if not f.exists()]
    if missing:
        raise Llama2Error(f"data.build.files: {missing[0]} does not exist; give .txt files (one document each), "
                          ".jsonl files (a \"text\" field per line) or directories of them")
    files = [f.resolve() for f in files]
    _check_built(build, root, names, files)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Llama2Error(f"cannot create the data cache {root}: {e.strerror}; set LLAMA2_CACHE or data.build.dir") \
            from None
    if not (corpus / "train.jsonl").is_file():
        if not quiet:
            shown = names + [str(f) for f in files]
            print(f"building the corpus {shown} into {corpus}", flush=True)
        _atomic_build(corpus, lambda d: build_corpus(names, files, d, val_fraction=build.val_fraction, quiet=quiet))
    if not (tok / "tokenizer.model").is_file():
        if not quiet:
            print(f"training a {build.vocab_size}-piece tokenizer into {tok}", flush=True)
        _atomic_build(tok, lambda d: train_tokenizer([corpus / "train.jsonl"], build.vocab_size, d,
                                                     reserved=build.reserved, quiet=quiet))
    if not _complete(shards):
        if not quiet:
            print(f"tokenising the corpus into {shards}", flush=True)
        _atomic_build(shards, lambda d: prepare_shards(tok, [corpus], d, quiet=quiet))
    return root


def build_pretraining(recipe: PretrainRecipe, env: DistEnv | None = None, quiet: bool = False) -> Trainer:
    """Everything `llama2 pretrain` sets up: data (built if needed), tokenizer check, model, batches, Trainer."""
    env = env or init_distributed(recipe.device)
    if recipe.data.build is not None:
        if env.is_main:
            ensure_built_data(recipe.data.build, quiet=quiet)
        barrier(env)
    sources, tok_dir = recipe.data.resolved()
    if not (tok_dir / "tokenizer.model").is_file() and not tok_dir.is_file():
        raise Llama2Error(f"data.tokenizer: no tokenizer at {tok_dir}; give the directory holding the "
                          "tokenizer.model the shards were prepared with")
    tokenizer = Tokenizer(tok_dir)
    names = [s.name or Path(s.path).name for s in sources]
    train = []
    for s in sources:
        shards = TokenShards(s.path, "train")
        shards.check_tokenizer(tokenizer)
        train.append(shards)
    cfg = recipe.model.build(vocab_size=tokenizer.vocab_size)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise Llama2Error(f"model.vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; "
                          "leave model.vocab_size unset to use the tokenizer's")
    if recipe.init_from is not None:
        init_cfg = load_config(expand_path(recipe.init_from))
        if init_cfg.vocab_size != cfg.vocab_size or init_cfg.dim != cfg.dim or init_cfg.n_layers != cfg.n_layers:
            raise Llama2Error(f"init_from {recipe.init_from} has shape dim={init_cfg.dim} n_layers={init_cfg.n_layers} "
                              f"vocab={init_cfg.vocab_size}, the recipe's model has dim={cfg.dim} n_layers="
                              f"{cfg.n_layers} vocab={cfg.vocab_size}; make model match it")
    seq_len = recipe.seq_len or cfg.max_seq_len
    if seq_len > cfg.max_seq_len:
        raise Llama2Error(f"seq_len {seq_len} is longer than the model's context (model.max_seq_len "
                          f"{cfg.max_seq_len}); shorten seq_len or lengthen the context")
    accum = recipe.accumulation(env.world_size)
    batches = PackedBatches(train, [s.weight for s in sources], seq_len, recipe.batch_size, accum,
                            rank=env.rank, world_size=env.world_size, seed=recipe.seed, names=names,
                            long_len=cfg.max_seq_len, long_share=recipe.long_rows)

    val_fn = None
    if recipe.data.eval_sequences > 0:
        val_names, val_sources = [], []
        for name, s in zip(names, sources):
            try:
                val_sources.append(TokenShards(s.path, "val"))
                val_names.append(name)
            except Llama2Error:
                if env.is_main and not quiet:
                    print(f"note: data source {name!r} has no val split; it is not evaluated", flush=True)
        if val_sources:
            cache: dict[str, Any] = {}

            def val_fn() -> dict[str, list]:
                if not cache:
                    cache.update(validation_windows(val_sources, val_names, recipe.data.eval_sequences, seq_len,
                                                    recipe.batch_size, env.rank, env.world_size))
                return cache

            val_fn()  # fail early on a too-small val split

    initial = None
    if recipe.init_from is not None:
        path = expand_path(recipe.init_from)

        def initial() -> dict[str, Tensor]:
            return load_model(path, device="cpu", dtype=torch.float32).state_dict()

    return Trainer(recipe, lambda: Transformer(cfg), causal_lm_loss, batches, val_batches=val_fn,
                   initial_weights=initial, checkpoint_io=HFCheckpointIO(tokenizer), env=env,
                   flops_per_token=flops_per_token(cfg, seq_len), quiet=quiet)


def pretrain(recipe: PretrainRecipe, quiet: bool = False) -> TrainResult:
    """Run (or resume) pretraining as the recipe says."""
    return build_pretraining(recipe, quiet=quiet).fit()
