"""The one training loop every stage drives (pretraining, SFT, reward models, rejection sampling, PPO, GAtt,
distillation).

A stage hands the Trainer:
  - `build_model()`: builds the model (random init); called again on the meta device for save skeletons;
  - `loss_fn(model, batch) -> LossOutput`: `loss` is the mean over `count` items (tokens for LM losses, pairs
    for reward models). The optimised objective is the mean over all items of the global batch (all
    micro-batches of all processes), so masked tokens and uneven batches weigh correctly;
  - `batches`: an object with `next() -> list[batch]` (this process's micro-batches for the next optimiser step)
    and `state_dict()` / `load_state_dict()` (a rank-independent position, saved in checkpoints);
  - optionally `val_batches()`: this process's validation batches (or a {name: batches} mapping); every process
    must yield the same number of batches (pad with fully masked ones);
  - optionally `initial_weights()`: a full state dict to start from (read on rank 0 only), with `fresh=`
    patterns for parameters it may lack (a reward head, LoRA adapters) and `discard=` patterns for entries to
    drop (an LM head the new model does not have); anything else missing or unexpected is an error;
  - optionally `trainable=` (name, param) -> bool and/or `frozen=` patterns: frozen parameters get no
    gradients and no optimizer state;
  - optionally `step_fn(trainer) -> stats` replacing the default step (PPO: a rollout, then several epochs of
    `trainer.backward(...)` + `trainer.optimizer_step()`), and `eval_fn(trainer) -> metrics` for evaluation;
  - optionally extra checkpointed state (`state={name: obj}` or `trainer.add_state`) and frozen reference
    models (`trainer.add_reference_model`).

Whoever runs the loop may watch it step by step: `trainer.fit(on_step=hook)` (one hook or a list) calls
`hook(trainer, info)` after every optimiser step, before that step's logging, evaluation and checkpoint, with
a `StepInfo` (steps done, the step's stats, when it started and how long it took). A hook may change the run's
length by setting `trainer.recipe.max_steps` (raised: the run goes on; lowered to the current step or below:
this step is the last), or return True to stop after this step; either way the last step is logged, evaluated
and saved like the step at max_steps. Stopping leaves max_steps alone (the learning-rate schedule and a later
resume follow it). With several processes every process runs the hooks, and they must decide alike (broadcast
a decision taken on rank 0). The demo's budget planner (`report.budget.fit_within`) is such a hook.

The Trainer owns precision (bf16 autocast, fp32 master weights), FSDP2 or HSDP sharding (recipe.sharding), AdamW +
schedule, gradient accumulation and clipping, NaN/inf detection, metrics.jsonl + progress bar, and atomic
checkpoints with exact resume (checkpoints.CheckpointManager).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..atomic import atomic_write_text
from ..checkpoint import read_rows_into, save_model
from ..cpu import has_native_bf16
from ..errors import Llama2Error
from ..paths import expand_path
from ..recipe import to_dict
from . import checkpoints as st
from .checkpoints import CheckpointIO, CheckpointManager, FnState, RNGState
from .config import TrainRecipe
from .distributed import (
    DistEnv,
    all_reduce_sum,
    apply_activation_checkpointing,
    apply_compile,
    barrier,
    broadcast_object,
    broadcast_tensor,
    init_distributed,
    shard_model,
    with_sharding,
)
from .metrics import MetricsLog, peak_tflops
from .plots import plot_run
from .schedule import lr_at

Batch = Any


@dataclass
class LossOutput:
    """What a loss function returns. `loss` is the mean over `count` items; `tokens` (default: count) counts
    processed tokens for throughput; `metrics` are extra per-item means (e.g. accuracy), averaged like the loss
    (in training stats and over validation); `perplexity`: the loss is a mean token negative log-likelihood, so
    evaluation also reports exp(val_loss)."""

    loss: Tensor
    count: float | Tensor
    tokens: float | Tensor | None = None
    metrics: dict[str, float | Tensor] = field(default_factory=dict)
    perplexity: bool = False


LossFn = Callable[[nn.Module, Batch], LossOutput]


class Batches(Protocol):
    def next(self) -> list[Batch]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class HFCheckpointIO:
    """The project's checkpoint directory (llama2.checkpoint): HF Llama layout plus the tokenizer."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer

    def save(self, model: nn.Module, path: Path, fetch: Callable[[str], Tensor] | None = None) -> None:
        save_model(model, path, tokenizer=self.tokenizer, fetch=fetch)

    def load_into(self, path: Path, targets: dict[str, tuple[Tensor, int]]) -> None:
        """Fill each (tensor, first row) in place, reading only those rows from disk (see read_rows_into)."""
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


@dataclass(frozen=True)
class StepInfo:
    """What a step hook (Trainer.fit(on_step=...)) is told after each optimiser step."""

    step: int  # steps done, this one included (trainer.step)
    stats: Mapping[str, float]  # what the step returned: loss, lr, grad_norm, tokens, the stage's own
    started: float  # time.time() when the step began
    seconds: float  # the step's wall time (data, forward, backward, update; not the logging, eval or save after)


StepHook = Callable[["Trainer", StepInfo], "bool | None"]  # True: stop after this step


@dataclass
class StepTotals:
    """What Trainer.backward measured over the global batch: mean loss and metrics over `count` items."""

    loss: float
    count: float
    tokens: float
    metrics: dict[str, float]

    def stats(self) -> dict[str, float]:
        return {"loss": self.loss, "tokens": self.tokens, **self.metrics}


def _as_loss_output(out: Any) -> LossOutput:
    if not isinstance(out, LossOutput):
        raise TypeError(f"loss_fn must return a LossOutput, got {type(out).__name__}")
    return out


def to_device(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


@functools.lru_cache(maxsize=1)
def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None (fp32) or bf16, from the recipe's precision and the device (see TrainRecipe.precision)."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise Llama2Error("precision bf16 requested but this GPU has no bf16 support; use precision=fp32")
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if has_native_bf16() else None
    return None


def _num(x: float | Tensor) -> Tensor | float:
    return x.detach().double() if isinstance(x, Tensor) else float(x)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def _few(names: Sequence[str], k: int = 4) -> str:
    names = list(names)
    return str(names[:k])[:-1] + (f", ... {len(names) - k} more]" if len(names) > k else "]")


def match_weights(model_shapes: Mapping[str, tuple[int, ...]], weights: Mapping[str, Tensor],
                  fresh: Sequence[str] = (), discard: Sequence[str] = ()) -> tuple[str | None, list[str]]:
    """(error message or None, the model's entries to load) for loading `weights` into a model whose state
    dict has `model_shapes`: entries matching `discard` are dropped; model entries missing from the weights
    must match `fresh` (they keep their initialisation); any other missing or unexpected entry, or a fresh
    pattern matching nothing, is an error."""
    unused = [p for p in fresh if not any(fnmatchcase(n, p) for n in model_shapes)]
    if unused:
        return (f"fresh pattern(s) {unused} match no parameter of the model (its names look like "
                f"{_few(model_shapes)}); fix the pattern"), []
    have = {k for k in weights if not _matches(k, discard)}
    missing = [n for n in model_shapes if n not in have and not _matches(n, fresh)]
    unexpected = sorted(have - set(model_shapes))
    if missing or unexpected:
        return (f"the initial weights do not fit the model: missing {_few(missing)}, unexpected {_few(unexpected)}; "
                "declare parameters that start fresh (a reward head, adapters) with fresh=[...] and entries to drop "
                "with discard=[...], or start from weights made for this model"), []
    for n in model_shapes:
        if n in have and tuple(weights[n].shape) != tuple(model_shapes[n]):
            return (f"initial weight {n} has shape {list(weights[n].shape)}, the model's is {list(model_shapes[n])}; "
                    "start from weights made for this model"), []
    return None, [n for n in model_shapes if n in have]


class Trainer:
    """The shared loop; see the module docstring. `fit()` trains to recipe.max_steps, resuming if possible;
    `fit(on_step=hook)` lets a hook extend, shorten or stop the run after any step.

    What a stage calls: start(), fit(), train_step(), backward(micro, loss_fn), optimizer_step(), evaluate(),
    save(), autocast(), add_state(name, obj), add_reference_model(name, build, weights), load_full_state(...).
    """

    def __init__(self, recipe: TrainRecipe, build_model: Callable[[], nn.Module], loss_fn: LossFn,
                 batches: Batches, *, val_batches: Callable[[], Iterable[Batch] | Mapping[str, Iterable[Batch]]]
                 | None = None, initial_weights: Callable[[], dict[str, Tensor]] | None = None,
                 checkpoint_io: CheckpointIO | None = None, env: DistEnv | None = None,
                 flops_per_token: float | None = None, quiet: bool = False,
                 fresh: Sequence[str] = (), discard: Sequence[str] = (),
                 trainable: Callable[[str, nn.Parameter], bool] | None = None, frozen: Sequence[str] = (),
                 step_fn: Callable[[Trainer], Mapping[str, float]] | None = None,
                 eval_fn: Callable[[Trainer], Mapping[str, float]] | None = None,
                 state: Mapping[str, Any] | None = None) -> None:
        self.recipe = recipe
        self.env = with_sharding(env or init_distributed(recipe.device), recipe.sharding, recipe.shard_size)
        self.device = self.env.device
        self.loss_fn = loss_fn
        self.batches = batches
        self.val_batches = val_batches
        self.build_model = build_model
        self.initial_weights = initial_weights
        self.io = checkpoint_io or HFCheckpointIO()
        self.flops_per_token = flops_per_token
        self.quiet = quiet
        self.fresh, self.discard = list(fresh), list(discard)
        self.step_fn, self.eval_fn = step_fn, eval_fn
        self.accum = recipe.accumulation(self.env.world_size)
        self.amp_dtype = autocast_dtype(recipe.precision, self.device)
        self.run_dir = Path(recipe.out_dir)
        self.step = 0
        self.tokens_seen = 0.0
        self.elapsed = 0.0
        self.last_record: dict[str, Any] = {}
        self.resumed_from: int | None = None
        self.references: dict[str, nn.Module] = {}
        self._started = False
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
        self.model = self._build(build_model, training=True,
                                 select=functools.partial(self._select_trainable, trainable, list(frozen)))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise Llama2Error("the model has no trainable parameters; check trainable= / frozen=")
        self.optimizer = self._make_optimizer()
        self.checkpoints = CheckpointManager(self.run_dir, self.env, recipe.keep_last)
        self.checkpoints.add_model(st.MODEL, self.model, self.io, skeleton=build_model)
        self.checkpoints.add_optimizer(st.OPTIMIZER, self.model, self.optimizer)
        self.checkpoints.add_state("trainer", FnState(self._counters, self._set_counters))
        self.after_start: list[Callable[[Trainer], None]] = []  # run at the end of start(), weights loaded
        self.checkpoints.add_state("batches", batches)
        for name, obj in (state or {}).items():
            self.add_state(name, obj)

    # ---------------------------------------------------------------- setup

    def _build(self, build: Callable[[], nn.Module], *, training: bool,
               select: Callable[[nn.Module], None], filled: bool = False) -> nn.Module:
        """filled: the caller reads every tensor in after (from a checkpoint): built on the meta device and left
        uninitialised, whatever init_on_meta says."""
        r, env = self.recipe, self.env
        if r.init_on_meta or filled:
            with torch.device("meta"):
                model = build()
        else:
            model = build().to(self.device)
        select(model)  # before sharding: FSDP2 keeps each parameter's requires_grad
        if training and r.activation_checkpointing:
            apply_activation_checkpointing(model)
        if r.compile:
            apply_compile(model)
        if env.enabled:
            gather_dtype = self.amp_dtype if self.device.type == "cuda" else None
            shard_model(model, env, param_dtype=gather_dtype, training=training)
        if r.init_on_meta or filled:
            model.to_empty(device=self.device)
        if r.init_on_meta and not filled:
            init = getattr(model, "init_weights", None)
            if init is None:
                raise Llama2Error("init_on_meta needs a model with init_weights(); set init_on_meta=false")
            torch.manual_seed(r.seed + env.shard_rank)  # each shard draws its own numbers, replicas the same
            with torch.no_grad():
                init()
            torch.manual_seed(r.seed)
        return model

    @staticmethod
    def _select_trainable(trainable: Callable[[str, nn.Parameter], bool] | None, frozen: list[str],
                          model: nn.Module) -> None:
        named = dict(model.named_parameters())
        unused = [p for p in frozen if not any(fnmatchcase(n, p) for n in named)]
        if unused:
            raise Llama2Error(f"frozen pattern(s) {unused} match no parameter of the model (its names look like "
                              f"{_few(named)}); fix the pattern")
        for name, p in named.items():
            keep = p.requires_grad and not _matches(name, frozen) and (trainable is None or trainable(name, p))
            p.requires_grad_(keep)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        o = self.recipe.optim
        decay = [p for p in self.params if p.ndim >= 2]
        no_decay = [p for p in self.params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        fused = o.fused if o.fused is not None else not self.env.enabled
        kind = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, **kind)

    def _counters(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "elapsed_s": self.elapsed,
                "last_metrics": self.last_record}

    def _set_counters(self, s: dict[str, Any]) -> None:
        self.step, self.tokens_seen = int(s["step"]), float(s["tokens_seen"])
        self.elapsed, self.last_record = float(s["elapsed_s"]), dict(s["last_metrics"])

    def add_state(self, name: str, obj: Any, per_process: bool = False) -> None:
        """Checkpoint `obj` (state_dict()/load_state_dict(), or a dict restored in place) as part `name`;
        per_process: each process keeps its own. Register before start()/fit() so a resume restores it."""
        self._not_started("add_state")
        self.checkpoints.add_state(name, obj, per_process=per_process)

    def add_reference_model(self, name: str, build: Callable[[], nn.Module],
                            weights: Callable[[], dict[str, Tensor]] | None = None, *, save: bool = False,
                            io: CheckpointIO | None = None, checkpoint: Path | None = None) -> nn.Module:
        """A frozen model beside the trained one (PPO's initial policy, a reward model used for scoring):
        built and sharded like the trained model, in eval mode, no gradients, loaded strictly from `weights()`
        (a full state dict read on rank 0; default: the Trainer's initial_weights), or from the checkpoint
        directory `checkpoint`, each process reading only its own rows (read_rows_into; built on the meta device,
        so no process holds the model whole). Not checkpointed unless save=True (then written through `io`,
        default the Trainer's, into the checkpoint's subdirectory `name`). Call it under torch.no_grad()."""
        if save:
            self._not_started("add_reference_model(save=True)")
        source = weights or self.initial_weights
        if source is None and checkpoint is None:
            raise Llama2Error(f"reference model {name!r} has no weights: pass weights= (a function returning the "
                              "full state dict) or give the Trainer initial_weights=")
        model = self._build(build, training=False, select=lambda m: [p.requires_grad_(False) for p in m.parameters()],
                            filled=checkpoint is not None)
        model.eval()
        if checkpoint is not None:
            with torch.no_grad():
                read_rows_into(checkpoint, {n: st.local_rows(t)[:2] for n, t in model.state_dict().items()})
        else:
            self.load_full_state(model, source() if self.env.is_main else {})
        if save:
            self.checkpoints.add_model(name, model, io or self.io, skeleton=build)
        self.references[name] = model
        return model

    def _not_started(self, what: str) -> None:
        if self._started:
            raise Llama2Error(f"{what} after training started; register it before start()/fit()")

    def load_full_state(self, model: nn.Module, weights: Mapping[str, Tensor], fresh: Sequence[str] = (),
                        discard: Sequence[str] = ()) -> None:
        """Load a full (unsharded) state dict present on rank 0 (the others pass {}) into a possibly sharded
        model, one tensor at a time; see match_weights for fresh / discard."""
        env = self.env
        entries = model.state_dict()
        problem, names = None, []
        if env.is_main:
            problem, names = match_weights({n: tuple(t.shape) for n, t in entries.items()}, weights, fresh, discard)
        problem, names = broadcast_object((problem, names), env)
        if problem:
            raise Llama2Error(problem)
        wanted = set(names)
        with torch.no_grad():
            for name, t in entries.items():
                if name not in wanted:
                    continue
                local, start, shape = st.local_rows(t)
                if env.enabled:
                    full = weights[name] if env.is_main else torch.empty(shape)
                    full = broadcast_tensor(full.to(local.dtype), env)
                else:
                    full = weights[name]
                local.copy_(full[start:start + local.shape[0]] if local.ndim else full)
                del full

    def start(self) -> None:
        """Resume from the latest checkpoint if there is one, else load the initial weights; fit() and
        train_step() call it (once). Every state part and saved reference model must be registered before."""
        if self._started:
            return
        if "rng" not in self.checkpoints.parts:
            self.checkpoints.add_state("rng", RNGState(), per_process=True)  # last: restored after the rest
        ckpt = self.checkpoints.latest()
        if ckpt is not None:
            self._check_same_base()
            self.checkpoints.load(ckpt)
            self.metrics.truncate(self.step)
            self.resumed_from = self.step
            if self.env.is_main and not self.quiet:
                print(f"resuming from {ckpt} (step {self.step})", flush=True)
        else:
            if self.initial_weights is not None:
                self.load_full_state(self.model, self.initial_weights() if self.env.is_main else {},
                                     self.fresh, self.discard)
            elif self.fresh or self.discard:
                raise Llama2Error("fresh= / discard= given without initial_weights: there is nothing to start from")
            self.metrics.truncate(0)
        if self.env.is_main:
            import yaml

            atomic_write_text(self.run_dir / "recipe.yaml", yaml.safe_dump(to_dict(self.recipe), sort_keys=False))
        for fn in self.after_start:  # e.g. QLoRA quantises the frozen base once its weights are in
            fn(self)
        self._started = True

    def _check_same_base(self) -> None:
        """A run resumes only from the base it started from: its checkpoints descend from that base, and
        recipe.yaml must keep saying so."""
        import yaml

        base = getattr(self.recipe, "base", None)
        saved = self.run_dir / "recipe.yaml"
        if not base or not saved.is_file():
            return
        try:
            before = (yaml.safe_load(saved.read_text(encoding="utf-8")) or {}).get("base")
        except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
            return
        if before and _same_path(before) != _same_path(base):
            raise Llama2Error(f"{self.run_dir} holds a run that started from base={before}, and this recipe says "
                              f"base={base}; choose another out_dir for a run from the new base, or keep "
                              f"base={before} to resume the run")

    # ---------------------------------------------------------------- one step

    def autocast(self) -> contextlib.AbstractContextManager:
        """The training precision's autocast context (a no-op for fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def backward(self, micro: Sequence[Batch], loss_fn: LossFn | None = None) -> StepTotals:
        """Forward + backward of `loss_fn` (default: the Trainer's) over this process's micro-batches, under
        autocast; the gradients become those of the mean loss over every item of the global batch (all
        micro-batches of all processes). Call it once per optimizer_step(). Raises NonFiniteLoss if the loss is
        not finite, Llama2Error if the global batch has no items."""
        if not micro:
            raise Llama2Error("backward() got no micro-batches")
        loss_fn = loss_fn or self.loss_fn
        self.model.train()
        loss_sum: Tensor | float = 0.0
        count: Tensor | float = 0.0
        tokens: Tensor | float = 0.0
        extra: dict[str, Tensor | float] = {}
        for i, batch in enumerate(micro):
            if self.env.enabled:
                self.model.set_requires_gradient_sync(i == len(micro) - 1)  # type: ignore[operator]
            with self.autocast():
                out = _as_loss_output(loss_fn(self.model, to_device(batch, self.device)))
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
        return StepTotals(loss, n_total, n_tokens, {k: v / n_total for k, v in zip(keys, totals[3:])})

    def optimizer_step(self) -> dict[str, float]:
        """Clip the gradients, then one AdamW update at the schedule's rate for the current step, then zero the
        gradients; returns lr and grad_norm (before clipping). Raises NonFiniteLoss (before updating) if the
        gradient norm is not finite."""
        lr = lr_at(self.step, self.recipe.optim, self.recipe.max_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        clip = self.recipe.optim.grad_clip if self.recipe.optim.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            raise NonFiniteLoss(f"gradient norm is {grad_norm}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"lr": lr, "grad_norm": grad_norm}

    def train_step(self, micro: list[Batch] | None = None) -> dict[str, float]:
        """One step of the loop: the stage's step_fn(trainer) if it gave one, else backward over `micro`
        (default: batches.next()) and one optimizer_step(). Then step += 1 and tokens_seen += stats["tokens"].
        Raises NonFiniteLoss (before updating) if the loss or the gradient norm is not finite."""
        self.start()
        self.model.train()
        if self.step_fn is not None:
            if micro is not None:
                raise TypeError("train_step(micro) with a step_fn: the step_fn fetches its own data")
            stats = dict(self.step_fn(self))
        else:
            totals = self.backward(self.batches.next() if micro is None else micro)
            stats = {**totals.stats(), **self.optimizer_step()}
        self.step += 1
        self.tokens_seen += float(stats.get("tokens", 0.0))
        return stats

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Over the fixed validation batches, per group and overall: val_loss, the mean of each of
        LossOutput.metrics as val_NAME (val_NAME/GROUP per group when there are several), val_ppl for
        perplexity losses; then whatever eval_fn(trainer) returns."""
        result: dict[str, float] = {}
        self.model.eval()
        try:
            if self.val_batches is not None:
                result.update(self._validation_losses())
            if self.eval_fn is not None:
                result.update({k: float(v) for k, v in self.eval_fn(self).items()})
        finally:
            self.model.train()
        return result

    def _validation_losses(self) -> dict[str, float]:
        data = self.val_batches()
        groups = data if isinstance(data, Mapping) else {"": data}
        result: dict[str, float] = {}
        overall: dict[str, float] = {}
        perplexity = True
        for name, batches in groups.items():
            sums: dict[str, float] = {}
            for batch in batches:
                with self.autocast():
                    out = _as_loss_output(self.loss_fn(self.model, to_device(batch, self.device)))
                c = float(_num(out.count))
                perplexity = perplexity and out.perplexity
                for k, v in {"loss": out.loss, **out.metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(_num(v)) * c
                sums[" count"] = sums.get(" count", 0.0) + c
            keys = broadcast_object(sorted(sums), self.env)  # every process reduces the same list
            reduced = dict(zip(keys, all_reduce_sum([sums.get(k, 0.0) for k in keys], self.env)))
            n = reduced.pop(" count", 0.0)
            for k, v in reduced.items():
                overall[k] = overall.get(k, 0.0) + v
                if name and n > 0 and len(groups) > 1:
                    result[f"val_{k}/{name}"] = v / n
            overall[" count"] = overall.get(" count", 0.0) + n
        n = overall.pop(" count", 0.0)
        if n > 0:
            result.update({f"val_{k}": v / n for k, v in overall.items()})
            if perplexity and "val_loss" in result:
                result["val_ppl"] = math.exp(min(result["val_loss"], 700.0))
        return result

    # ---------------------------------------------------------------- checkpoints

    def save(self) -> Path:
        """Write checkpoint step-NNNNNN of every part atomically (checkpoints.CheckpointManager); every process
        takes part."""
        return self.checkpoints.save(self.step)

    # ---------------------------------------------------------------- the loop

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.flops_per_token is None:
            return None
        if self._peak is None:
            dtype = self.amp_dtype or torch.float32
            self._peak = broadcast_object(peak_tflops(self.device, dtype, self.recipe.peak_tflops), self.env)
        return self.flops_per_token * tokens_per_s / (self._peak * 1e12 * self.env.world_size)

    def fit(self, on_step: StepHook | Sequence[StepHook] | None = None) -> TrainResult:
        """Train until recipe.max_steps (from the latest checkpoint if there is one). on_step: hooks called after
        each optimiser step, which may extend, shorten or stop the run (see the module docstring)."""
        from tqdm import tqdm

        hooks = [] if on_step is None else [on_step] if callable(on_step) else list(on_step)
        self.start()
        r = self.recipe
        last_ckpt = self.checkpoints.latest()
        if self.step >= r.max_steps:
            if self.env.is_main and not self.quiet:
                print(f"{self.run_dir}: already at step {self.step} (max_steps {r.max_steps}); nothing to do")
            return TrainResult(self.step, self.tokens_seen, self.last_record, last_ckpt, self.resumed_from)
        bar = tqdm(total=r.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=self.quiet or not self.env.is_main, desc="train")
        evaluates = self.val_batches is not None or self.eval_fn is not None
        window_t0 = time.perf_counter()
        window = {"steps": 0, "tokens": 0.0, "loss": 0.0, "losses": 0}
        try:
            while self.step < r.max_steps:
                started = time.time()
                try:
                    stats = self.train_step()
                except NonFiniteLoss as e:
                    where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved"
                    raise NonFiniteLoss(
                        f"{e} at step {self.step + 1}: training stopped without saving; {where}. Lower optim.lr "
                        f"(now {r.optim.lr:g}), raise optim.warmup_steps or check the data, then run again "
                        "(it resumes from the last good checkpoint)") from None
                window["steps"] += 1
                window["tokens"] += float(stats.get("tokens", 0.0))
                if "loss" in stats:
                    window["loss"] += float(stats["loss"])
                    window["losses"] += 1
                step = self.step
                stop = False
                if hooks:
                    info = StepInfo(step, stats, started, time.time() - started)
                    for hook in hooks:
                        stop = bool(hook(self, info)) or stop
                    if bar.total != r.max_steps:
                        bar.total = r.max_steps
                last = stop or step >= r.max_steps
                do_eval = evaluates and ((r.eval_every and step % r.eval_every == 0) or last)
                do_save = (r.save_every and step % r.save_every == 0) or last
                if step % r.log_every == 0 or last or do_eval:
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    dt = max(now - window_t0, 1e-9)
                    self.elapsed += dt
                    tps = window["tokens"] / dt
                    record: dict[str, Any] = {"step": step}
                    if window["losses"]:
                        record["loss"] = window["loss"] / window["losses"]
                    record.update({k: stats[k] for k in ("lr", "grad_norm") if k in stats})
                    record.update({"tokens": self.tokens_seen, "tokens_per_s": tps})
                    mfu = self._mfu(tps)
                    if mfu is not None:
                        record["mfu"] = mfu
                    record.update({k: v for k, v in stats.items() if k not in ("loss", "lr", "grad_norm", "tokens")})
                    if do_eval:
                        record.update(self.evaluate())
                    record["elapsed_s"] = self.elapsed
                    self.metrics.append(record)
                    self.last_record = record
                    post = {"tok/s": f"{tps:,.0f}"}
                    if "loss" in record:
                        post["loss"] = f"{record['loss']:.4f}"
                    if "val_loss" in record:
                        post["val"] = f"{record['val_loss']:.4f}"
                    bar.set_postfix(post, refresh=False)
                    window = {"steps": 0, "tokens": 0.0, "loss": 0.0, "losses": 0}
                    window_t0 = time.perf_counter()
                bar.update(1)
                if do_save:
                    last_ckpt = self.save()
                    window_t0 = time.perf_counter()
                if stop:
                    break
        finally:
            bar.close()
        if self.env.is_main:
            self.plot()
        return TrainResult(self.step, self.tokens_seen, self.last_record, last_ckpt, self.resumed_from)

    def plot(self) -> list[Path]:
        """PNG curves of metrics.jsonl in the run directory (llama2.train.plots; written at the end of fit)."""
        try:
            return plot_run(self.run_dir)
        except Llama2Error:  # nothing logged yet
            return []


class FrozenModels:
    """Frozen models sharded over the job's processes exactly as a Trainer's reference models are (the Trainer's
    own add_reference_model: built on the meta device and read row by row from `checkpoint=`, or loaded from a
    full state dict), with no model to train: what rejection sampling holds its sharded reward models in
    (RewardModel.load_sharded takes a Trainer or this). `recipe` gives the device, precision, sharding and
    compile settings; nothing is checkpointed."""

    def __init__(self, recipe: TrainRecipe, env: DistEnv | None = None) -> None:
        self.recipe = recipe
        self.env = with_sharding(env or init_distributed(recipe.device), recipe.sharding, recipe.shard_size)
        self.device = self.env.device
        self.amp_dtype = autocast_dtype(recipe.precision, self.device)
        self.initial_weights: Callable[[], dict[str, Tensor]] | None = None
        self.references: dict[str, nn.Module] = {}

    _build = Trainer._build
    load_full_state = Trainer.load_full_state

    def add_reference_model(self, name: str, build: Callable[[], nn.Module],
                            weights: Callable[[], dict[str, Tensor]] | None = None, *,
                            checkpoint: Path | None = None) -> nn.Module:
        """As Trainer.add_reference_model (never saved). Every process must call it."""
        return Trainer.add_reference_model(self, name, build, weights, checkpoint=checkpoint)  # type: ignore[arg-type]


def _same_path(path: str) -> str:
    """A path as compared across runs (variables and ~ expanded, absolute)."""
    return str(Path(expand_path(str(path))).resolve())
