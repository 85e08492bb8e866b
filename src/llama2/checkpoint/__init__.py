"""Checkpoint I/O for every stage, keyed by model kind; on disk the Hugging Face layouts (and Meta's for import).

    model = load_model("llama-2-7b")              # Meta download dir (params.json + consolidated.*.pth)
    model = load_model("Llama-2-7b-hf", dtype="bf16")   # HF dir (config.json + model*.safetensors)
    model = load_model("runs/sft")                # a training run (or RUN/checkpoints/latest): its latest checkpoint
    save_model(model, "out", tokenizer=tok)       # HF layout, atomically
    save_meta(model, "out-meta", shards=2)        # Meta layout, 2 model-parallel ranks

Three kinds ("causal_lm", "classifier", "adapter"), detected from the directory (config.json `architectures`,
adapter_config.json) and from the model when saving (Transformer, SequenceClassifier, a model with LoRA):

    rm = load_checkpoint("sft-hf", kind="classifier")     # reward model from a causal LM: lm_head dropped,
                                                          # `score` fresh (llama2.classifier.init_score_)
    save_checkpoint(rm, "rm")                             # LlamaForSequenceClassification, one label
    save_checkpoint(apply_lora(model), "lora", base_model="sft-hf")   # PEFT adapter only
    policy = load_checkpoint("lora")                      # its base (base_model_name_or_path) + the adapter

Loading builds the model on the meta device and materialises each tensor once, in its final dtype and device.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..classifier import SequenceClassifier
from ..config import ModelConfig
from ..device import resolve_device
from ..errors import Llama2Error
from ..lora import lora_config
from ..model import Transformer
from ..paths import resolve_checkpoint
from . import adapter, hf, meta
from .common import parse_dtype
from .meta import save_meta as _save_meta

__all__ = ["KINDS", "load_model", "load_config", "save_model", "save_meta", "detect_layout", "detect_kind",
           "load_checkpoint", "save_checkpoint", "load_adapter", "read_rows_into", "AdapterCheckpointIO"]

CAUSAL_LM, CLASSIFIER, ADAPTER = hf.CAUSAL_LM, hf.CLASSIFIER, "adapter"
KINDS = (CAUSAL_LM, CLASSIFIER, ADAPTER)
_DESCRIBED = {CAUSAL_LM: "a causal LM (LlamaForCausalLM)", CLASSIFIER: "a sequence classifier "
              "(LlamaForSequenceClassification)", ADAPTER: "a PEFT LoRA adapter"}


def _existing_dir(path: Path | str) -> Path:
    """The checkpoint directory `path` names (a training run or its `latest` pointer: the latest checkpoint)."""
    p = resolve_checkpoint(Path(path).expanduser())
    if not p.exists():
        raise Llama2Error(f"checkpoint directory {p} does not exist; check the path")
    if not p.is_dir():
        raise Llama2Error(f"{p} is a file; give the checkpoint directory (holding config.json or params.json)")
    return p


def detect_layout(path: Path | str) -> str:
    """"hf" (config.json) or "meta" (params.json); a clear error for anything else."""
    p = _existing_dir(path)
    if (p / hf.CONFIG).is_file():
        return "hf"
    if (p / meta.PARAMS).is_file():
        return "meta"
    if adapter.is_adapter_dir(p):
        raise Llama2Error(f"{p} holds a PEFT LoRA adapter ({adapter.ADAPTER_CONFIG}), not full weights; open it "
                          "with load_checkpoint / load_model (which load its base too)")
    inner = sorted(q.name for q in p.iterdir() if q.is_dir() and ((q / hf.CONFIG).is_file() or
                                                                  (q / meta.PARAMS).is_file()))
    hint = f"; it has checkpoint subdirectories {inner[:6]}: point at one of them" if inner else ""
    raise Llama2Error(f"{p}: unknown checkpoint layout: neither {hf.CONFIG} (Hugging Face) nor {meta.PARAMS} "
                      f"(Meta) is there{hint}")


def detect_kind(path: Path | str) -> str:
    """The kind of model a directory holds: "adapter" (adapter_config.json), "classifier" or "causal_lm"
    (config.json's architectures; Meta's layout is always a causal LM)."""
    p = _existing_dir(path)
    if adapter.is_adapter_dir(p):
        return ADAPTER
    if detect_layout(p) == "hf":
        return hf.kind_of_config(hf.read_json(p / hf.CONFIG), p / hf.CONFIG)
    return CAUSAL_LM


def load_config(path: Path | str) -> ModelConfig:
    """The ModelConfig of a checkpoint directory (reads only configs, and for Meta's vocab_size -1 one shape)."""
    p = _existing_dir(path)
    if detect_layout(p) == "hf":
        return hf.config_from_hf(hf.read_json(p / hf.CONFIG), p / hf.CONFIG)
    params = hf.read_json(p / meta.PARAMS)
    first = meta.shard_files(p)[0]
    vocab = params.get("vocab_size", -1) if isinstance(params, dict) else -1
    if not (isinstance(vocab, int) and vocab > 0):
        vocab = meta._vocab(params, meta.load_pth(first)[0], first)
    return meta.config_from_params(params, vocab, p / meta.PARAMS)


def _check_kind(kind: str | None) -> None:
    if kind is not None and kind not in KINDS:
        raise Llama2Error(f"unknown checkpoint kind {kind!r}; choose {', '.join(KINDS)} (or None to detect it)")


def load_checkpoint(path: Path | str, kind: str | None = None, device: torch.device | str = "cpu",
                    dtype: torch.dtype | str | None = None, *, base: Path | str | None = None,
                    progress: bool = False) -> Transformer:
    """Open a checkpoint directory as the model of `kind` (None: the kind it holds, see detect_kind).

    "causal_lm" -> Transformer, "classifier" -> SequenceClassifier, "adapter" -> its base model (`base`, else
    the adapter's base_model_name_or_path) with the LoRA adapter applied (llama2.lora). A causal LM may be
    opened as a classifier: the backbone is taken, lm_head dropped and the head drawn fresh; every other
    mismatch of kinds is an error. dtype None keeps the checkpoint's dtype; each tensor is read once, straight
    into its final dtype and device."""
    _check_kind(kind)
    p = _existing_dir(path)
    stored = detect_kind(p)
    kind = kind or stored
    if kind != stored and not (kind == CLASSIFIER and stored == CAUSAL_LM):
        raise Llama2Error(f"{p} holds {_DESCRIBED[stored]}, not {_DESCRIBED[kind]}; load it with "
                          f"kind={stored!r} (or kind=None)")
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    dt = parse_dtype(dtype)
    if stored == ADAPTER:
        config, base_kind = adapter.read_adapter_config(p)
        base_dir = adapter.base_dir(p, config, base)
        model = load_checkpoint(base_dir, base_kind, dev, dt, progress=progress)
        return adapter.load_adapter(model, p)
    if detect_layout(p) == "hf":
        model = hf.load_hf(p, dev, dt, progress, kind)
    else:
        model = meta.load_meta(p, dev, dt, progress)
        model = SequenceClassifier.from_causal_lm(model) if kind == CLASSIFIER else model
    model.name_or_path = str(p)  # as transformers' name_or_path: an adapter trained on it names it as its base
    return model


def load_adapter(model: nn.Module, path: Path | str) -> nn.Module:
    """Apply the PEFT LoRA adapter at `path` to a loaded base model, in place (PeftModel.from_pretrained)."""
    p = _existing_dir(path)
    if not adapter.is_adapter_dir(p):
        raise Llama2Error(f"{p} holds no {adapter.ADAPTER_CONFIG}: it is not a PEFT adapter directory")
    return adapter.load_adapter(model, p)


def load_model(path: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None, *,
               progress: bool = False, kind: str | None = None, base: Path | str | None = None) -> Transformer:
    """Open a Hugging Face or Meta checkpoint directory, or an adapter with its base: load_checkpoint.

    dtype None keeps the checkpoint's dtype (config.json's dtype, else the tensors'). Each tensor is read once,
    straight into its final dtype and device; the model is never held twice.
    """
    return load_checkpoint(path, kind, device, dtype, base=base, progress=progress)


def kind_of_model(model: nn.Module) -> str:
    """"adapter" for a model with LoRA adapters, else "classifier" or "causal_lm" by its class."""
    if lora_config(model) is not None:
        return ADAPTER
    return CLASSIFIER if isinstance(model, SequenceClassifier) else CAUSAL_LM


def save_checkpoint(model: nn.Module, path: Path | str, kind: str | None = None, tokenizer: Any = None, *,
                    base_model: str | Path | None = None, max_shard_bytes: int = 5 * 2**30,
                    dtype: torch.dtype | str | None = None, progress: bool = False,
                    fetch: Callable[[str], Tensor] | None = None) -> Path:
    """Write `model` atomically in the layout of `kind` (None: the model's own, see kind_of_model).

    "causal_lm" / "classifier": config.json + model*.safetensors (sharded above max_shard_bytes), for
    LlamaForCausalLM / LlamaForSequenceClassification. "adapter": adapter_config.json +
    adapter_model.safetensors with only the LoRA tensors and modules_to_save, PEFT's names; `base_model` is
    written as base_model_name_or_path (default: what apply_lora was given). The tokenizer's files are
    written too if one is given (any object with `.save(directory)`); dtype None keeps the model's dtype.

    `fetch(name)` (our parameter name), if given, supplies each tensor's data in state_dict order, and `model`
    may be a meta-device skeleton: a sharded model is saved one gathered tensor at a time."""
    _check_kind(kind)
    actual = kind_of_model(model)
    kind = kind or actual
    if actual == ADAPTER and kind != ADAPTER:
        raise Llama2Error(f"the model has LoRA adapters: save it with kind='adapter' (the adapter alone), or "
                          f"merge_lora(model) first to save full {kind} weights")
    if kind == ADAPTER and actual != ADAPTER:
        raise Llama2Error(f"the model has no LoRA adapters to save as an adapter; call apply_lora first, or save "
                          f"its full weights with kind={actual!r}")
    if kind != actual:
        raise Llama2Error(f"cannot save {_DESCRIBED[actual]} as {_DESCRIBED[kind]}; pass kind={actual!r} (or None)")
    p, dt = Path(path), parse_dtype(dtype)
    if kind == ADAPTER:
        return adapter.save_adapter(model, p, tokenizer, None if base_model is None else str(base_model), dt, fetch)
    return hf.save_hf(model, p, tokenizer, max_shard_bytes, dt, progress, fetch)


def save_model(model: nn.Module, path: Path | str, tokenizer: Any = None, *, max_shard_bytes: int = 5 * 2**30,
               dtype: torch.dtype | str | None = None, progress: bool = False,
               fetch: Callable[[str], Tensor] | None = None, kind: str | None = None,
               base_model: str | Path | None = None) -> Path:
    """save_checkpoint with the model's own kind: the Hugging Face layout for a causal LM or a classifier
    (config.json, model.safetensors sharded above max_shard_bytes with model.safetensors.index.json,
    generation_config.json for a causal LM, the tokenizer's files), PEFT's for a model with LoRA adapters.
    dtype None keeps the model's dtype.

    `fetch(name)` (our parameter name), if given, supplies each tensor's data at the moment it is written, in
    state_dict order, and `model` may be a meta-device skeleton: a sharded model is saved one gathered tensor
    at a time."""
    return save_checkpoint(model, path, kind, tokenizer, base_model=base_model, max_shard_bytes=max_shard_bytes,
                           dtype=dtype, progress=progress, fetch=fetch)


def read_rows_into(path: Path | str, targets: dict[str, tuple[Tensor, int]], base: Path | str | None = None) -> None:
    """Fill tensors in place from a checkpoint directory, reading from disk only the rows each one holds.

    `targets` maps our parameter names to (destination, first row): a whole tensor (row 0), or one process's
    dim-0 shard of it under FSDP2. Every checkpoint tensor must have a target and the reverse. For an adapter
    directory, the targets it does not hold (the frozen base) are read from `base` (else the adapter's
    base_model_name_or_path)."""
    p = _existing_dir(path)
    if adapter.is_adapter_dir(p):
        adapter.read_adapter_rows(p, targets, base)
    else:
        hf.read_rows_into(p, targets)


class AdapterCheckpointIO:
    """The training loop's CheckpointIO for a LoRA run (the same shape as llama2.train's HFCheckpointIO): saves
    only the adapter and modules_to_save in PEFT's layout, and resumes by reading the adapter's rows from the
    checkpoint and the frozen base's rows from `base` (an HF checkpoint directory)."""

    def __init__(self, base: Path | str | None = None, tokenizer: Any = None, base_model: str | None = None) -> None:
        """`base_model` is written as base_model_name_or_path (default: `base`, else what apply_lora recorded)."""
        self.base = None if base is None else Path(base)
        self.tokenizer = tokenizer
        self.base_model = base_model if base_model is not None else (None if base is None else str(base))

    def save(self, model: nn.Module, path: Path, fetch: Callable[[str], Tensor] | None = None) -> None:
        save_checkpoint(model, path, ADAPTER, self.tokenizer, base_model=self.base_model, fetch=fetch)

    def load_into(self, path: Path, targets: dict[str, tuple[Tensor, int]]) -> None:
        """Fill each (tensor, first row) in place, reading only those rows from disk (see read_rows_into)."""
        read_rows_into(path, targets, base=self.base)


def save_meta(model: Transformer, path: Path | str, shards: int = 1, *, dtype: torch.dtype | str | None = None,
              tokenizer: Any = None, progress: bool = False) -> Path:
    """Write Meta's layout atomically: params.json + consolidated.NN.pth for `shards` model-parallel ranks, q/k
    rows permuted back to Meta's interleaved rotary order. Only a plain causal LM has this layout."""
    if kind_of_model(model) != CAUSAL_LM:
        raise Llama2Error(f"Meta's layout holds only causal LMs, not {_DESCRIBED[kind_of_model(model)]}; save it "
                          "with save_checkpoint (merge_lora first for an adapter)")
    return _save_meta(model, Path(path), shards, dtype=parse_dtype(dtype), tokenizer=tokenizer, progress=progress)
