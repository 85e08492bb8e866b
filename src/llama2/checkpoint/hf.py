"""The Hugging Face Llama layout: config.json + model.safetensors (or shards with model.safetensors.index.json).

Two model kinds share it, told apart by config.json's `architectures`: the causal LM (`LlamaForCausalLM`:
`model.*` + `lm_head.weight`) and the one-label sequence classifier, the reward model
(`LlamaForSequenceClassification`: `model.*` + `score.weight`, with `num_labels` 1 and `pad_token_id`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..classifier import DEFAULT_PAD_ID, SequenceClassifier, init_score_
from ..config import ModelConfig
from ..errors import Llama2Error
from ..model import Transformer
from .common import (
    HF_DTYPE_NAME,
    Source,
    atomic_directory,
    build_model,
    check_materialised,
    model_dtype,
    parse_dtype,
    write_json,
)
from .safetensors_io import TensorInfo, read_header, read_tensor, write_safetensors

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # a buffer some older checkpoints carry; recomputed by the model
CAUSAL_LM, CLASSIFIER = "causal_lm", "classifier"
ARCHITECTURES = {"LlamaForCausalLM": CAUSAL_LM, "LlamaForSequenceClassification": CLASSIFIER}
ARCHITECTURE_OF = {kind: arch for arch, kind in ARCHITECTURES.items()}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Llama2Error(f"{path}: file not found") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise Llama2Error(f"{path}: not valid JSON ({e}); fix or re-download it") from None
    except OSError as e:
        raise Llama2Error(f"{path}: cannot read ({e.strerror})") from None


def _rope_type(d: Any) -> str | None:
    if not isinstance(d, dict):
        return None
    return d.get("rope_type") or d.get("type")


def config_from_hf(d: dict[str, Any], where: Path) -> ModelConfig:
    """A ModelConfig from LlamaConfig fields (transformers 4.x `rope_theta` or 5.x `rope_parameters`)."""
    if not isinstance(d, dict):
        raise Llama2Error(f"{where}: expected a JSON object of LlamaConfig fields")
    if d.get("model_type", "llama") != "llama":
        raise Llama2Error(f"{where}: model_type {d['model_type']!r} is not a Llama model; only model_type "
                          "'llama' checkpoints can be loaded")
    if d.get("hidden_act", "silu") != "silu":
        raise Llama2Error(f"{where}: hidden_act {d['hidden_act']!r} is not supported; Llama uses 'silu'")
    for flag in ("attention_bias", "mlp_bias"):
        if d.get(flag):
            raise Llama2Error(f"{where}: {flag}=true is not supported; Llama 2 has no biases")
    for key in ("rope_scaling", "rope_parameters"):
        kind = _rope_type(d.get(key))
        if kind not in (None, "default"):
            raise Llama2Error(f"{where}: {key} type {kind!r} is not implemented (only plain RoPE, as in Llama 2); "
                              "this checkpoint needs a different model")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in d]
    if missing:
        raise Llama2Error(f"{where}: missing field(s) {missing}; a Llama config.json needs them")
    rope = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    heads = d["num_attention_heads"]
    head_dim = d.get("head_dim")
    if head_dim is not None and isinstance(heads, int) and heads > 0 and head_dim * heads != d["hidden_size"]:
        raise Llama2Error(f"{where}: head_dim {d['head_dim']} differs from hidden_size / num_attention_heads; "
                          "this layout is not supported")
    try:
        return ModelConfig(
            dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=heads,
            n_kv_heads=d.get("num_key_value_heads") or heads, vocab_size=d["vocab_size"],
            hidden_dim=d["intermediate_size"], norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta), max_seq_len=d.get("max_position_embeddings", 2048))
    except (Llama2Error, TypeError, ValueError) as e:
        raise Llama2Error(f"{where}: {e}") from None


def kind_of_config(d: Any, where: Path) -> str:
    """"causal_lm" or "classifier" from config.json's `architectures` (absent: a causal LM, as older files)."""
    archs = d.get("architectures") if isinstance(d, dict) else None
    if not archs:
        return CAUSAL_LM
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise Llama2Error(f"{where}: architectures {archs!r} is not supported; this package reads "
                          f"{' and '.join(ARCHITECTURES)} checkpoints")
    if archs[0] == "LlamaForSequenceClassification":
        labels = d.get("num_labels", len(d["id2label"]) if isinstance(d.get("id2label"), dict) else 1)
        if labels != 1:
            raise Llama2Error(f"{where}: a sequence classifier with {labels} labels; only one label (a reward "
                              "model's scalar score) is supported")
    return ARCHITECTURES[archs[0]]


def pad_id_of_config(d: dict[str, Any], cfg: ModelConfig) -> int:
    """The classifier's pad id: config.json's pad_token_id, else DEFAULT_PAD_ID (<unk>, never EOS)."""
    pad = d.get("pad_token_id")
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    return pad if isinstance(pad, int) and not isinstance(pad, bool) and 0 <= pad < cfg.vocab_size \
        else DEFAULT_PAD_ID


def config_dtype(d: dict[str, Any]) -> torch.dtype | None:
    """The dtype a config.json declares (`dtype` in transformers 5, `torch_dtype` in 4), if any."""
    for key in ("dtype", "torch_dtype"):
        value = d.get(key)
        if isinstance(value, str):
            try:
                return parse_dtype(value)
            except Llama2Error:
                return None
    return None


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for LlamaForCausalLM, readable by transformers 4.x and 5.x."""
    name = HF_DTYPE_NAME.get(dtype, "float32")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "rope_scaling": None, "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "pretraining_tp": 1, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None, "tie_word_embeddings": False,
        "torch_dtype": name, "dtype": name,
    }


LIKELIHOOD_FLAG = "llama2_likelihood_term"  # config.json: the reward model has the likelihood term (classifier.py)


def classifier_config(cfg: ModelConfig, dtype: torch.dtype, pad_id: int, likelihood: bool = False) -> dict[str, Any]:
    """config.json for a one-label LlamaForSequenceClassification (the reward model)."""
    d = hf_config(cfg, dtype)
    d.update(architectures=[ARCHITECTURE_OF[CLASSIFIER]], num_labels=1, id2label={"0": "LABEL_0"},
             label2id={"LABEL_0": 0}, pad_token_id=pad_id)
    if likelihood:
        d[LIKELIHOOD_FLAG] = True
    return d


def generation_config(cfg: ModelConfig) -> dict[str, Any]:
    """Sampling defaults as Meta ships them for Llama 2 (temperature 0.6, top-p 0.9)."""
    return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "temperature": 0.6,
            "top_p": 0.9, "max_length": cfg.max_seq_len}


def _weight_files(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint by its Hugging Face name, with its file and place (headers only)."""
    index = path / INDEX
    if index.exists():
        d = read_json(index)
        weight_map = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise Llama2Error(f"{index}: no weight_map; the index is corrupt, re-download it")
        headers: dict[str, dict[str, TensorInfo]] = {}
        out: dict[str, TensorInfo] = {}
        for name, fname in weight_map.items():
            shard = path / str(fname)
            if fname not in headers:
                if not shard.is_file():
                    raise Llama2Error(f"{index} names shard {fname} (for tensor {name}), but {shard} does not "
                                      "exist; the download is incomplete")
                headers[fname] = read_header(shard)
            if name not in headers[fname]:
                raise Llama2Error(f"{shard}: lacks tensor {name} that {INDEX} assigns to it; the shard is "
                                  "corrupt or from another checkpoint")
            out[name] = headers[fname][name]
        return out
    single = path / WEIGHTS
    if single.exists():
        return read_header(single)
    if any(path.glob("pytorch_model*.bin")):
        raise Llama2Error(f"{path}: holds pytorch_model*.bin weights (pickles); only safetensors are read. Convert "
                          "them with transformers (save_pretrained(..., safe_serialization=True))")
    raise Llama2Error(f"{path}: no {WEIGHTS} or {INDEX}; the checkpoint has no weights")


def our_name(hf: str) -> str:
    """Hugging Face's parameter name -> ours (the backbone loses its `model.` prefix; the inverse of hf_name)."""
    return hf.removeprefix("model.")


class _Reader:
    """Open files and one staging buffer shared by all tensor reads of a load.

    A tensor already in its final dtype on the CPU is read straight into its own memory. Any other is read into
    the staging buffer (sized for the largest tensor, allocated once) and converted from there, so a converting
    load holds the final weights plus one buffer, without fragmenting the heap with short-lived temporaries.
    """

    def __init__(self, stack: ExitStack) -> None:
        self.stack, self.files, self.staging = stack, {}, None
        self.staging_bytes = 0

    def source(self, info: TensorInfo) -> Source:
        self.staging_bytes = max(self.staging_bytes, info.nbytes)

        def read(dtype: torch.dtype, device: torch.device) -> Tensor:
            if info.path not in self.files:
                self.files[info.path] = self.stack.enter_context(open(info.path, "rb", buffering=0))
            f = self.files[info.path]
            if dtype == info.dtype and device.type == "cpu":
                return read_tensor(f, info)
            if self.staging is None:
                self.staging = torch.empty(self.staging_bytes, dtype=torch.uint8)
            out = torch.empty(info.shape, dtype=dtype, device=device)
            out.copy_(read_tensor(f, info, self.staging))
            return out

        return Source(info.shape, info.dtype, info.path.name, read)


def load_hf(path: Path, device: torch.device, dtype: torch.dtype | None, progress: bool = False,
            kind: str | None = None) -> Transformer:
    """Open an HF directory as the model of `kind` (default: the kind it holds). A causal LM opens as a
    classifier too: its backbone is taken, lm_head dropped and the head drawn fresh (init_score_)."""
    d = read_json(path / CONFIG)
    cfg = config_from_hf(d, path / CONFIG)
    stored = kind_of_config(d, path / CONFIG)
    kind = kind or stored
    if kind not in ARCHITECTURE_OF:
        raise Llama2Error(f"unknown model kind {kind!r} for {path}; choose {' or '.join(ARCHITECTURE_OF)}")
    if stored == CLASSIFIER and kind == CAUSAL_LM:
        raise Llama2Error(f"{path} holds a sequence classifier (LlamaForSequenceClassification), which has no LM "
                          "head; load it as kind='classifier', or load the causal LM it was trained from")
    make = fresh = None
    if kind == CLASSIFIER:
        pad = pad_id_of_config(d, cfg)
        likelihood = stored == CLASSIFIER and d.get(LIKELIHOOD_FLAG) is True

        def make() -> Transformer:
            return SequenceClassifier(cfg, pad_id=pad, likelihood=likelihood)

        if stored == CAUSAL_LM:  # the declared-fresh case: a reward model started from a causal LM
            fresh = {"score.weight": lambda dt, dev: init_score_(torch.empty(1, cfg.dim, dtype=dt, device=dev))}
    infos = _weight_files(path)
    with ExitStack() as stack:
        reader = _Reader(stack)
        plan: dict[str, Source] = {}
        for key, info in infos.items():
            if key.endswith(IGNORED_SUFFIXES):
                continue
            plan[our_name(key)] = reader.source(info)
        if dtype is None:
            dtype = config_dtype(d) or (plan["embed_tokens.weight"].dtype if "embed_tokens.weight" in plan
                                        else next(iter(plan.values())).dtype)
        if kind == CLASSIFIER and stored == CAUSAL_LM:
            plan.pop("lm_head.weight", None)
        elif "lm_head.weight" not in plan and d.get("tie_word_embeddings") and "embed_tokens.weight" in plan:
            plan["lm_head.weight"] = plan["embed_tokens.weight"]  # tied: read the embedding a second time (a copy)
        return build_model(cfg, plan, dtype, device, path, progress, make=make, fresh=fresh)


def read_rows_into(path: Path, targets: dict[str, tuple[Tensor, int]], unused: tuple[str, ...] = ()) -> None:
    """Fill tensors in place from a Hugging Face checkpoint, reading from disk only the rows each one holds.

    `targets` maps our parameter names to (destination, first row): a whole tensor (row 0), or one process's
    dim-0 shard of it under FSDP2. Every checkpoint tensor must have a target and the reverse, except the
    checkpoint tensors named in `unused` (lm_head of a causal-LM base under a classifier adapter)."""
    files = _weight_files(path)
    ours = {our_name(n): info for n, info in files.items() if not n.endswith(IGNORED_SUFFIXES)}
    fill_rows(path, {n: info for n, info in ours.items() if n in targets or n not in unused}, targets)


def fill_rows(path: Path, ours: dict[str, TensorInfo], targets: dict[str, tuple[Tensor, int]]) -> None:
    """read_rows_into's reading: `ours` are the checkpoint's tensors by our names; the two sets must agree."""
    missing, extra = sorted(set(targets) - set(ours)), sorted(set(ours) - set(targets))
    if missing or extra:
        raise Llama2Error(f"{path} does not fit the model: missing {missing[:4]}, unexpected {extra[:4]}; use the "
                          "recipe the checkpoint was trained with")
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}
        for name, (dest, start) in targets.items():
            info = ours[name]
            rows = dest.shape[0] if dest.ndim else 1
            if tuple(dest.shape[1:]) != info.shape[1:] or start + rows > (info.shape[0] if info.shape else 1):
                raise Llama2Error(f"{path}: tensor {name} has shape {list(info.shape)}, the model's (rows "
                                  f"{start}..{start + rows} of) {list(dest.shape)}; use the recipe it was trained with")
            row_bytes = info.nbytes // max(info.shape[0], 1) if info.shape else info.nbytes
            piece = TensorInfo(info.path, name, info.dtype, tuple(dest.shape), info.start + start * row_bytes,
                               rows * row_bytes)
            if info.path not in handles:
                handles[info.path] = stack.enter_context(open(info.path, "rb", buffering=0))
            dest.copy_(read_tensor(handles[info.path], piece))


# top-level modules of the HF models (and the likelihood term's weight); everything else lives under `model.`
HEADS = ("lm_head.", "score.", "likelihood_weight")


def hf_name(name: str) -> str:
    """Our parameter name -> Hugging Face's (the backbone under `model.`, the heads at the top)."""
    return name if name.startswith(HEADS) else f"model.{name}"


def _shard(items: list[tuple[str, Tensor]], dtype: torch.dtype, max_bytes: int) -> list[list[tuple[str, Tensor]]]:
    shards: list[list[tuple[str, Tensor]]] = [[]]
    size = 0
    for name, t in items:
        n = t.numel() * dtype.itemsize
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
    return shards


def save_hf(model: Transformer, path: Path, tokenizer: Any = None, max_shard_bytes: int = 5 * 2**30,
            dtype: torch.dtype | None = None, progress: bool = False,
            fetch: Callable[[str], Tensor] | None = None) -> Path:
    if fetch is None:
        check_materialised(model)
    if max_shard_bytes <= 0:
        raise Llama2Error(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    dtype = dtype or model_dtype(model)
    items = [(hf_name(n), t.detach()) for n, t in model.state_dict().items()]
    shards = _shard(items, dtype, max_shard_bytes)
    total = sum(t.numel() * dtype.itemsize for _, t in items)

    by_hf = None if fetch is None else (lambda name: fetch(our_name(name)))
    with atomic_directory(path) as tmp, tqdm(total=total, unit="B", unit_scale=True, desc="saving",
                                             disable=not progress, leave=False) as bar:
        if len(shards) == 1:
            write_safetensors(tmp / WEIGHTS, shards[0], dtype, on_tensor=bar.update, fetch=by_hf)
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(tmp / fname, shard, dtype, on_tensor=bar.update, fetch=by_hf)
                weight_map.update({name: fname for name, _ in shard})
            write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
        if isinstance(model, SequenceClassifier):
            write_json(tmp / CONFIG, classifier_config(model.config, dtype, model.pad_id, model.likelihood))
        else:
            write_json(tmp / CONFIG, hf_config(model.config, dtype))
            write_json(tmp / GENERATION_CONFIG, generation_config(model.config))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path
