"""PEFT's LoRA adapter layout: adapter_config.json + adapter_model.safetensors, nothing of the base model.

Tensor names are PEFT's: `base_model.model.` + the Hugging Face parameter name, e.g.
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, and a module in modules_to_save (a reward
model's head) is saved whole under its own name, `base_model.model.score.weight`. `PeftModel.from_pretrained(
LlamaForCausalLM.from_pretrained(base), adapter_dir)` opens what is written here, and adapters PEFT wrote load
here. The base is found through base_model_name_or_path (a local directory) or given explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..classifier import SequenceClassifier
from ..errors import Llama2Error
from ..lora import ALL_LINEAR, LoRAConfig, adapter_parameter_names, apply_lora, lora_config, lora_layers, remove_lora
from .common import atomic_directory, write_json
from .hf import CAUSAL_LM, CLASSIFIER, fill_rows, hf_name, our_name, read_json, read_rows_into
from .safetensors_io import TensorInfo, read_header, read_tensor, write_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
TASK_TYPE = {CAUSAL_LM: "CAUSAL_LM", CLASSIFIER: "SEQ_CLS"}
KIND_OF_TASK = {task: kind for kind, task in TASK_TYPE.items()}

# adapter_config.json fields this reader does not implement, with the value(s) that mean "not used".
UNSUPPORTED = {
    "bias": ("none", None), "fan_in_fan_out": (False, None), "use_dora": (False, None),
    "lora_bias": (False, None), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
    "layers_to_transform": (None, []), "layers_pattern": (None, [], ""), "exclude_modules": (None, [], ""),
    "layer_replication": (None, []), "trainable_token_indices": (None, {}, []), "target_parameters": (None, []),
    "use_qalora": (False, None), "alora_invocation_tokens": (None, []), "use_bdlora": (None, False),
}

# init_lora_weights values after which the adapter is a plain delta on the unchanged base (PiSSA, OLoRA, CorDA
# and LoftQ rewrite the base weights too).
BASE_PRESERVING_INITS = (True, False, None, "gaussian", "orthogonal", "eva")
INIT_ONLY_CONFIGS = ("eva_config", "corda_config", "loftq_config")  # settings of an initialisation, not a layer


def peft_key(name: str) -> str:
    """Our parameter name -> PEFT's key in adapter_model.safetensors."""
    return PEFT_PREFIX + hf_name(name)


def name_of_peft_key(key: str) -> str | None:
    """PEFT's key -> our parameter name (None for a key without PEFT's prefix)."""
    return our_name(key.removeprefix(PEFT_PREFIX)) if key.startswith(PEFT_PREFIX) else None


def model_kind(model: nn.Module) -> str:
    return CLASSIFIER if isinstance(model, SequenceClassifier) else CAUSAL_LM


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG).is_file()


def adapter_config_json(config: LoRAConfig, kind: str, base_model: str | None) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it for a plain LoRA adapter (fields PEFT needs; the rest default)."""
    alpha = int(config.alpha) if float(config.alpha).is_integer() else config.alpha
    return {
        "peft_type": "LORA", "task_type": TASK_TYPE[kind], "base_model_name_or_path": base_model,
        "r": config.r, "lora_alpha": alpha, "lora_dropout": config.dropout,
        "target_modules": list(config.target_modules),
        "modules_to_save": list(config.modules_to_save) or None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": config.use_rslora, "use_dora": False,
        "lora_bias": False, "init_lora_weights": True, "inference_mode": True, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None,
        "revision": None, "auto_mapping": None,
    }


def read_adapter_config(path: Path) -> tuple[LoRAConfig, str]:
    """(LoRAConfig, model kind) of an adapter directory; anything this reader does not implement is refused."""
    where = path / ADAPTER_CONFIG
    d = read_json(where)
    if not isinstance(d, dict):
        raise Llama2Error(f"{where}: expected a JSON object (PEFT's adapter config)")
    if d.get("peft_type") != "LORA":
        raise Llama2Error(f"{where}: peft_type {d.get('peft_type')!r} is not supported; only LoRA adapters "
                          "(peft_type LORA) are read")
    task = d.get("task_type") or "CAUSAL_LM"  # PEFT writes null when its LoraConfig named no task: a plain model
    if task not in KIND_OF_TASK:
        raise Llama2Error(f"{where}: task_type {task!r} is not supported; use CAUSAL_LM (a causal LM) or SEQ_CLS "
                          "(a one-label sequence classifier)")
    for key, plain in UNSUPPORTED.items():
        if key in d and d[key] not in plain:
            raise Llama2Error(f"{where}: {key}={d[key]!r} is not supported by this LoRA implementation (only "
                              f"{plain[0]!r}); merge the adapter with PEFT or retrain without it")
    for key, value in d.items():  # variants configured by a sub-config (KaSA, Arrow, ...) change the layer itself
        if key.endswith("_config") and key not in INIT_ONLY_CONFIGS and value not in (None, {}):
            raise Llama2Error(f"{where}: {key} is set; that LoRA variant is not supported (only plain LoRA)")
    init = d.get("init_lora_weights", True)
    if init not in BASE_PRESERVING_INITS:
        raise Llama2Error(f"{where}: init_lora_weights={init!r} changes the base weights as well (or is unknown "
                          "here), so the adapter only fits that changed base; convert it to a plain LoRA with PEFT "
                          "(path_initial_model_for_weight_conversion) or merge it with PEFT")
    targets = d.get("target_modules")
    if isinstance(targets, str) and targets != ALL_LINEAR:
        raise Llama2Error(f"{where}: target_modules {targets!r} is a regular expression; only a list of module "
                          f"names (or '{ALL_LINEAR}') is supported")
    saved = list(dict.fromkeys(d.get("modules_to_save") or []))
    if task == "SEQ_CLS":  # PEFT lists both of its classifier-head names; ours is "score"
        saved = [m for m in saved if m != "classifier"]
    try:
        config = LoRAConfig(d.get("r", 8), d.get("lora_alpha", 8), d.get("lora_dropout", 0.0) or 0.0,
                            tuple([targets] if isinstance(targets, str) else targets or ()), tuple(saved),
                            bool(d.get("use_rslora", False)), d.get("base_model_name_or_path"))
    except Llama2Error as e:
        raise Llama2Error(f"{where}: {e}") from None
    return config, KIND_OF_TASK[task]


def _adapter_tensors(path: Path) -> dict[str, TensorInfo]:
    """The adapter file's tensors by our names; keys that are not PEFT's are an error."""
    file = path / ADAPTER_WEIGHTS
    if not file.is_file():
        hint = " (adapter_model.bin pickles are not read; re-save with safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise Llama2Error(f"{path}: no {ADAPTER_WEIGHTS}; the adapter has no weights{hint}")
    out: dict[str, TensorInfo] = {}
    for key, info in read_header(file).items():
        name = name_of_peft_key(key)
        if name is None:
            raise Llama2Error(f"{file}: tensor {key!r} is not named as PEFT names adapter tensors "
                              f"({PEFT_PREFIX}...); this is not a PEFT LoRA adapter")
        out[name] = info
    return out


def read_adapter_weights(path: Path) -> dict[str, Tensor]:
    """Every tensor of an adapter directory's weights file, by our parameter names (as saved: no dtype change)."""
    tensors = _adapter_tensors(path)
    with open(path / ADAPTER_WEIGHTS, "rb", buffering=0) as f:
        return {name: read_tensor(f, info) for name, info in tensors.items()}


def base_dir(path: Path, config: LoRAConfig, base: Path | str | None) -> Path:
    if base is not None:
        return Path(base).expanduser()
    named = config.base_model
    if named and Path(named).expanduser().is_dir():
        return Path(named).expanduser()
    raise Llama2Error(f"{path}: the adapter's base model {named!r} (base_model_name_or_path) is not a local "
                      "directory; pass base=<the base checkpoint directory> (AdapterCheckpointIO(base=...) in "
                      "training)")


def save_adapter(model: nn.Module, path: Path, tokenizer: Any = None, base_model: str | None = None,
                 dtype: torch.dtype | None = None, fetch: Callable[[str], Tensor] | None = None) -> Path:
    """Write only the adapter (lora_A/lora_B and modules_to_save) in PEFT's layout, atomically.

    With `fetch`, `model` is a meta skeleton and fetch(name) is called for every state_dict entry in order up to
    the last adapter tensor (that is how a sharded model hands its tensors over); the rest are dropped."""
    config = lora_config(model)
    if config is None:
        raise Llama2Error("the model has no LoRA adapters to save; call apply_lora first, or save the full "
                          "model with kind='causal_lm' or 'classifier'")
    names = adapter_parameter_names(model)
    state = model.state_dict()
    if fetch is None:
        if any(state[n].is_meta for n in names):
            raise Llama2Error("cannot save an adapter whose tensors are on the meta device (not loaded)")
        data = {n: state[n].detach() for n in names}
    else:
        wanted, data = set(names), {}
        for name in state:
            t = fetch(name)
            if name in wanted:
                data[name] = t.detach()
                if len(data) == len(wanted):
                    break
    items = [(peft_key(n), state[n]) for n in names]
    by_key = {peft_key(n): data[n] for n in names}
    base = base_model if base_model is not None else config.base_model
    with atomic_directory(path) as tmp:
        write_safetensors(tmp / ADAPTER_WEIGHTS, items, dtype, fetch=by_key.__getitem__)
        write_json(tmp / ADAPTER_CONFIG, adapter_config_json(config, model_kind(model),
                                                              None if base is None else str(base)))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path


def load_adapter(model: nn.Module, path: Path) -> nn.Module:
    """Add the adapter at `path` to a loaded base model in place (PeftModel.from_pretrained's job), and return
    it. The base must be the one the adapter was trained on: any shape mismatch is an error, and then the
    model is left as it was."""
    config, kind = read_adapter_config(path)
    if kind != model_kind(model):
        have = "a sequence classifier" if model_kind(model) == CLASSIFIER else "a causal LM"
        raise Llama2Error(f"{path}: the adapter is for task_type {TASK_TYPE[kind]} but the model is {have}; load "
                          f"the base as kind={kind!r}")
    if lora_layers(model):
        raise Llama2Error("the model already has LoRA adapters; load the adapter onto a plain base model")
    tensors = _adapter_tensors(path)
    saved = config.modules_to_save
    if kind == CLASSIFIER and "score.weight" not in tensors:  # PEFT then keeps the base's head: so do we
        saved = tuple(m for m in saved if m != "score")
    apply_lora(model, config.r, config.alpha, config.dropout, config.target_modules, saved,
               use_rslora=config.use_rslora, base_model=config.base_model)
    try:
        state = model.state_dict()
        expected = adapter_parameter_names(model)
        missing = [n for n in expected if n not in tensors]
        extra = [n for n in tensors if n not in expected]
        if missing or extra:
            raise Llama2Error(f"{path / ADAPTER_WEIGHTS} does not fit adapter_config.json on this model: missing "
                              f"{[peft_key(n) for n in missing[:3]]}, unexpected {[peft_key(n) for n in extra[:3]]}")
        for name in expected:
            if tensors[name].shape != tuple(state[name].shape):
                raise Llama2Error(
                    f"{path}: the adapter does not match the base model: {peft_key(name)} has shape "
                    f"{list(tensors[name].shape)} but this model needs {list(state[name].shape)}; load it onto the "
                    f"base it was trained from (base_model_name_or_path: {config.base_model!r})")
        with open(path / ADAPTER_WEIGHTS, "rb", buffering=0) as f, torch.no_grad():
            for name in expected:
                state[name].copy_(read_tensor(f, tensors[name]))
    except BaseException:
        remove_lora(model)
        raise
    return model


def read_adapter_rows(path: Path, targets: dict[str, tuple[Tensor, int]], base: Path | str | None = None) -> None:
    """read_rows_into for an adapter run: the adapter's tensors from `path`, every other target (the frozen
    base) from the base checkpoint (`base`, else base_model_name_or_path)."""
    config, kind = read_adapter_config(path)
    tensors = _adapter_tensors(path)
    fill_rows(path, tensors, {n: t for n, t in targets.items() if n in tensors})
    rest = {n: t for n, t in targets.items() if n not in tensors}
    if rest:
        unused = tuple(tensors) + (("lm_head.weight",) if kind == CLASSIFIER else ())
        read_rows_into(base_dir(path, config, base), rest, unused=unused)
