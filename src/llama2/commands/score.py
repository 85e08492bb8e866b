"""`llama2 score RM --prompt TEXT --response TEXT | --input FILE.jsonl`: reward-model scores of answers."""

from __future__ import annotations

import argparse
import json
import sys

from ..device import add_device_args

HINT = 'each line must be {"prompt": text or chat messages ending with a user message, "response": text}'


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "score", help="score answers with a reward model (raw score and sigmoid)",
        description="Score (prompt, response) pairs with a reward model (a `llama2 reward` run or checkpoint, or "
                    "any LlamaForSequenceClassification directory with one label and tokenizer.model). The pair is "
                    "read as the completed chat turn and scored at its final EOS. With --prompt/--response: one "
                    "line, 'score RAW  prob SIGMOID'. With --input: one JSON line per input line on stdout, "
                    '{"score": raw, "prob": sigmoid}.')
    p.add_argument("model", metavar="RM", help="reward-model checkpoint directory or training run")
    p.add_argument("--prompt", help="the user message ('-' reads it from stdin)")
    p.add_argument("--response", help="the answer to score")
    p.add_argument("--system", default=None, help="a system message before the prompt (with --prompt)")
    p.add_argument("--input", metavar="FILE.jsonl", help="score every line of a JSONL file of prompt/response pairs")
    p.add_argument("--batch-tokens", type=int, default=16_384, help="padded tokens per scoring batch")
    add_device_args(p)
    p.set_defaults(func=run)


def _pairs(path: str) -> tuple[list, list[str]]:
    from ..chat import validate_dialog
    from ..data.jsonl import field_problem, read_jsonl
    from ..errors import Llama2Error

    prompts, responses = [], []
    reader = read_jsonl(path, hint=HINT, arrays=False)
    for lineno, obj in reader:  # a bad line raises BadLine ("FILE:LINE: reason; hint")
        problem = field_problem(obj, "response", str, "a string")
        prompt = obj.get("prompt")
        if problem is None and (not isinstance(prompt, (str, list)) or not prompt):
            problem = '"prompt" must be text or a non-empty list of chat messages'
        if problem is None and isinstance(prompt, list):
            try:
                validate_dialog(prompt, complete=False)
            except Llama2Error as e:
                problem = str(e)
        if problem is not None:
            reader.bad(lineno, problem)
            continue
        prompts.append(prompt)
        responses.append(obj["response"])
    if not prompts:
        raise Llama2Error(f"{path}: no lines to score; {HINT}")
    return prompts, responses


def run(args: argparse.Namespace) -> int:
    from ..device import resolve_device, resolve_dtype
    from ..errors import Llama2Error
    from ..reward import RewardModel, sigmoid

    if (args.input is None) == (args.prompt is None):
        raise Llama2Error("give either --prompt TEXT --response TEXT, or --input FILE.jsonl")
    if args.prompt is not None and args.response is None:
        raise Llama2Error("--prompt needs --response (the answer to score)")
    if args.input is not None and (args.response is not None or args.system is not None):
        raise Llama2Error("--input takes the prompts and responses from the file; drop --response / --system")
    if args.input is not None:
        prompts, responses = _pairs(args.input)
    else:
        text = sys.stdin.read() if args.prompt == "-" else args.prompt
        prompts = [([{"role": "system", "content": args.system}] if args.system else []) +
                   [{"role": "user", "content": text}]]
        responses = [args.response]
    device = resolve_device(args.device)
    rm = RewardModel.load(args.model, device=device, dtype=resolve_dtype(args.dtype, device),
                          max_batch_tokens=args.batch_tokens)
    scores = rm.score(prompts, responses)
    if args.input is None:
        print(f"score {scores[0]:.4f}  prob {sigmoid(scores[0]):.4f}")
    else:
        out = sys.stdout
        for s in scores:
            out.write(json.dumps({"score": round(s, 6), "prob": round(sigmoid(s), 6)}) + "\n")
        out.flush()
    if rm.truncated:
        print(f"note: {rm.truncated} pair(s) longer than the model's context kept only their last "
              f"{rm.max_seq_len} tokens", file=sys.stderr)
    return 0
