"""Quality cost of lower-precision weights: held-out perplexity of our int8 / bf16 / fp16 against fp32, beside
llama.cpp (llama-cpp-python) on the very same weights exported with `llama2 convert --to gguf` (f32, f16, bf16,
q8_0). Our int8 and llama.cpp's q8_0 hold identical quantised weights (the exporter uses our quantiser).

    .venv/bin/python benchmarks/quant_quality.py                    # the tiny pretrain checkpoint, its val split
    .venv/bin/python benchmarks/quant_quality.py --checkpoint DIR --text held_out.jsonl --max-tokens 32768

Model: --checkpoint (default runs/tiny-pretrain/checkpoints/latest; a random tiny model with a freshly trained
1000-piece tokenizer if it is absent). Text: --text (.jsonl with a "text" field, or plain text; default the
validation split the tiny pretrain run held out, else the tail of Python's pydoc topics). Tokens are scored in
non-overlapping windows of the model's context (each document starts with BOS). Ours: fp32, weight-only int8
(`--quantize int8`), the model in bf16 and in fp16 (weights and activations, as `--dtype` runs it).
llama.cpp: its CPU backend with an f32 KV cache (--kv-cache f16 for its default), so only the weights differ.
This is a script, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from llama2.cpu import cpu_banner

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CKPT = ROOT / "runs" / "tiny-pretrain" / "checkpoints" / "latest"
DEFAULT_VAL = Path.home() / ".cache" / "llama2" / "pretrain-stdlib-code-v4096" / "corpus" / "val.jsonl"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_checkpoint(path: Path) -> Path:
    """A `latest` pointer file (holding a step directory's name) -> that directory."""
    if path.is_file() and not path.suffix:
        return path.parent / path.read_text().strip()
    return path


def random_model(work: Path):
    """A random dim-128 model and a 1000-piece tokenizer trained on pydoc topics (when no checkpoint exists)."""
    import sentencepiece as spm
    from pydoc_data.topics import topics

    from llama2.config import ModelConfig
    from llama2.model import Transformer
    from llama2.tokenizer import Tokenizer

    (work / "corpus.txt").write_text("\n".join(topics[k] for k in sorted(topics)))
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"), model_prefix=str(work / "tokenizer"), model_type="bpe", vocab_size=1000,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_name("tiny", vocab_size=1000)).eval(), Tokenizer(work)


def held_out_texts(path: Path | None) -> tuple[list[str], str]:
    if path is None and DEFAULT_VAL.is_file():
        path = DEFAULT_VAL
    if path is None:
        from pydoc_data.topics import topics

        text = "\n".join(topics[k] for k in sorted(topics))
        return [text[-200_000:]], "pydoc topics (tail)"
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r["text"] for r in rows], str(path)
    return [path.read_text(encoding="utf-8")], str(path)


def windows(tok, texts: list[str], length: int, max_tokens: int) -> list[list[int]]:
    """Non-overlapping windows of `length` tokens (length + 1 with the next window's first as the last target)."""
    stream: list[int] = []
    for t in texts:
        stream += tok.encode(t, bos=True)
        if len(stream) > max_tokens + 1:
            break
    stream = stream[:max_tokens + 1]
    return [stream[i:i + length + 1] for i in range(0, len(stream) - 1, length) if len(stream[i:i + length + 1]) > 1]


def nll_of_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")


def ours(model, wins: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL and argmax over all windows."""
    nll, top = [], []
    with torch.inference_mode():
        for w in wins:
            x, y = torch.tensor([w[:-1]]), torch.tensor(w[1:])
            logits = model(x)[0]
            nll.append(nll_of_logits(logits, y))
            top.append(logits.float().argmax(-1))
    return torch.cat(nll), torch.cat(top)


def llama_cpp_run(path: Path, wins: list[list[int]], n_ctx: int, threads: int, kv_f32: bool):
    import llama_cpp
    import numpy as np

    kw = dict(type_k=0, type_v=0) if kv_f32 else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(n_ctx, 256), n_batch=max(n_ctx, 256), logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False, **kw)
    nll, top = [], []
    try:
        for w in wins:
            llm.reset()
            llm.eval(w[:-1])
            logits = torch.from_numpy(np.array(llm.scores[:len(w) - 1]))
            nll.append(nll_of_logits(logits, torch.tensor(w[1:])))
            top.append(logits.argmax(-1))
    finally:
        llm.close()
    return torch.cat(nll), torch.cat(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT)
    ap.add_argument("--text", type=Path, default=None, help="held-out text (.jsonl with 'text', or plain text)")
    ap.add_argument("--max-tokens", type=int, default=16384, help="tokens scored (default 16384)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-cache", choices=["f32", "f16"], default="f32", help="llama.cpp's KV cache type")
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_banner()}")
    print(f"torch {torch.__version__}, {args.threads} thread(s)")

    from llama2.checkpoint import load_model
    from llama2.checkpoint.gguf import save_gguf
    from llama2.inference.quantize import quantize_int8
    from llama2.tokenizer import Tokenizer

    work = Path(tempfile.mkdtemp(prefix="quant-quality-"))
    ckpt = resolve_checkpoint(args.checkpoint)
    if ckpt.is_dir():
        model, tok = load_model(ckpt, dtype="fp32").eval(), Tokenizer(ckpt)
        what = str(ckpt.relative_to(ROOT) if ckpt.is_relative_to(ROOT) else ckpt)
    else:
        log(f"{ckpt} not found: a random tiny model instead")
        model, tok = random_model(work)
        what = "random tiny model"
    cfg = model.config
    texts, source = held_out_texts(args.text)
    wins = windows(tok, texts, cfg.max_seq_len, args.max_tokens)
    n = sum(len(w) - 1 for w in wins)
    print(f"model: {what} (dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads}/{cfg.n_kv_heads} heads, vocab "
          f"{cfg.vocab_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)")
    print(f"held-out text: {source}: {n} tokens in {len(wins)} windows of <= {cfg.max_seq_len}")

    runs: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    variants = {"llama2 fp32": lambda: model, "llama2 int8": lambda: quantize_int8(model),
                "llama2 bf16": lambda: load_model(ckpt, dtype="bf16").eval() if ckpt.is_dir()
                else model.to(torch.bfloat16),
                "llama2 fp16": lambda: load_model(ckpt, dtype="fp16").eval() if ckpt.is_dir()
                else model.float().to(torch.float16)}
    for label, make in variants.items():
        log(f"scoring {label} ...")
        t0 = time.perf_counter()
        nll, top = ours(make(), wins)
        runs[label] = (nll, top, time.perf_counter() - t0)
    model = model.float()
    if not args.no_llama_cpp:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            log("llama-cpp-python is not importable: llama.cpp rows skipped")
        else:
            for kind in ("f32", "f16", "bf16", "q8_0"):
                path = save_gguf(model, work / f"model-{kind}.gguf", tok, kind)
                log(f"scoring llama.cpp {kind} ({path.stat().st_size / 1e6:.1f} MB) ...")
                t0 = time.perf_counter()
                nll, top = llama_cpp_run(path, wins, cfg.max_seq_len, args.threads, args.kv_cache == "f32")
                runs[f"llama.cpp {kind}"] = (nll, top, time.perf_counter() - t0)

    base_nll, base_top, _ = runs["llama2 fp32"]
    base_ppl = math.exp(base_nll.mean().item())
    print(f"\nperplexity against our fp32 ({base_ppl:.4f}); llama.cpp KV cache {args.kv_cache}")
    print(f"  {'weights':16s} {'ppl':>9s} {'ppl ratio':>10s} {'delta ppl':>10s} {'delta %':>8s} "
          f"{'mean |dNLL|':>12s} {'argmax = fp32':>14s} {'time s':>7s}")
    for label, (nll, top, secs) in runs.items():
        ppl = math.exp(nll.mean().item())
        print(f"  {label:16s} {ppl:9.4f} {ppl / base_ppl:10.5f} {ppl - base_ppl:+10.4f} "
              f"{100 * (ppl / base_ppl - 1):+7.3f}% {(nll - base_nll).abs().mean().item():12.5f} "
              f"{100 * (top == base_top).float().mean().item():13.2f}% {secs:7.2f}")
    if "llama.cpp q8_0" in runs:
        ours_q, cpp_q = runs["llama2 int8"], runs["llama.cpp q8_0"]
        print(f"\nour int8 vs llama.cpp q8_0 (identical quantised weights): ppl {math.exp(ours_q[0].mean()):.4f} vs "
              f"{math.exp(cpp_q[0].mean()):.4f}, argmax agreement "
              f"{100 * (ours_q[1] == cpp_q[1]).float().mean().item():.2f}%")


if __name__ == "__main__":
    main()
