"""`llama2 convert SRC DST --to hf|meta|gguf`: convert a checkpoint between the Hugging Face and Meta layouts, export
it to one GGUF file for llama.cpp / Ollama / LM Studio (`--dtype f32|f16|bf16|q8_0`), or read a GGUF file back
(SRC.gguf, llama-family, F32/F16/BF16/Q8_0 tensors dequantised)."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from ..errors import Llama2Error

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a checkpoint between the Hugging Face, Meta and GGUF (llama.cpp) layouts",
        description="Convert a checkpoint directory (Hugging Face: config.json + model*.safetensors; Meta: "
                    "params.json + consolidated.NN.pth) into the other layout, or re-shard / re-type it. "
                    "tokenizer.model is copied along when SRC (or, for a Meta download, its parent) has one. "
                    "--to gguf writes one .gguf file for llama.cpp, Ollama and LM Studio (weights, tokenizer, chat "
                    "template); SRC may also be a .gguf file (llama-family; F32/F16/BF16/Q8_0 tensors).")
    p.add_argument("src", type=Path, help="source checkpoint directory (layout detected) or .gguf file")
    p.add_argument("dst", type=Path, help="destination directory, or .gguf file for --to gguf (written atomically)")
    p.add_argument("--to", required=True, choices=["hf", "meta", "gguf"], help="layout to write")
    p.add_argument("--shards", type=int, default=1,
                   help="--to meta: number of model-parallel consolidated.NN.pth files (default 1)")
    p.add_argument("--max-shard-size", default="5GiB",
                   help="--to hf: largest model-*.safetensors file, e.g. 5GiB, 500MB (default 5GiB)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16; --to gguf: f32, f16, bf16 or q8_0 (default: "
                                                 "keep the source's dtype; a q8_0 GGUF is read back as fp32)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="--to gguf: the tokenizer.model (or its directory) to embed (default: SRC's, or its parent's "
                        "for a Meta download)")
    p.add_argument("--force", action="store_true", help="replace DST if it already holds files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", text.lower())
    if not m:
        raise Llama2Error(f"--max-shard-size {text!r}: expected a size such as 5GB or 500MB")
    unit = m.group(2).rstrip("b")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise Llama2Error(f"--max-shard-size {text!r} must be positive")
    return n


class CopyFiles:
    """A stand-in tokenizer whose save(directory) copies the given files there."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def save(self, directory: Path) -> None:
        for f in self.files:
            shutil.copy2(f, Path(directory) / f.name)


def tokenizer_for(src: Path, layout: str, to: str):
    """What to carry along: HF tokenizer files as they are, else tokenizer.model from SRC or its parent; the
    tokenizer.model is loaded first, so a corrupt one is an error here rather than in the converted checkpoint."""
    from ..tokenizer import Tokenizer

    if to == "hf" and (src / "tokenizer_config.json").is_file() and (src / "tokenizer.model").is_file():
        Tokenizer(src / "tokenizer.model")
        return CopyFiles([src / n for n in TOKENIZER_FILES if (src / n).is_file()])
    where = src / "tokenizer.model"
    if not where.is_file() and layout == "meta" and (src.parent / "tokenizer.model").is_file():
        where = src.parent / "tokenizer.model"  # Meta's download puts it beside the llama-2-* folders
    if not where.is_file():
        return None
    tokenizer = Tokenizer(where)
    # hf: writes tokenizer.model + tokenizer_config.json (with the chat template); meta: the file as it is
    return tokenizer if to == "hf" else CopyFiles([where])


def gguf_tokenizer_for(src: Path, layout: str, given: Path | None):
    """The Tokenizer a GGUF export embeds: --tokenizer, else SRC's tokenizer.model (or its parent's for Meta's
    download), else the vocabulary of a GGUF source; a clear error when there is none."""
    from ..tokenizer import Tokenizer

    if given is not None:
        return Tokenizer(given)
    if layout == "gguf":
        from ..checkpoint.gguf import gguf_tokenizer

        tok = gguf_tokenizer(src)
    else:
        where = src / "tokenizer.model"
        if not where.is_file() and layout == "meta" and (src.parent / "tokenizer.model").is_file():
            where = src.parent / "tokenizer.model"
        tok = Tokenizer(where) if where.is_file() else None
    if tok is None:
        raise Llama2Error(f"{src} has no tokenizer.model, and a GGUF file must carry its vocabulary; pass "
                          "--tokenizer PATH (the tokenizer.model the model was trained with)")
    return tok


def _check_gguf_dst(dst: Path, force: bool) -> None:
    if dst.is_dir():
        raise Llama2Error(f"{dst} is a directory; --to gguf writes one file (e.g. {dst / 'model.gguf'})")
    if dst.exists() and not force:
        raise Llama2Error(f"{dst} already exists; choose another destination or pass --force")
    if dst.suffix != ".gguf":
        raise Llama2Error(f"--to gguf writes a .gguf file; name the destination {dst.name}.gguf")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import detect_layout, load_model, save_meta, save_model
    from ..checkpoint.gguf import is_gguf, load_gguf, parse_gguf_dtype, save_gguf
    from ..dtypes import dtype_name, parse_dtype

    src, dst = args.src, args.dst
    from_gguf = src.suffix == ".gguf" or is_gguf(src)
    layout = "gguf" if from_gguf else detect_layout(src)
    if args.tokenizer is not None and args.to != "gguf":
        raise Llama2Error("--tokenizer applies to --to gguf; the other layouts copy SRC's tokenizer files")
    if args.to == "gguf":
        return _to_gguf(args, layout, load_gguf if from_gguf else load_model, parse_gguf_dtype, save_gguf)
    if dst.exists() and src.resolve() == dst.resolve():
        raise Llama2Error(f"SRC and DST are the same directory ({src}); choose another destination")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not args.force:
        raise Llama2Error(f"{dst} already exists and is not empty; choose another destination or pass --force")
    if args.shards < 1:
        raise Llama2Error(f"--shards must be at least 1, got {args.shards}")
    if args.to == "hf" and args.shards != 1:
        raise Llama2Error("--shards applies to --to meta; for --to hf use --max-shard-size")
    if args.dtype is not None and args.dtype.strip().lower() in ("q8_0", "q8"):
        raise Llama2Error(f"--dtype {args.dtype} is a GGUF type; --to {args.to} writes fp32, bf16 or fp16")
    dtype = parse_dtype(args.dtype)
    max_shard = parse_size(args.max_shard_size)
    if from_gguf:
        from ..checkpoint.gguf import gguf_tokenizer

        tokenizer = gguf_tokenizer(src)
    else:
        tokenizer = tokenizer_for(src, layout, args.to)
    progress = not args.quiet
    model = (load_gguf if from_gguf else load_model)(src, "cpu", dtype, progress=progress)
    if args.to == "hf":
        save_model(model, dst, tokenizer, max_shard_bytes=max_shard, dtype=dtype, progress=progress)
    else:
        save_meta(model, dst, args.shards, dtype=dtype, tokenizer=tokenizer, progress=progress)
    n = sum(p.numel() for p in model.parameters())
    dt = dtype_name(next(model.parameters()).dtype)
    tok = " + tokenizer" if tokenizer is not None else ""
    print(f"converted {src} ({layout}) -> {dst} ({args.to}, {n / 1e6:.1f}M parameters, {dt}{tok})")
    return 0


def _to_gguf(args: argparse.Namespace, layout: str, load, parse_gguf_dtype, save_gguf) -> int:
    """--to gguf: load SRC (any layout, or a GGUF file to re-type) and write DST.gguf with its tokenizer."""
    from ..dtypes import dtype_name

    src, dst = args.src, args.dst
    if args.shards != 1:
        raise Llama2Error("--shards applies to --to meta; a GGUF export is one file")
    if dst.exists() and src.resolve() == dst.resolve():
        raise Llama2Error(f"SRC and DST are the same file ({src}); choose another destination")
    _check_gguf_dst(dst, args.force)
    kind = parse_gguf_dtype(args.dtype)
    tokenizer = gguf_tokenizer_for(src, layout, args.tokenizer)
    progress = not args.quiet
    model = load(src, "cpu", None, progress=progress)
    from ..lora import lora_config, merge_lora

    if lora_config(model) is not None:  # an adapter directory: llama.cpp gets the merged weights
        model = merge_lora(model)
    save_gguf(model, dst, tokenizer, kind, name=src.stem if layout == "gguf" else src.name, progress=progress)
    n = sum(p.numel() for p in model.parameters())
    shown = kind or f"{dtype_name(next(model.parameters()).dtype)} kept"
    print(f"converted {src} ({layout}) -> {dst} (gguf {shown}, {n / 1e6:.1f}M parameters, "
          f"{dst.stat().st_size / 1e6:.1f} MB, tokenizer {tokenizer.vocab_size} pieces + chat template)")
    return 0
