"""Meta's layout: params.json + consolidated.NN.pth, one file per model-parallel rank.

Column-parallel weights (wq, wk, wv, w1, w3, output) are split along dim 0, row-parallel ones (wo, w2) and the
embedding along dim 1, norms are replicated. q/k rows are in Meta's interleaved rotary order; the model uses
Hugging Face's rotate-halves order, so they are permuted at import and back at export.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ..config import ModelConfig, ffn_hidden_size
from ..errors import Llama2Error
from ..model import Transformer
from .common import (
    Source,
    atomic_directory,
    build_model,
    check_materialised,
    model_dtype,
    release_pages,
    to_interleaved,
    write_json,
)
from .hf import read_json

PARAMS = "params.json"
SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth")
IGNORED = ("rope.freqs",)  # a precomputed rotary table in some Meta files; the model recomputes it

# Meta name (suffix) -> (our name, split dim across ranks or None if replicated, rotary permutation of q/k)
TOP = {"tok_embeddings.weight": ("embed_tokens.weight", 1, None), "norm.weight": ("norm.weight", None, None),
       "output.weight": ("lm_head.weight", 0, None)}
LAYER = {
    "attention.wq.weight": ("self_attn.q_proj.weight", 0, "q"),
    "attention.wk.weight": ("self_attn.k_proj.weight", 0, "k"),
    "attention.wv.weight": ("self_attn.v_proj.weight", 0, None),
    "attention.wo.weight": ("self_attn.o_proj.weight", 1, None),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0, None),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1, None),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0, None),
    "attention_norm.weight": ("input_layernorm.weight", None, None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None, None),
}
LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")


def meta_to_ours(name: str) -> tuple[str, int | None, str | None] | None:
    if name in TOP:
        return TOP[name]
    m = LAYER_RE.fullmatch(name)
    if m and m.group(2) in LAYER:
        ours, split, perm = LAYER[m.group(2)]
        return f"layers.{m.group(1)}.{ours}", split, perm
    return None


def shard_files(path: Path) -> list[Path]:
    """consolidated.00.pth ... consolidated.NN.pth, checked to be numbered 0..N-1 without gaps."""
    found = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := SHARD_RE.fullmatch(p.name)))
    if not found:
        raise Llama2Error(f"{path}: has {PARAMS} but no consolidated.NN.pth weight files; the download is incomplete")
    for want, (got, p) in enumerate(found):
        if got != want:
            raise Llama2Error(f"{path}: model-parallel shard consolidated.{want:02d}.pth is missing (found "
                              f"{[q.name for _, q in found]}); the download is incomplete")
    return [p for _, p in found]


def load_pth(path: Path) -> tuple[dict[str, Tensor], bool]:
    """torch.load with weights_only=True (never runs code from the file), memory-mapped where possible.
    Returns the tensors and whether they are memory-mapped from the file."""
    mapped = True
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            mapped = False
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format: no mmap
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        if "GLOBAL" in detail:
            raise Llama2Error(f"{path}: refused to load: the file holds Python objects other than tensors, which "
                              f"could run code (it is read with weights_only=True): {detail[:160]}") from None
        raise Llama2Error(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: {detail[:160]}); "
                          "re-download it") from None
    except FileNotFoundError:
        raise Llama2Error(f"{path}: file not found") from None
    except Exception as e:  # torch raises RuntimeError/EOFError/ValueError/... for truncated or foreign files
        raise Llama2Error(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt: "
                          f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__}); "
                          "re-download it") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise Llama2Error(f"{path}: expected a dict of named tensors (a Meta consolidated checkpoint)")
    return sd, mapped


def config_from_params(params: Any, vocab_size: int, where: Path) -> ModelConfig:
    if not isinstance(params, dict):
        raise Llama2Error(f"{where}: expected a JSON object of Meta model arguments")
    if params.get("use_scaled_rope"):
        raise Llama2Error(f"{where}: use_scaled_rope (Llama 3.1 rotary scaling) is not implemented")
    missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
    if missing:
        raise Llama2Error(f"{where}: missing field(s) {missing}; Meta's params.json has dim, n_layers, n_heads")
    try:
        return ModelConfig(
            dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads"), vocab_size=vocab_size,
            multiple_of=params.get("multiple_of", 256), ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=float(params.get("rope_theta", 10000.0)),
            max_seq_len=params.get("max_seq_len", 4096))
    except (Llama2Error, TypeError, ValueError) as e:
        raise Llama2Error(f"{where}: {e}") from None


def _vocab(params: Any, first: dict[str, Tensor], where: Path) -> int:
    v = params.get("vocab_size", -1) if isinstance(params, dict) else -1
    if isinstance(v, int) and v > 0:
        return v
    if "tok_embeddings.weight" not in first:
        raise Llama2Error(f"{where}: lacks tok_embeddings.weight, needed to learn vocab_size (-1 in {PARAMS})")
    return int(first["tok_embeddings.weight"].shape[0])


def _source(key: str, pieces: list[Tensor], files: list[Path], split: int | None, perm: str | None,
            cfg: ModelConfig, mapped: bool) -> Source:
    where = ", ".join(p.name for p in files)
    for p, f in zip(pieces, files):
        if p.ndim != pieces[0].ndim or any(a != b for i, (a, b) in enumerate(zip(p.shape, pieces[0].shape))
                                           if i != split):
            raise Llama2Error(f"{f}: tensor {key} has shape {list(p.shape)}, which does not fit the other shards' "
                              f"{list(pieces[0].shape)}")
    if split is None:
        pieces, files = pieces[:1], files[:1]
        shape = tuple(pieces[0].shape)
    else:
        shape = list(pieces[0].shape)
        shape[split] = sum(p.shape[split] for p in pieces)
        shape = tuple(shape)
    hd = cfg.head_dim
    if perm:
        for p, f in zip(pieces, files):
            if p.ndim != 2 or p.shape[0] % hd:
                raise Llama2Error(f"{f}: tensor {key} has shape {list(p.shape)}, not whole heads of size {hd}; the "
                                  "config does not match the weights")

    def read(dtype: torch.dtype, device: torch.device) -> Tensor:
        out = torch.empty(shape, dtype=dtype, device=device)
        offset = 0
        for p in pieces:
            n = p.shape[split] if split is not None else 0
            dst = out if split is None else out.narrow(split, offset, n)
            if perm:  # per rank: each holds whole heads
                heads, dim = p.shape[0] // hd, p.shape[1]
                dst.view(heads, 2, hd // 2, dim).copy_(p.view(heads, hd // 2, 2, dim).transpose(1, 2))
            else:
                dst.copy_(p)
            offset += n
            if mapped:  # the copy is made: let the kernel drop the file pages from our resident set
                release_pages(p)
        return out

    return Source(shape, pieces[0].dtype, where, read)


def load_meta(path: Path, device: torch.device, dtype: torch.dtype | None, progress: bool = False) -> Transformer:
    params = read_json(path / PARAMS)
    files = shard_files(path)
    loaded = [load_pth(f) for f in files]
    sds = [sd for sd, _ in loaded]
    mapped = all(m for _, m in loaded)
    keys = [k for k in sds[0] if k not in IGNORED]
    for sd, f in zip(sds[1:], files[1:]):
        other = {k for k in sd if k not in IGNORED}
        if other != set(keys):
            diff = sorted(set(keys) ^ other)
            raise Llama2Error(f"{f}: its tensor names differ from {files[0].name} ({diff[:4]}); the shards are "
                              "from different checkpoints")
    cfg = config_from_params(params, _vocab(params, sds[0], files[0]), path / PARAMS)
    plan: dict[str, Source] = {}
    for key in keys:
        entry = meta_to_ours(key)
        if entry is None:
            plan[key] = Source(tuple(sds[0][key].shape), sds[0][key].dtype, files[0].name, lambda *a: None)
            continue  # unknown name: reported as unexpected by build_model
        ours, split, perm = entry
        plan[ours] = _source(key, [sd[key] for sd in sds], files, split, perm, cfg, mapped)
    if dtype is None:
        dtype = sds[0]["tok_embeddings.weight"].dtype if "tok_embeddings.weight" in sds[0] else sds[0][keys[0]].dtype
    model = build_model(cfg, plan, dtype, device, path, progress)
    del sds, loaded, plan
    return model


def meta_params(cfg: ModelConfig) -> dict[str, Any]:
    """params.json as Meta writes it; multiple_of/ffn_dim_multiplier chosen to reproduce hidden_dim exactly."""
    candidates: list[tuple[int, float | None]] = [(cfg.multiple_of, cfg.ffn_dim_multiplier), (256, None),
                                                   (4096, 1.3), (1024, 1.3), (1024, 1.5)]
    base = int(2 * 4 * cfg.dim / 3)
    candidates.append((cfg.hidden_dim, None if base <= cfg.hidden_dim else cfg.hidden_dim / base))
    found = next((c for c in candidates if ffn_hidden_size(cfg.dim, *c) == cfg.hidden_dim), None)
    if found is None:
        raise Llama2Error(f"feed-forward size {cfg.hidden_dim} cannot be expressed in Meta's params.json")
    multiple_of, mult = found
    p: dict[str, Any] = {"dim": cfg.dim, "multiple_of": multiple_of}
    if mult is not None:
        p["ffn_dim_multiplier"] = mult
    p.update(n_heads=cfg.n_heads, n_layers=cfg.n_layers, norm_eps=cfg.norm_eps, vocab_size=cfg.vocab_size)
    if cfg.n_kv_heads != cfg.n_heads:
        p["n_kv_heads"] = cfg.n_kv_heads
    if cfg.rope_theta != 10000.0:
        p["rope_theta"] = cfg.rope_theta
    return p


def _rank_piece(t: Tensor, r: int, shards: int, split: int | None, perm: str | None, hd: int,
                dtype: torch.dtype) -> Tensor:
    if split is not None:
        t = t.chunk(shards, dim=split)[r]
    if perm:
        t = to_interleaved(t.contiguous(), t.shape[0] // hd)
    t = t.to(device="cpu", dtype=dtype).contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()  # torch.save writes a view's whole storage: give each piece its own
    return t


def save_meta(model: Transformer, path: Path | str, shards: int = 1, *, dtype: torch.dtype | None = None,
              tokenizer: Any = None, progress: bool = False) -> Path:
    """Write Meta's layout: params.json + consolidated.NN.pth split for `shards` model-parallel ranks."""
    check_materialised(model)
    cfg = model.config
    if not isinstance(shards, int) or shards < 1:
        raise Llama2Error(f"shards must be a positive integer, got {shards!r}")
    for what, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("dim", cfg.dim),
                    ("hidden_dim", cfg.hidden_dim), ("vocab_size", cfg.vocab_size)):
        if n % shards:
            raise Llama2Error(f"cannot split the model into {shards} model-parallel shards: {what} {n} is not "
                              "divisible by it; choose a divisor")
    dtype = dtype or model_dtype(model)
    state = model.state_dict()
    # Meta's order: embedding, final norm, output, then per layer as its modules are defined
    names = {meta: (ours, split, perm) for meta, (ours, split, perm) in TOP.items()}
    for i in range(cfg.n_layers):
        names.update({f"layers.{i}.{meta}": (f"layers.{i}.{ours}", split, perm)
                      for meta, (ours, split, perm) in LAYER.items()})
    path = Path(path)

    with atomic_directory(path) as tmp, tqdm(total=shards * len(names), unit="tensor", desc="saving",
                                             disable=not progress, leave=False) as bar:
        for r in range(shards):
            sd: dict[str, Tensor] = {}
            for meta, (ours, split, perm) in names.items():
                sd[meta] = _rank_piece(state[ours].detach(), r, shards, split, perm, cfg.head_dim, dtype)
                bar.update()
            with open(tmp / f"consolidated.{r:02d}.pth", "wb") as f:
                torch.save(sd, f)
                f.flush()
                os.fsync(f.fileno())
            del sd
        write_json(tmp / PARAMS, meta_params(cfg))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return path
