"""LoRA (Hu et al. 2021): low-rank adapters on the projections of a Transformer or SequenceClassifier.

    apply_lora(model, r=8, alpha=16, target_modules=("q_proj", "v_proj"))  # in place; only adapters train
    with adapters_disabled(model): ref = model(tokens)                     # the base model (PPO's reference)
    merge_lora(model)                                                       # W + (alpha/r) B A, plain Linears again
    quantize_base_4bit(model)        # QLoRA: the frozen base weights in 4-bit NF4 (bitsandbytes), adapters stay fp

Each targeted projection becomes a LoRALinear that keeps the base weight under its old name (so base
checkpoints still load into it) and adds `lora_A` (r x in, Kaiming-uniform as PEFT initialises it) and `lora_B`
(out x r, zeros): at the start the adapted model computes exactly the base model. On disk adapters use PEFT's
layout (llama2.checkpoint: adapter_config.json + adapter_model.safetensors).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import Llama2Error
from .model import Linear
from .recipe import check

TARGETABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every projection except the output head
HEADS = ("lm_head", "score", "embed_tokens")


@dataclass(frozen=True)
class LoRAConfig:
    """What apply_lora did; saved as PEFT's adapter_config.json. `scale` is alpha / r (alpha / sqrt(r) with
    rsLoRA). `modules_to_save` are modules trained in full and saved whole with the adapter (a reward head)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False
    base_model: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise Llama2Error(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or self.alpha <= 0:
            raise Llama2Error(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise Llama2Error(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "target_modules", resolve_targets(self.target_modules))
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


LORA_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                "down": "down_proj"}  # a recipe's short names


@dataclass
class LoRASpec:
    """A recipe's `lora` section: LoRA on the frozen base (rank 0 = full fine-tuning); targets in short names."""

    rank: int = 0  # 0 = full fine-tuning
    alpha: float = 16.0  # LoRA scale numerator (scale = alpha / rank)
    dropout: float = 0.05  # dropout on the adapters' input
    targets: list[str] = field(default_factory=lambda: ["q", "v"])  # any of q k v o gate up down
    quantize_base: Literal["none", "4bit"] = "none"  # 4bit = QLoRA: an NF4 base (bitsandbytes, CPU or CUDA)

    def validate(self, prefix: str = "lora") -> None:
        check(self.rank >= 0, f"{prefix}.rank", self.rank, "an integer >= 0 (0 = full fine-tuning)")
        check(self.alpha > 0, f"{prefix}.alpha", self.alpha, "a positive number")
        check(0 <= self.dropout < 1, f"{prefix}.dropout", self.dropout, "a number in [0, 1)")
        for t in self.targets:
            check(t in LORA_TARGETS or t in LORA_TARGETS.values(), f"{prefix}.targets", self.targets,
                  f"a list of {', '.join(LORA_TARGETS)}")
        check(bool(self.targets), f"{prefix}.targets", self.targets, f"a non-empty list of {', '.join(LORA_TARGETS)}")

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(LORA_TARGETS.get(t, t) for t in self.targets)


def resolve_targets(names: str | Sequence[str]) -> tuple[str, ...]:
    """Target module names, "all-linear" expanded, in the model's order; unknown names are an error."""
    if isinstance(names, str):
        names = [names]
    names = list(names)
    if not names:
        raise Llama2Error(f"LoRA target_modules is empty; name some of {', '.join(TARGETABLE)} (or 'all-linear')")
    chosen: set[str] = set()
    for name in names:
        if name == ALL_LINEAR:
            chosen.update(TARGETABLE)
        elif name in TARGETABLE:
            chosen.add(name)
        elif name in HEADS:
            raise Llama2Error(f"LoRA target module {name!r} is not supported (only the attention and MLP "
                              f"projections take adapters); to train a head in full, list it in modules_to_save")
        else:
            raise Llama2Error(f"unknown LoRA target module {name!r}; choose from {', '.join(TARGETABLE)} or "
                              f"'{ALL_LINEAR}'")
    return tuple(n for n in TARGETABLE if n in chosen)


class LoRALinear(nn.Module):
    """A frozen bias-free Linear plus a trainable low-rank update: y = x W^T + scale * B(A(dropout(x))).

    It takes over the wrapped Linear's `weight` Parameter (no copy). `enabled = False` computes the base alone.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False) -> None:
        super().__init__()
        if base.bias is not None:
            raise Llama2Error("LoRA here wraps bias-free Linear layers only (Llama has no biases)")
        w = base.weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = r, alpha
        self.scale = alpha / (math.sqrt(r) if use_rslora else r)
        self.weight = w
        self.weight.requires_grad_(False)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default initialisation: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zeros."""
        if self.lora_A.weight.is_meta:
            return
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> Tensor:
        """scale * B @ A in fp32 (the change merging makes to the weight)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        base4 = self.__dict__.get("base4")
        y = base4(x) if base4 is not None else F.linear(x, self.weight)
        if not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, scale={self.scale:g}"


class NF4Linear(nn.Module):
    """A frozen bias-free Linear stored in 4 bits: QLoRA's NormalFloat-4 with blocks of 64 weights and double
    quantisation of the block scales (bitsandbytes' quantize_4bit); the forward dequantises on the fly
    (bitsandbytes' matmul_4bit) and returns gradients for the input only."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        bnb = bitsandbytes()
        self.out_features, self.in_features = weight.shape
        packed, self.quant_state = bnb.functional.quantize_4bit(weight.detach().contiguous(), blocksize=64,
                                                                quant_type="nf4", compress_statistics=True)
        self.register_buffer("packed", packed, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return bitsandbytes().matmul_4bit(x, self.packed.t(), quant_state=self.quant_state)

    def dequantized(self) -> Tensor:
        """The weight as the forward sees it (out x in)."""
        return bitsandbytes().functional.dequantize_4bit(self.packed, self.quant_state)

    def nbytes(self) -> int:
        """Bytes of the packed weights and their quantisation state."""
        qs = self.quant_state
        extra = [qs.absmax] + ([qs.state2.absmax, qs.state2.code] if qs.nested else []) + [qs.code]
        return self.packed.numel() * self.packed.element_size() + sum(t.numel() * t.element_size() for t in extra)


def bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise Llama2Error("a 4-bit base (QLoRA) needs bitsandbytes: pip install bitsandbytes (it runs on CPU and "
                          "CUDA); or set lora.quantize_base=none") from None
    return bitsandbytes


def quantize_base_4bit(model: nn.Module) -> tuple[int, int]:
    """QLoRA: replace the frozen base weight of every LoRA layer with its 4-bit NF4 form (NF4Linear), in place,
    on the weight's device; the adapters keep their precision. Returns (bytes before, bytes after) of those
    weights. The layers' `weight` parameters are dropped, so save adapters only (a LoRA run does)."""
    layers = lora_layers(model)
    if not layers:
        raise Llama2Error("quantize_base_4bit needs LoRA layers; call apply_lora first")
    before = after = 0
    for _, layer in layers:
        if "base4" in layer.__dict__:
            continue
        w = layer.weight
        if w.is_meta:
            raise Llama2Error("quantize the base after its weights are loaded (they are on the meta device)")
        before += w.numel() * w.element_size()
        q = NF4Linear(w.float() if w.dtype not in (torch.float16, torch.bfloat16, torch.float32) else w)
        after += q.nbytes()
        layer.__dict__["base4"] = q  # not a submodule: it holds no parameters and is never saved
        del layer.weight
    return before, after


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_config(model: nn.Module) -> LoRAConfig | None:
    """The LoRAConfig apply_lora recorded on the model, or None for a model without adapters."""
    return getattr(model, "_lora_config", None)


def _matching_modules(model: nn.Module, key: str) -> list[str]:
    """Module names equal to `key` or ending in `.key` (PEFT's matching of modules_to_save)."""
    return [n for n, _ in model.named_modules() if n and (n == key or n.endswith("." + key))]


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
               modules_to_save: Sequence[str] | None = None, *, use_rslora: bool = False,
               base_model: str | None = None) -> nn.Module:
    """Add LoRA adapters to every targeted projection of every layer, in place, and return the model.

    Every parameter is frozen except the adapters and `modules_to_save` (default: ["score"] for a sequence
    classifier, whose fresh head must train, and nothing for a causal LM). `base_model` is recorded as
    PEFT's base_model_name_or_path when the adapter is saved (default: the directory the model was loaded
    from, its `name_or_path`). The model's `init_weights()` afterwards also
    re-initialises the adapters (A Kaiming-uniform, B zeros), so a model built on the meta device and then
    initialised gets PEFT's starting point."""
    if lora_layers(model):
        raise Llama2Error("the model already has LoRA adapters; apply_lora once (merge_lora first to stack)")
    if modules_to_save is None:
        modules_to_save = ("score",) if isinstance(getattr(model, "score", None), nn.Module) else ()
    if base_model is None:
        base_model = getattr(model, "name_or_path", None)
    config = LoRAConfig(r, alpha, dropout, tuple([target_modules] if isinstance(target_modules, str)
                                                 else target_modules), tuple(modules_to_save), use_rslora,
                        base_model)
    for key in config.modules_to_save:
        if not _matching_modules(model, key):
            raise Llama2Error(f"modules_to_save names {key!r}, but the model has no such module; use e.g. "
                              "'score' for a sequence classifier's head")
    targets = [(name, m) for name, m in model.named_modules()
               if name.rpartition(".")[2] in config.target_modules and isinstance(m, nn.Linear)]
    if not targets:
        raise Llama2Error(f"no module of the model matches LoRA target_modules {list(config.target_modules)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(m, r, alpha, dropout, use_rslora))
    for key in config.modules_to_save:
        for name in _matching_modules(model, key):
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
    model._lora_config = config
    _wrap_init_weights(model)
    return model


def _wrap_init_weights(model: nn.Module) -> None:
    base_init = getattr(model, "init_weights", None)
    if base_init is None:
        return

    def init_weights(*args, **kwargs) -> None:
        base_init(*args, **kwargs)
        for _, layer in lora_layers(model):
            layer.reset_lora_parameters()

    init_weights.__doc__ = "The model's own initialisation, then PEFT's for the LoRA adapters."
    model.init_weights = init_weights


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """The state_dict names an adapter checkpoint holds, in state_dict order: every lora_A/lora_B weight and
    every parameter of the modules_to_save."""
    config = lora_config(model)
    if config is None:
        raise Llama2Error("the model has no LoRA adapters; call apply_lora (or load an adapter) first")
    saved = [n for key in config.modules_to_save for n in _matching_modules(model, key)]
    names = []
    for name in model.state_dict():
        module = name.rpartition(".")[0]
        if module.endswith((".lora_A", ".lora_B")) or any(name.startswith(s + ".") for s in saved):
            names.append(name)
    return names


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for _, layer in lora_layers(model):
        layer.enabled = enabled


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its base weights alone (the adapters are skipped), e.g. for PPO's
    reference policy. modules_to_save (a reward head) are trained in place and stay as they are."""
    layers = lora_layers(model)
    if not layers:
        raise Llama2Error("the model has no LoRA adapters to disable")
    before = [layer.enabled for _, layer in layers]
    set_adapters_enabled(model, False)
    try:
        yield model
    finally:
        for (_, layer), state in zip(layers, before):
            layer.enabled = state


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W += scale * B @ A, computed in fp32, in place) and put plain Linear
    layers back, as PEFT's merge_and_unload does; the model can then be saved or served as a plain model and
    every parameter is trainable again."""
    return _unwrap(model, merge=True)


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop the adapters without merging them: the plain base model again, every parameter trainable."""
    return _unwrap(model, merge=False)


def _unwrap(model: nn.Module, merge: bool) -> nn.Module:
    layers = lora_layers(model)
    if not layers:
        raise Llama2Error("the model has no LoRA adapters to merge or remove")
    for name, layer in layers:
        if "base4" in layer.__dict__:
            raise Llama2Error("this model's base is 4-bit (QLoRA): merge the adapter into the full-precision base "
                              "instead (llama2 lora merge BASE ADAPTER OUT)")
        w = layer.weight
        if merge and not w.is_meta:
            with torch.no_grad():
                w.add_(layer.delta_weight().to(w.dtype))
        plain = Linear(layer.in_features, layer.out_features, device="meta")
        plain.weight = w
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    model.__dict__.pop("init_weights", None)
    model.__dict__.pop("_lora_config", None)
    return model
