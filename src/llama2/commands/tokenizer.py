"""`llama2 tokenizer train | from-gguf | encode | decode`."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenizer", help="train, import and try SentencePiece tokenizers",
                              description="Train a Llama 2 style SentencePiece BPE tokenizer, rebuild one from a "
                                          "GGUF vocabulary, or encode/decode text with one.")
    sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")

    t = sub.add_parser("train", help="train a SentencePiece BPE tokenizer with the Llama 2 settings")
    t.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help=".txt files (one sentence per line) or .jsonl files (a \"text\" field per line)")
    t.add_argument("--vocab-size", type=int, required=True, help="number of pieces (Llama 2: 32000)")
    t.add_argument("--output", required=True, help="directory to write tokenizer.model and tokenizer_config.json")
    t.add_argument("--max-sentence-length", type=int, default=16384,
                   help="lines longer than this many bytes are skipped (default 16384)")
    t.add_argument("--input-sentence-size", type=int, default=2_000_000,
                   help="at most this many sampled lines are used for training (0 = all; default 2,000,000)")
    t.add_argument("--reserved", nargs="+", default=[], metavar="TEXT",
                   help="strings kept as one piece each wherever they occur (SentencePiece user_defined_symbols; "
                        "no spaces), e.g. whole words or the chat tags '[INST]' '[/INST]' '<<SYS>>' '<</SYS>>'")
    t.add_argument("--quiet", action="store_true", help="no progress bar or SentencePiece log")
    t.set_defaults(func=_train)

    g = sub.add_parser("from-gguf", help="rebuild a tokenizer.model from a GGUF file's SentencePiece vocabulary")
    g.add_argument("gguf", help="a .gguf file with a 'llama' (SentencePiece) tokenizer")
    g.add_argument("--output", required=True, help="directory to write tokenizer.model and tokenizer_config.json")
    g.set_defaults(func=_from_gguf)

    e = sub.add_parser("encode", help="print the token ids of a text")
    e.add_argument("tokenizer", help="a tokenizer.model file or a directory holding one")
    e.add_argument("--text", required=True, help="the text to encode")
    e.add_argument("--no-bos", action="store_true", help="do not prepend BOS")
    e.add_argument("--eos", action="store_true", help="append EOS")
    e.add_argument("--pieces", action="store_true", help="print the pieces instead of the ids")
    e.set_defaults(func=_encode)

    d = sub.add_parser("decode", help="print the text of token ids")
    d.add_argument("tokenizer", help="a tokenizer.model file or a directory holding one")
    d.add_argument("ids", nargs="+", type=int, help="token ids")
    d.set_defaults(func=_decode)


def _train(args: argparse.Namespace) -> int:
    from ..data.tokenizer_training import train_tokenizer

    tok = train_tokenizer(args.input, args.vocab_size, args.output, max_sentence_length=args.max_sentence_length,
                          input_sentence_size=args.input_sentence_size, reserved=args.reserved, quiet=args.quiet)
    if not args.quiet:
        print(f"wrote {tok.model_path} ({tok.vocab_size} pieces, sha256 {tok.sha256[:16]}...)")
    return 0


def _from_gguf(args: argparse.Namespace) -> int:
    from ..tokenizer import tokenizer_from_gguf

    tok = tokenizer_from_gguf(args.gguf, args.output)
    print(f"wrote {tok.model_path} ({tok.vocab_size} pieces, sha256 {tok.sha256[:16]}...)")
    return 0


def _encode(args: argparse.Namespace) -> int:
    from ..tokenizer import Tokenizer

    tok = Tokenizer(args.tokenizer)
    ids = tok.encode(args.text, bos=not args.no_bos, eos=args.eos)
    print(" ".join(tok.id_to_piece(i) for i in ids) if args.pieces else " ".join(map(str, ids)))
    return 0


def _decode(args: argparse.Namespace) -> int:
    from ..tokenizer import Tokenizer

    print(Tokenizer(args.tokenizer).decode(args.ids))
    return 0
