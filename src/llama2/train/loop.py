"""The one training loop every stage drives (pretraining, SFT, reward models, rejection sampling, PPO, GAtt,
distillation).

A stage hands the Trainer:
  - `build_model()`: builds the model (random init); called again on the meta device for save skeletons;
  - `loss_fn(model, batch) -> LossOutput | (loss, count[, metrics])`: `loss` is the mean over `count` items
    (tokens for LM losses, pairs for reward models). The optimised objective is the mean over all items of the
    global batch (all micro-batches of all processes), so masked tokens and uneven batches weigh correctly;
  - `batches`: an object with `next() -> list[batch]` (this process's micro-batches for the next optimiser step)
    and `state_dict()` / `load_state_dict()` (a rank-independent position, saved in checkpoints);
  - optionally `val_batches()`: this process's validation batches (or a {name: batches} mapping); every process
    must yield the same number of batches (pad with fully masked ones);
  - optionally `initial_weights()`: a full state dict to start from (read on rank 0 only).

The Trainer owns precision (bf16 autocast, fp32 master weights), FSDP2 sharding, AdamW + schedule, gradient
accumulation and clipping, NaN/inf detection, metrics.jsonl + progress bar, and atomic checkpoints with exact
resume (see state.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..atomic import atomic_write_text
from ..errors import Llama2Error
from . import checkpoints as st
from .config import TrainRecipe, to_dict
from .distributed import (DistEnv, all_reduce_sum, apply_activation_checkpointing, apply_compile, barrier,
                          broadcast_object, init_distributed, shard_model)
from .metrics import MetricsLog, peak_tflops
from .schedule import lr_at

Batch = Any


@dataclass
class LossOutput:
    """What a loss function returns. `loss` is the mean over `count` items; `tokens` (default: count) counts
    processed tokens for throughput; `metrics` are extra per-item means (e.g. accuracy), averaged like the loss."""

    loss: Tensor
    count: float | Tensor
    tokens: float | Tensor | None = None
    metrics: dict[str, float | Tensor] = field(default_factory=dict)


LossFn = Callable[[nn.Module, Batch], "LossOutput | tuple"]


class Batches(Protocol):
    def next(self) -> list[Batch]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class CheckpointIO(Protocol):
    def save(self, model: nn.Module, path: Path, fetch: Callable[[str], Tensor] | None = None) -> None:
        """Write the weights directory at `path` (which does not exist yet). With `fetch`, `model` is a meta
        skeleton and fetch(name) gives each state_dict tensor's data, to be requested in state_dict order."""

    def load(self, path: Path) -> dict[str, Tensor]:
        """The full fp32 CPU state dict of the weights directory at `path` (resume uses `load_into(path,
        {name: (local tensor, first row)})` instead where the IO has it: each process reads only its rows)."""


class HFCheckpointIO:
    """The project's checkpoint directory (llama2.checkpoint): HF Llama layout plus the tokenizer."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    def save(self, model: nn.Module, path: Path, fetch: Callable[[str], Tensor] | None = None) -> None:
        from ..checkpoint import save_model

        save_model(model, path, tokenizer=self.tokenizer, fetch=fetch)

    def load(self, path: Path) -> dict[str, Tensor]:
        from ..checkpoint import load_model

        return load_model(path, device="cpu", dtype=torch.float32).state_dict()

    def load_into(self, path: Path, targets: dict[str, tuple[Tensor, int]]) -> None:
        """Fill each (tensor, first row) in place, reading only those rows from disk (see read_rows_into)."""
        from ..checkpoint import read_rows_into

        read_rows_into(path, targets)


class NonFiniteLoss(Llama2Error):
    """The loss or gradient norm became NaN/inf: training stops without saving."""


@dataclass
class TrainResult:
    step: int
    tokens_seen: float
    last: dict[str, Any]
    checkpoint: Path | None
    resumed_from: int | None


def _gathered(model: nn.Module, keep: bool) -> Iterator[tuple[str, Tensor | None]]:
    """(name, full CPU tensor) for each state_dict entry of a sharded model, gathered one at a time; every
    process must run it to the end (each step is a collective); only `keep` processes get the tensors."""
    for name, t in model.state_dict().items():
        full = t.full_tensor() if hasattr(t, "full_tensor") else t
        yield name, full.detach().cpu() if keep else None
        del full


def _normalize(out: Any) -> LossOutput:
    if isinstance(out, LossOutput):
        return out
    if isinstance(out, tuple) and len(out) in (2, 3):
        return LossOutput(out[0], out[1], None, dict(out[2]) if len(out) == 3 else {})
    raise TypeError("loss_fn must return LossOutput or (loss, count[, metrics])")


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None (fp32) or bf16, from the recipe's precision and the device."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise Llama2Error("precision bf16 requested but this GPU has no bf16 support; use precision=fp32")
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


def _num(x: float | Tensor) -> Tensor | float:
    return x.detach().double() if isinstance(x, Tensor) else float(x)


class Trainer:
    """The shared loop; see the module docstring. `fit()` trains to recipe.max_steps, resuming if possible."""

    def __init__(self, recipe: TrainRecipe, build_model: Callable[[], nn.Module], loss_fn: LossFn,
                 batches: Batches, *, val_batches: Callable[[], Iterable[Batch] | Mapping[str, Iterable[Batch]]]
                 | None = None, initial_weights: Callable[[], dict[str, Tensor]] | None = None,
                 checkpoint_io: CheckpointIO | None = None, env: DistEnv | None = None,
                 flops_per_token: float | None = None, quiet: bool = False) -> None:
        self.recipe = recipe
        self.env = env or init_distributed(recipe.device)
        self.device = self.env.device
        self.loss_fn = loss_fn
        self.batches = batches
        self.val_batches = val_batches
        self.build_model = build_model
        self.io = checkpoint_io or HFCheckpointIO()
        self.flops_per_token = flops_per_token
        self.quiet = quiet
        self.accum = recipe.accumulation(self.env.world_size)
        self.amp_dtype = autocast_dtype(recipe.precision, self.device)
        self.run_dir = Path(recipe.out_dir)
        self.step = 0
        self.tokens_seen = 0.0
        self.elapsed = 0.0
        self.last_record: dict[str, Any] = {}
        self.resumed_from: int | None = None
        self._peak: float | None = None
        if self.env.is_main:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise Llama2Error(f"cannot create out_dir {self.run_dir}: {e.strerror}") from None
            st.remove_stale(self.run_dir)
        barrier(self.env)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.env.is_main)

        st.seed_everything(recipe.seed)
        self.model = self._build()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise Llama2Error("the model has no trainable parameters")
        self.optimizer = self._make_optimizer()
        found = st.latest_checkpoint(self.run_dir) if self.env.is_main else None
        ckpt = broadcast_object(str(found) if found else None, self.env)
        if ckpt is not None:
            self._resume(Path(ckpt))
        else:
            if initial_weights is not None:
                self._set_full_state(initial_weights() if self.env.is_main else {})
            self.metrics.truncate(0)
        if self.env.is_main:
            import yaml

            atomic_write_text(self.run_dir / "recipe.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))

    # ---------------------------------------------------------------- setup

    def _build(self) -> nn.Module:
        r, env = self.recipe, self.env
        if r.init_on_meta:
            with torch.device("meta"):
                model = self.build_model()
        else:
            model = self.build_model().to(self.device)
        if r.activation_checkpointing:
            apply_activation_checkpointing(model)
        if r.compile:
            apply_compile(model)
        if env.enabled:
            gather_dtype = self.amp_dtype if self.device.type == "cuda" else None
            shard_model(model, env, param_dtype=gather_dtype)
        if r.init_on_meta:
            model.to_empty(device=self.device)
            init = getattr(model, "init_weights", None)
            if init is None:
                raise Llama2Error("init_on_meta needs a model with init_weights(); set init_on_meta=false")
            torch.manual_seed(r.seed + env.rank)  # each shard draws its own numbers
            with torch.no_grad():
                init()
            torch.manual_seed(r.seed)
        return model

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.recipe.optim
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        fused = o.fused if o.fused is not None else not self.env.enabled
        kind = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kind)

    def _set_full_state(self, sd: dict[str, Tensor]) -> None:
        """Load a full (unsharded) state dict present on rank 0 into the (possibly sharded) model."""
        try:
            if self.env.enabled:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

                set_model_state_dict(self.model, sd, options=StateDictOptions(full_state_dict=True,
                                                                              broadcast_from_rank0=True))
            else:
                with torch.no_grad():
                    self.model.load_state_dict(sd)
        except (RuntimeError, KeyError, ValueError) as e:
            raise Llama2Error(f"the weights do not fit the model built from the recipe: {str(e)[:400]}; use the "
                              "recipe the checkpoint was trained with") from None

    def _resume(self, ckpt: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        main = self.env.is_main
        load_into = getattr(self.io, "load_into", None)
        if load_into is not None:  # every process reads its own rows of the weights, nothing is broadcast
            targets = {name: st.local_rows(t)[:2] for name, t in self.model.state_dict().items()}
            with torch.no_grad():
                load_into(ckpt, targets)
        else:
            self._set_full_state(self.io.load(ckpt) if main else {})
        osd = st.load_optimizer_rows(ckpt, get_optimizer_state_dict(self.model, self.optimizer))
        try:
            set_optimizer_state_dict(self.model, self.optimizer, osd)
        except (RuntimeError, KeyError, ValueError) as e:
            raise Llama2Error(f"the optimizer state of {ckpt} does not fit this model/optimizer: {str(e)[:300]}; "
                              "use the recipe the checkpoint was trained with") from None
        ts = broadcast_object(st.load_torch(ckpt / st.TRAINING_STATE) if main else None, self.env)
        self.step = int(ts["step"])
        self.tokens_seen = float(ts["tokens_seen"])
        self.elapsed = float(ts.get("elapsed_s", 0.0))
        self.last_record = dict(ts.get("last_metrics", {}))
        self.batches.load_state_dict(ts["batches"])
        rngs = ts["rng"]
        st.restore_rng(rngs[self.env.rank] if len(rngs) == self.env.world_size else rngs[0])
        self.metrics.truncate(self.step)
        self.resumed_from = self.step
        if main and not self.quiet:
            print(f"resuming from {ckpt} (step {self.step})", flush=True)

    # ---------------------------------------------------------------- one step

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, micro: list[Batch]) -> dict[str, float]:
        """Forward/backward over this process's micro-batches, then one optimiser update. Raises NonFiniteLoss
        (before updating) if the loss or the gradient norm is not finite."""
        self.model.train()
        lr = lr_at(self.step, self.recipe.optim, self.recipe.max_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss_sum: Tensor | float = 0.0
        count: Tensor | float = 0.0
        tokens: Tensor | float = 0.0
        extra: dict[str, Tensor | float] = {}
        for i, batch in enumerate(micro):
            if self.env.enabled:
                self.model.set_requires_gradient_sync(i == len(micro) - 1)  # type: ignore[operator]
            with self._autocast():
                out = _normalize(self.loss_fn(self.model, to_device(batch, self.device)))
            (out.loss * out.count).backward()
            n = _num(out.count)
            loss_sum = loss_sum + out.loss.detach().double() * n
            count = count + n
            tokens = tokens + _num(out.tokens if out.tokens is not None else out.count)
            for k, v in out.metrics.items():
                extra[k] = extra.get(k, 0.0) + _num(v) * n
        keys = sorted(extra)
        totals = all_reduce_sum([float(x) for x in (loss_sum, count, tokens, *(extra[k] for k in keys))], self.env)
        total_loss, n_total, n_tokens = totals[:3]
        if n_total <= 0:
            raise Llama2Error(f"step {self.step + 1}: the batch has no trained items (every label masked?); "
                              "check the data")
        loss = total_loss / n_total
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss}")
        scale = self.env.world_size / n_total  # FSDP averages over processes; make it a mean over all items
        grads = [p.grad for p in self.params if p.grad is not None]
        with torch.no_grad():
            if self.env.enabled:
                for g in grads:
                    g.mul_(scale)
            elif grads:
                torch._foreach_mul_(grads, scale)
        clip = self.recipe.optim.grad_clip if self.recipe.optim.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            raise NonFiniteLoss(f"gradient norm is {grad_norm} (loss {loss:.4f})")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += n_tokens
        stats = {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens}
        stats.update({k: v / n_total for k, v in zip(keys, totals[3:])})
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean validation loss (and perplexity) over the fixed validation batches, per group and overall."""
        if self.val_batches is None:
            return {}
        self.model.eval()
        data = self.val_batches()
        groups = data if isinstance(data, Mapping) else {"": data}
        result: dict[str, float] = {}
        all_s = all_n = 0.0
        for name, batches in groups.items():
            s = n = 0.0
            for batch in batches:
                with self._autocast():
                    out = _normalize(self.loss_fn(self.model, to_device(batch, self.device)))
                c = float(_num(out.count))
                s += float(out.loss.double()) * c
                n += c
            s, n = all_reduce_sum([s, n], self.env)
            if name and n > 0 and len(groups) > 1:
                result[f"val_loss/{name}"] = s / n
            all_s, all_n = all_s + s, all_n + n
        if all_n > 0:
            result["val_loss"] = all_s / all_n
            result["val_ppl"] = math.exp(min(result["val_loss"], 700.0))
        self.model.train()
        return result

    # ---------------------------------------------------------------- checkpoints

    def save(self) -> Path | None:
        """Write checkpoint step-NNNNNN atomically. Every process takes part: rank 0 writes the weights, gathered
        one tensor at a time, and each process writes its own shard of the optimizer state (see state.py)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        env, main = self.env, self.env.is_main
        staging = st.staging_dir(self.run_dir, self.step) if main else None
        if not env.enabled:
            self.io.save(self.model, staging)
        else:
            tensors = _gathered(self.model, main)

            def fetch(name: str) -> Tensor:
                got, t = next(tensors)
                if got != name:
                    raise Llama2Error(f"internal: gathered {got!r} while saving {name!r}")
                return t

            try:
                if main:
                    with torch.device("meta"):
                        skeleton = self.build_model()
                    self.io.save(skeleton, staging, fetch=fetch)
            finally:
                for _ in tensors:  # the other ranks' gathers, and rank 0's after an error: every one must run
                    pass
        staging = Path(broadcast_object(str(staging) if main else None, env))
        barrier(env)  # the staging directory exists for everyone
        osd = get_optimizer_state_dict(self.model, self.optimizer)
        st.save_optimizer_shard(osd, staging, env.rank, env.world_size)
        del osd
        rng = st.capture_rng()
        if env.enabled:
            import torch.distributed as dist

            rngs: list[Any] = [None] * env.world_size
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng]
        barrier(env)  # every optimizer shard is written
        final = None
        if main:
            st.save_torch({"format": 2, "step": self.step, "tokens_seen": self.tokens_seen,
                           "elapsed_s": self.elapsed, "batches": self.batches.state_dict(), "rng": rngs,
                           "world_size": env.world_size, "last_metrics": self.last_record},
                          staging / st.TRAINING_STATE)
            final = st.commit_checkpoint(self.run_dir, staging, self.step, self.recipe.keep_last)
        barrier(env)
        return final

    # ---------------------------------------------------------------- the loop

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.flops_per_token is None:
            return None
        if self._peak is None:
            dtype = self.amp_dtype or torch.float32
            self._peak = broadcast_object(peak_tflops(self.device, dtype, self.recipe.peak_tflops), self.env)
        return self.flops_per_token * tokens_per_s / (self._peak * 1e12 * self.env.world_size)

    def fit(self) -> TrainResult:
        """Train until recipe.max_steps (from the latest checkpoint if there is one)."""
        from tqdm import tqdm

        r = self.recipe
        last_ckpt = st.latest_checkpoint(self.run_dir) if self.env.is_main else None
        if self.step >= r.max_steps:
            if self.env.is_main and not self.quiet:
                print(f"{self.run_dir}: already at step {self.step} (max_steps {r.max_steps}); nothing to do")
            return TrainResult(self.step, self.tokens_seen, self.last_record, last_ckpt, self.resumed_from)
        bar = tqdm(total=r.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=self.quiet or not self.env.is_main, desc="train")
        window_t0 = time.perf_counter()
        window = {"steps": 0, "tokens": 0.0, "loss": 0.0}
        try:
            while self.step < r.max_steps:
                micro = self.batches.next()
                try:
                    stats = self.train_step(micro)
                except NonFiniteLoss as e:
                    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved"
                    raise NonFiniteLoss(
                        f"{e} at step {self.step + 1}: training stopped without saving; {where}. Lower optim.lr "
                        f"(now {r.optim.lr:g}), raise optim.warmup_steps or check the data, then run again "
                        "(it resumes from the last good checkpoint)") from None
                window["steps"] += 1
                window["tokens"] += stats["tokens"]
                window["loss"] += stats["loss"]
                step = self.step
                do_eval = self.val_batches is not None and (
                    (r.eval_every and step % r.eval_every == 0) or step == r.max_steps)
                do_save = (r.save_every and step % r.save_every == 0) or step == r.max_steps
                if step % r.log_every == 0 or step == r.max_steps or do_eval:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    dt = max(now - window_t0, 1e-9)
                    self.elapsed += dt
                    tps = window["tokens"] / dt
                    record: dict[str, Any] = {"step": step, "loss": window["loss"] / window["steps"],
                                              "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                                              "tokens": self.tokens_seen, "tokens_per_s": tps}
                    mfu = self._mfu(tps)
                    if mfu is not None:
                        record["mfu"] = mfu
                    record.update({k: v for k, v in stats.items() if k not in ("loss", "lr", "grad_norm", "tokens")})
                    if do_eval:
                        record.update(self.evaluate())
                    record["elapsed_s"] = self.elapsed
                    self.metrics.append(record)
                    self.last_record = record
                    post = {"loss": f"{record['loss']:.4f}", "tok/s": f"{tps:,.0f}"}
                    if "val_loss" in record:
                        post["val"] = f"{record['val_loss']:.4f}"
                    bar.set_postfix(post, refresh=False)
                    window = {"steps": 0, "tokens": 0.0, "loss": 0.0}
                    window_t0 = time.perf_counter()
                bar.update(1)
                if do_save:
                    last_ckpt = self.save()
                    window_t0 = time.perf_counter()
        finally:
            bar.close()
        return TrainResult(self.step, self.tokens_seen, self.last_record, last_ckpt, self.resumed_from)
