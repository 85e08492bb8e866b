"""`llama2 data corpus | prepare | info | dialogues | comparisons | adversarial`: build a deduplicated text corpus,
tokenise it into token shards, summarise a prepared shard directory, and build the built-in SFT dialogues,
reward-model comparisons and adversarial prompts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="data: build a corpus, token shards, built-in dialogues, comparisons",
                              description="Data: `corpus` gathers and deduplicates documents, `prepare` tokenises "
                                          "them into memory-mapped token shards, `info` summarises shards, "
                                          "`dialogues` writes the built-in SFT dialogues, `comparisons` the built-in "
                                          "reward-model comparisons.")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    c = sub.add_parser("corpus", help="build train.jsonl / val.jsonl / stats.json from text sources",
                       description="Gather documents from the sources, remove exact duplicates (normalised-text hash) "
                                   "and near duplicates (MinHash + LSH over word 5-shingles), hold out a validation "
                                   "split by document, and write OUTPUT/train.jsonl, OUTPUT/val.jsonl, "
                                   "OUTPUT/stats.json.")
    c.add_argument("--source", action="append", default=None, metavar="NAME",
                   help="default (= stdlib + pydoc), stdlib (standard-library docstrings), pydoc (pydoc_data "
                        "topics), stdlib-source (the standard library's modules, one document each), python-docs (needs "
                        "`apt-get install python3.11-doc`), files (the PATHS); repeat or "
                        "comma-separate for several; files is implied when PATHS are given without --source")
    c.add_argument("paths", nargs="*", type=Path, metavar="PATHS",
                   help=".txt files (one document each), .jsonl files (a \"text\" field per line) or "
                        "directories of them")
    c.add_argument("--output", "-o", type=Path, required=True, help="output directory")
    c.add_argument("--val-fraction", type=float, default=0.01, help="fraction of documents held out (default 0.01)")
    c.add_argument("--seed", type=int, default=0, help="seed of the validation split and document order")
    c.add_argument("--near-dup-threshold", type=float, default=0.8,
                   help="estimated Jaccard similarity at which a document is a near duplicate (default 0.8)")
    c.add_argument("--workers", type=int, default=None, help="processes parsing the standard library (default: CPUs)")
    c.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    c.set_defaults(func=corpus_handler)

    r = sub.add_parser("prepare", help="tokenise a corpus into memory-mapped token shards",
                       description="Tokenise documents into OUTPUT/{train,val}-NNNNN.bin (+ .idx.npy) and "
                                   "OUTPUT/manifest.json. Each document is BOS ... EOS. Rerunning the same command "
                                   "after an interruption resumes where it stopped.")
    r.add_argument("--tokenizer", type=Path, required=True, help="tokenizer.model or a directory holding one")
    r.add_argument("--input", nargs="+", type=Path, required=True, metavar="FILES_OR_CORPUS_DIR",
                   help="a corpus directory from `llama2 data corpus` (train.jsonl -> train, val.jsonl -> val) "
                        "and/or .jsonl/.txt files (into train, unless --val-fraction)")
    r.add_argument("--output", "-o", type=Path, required=True, help="output directory")
    r.add_argument("--workers", type=int, default=None, help="tokeniser threads (default: CPUs)")
    r.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard (default 50,000,000)")
    r.add_argument("--val-fraction", type=float, default=None,
                   help="send this fraction of the documents of plain input files to val (by a hash of the text)")
    r.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    r.set_defaults(func=prepare_handler)

    i = sub.add_parser("info", help="summarise a prepared token shard directory")
    i.add_argument("directory", type=Path)
    i.set_defaults(func=info_handler)

    d = sub.add_parser("dialogues", help="build the built-in instruction dialogues for SFT",
                       description="Write instruction dialogues whose answers are real text from this Python: a "
                                   "standard-library function's signature -> its docstring, a pydoc topic -> its "
                                   "text, a Python FAQ question -> its answer (when python3.11-doc is installed); "
                                   "single- and multi-turn, some with a system message. Source documents are held "
                                   "out whole: OUTPUT and OUTPUT's .val.jsonl sibling (dialogues.jsonl + "
                                   "dialogues.val.jsonl).")
    d.add_argument("--output", "-o", type=Path, required=True, help="training file, e.g. dialogues.jsonl")
    d.add_argument("--safety", action="store_true",
                   help="add the project's small synthetic safety set (harmful requests answered with refusals, "
                        "benign look-alikes answered helpfully)")
    d.add_argument("--val-fraction", type=float, default=0.05,
                   help="fraction of source documents held out (default 0.05)")
    d.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    d.add_argument("--stdlib-root", type=Path, default=None,
                   help="the standard-library directory to read (default: this Python's)")
    d.add_argument("--quiet", "-q", action="store_true", help="print nothing")
    d.set_defaults(func=dialogues_handler)

    m = sub.add_parser("comparisons", help="build the built-in comparisons (preference pairs) for reward models",
                       description="Write comparisons (a prompt, a chosen and a rejected answer, a rating) built from "
                                   "the built-in dialogues (built into the cache first when missing), plus a "
                                   "synthetic safety set. The rejected answer is made to match the rating: "
                                   "significantly_better: the rejected answer answers another question; "
                                   "better: it is the real answer with its words shuffled; "
                                   "slightly_better: it is the real answer cut off after 35-60% of its words; "
                                   "negligibly_better: it is the real answer with one or two words dropped, "
                                   "duplicated or swapped. Safety comparisons (all significantly_better) prefer a "
                                   "refusal for a harmful request and a helpful answer for a benign look-alike. "
                                   "Writes OUTPUT (one comparison per training dialogue) and OUTPUT's .val.jsonl "
                                   "sibling (all four ratings for every held-out dialogue).")
    m.add_argument("--output", "-o", type=Path, required=True, help="training file, e.g. comparisons.jsonl")
    m.add_argument("--seed", type=int, default=0, help="seed of the ratings, rejected answers and order")
    m.add_argument("--quiet", "-q", action="store_true", help="print nothing")
    m.set_defaults(func=comparisons_handler)

    a = sub.add_parser("adversarial", help="build the built-in adversarial prompt set (safety distillation, red team)",
                       description="Write the synthetic adversarial prompts (harmful requests and requests for "
                                   "unqualified advice, each asked directly, inside a role-play and as hypothetical "
                                   "fiction) and their benign look-alikes, with their risk categories: OUTPUT and its "
                                   ".val.jsonl sibling (held out by request, as the built-in safety comparisons).")
    a.add_argument("--output", "-o", type=Path, required=True, help="training file, e.g. adversarial.jsonl")
    a.add_argument("--seed", type=int, default=0, help="seed of the split and order")
    a.add_argument("--quiet", "-q", action="store_true", help="print nothing")
    a.set_defaults(func=adversarial_handler)

    w = sub.add_parser("world", help="build a built-in world (questions with gold answers) from a spec",
                       description="Writes every file of a built-in world (corpus, SFT dialogues, comparisons, "
                                   "prompts, adversarial prompts, gold questions; see docs/world.md) into OUTPUT. "
                                   "Recipes name the default world's files builtin:world/NAME; give these files' "
                                   "paths instead to train in another world.")
    w.add_argument("--output", type=Path, required=True, help="directory to write (replaced as a whole)")
    w.add_argument("--seed", type=int, default=0, help="the world's seed (default 0)")
    w.add_argument("--people", type=int, default=100, help="invented people (default 100)")
    w.add_argument("--towns", type=int, default=20, help="invented towns (default 20)")
    w.add_argument("--held-out", type=float, default=0.2, help="share of each question family held out (0.2)")
    w.add_argument("--annotator-noise", type=float, default=0.1,
                   help="standard deviation of the simulated annotator's noise on gold gaps (default 0.1)")
    w.add_argument("--careless", type=float, default=None,
                   help="share of the SFT demonstrations with a short answer that end with a needless pleasantry, "
                        "as careless writers add (default 0.8; 0 writes every demonstration carefully)")
    w.add_argument("--quiet", "-q", action="store_true")
    w.set_defaults(func=world_handler)


def _sources(args: argparse.Namespace) -> list[str]:
    if args.source is None:
        return ["files"] if args.paths else ["default"]
    return [s.strip() for arg in args.source for s in arg.split(",") if s.strip()]


def corpus_handler(args: argparse.Namespace) -> int:
    from ..data.corpus import build_corpus

    stats = build_corpus(_sources(args), args.paths, args.output, val_fraction=args.val_fraction, seed=args.seed,
                         near_dup_threshold=args.near_dup_threshold, quiet=args.quiet, workers=args.workers)
    tr, va = stats["splits"]["train"], stats["splits"]["val"]
    print(f"{stats['documents_in']} documents in, {stats['exact_duplicates_removed']} exact and "
          f"{stats['near_duplicates_removed']} near duplicates removed; train {tr['documents']} documents "
          f"({tr['chars']:,} chars), val {va['documents']} documents ({va['chars']:,} chars) -> {args.output}")
    return 0


def prepare_handler(args: argparse.Namespace) -> int:
    from ..data.prepare import prepare_shards

    m = prepare_shards(args.tokenizer, args.input, args.output, workers=args.workers, shard_tokens=args.shard_tokens,
                       val_fraction=args.val_fraction, quiet=args.quiet)
    parts = [f"{s} {v['tokens']:,} tokens / {v['documents']} documents / {len(v['shards'])} shards"
             for s, v in m["splits"].items()]
    print(f"{'; '.join(parts)} ({m['dtype']}) -> {args.output}")
    return 0


def dialogues_handler(args: argparse.Namespace) -> int:
    from ..data.dialogues import build_dialogues

    build_dialogues(args.output, safety=args.safety, val_fraction=args.val_fraction, seed=args.seed,
                    stdlib_root=args.stdlib_root, quiet=args.quiet)
    return 0


def comparisons_handler(args: argparse.Namespace) -> int:
    from ..data.comparisons import build_comparisons
    from ..data.dialogues import read_dialogues
    from ..data.dialogues import ensure_dialogues

    train, val = ensure_dialogues(quiet=args.quiet)
    build_comparisons(args.output, train_dialogues=read_dialogues(train).dialogues,
                      val_dialogues=read_dialogues(val).dialogues, seed=args.seed, quiet=args.quiet)
    return 0


def info_handler(args: argparse.Namespace) -> int:
    from ..data.shards import TokenShards, load_manifest

    m = load_manifest(args.directory)
    summary = {k: m[k] for k in ("format", "version", "tokenizer_sha256", "vocab_size", "dtype", "complete")
               if k in m}
    if m.get("complete"):
        for split in m["splits"]:
            TokenShards(args.directory, split)  # validates every shard file
    summary["splits"] = {s: {k: v[k] for k in ("tokens", "documents")} | {"shards": len(v["shards"])}
                         for s, v in m["splits"].items()}
    print(json.dumps(summary, indent=2))
    return 0


def adversarial_handler(args: argparse.Namespace) -> int:
    from ..data.adversarial import build_adversarial

    build_adversarial(args.output, seed=args.seed, quiet=args.quiet)
    return 0


def world_handler(args: argparse.Namespace) -> int:
    from ..data.world import WorldSpec
    from ..data.world.files import CARELESS, build_world
    from ..errors import Llama2Error

    if not 0 <= args.annotator_noise <= 1:
        raise Llama2Error(f"--annotator-noise must be in [0, 1], got {args.annotator_noise}")
    careless = CARELESS if args.careless is None else args.careless
    if not 0 <= careless <= 1:
        raise Llama2Error(f"--careless must be in [0, 1], got {careless}")
    spec = WorldSpec(seed=args.seed, people=args.people, towns=args.towns, held_out=args.held_out)
    build_world(args.output, spec, noise=args.annotator_noise, careless=careless, quiet=args.quiet)
    return 0
