"""GGUF, llama.cpp's single-file format: export a causal LM with its tokenizer, and read one back.

    save_gguf(model, "model.gguf", tokenizer, "q8_0")     # f32 | f16 | bf16 | q8_0, written atomically
    model = load_gguf("model.gguf")                       # f32 / f16 / bf16 / q8_0 tensors, dequantised
    tok = gguf_tokenizer("model.gguf", "out-dir")         # its SentencePiece vocabulary as a tokenizer.model

What is stored: architecture "llama" with the shape (context length, embedding and feed-forward sizes, layers,
query and key/value head counts, RMSNorm epsilon, rotary base and dimension), the weights under llama.cpp's
tensor names with q/k rows in Meta's interleaved rotary order (this package's model keeps Hugging Face's
rotate-halves order, so they are permuted on the way out and back on the way in), the SentencePiece vocabulary
(pieces, scores, token types, unk/bos/eos ids, add_bos, add_space_prefix) and the Llama 2 chat template.

Tensor types: norms are always F32 (llama.cpp expects them so); the 2-D weights take the requested type. q8_0 is
the block layout of llama2.inference.quantize (32 int8 values after one fp16 scale, 34 bytes), quantised with
the same code as `--quantize int8`, so llama.cpp's q8_0 and our int8 hold identical weights; a weight whose
rows are not a multiple of 32 long falls back to F16, as llama.cpp's own converter does.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from sentencepiece import sentencepiece_model_pb2
from torch import Tensor
from tqdm import tqdm

from ..atomic import TMP_SUFFIX, fsync_dir
from ..config import ModelConfig
from ..errors import Llama2Error
from ..inference.cpu_kernels import dequantize_blocks, quantize_blocks
from ..lora import lora_config
from ..model import Transformer
from ..tokenizer import LLAMA2_CHAT_TEMPLATE, tokenizer_from_gguf
from .common import Source, build_model, check_materialised, to_interleaved

ARCH = "llama"
MAGIC = b"GGUF"
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")
_DTYPE_ALIASES = {"f32": "f32", "fp32": "f32", "float32": "f32", "f16": "f16", "fp16": "f16", "float16": "f16",
                  "half": "f16", "bf16": "bf16", "bfloat16": "bf16", "q8_0": "q8_0", "q8": "q8_0", "int8": "q8_0"}
Q8_BLOCK, Q8_BYTES = 32, 34  # values per block, bytes per block (fp16 scale + 32 int8)

# our parameter name -> llama.cpp's tensor name (per layer: under blk.N.)
TOP = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
LAYER = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
         "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
         "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
         "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
         "mlp.down_proj.weight": "ffn_down.weight"}
_LAYER_BACK = {v: k for k, v in LAYER.items()}
_TOP_BACK = {v: k for k, v in TOP.items()}


def parse_gguf_dtype(name: str | None) -> str | None:
    """"f32" | "f16" | "bf16" | "q8_0" from what a user may type (fp16, bfloat16, int8, ...); None stays None."""
    if name is None:
        return None
    key = str(name).strip().lower()
    if key not in _DTYPE_ALIASES:
        raise Llama2Error(f"unknown GGUF type {name!r}; choose {', '.join(GGUF_DTYPES)}")
    return _DTYPE_ALIASES[key]


def default_gguf_dtype(dtype: torch.dtype) -> str:
    """The GGUF type that keeps a model's dtype: fp16 -> f16, bf16 -> bf16, anything else -> f32."""
    return {torch.float16: "f16", torch.bfloat16: "bf16"}.get(dtype, "f32")


def gguf_name(ours: str) -> str:
    """Our parameter name -> llama.cpp's tensor name ("layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight")."""
    if ours in TOP:
        return TOP[ours]
    prefix, _, rest = ours.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix != "layers" or not layer.isdigit() or suffix not in LAYER:
        raise Llama2Error(f"parameter {ours!r} has no GGUF counterpart; only plain Llama causal LMs can be exported")
    return f"blk.{layer}.{LAYER[suffix]}"


def our_name(name: str) -> str | None:
    """llama.cpp's tensor name -> ours; None for a name this package's model does not have."""
    if name in _TOP_BACK:
        return _TOP_BACK[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_BACK:
        return f"layers.{parts[1]}.{_LAYER_BACK[parts[2]]}"
    return None


def _rotary_heads(ours: str, cfg: ModelConfig) -> int | None:
    """The head count whose rows are permuted between the two rotary orders (q: n_heads, k: n_kv_heads)."""
    if ours.endswith("self_attn.q_proj.weight"):
        return cfg.n_heads
    if ours.endswith("self_attn.k_proj.weight"):
        return cfg.n_kv_heads
    return None


def from_interleaved(w: Tensor, n: int) -> Tensor:
    """Hugging Face's rotate-halves rows from Meta's interleaved rotary rows, for n heads (to_interleaved's inverse)."""
    rows, dim = w.shape
    hd = rows // n
    return w.reshape(n, hd // 2, 2, dim).transpose(1, 2).reshape(rows, dim)


# ---------------------------------------------------------------------------------------------------------------
# Export


def _ggml_types():
    T = GGMLQuantizationType
    return {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}


def tensor_type(shape: tuple[int, ...], dtype: str) -> str:
    """The GGUF type a tensor of `shape` is stored in for a requested `dtype` (norms: f32; q8_0 needs whole
    blocks along a row, else f16)."""
    if len(shape) < 2 or dtype == "f32":
        return "f32"
    if dtype == "q8_0" and shape[-1] % Q8_BLOCK:
        return "f16"
    return dtype


def encode_tensor(t: Tensor, kind: str) -> np.ndarray:
    """A tensor's bytes as GGUF stores them for type `kind` (a numpy array in row-major order)."""
    t = t.detach().to("cpu")
    if kind == "f32":
        return t.float().contiguous().numpy()
    if kind == "f16":
        return t.half().contiguous().numpy()
    if kind == "bf16":
        return t.bfloat16().contiguous().view(torch.int16).numpy().view(np.uint8)
    if kind == "q8_0":
        rows, cols = t.shape
        q, scale = quantize_blocks(t.float())
        blocks = torch.cat([scale.view(torch.uint8).view(rows, cols // Q8_BLOCK, 2),
                            q.view(torch.uint8).view(rows, cols // Q8_BLOCK, Q8_BLOCK)], dim=-1)
        return blocks.reshape(rows, cols // Q8_BLOCK * Q8_BYTES).numpy()
    raise Llama2Error(f"unknown GGUF type {kind!r}; choose {', '.join(GGUF_DTYPES)}")


_PIECE_TYPES = {1, 2, 3, 4, 5, 6}  # SentencePiece's numbering = GGUF's: normal, unknown, control, user, unused, byte


@dataclass
class Vocab:
    """The tokenizer fields of a GGUF file."""

    tokens: list[str]
    scores: list[float]
    types: list[int]
    unk_id: int
    bos_id: int
    eos_id: int
    add_space_prefix: bool


def vocab_of(tokenizer: Any, vocab_size: int) -> Vocab:
    """The GGUF vocabulary of a llama2 Tokenizer for a model with `vocab_size` rows; rows past the tokenizer's
    pieces (a padded embedding) become unused pieces "[PADn]", as llama.cpp's converter writes them."""
    sp = getattr(tokenizer, "sp", None)
    if sp is None:
        raise Llama2Error(f"the tokenizer ({type(tokenizer).__name__}) is not a SentencePiece tokenizer; a GGUF file "
                          "needs the tokenizer.model the model was trained with")
    proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
    n = len(proto.pieces)
    if n > vocab_size:
        raise Llama2Error(f"the tokenizer has {n} pieces but the model only {vocab_size} embedding rows; this is "
                          "not the model's tokenizer (pass the one it was trained with)")
    tokens = [p.piece for p in proto.pieces] + [f"[PAD{i}]" for i in range(n, vocab_size)]
    scores = [float(p.score) for p in proto.pieces] + [-10000.0] * (vocab_size - n)
    types = [int(p.type) if int(p.type) in _PIECE_TYPES else 1 for p in proto.pieces] + [5] * (vocab_size - n)
    ids = (sp.unk_id(), sp.bos_id(), sp.eos_id())
    if any(i < 0 for i in ids):
        raise Llama2Error(f"the tokenizer lacks an unk, bos or eos piece (ids {ids}); a Llama tokenizer has all three")
    return Vocab(tokens, scores, types, *ids, add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix))


@contextlib.contextmanager
def _atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on a clean exit fsync it and rename it onto `path`, else delete it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as e:
        raise Llama2Error(f"cannot write {path}: {e.strerror}") from None
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_gguf(model: Transformer, path: Path | str, tokenizer: Any, dtype: str | None = None, *,
              name: str | None = None, progress: bool = False) -> Path:
    """Write `model` (a causal LM) and `tokenizer` (a llama2 Tokenizer) as one GGUF file, atomically.

    dtype: "f32", "f16", "bf16" or "q8_0" (None: the model's own dtype, f32 for fp32). Tensors are converted
    and written one at a time, so the file is never held in memory."""
    if type(model) is not Transformer:
        raise Llama2Error(f"only a causal LM (Transformer) can be exported to GGUF, not {type(model).__name__}; "
                          "merge LoRA adapters first (merge_lora)")

    if lora_config(model) is not None:
        raise Llama2Error("the model has LoRA adapters; merge them first (llama2.lora.merge_lora) to export it")
    check_materialised(model)
    if tokenizer is None:
        raise Llama2Error("a GGUF file must carry its tokenizer: give the tokenizer.model the model was trained with")
    path = Path(path)
    if path.is_dir():
        raise Llama2Error(f"{path} is a directory; a GGUF export is one file (e.g. {path / 'model.gguf'})")
    cfg = model.config
    state = model.state_dict()
    dtype = parse_gguf_dtype(dtype) or default_gguf_dtype(next(iter(state.values())).dtype)
    vocab = vocab_of(tokenizer, cfg.vocab_size)
    types = _ggml_types()
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    label = name or Path(getattr(model, "name_or_path", "") or "llama2").name or "llama2"
    plan = [(ours, gguf_name(ours), tensor_type(tuple(t.shape), dtype)) for ours, t in state.items()]
    with _atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        try:
            w.add_type("model")
            w.add_name(label)
            w.add_file_type(int(file_type))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            w.add_vocab_size(cfg.vocab_size)
            w.add_context_length(cfg.max_seq_len)
            w.add_embedding_length(cfg.dim)
            w.add_block_count(cfg.n_layers)
            w.add_feed_forward_length(cfg.hidden_dim)
            w.add_head_count(cfg.n_heads)
            w.add_head_count_kv(cfg.n_kv_heads)
            w.add_layer_norm_rms_eps(float(cfg.norm_eps))
            w.add_rope_freq_base(float(cfg.rope_theta))
            w.add_rope_dimension_count(cfg.head_dim)
            w.add_tokenizer_model("llama")
            w.add_tokenizer_pre("default")
            w.add_token_list(vocab.tokens)
            w.add_token_scores(vocab.scores)
            w.add_token_types(vocab.types)
            w.add_unk_token_id(vocab.unk_id)
            w.add_bos_token_id(vocab.bos_id)
            w.add_eos_token_id(vocab.eos_id)
            w.add_add_bos_token(True)
            w.add_add_eos_token(False)
            w.add_add_space_prefix(vocab.add_space_prefix)
            w.add_chat_template(LLAMA2_CHAT_TEMPLATE)
            sizes = {}
            for ours, gname, kind in plan:
                t = state[ours]
                nbytes = _nbytes(tuple(t.shape), kind)
                sizes[ours] = nbytes
                w.add_tensor_info(gname, tuple(t.shape), np.dtype(np.float32), nbytes, raw_dtype=types[kind])
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()

            with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="writing GGUF",
                      disable=not progress, leave=False) as bar:
                for ours, _, kind in plan:
                    t = state[ours]
                    heads = _rotary_heads(ours, cfg)
                    if heads is not None:
                        t = to_interleaved(t.detach().contiguous(), heads)
                    data = encode_tensor(t, kind)
                    w.write_tensor_data(data)
                    bar.update(data.nbytes)
        finally:
            w.close()
    return path


def _nbytes(shape: tuple[int, ...], kind: str) -> int:
    n = 1
    for s in shape:
        n *= s
    return {"f32": 4 * n, "f16": 2 * n, "bf16": 2 * n, "q8_0": n // Q8_BLOCK * Q8_BYTES}[kind]


# ---------------------------------------------------------------------------------------------------------------
# Import


def is_gguf(path: Path | str) -> bool:
    """Whether `path` is a file that starts with GGUF's magic bytes."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        with p.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def open_gguf(path: Path | str):
    """A gguf.GGUFReader over `path`, with one clear error for a missing, foreign or truncated file."""
    p = Path(path)
    if not p.is_file():
        raise Llama2Error(f"GGUF file not found: {p}" if not p.exists() else f"{p} is not a file; give a .gguf file")
    if not is_gguf(p):
        raise Llama2Error(f"{p} is not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        return GGUFReader(p)
    except Exception as e:  # the gguf package raises ValueError / struct / numpy errors on a damaged file
        raise Llama2Error(f"{p} is not a readable GGUF file (truncated or damaged: {str(e)[:200]})") from None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader, where: Path) -> ModelConfig:
    """The ModelConfig of a GGUF file of architecture "llama" (a clear error for other architectures and for
    features this model does not implement: experts, rotary scaling, partial rotary, per-layer head counts)."""
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise Llama2Error(f"{where}: architecture {arch!r} is not supported; only 'llama' (Llama 2 family) GGUF "
                          "files can be converted")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = _field(reader, f"{ARCH}.{key}", default)
        if required and value is None:
            raise Llama2Error(f"{where}: missing {ARCH}.{key}; the file does not describe a Llama model")
        if isinstance(value, list):
            raise Llama2Error(f"{where}: {ARCH}.{key} varies per layer ({value[:4]}...); not supported")
        return value

    if (get("expert_count") or 0) > 0:
        raise Llama2Error(f"{where}: a mixture-of-experts model ({get('expert_count')} experts); not supported")
    scaling = get("rope.scaling.type")
    if scaling not in (None, "none"):
        raise Llama2Error(f"{where}: rotary scaling {scaling!r} is not implemented (only plain RoPE, as in Llama 2)")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise Llama2Error(f"{where}: holds rope_freqs.weight (Llama 3.1 rotary scaling); not implemented")
    dim, heads = get("embedding_length", required=True), get("attention.head_count", required=True)
    vocab = get("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = len(tokens.data) if tokens is not None else (int(emb.shape[1]) if emb is not None else None)
    if vocab is None:
        raise Llama2Error(f"{where}: neither {ARCH}.vocab_size, a vocabulary nor token_embd.weight; cannot size it")
    try:
        cfg = ModelConfig(dim=int(dim), n_layers=int(get("block_count", required=True)), n_heads=int(heads),
                          n_kv_heads=int(get("attention.head_count_kv", heads)), vocab_size=int(vocab),
                          hidden_dim=int(get("feed_forward_length", required=True)),
                          norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                          rope_theta=float(get("rope.freq_base", 10000.0)),
                          max_seq_len=int(get("context_length", 4096)))
    except (Llama2Error, TypeError, ValueError) as e:
        raise Llama2Error(f"{where}: {e}") from None
    rot = get("rope.dimension_count", cfg.head_dim)
    if int(rot) != cfg.head_dim:
        raise Llama2Error(f"{where}: rotary dimension {rot} differs from the head size {cfg.head_dim} (partial "
                          "rotary); not supported")
    key_len = get("attention.key_length", cfg.head_dim)
    if int(key_len) != cfg.head_dim:
        raise Llama2Error(f"{where}: head size {key_len} differs from embedding_length / head_count; not supported")
    return cfg


def _decode(t, dtype: torch.dtype) -> Tensor:
    """One GGUF tensor (F32 / F16 / BF16 / Q8_0) as a torch tensor of `dtype`, in row-major (rows, cols) order."""
    T = GGMLQuantizationType
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    kind = T(t.tensor_type)
    if kind in (T.F32, T.F16):
        return torch.from_numpy(np.array(t.data, copy=True)).reshape(shape).to(dtype)
    if kind == T.BF16:
        raw = torch.from_numpy(np.array(t.data, copy=True).view(np.int16))
        return raw.view(torch.bfloat16).reshape(shape).to(dtype)
    if kind == T.Q8_0:
        rows, cols = (int(np.prod(shape[:-1])), shape[-1]) if len(shape) > 1 else (1, shape[0])
        blocks = torch.from_numpy(np.array(t.data, copy=True)).reshape(rows, cols // Q8_BLOCK, Q8_BYTES)
        scale = blocks[..., :2].contiguous().view(torch.float16).reshape(rows, cols // Q8_BLOCK)
        q = blocks[..., 2:].contiguous().view(torch.int8).reshape(rows, cols)
        return dequantize_blocks(q, scale, torch.float32).reshape(shape).to(dtype)
    raise AssertionError(kind)


SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0")


def _default_dtype(types: set[str]) -> torch.dtype:
    """fp16 / bf16 if every 2-D weight is stored so, else fp32 (q8_0 dequantises exactly into fp32)."""
    if types == {"F16"}:
        return torch.float16
    if types == {"BF16"}:
        return torch.bfloat16
    return torch.float32


def load_gguf(path: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, *,
              progress: bool = False) -> Transformer:
    """Open a llama-family GGUF file as our Transformer: F32 / F16 / BF16 / Q8_0 tensors dequantised into
    `dtype` (None: fp16 or bf16 when every weight is stored so, else fp32), q/k rows permuted back into the
    rotate-halves order. A file without output.weight (tied embeddings) gets a copy of token_embd."""
    p = Path(path)
    reader = open_gguf(p)
    cfg = config_from_gguf(reader, p)
    plan: dict[str, Source] = {}
    weight_types: set[str] = set()
    for t in reader.tensors:
        ours = our_name(t.name)
        kind = getattr(t.tensor_type, "name", str(t.tensor_type))
        if ours is None:
            raise Llama2Error(f"{p}: tensor {t.name!r} is not part of a Llama 2 model (biases, experts and other "
                              "architectures' tensors are not supported)")
        if kind not in SUPPORTED_TYPES:
            raise Llama2Error(f"{p}: tensor {t.name} has type {kind}; only {', '.join(SUPPORTED_TYPES)} tensors can "
                              "be read (export the model again as f32, f16, bf16 or q8_0)")
        if len(t.shape) > 1:
            weight_types.add(kind)
        plan[ours] = _gguf_source(t, ours, cfg, p)
    if "lm_head.weight" not in plan and "embed_tokens.weight" in plan:
        plan["lm_head.weight"] = plan["embed_tokens.weight"]  # tied embeddings: read the embedding a second time
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    model = build_model(cfg, plan, dtype or _default_dtype(weight_types), dev, p, progress)
    model.name_or_path = str(p)
    return model


def _gguf_source(t, ours: str, cfg: ModelConfig, where: Path) -> Source:
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))
    heads = _rotary_heads(ours, cfg)

    def read(dtype: torch.dtype, device: torch.device) -> Tensor:
        w = _decode(t, torch.float32 if heads is not None else dtype)
        if heads is not None:
            w = from_interleaved(w, heads).to(dtype)
        return w.to(device)

    return Source(shape, torch.float32, f"{where.name}:{t.name}", read)


def gguf_tokenizer(path: Path | str, output_dir: Path | str | None = None):
    """The GGUF file's SentencePiece vocabulary as a llama2 Tokenizer (written into `output_dir`, else a temporary
    directory: the Tokenizer keeps its bytes and can be saved elsewhere); None if the file has no vocabulary."""
    reader = open_gguf(path)
    if reader.fields.get("tokenizer.ggml.tokens") is None:
        return None
    if output_dir is not None:
        return tokenizer_from_gguf(path, output_dir)
    with tempfile.TemporaryDirectory(prefix="llama2-gguf-tok-") as tmp:
        return tokenizer_from_gguf(path, tmp)
