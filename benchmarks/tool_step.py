"""Tool execution's cost in batched decoding, and against the loop a user would otherwise write.

    .venv/bin/python benchmarks/tool_step.py                          # runs/world-sft-tools (its recipe builds it)
    .venv/bin/python benchmarks/tool_step.py --checkpoint DIR --batch 16 --threads 2

A tool-tuned model (configs/world/sft-tools.yaml) answers the built-in world's held-out calculation questions, 16
at a time, greedy, with the calculator listed; every answer makes a call. Two ways:

- "engine": `SamplingParams(tools=...)`: the engine runs each call when the model closes it and feeds the result
  into the request's own slot at the next step (the results of the requests that called at the same step in one
  forward), in the batch with the others. The time inside the tool runs (parsing the call, running the tool,
  encoding the result) and inside the results' feeding is what tool execution adds; both are reported as a share
  of the rest of the run (the decode steps), the goal being < 10%.
- "client loop": what a user of an engine without tool execution (vLLM, transformers' generate) writes: generate
  until `</call>`, run the tools, send the whole text so far back as a new prompt and generate the rest (the same
  engine and batch size, so the difference is the loop, not the engine).

Both count the tokens the model sampled over wall time; rounds alternate, medians of the rounds' ratios are
reported, and whether both ways gave the same final answers. This is a script, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llama2.cpu import cpu_banner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/world-sft-tools")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--problems", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from llama2.chat import encode_dialog
    from llama2.checkpoint import load_checkpoint
    from llama2.checkpoint.runs import resolve_base
    from llama2.data.jsonl import read_jsonl
    from llama2.data.world import data_path
    from llama2.errors import Llama2Error
    from llama2.inference.engine import Engine
    from llama2.inference.generate import Generator, SamplingParams
    from llama2.tokenizer import Tokenizer, encode_continuation
    from llama2.tools import Toolbox, calculator_tool, final_answer, results_text, split_calls

    torch.set_num_threads(args.threads)
    print(cpu_banner())
    try:
        ckpt = resolve_base(args.checkpoint)
    except Llama2Error as e:
        raise SystemExit(f"{e}\nbuild it first: llama2 sft --config configs/world/sft-tools.yaml") from None
    model, tok = load_checkpoint(ckpt).eval(), Tokenizer(ckpt)
    box = Toolbox([calculator_tool()])
    rows = [obj for _, obj in read_jsonl(data_path("builtin:world/tools-gold.val.jsonl"))
            if obj["family"] == "calculation"][:args.problems]
    prompts = [encode_dialog(tok, r["messages"], tools=box.specs) for r in rows]
    gen = Generator(model, tok, max_batch_size=args.batch)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens)
    print(f"{ckpt}: {len(prompts)} held-out calculation questions, batch {args.batch}, {args.threads} threads, "
          f"greedy, at most {args.max_new_tokens} new tokens")

    spent = {"runs": 0.0, "feeds": 0.0}
    run_tools, prefill_ext = Engine._run_tools, Engine._prefill_extensions

    def timed(fn, key):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t0
        return wrapper

    Engine._run_tools, Engine._prefill_extensions = timed(run_tools, "runs"), timed(prefill_ext, "feeds")

    def sampled(c) -> int:
        return len(c.tokens) - sum(b - a for a, b in c.tool_spans)

    def engine_way():
        spent["runs"] = spent["feeds"] = 0.0
        t0 = time.perf_counter()
        done = gen.generate(prompts, greedy.replace(tools=box))
        wall = time.perf_counter() - t0
        return wall, dict(spent), sum(sampled(c) for c in done), [final_answer(c.text) for c in done], done

    def client_loop():
        t0 = time.perf_counter()
        first = gen.generate(prompts, greedy.replace(stop=["</call>"]))
        again, index, n = [], [], sum(len(c.tokens) for c in first)
        for i, c in enumerate(first):
            _, calls, _ = split_calls(c.text)
            if c.finish_reason == "stop" and calls:
                box.run(calls)
                ids = prompts[i] + c.tokens + encode_continuation(tok, results_text([x.result for x in calls]))
                again.append(ids)
                index.append(i)
        answers = [final_answer(c.text) for c in first]
        rest = [greedy.replace(max_new_tokens=max(1, args.max_new_tokens - len(ids) + len(prompts[i])))
                for ids, i in zip(again, index)]
        for i, c in zip(index, gen.generate(again, rest) if again else []):
            answers[i] = final_answer(c.text)
            n += len(c.tokens)
        return time.perf_counter() - t0, n, answers

    engine_way()  # warm-up (allocations, the kernel's first calls)
    ratios, shares, runs, rates = [], [], [], {"engine": [], "loop": []}
    for _ in range(args.repeats):
        wall, tool_s, n, answers, done = engine_way()
        loop_wall, loop_n, loop_answers = client_loop()
        rates["engine"].append(n / wall)
        rates["loop"].append(loop_n / loop_wall)
        ratios.append((n / wall) / (loop_n / loop_wall))
        rest = wall - tool_s["runs"] - tool_s["feeds"]
        shares.append((tool_s["runs"] + tool_s["feeds"]) / rest)
        runs.append(tool_s["runs"] / rest)
    Engine._run_tools, Engine._prefill_extensions = run_tools, prefill_ext
    calls = sum(len(c.tool_calls) for c in done)
    same = sum(a == b for a, b in zip(answers, loop_answers))
    print(f"calls made: {calls} in {len(done)} answers; final answers equal both ways: {same}/{len(done)}")
    print(f"engine: {statistics.median(rates['engine']):.0f} sampled tokens/s; client loop: "
          f"{statistics.median(rates['loop']):.0f} tokens/s")
    print(f"tool execution / the rest of the run (the decode steps): runs (parse, run, encode the results) "
          f"{100 * statistics.median(runs):.1f}%, with the results fed into the slots "
          f"{100 * statistics.median(shares):.1f}% (goal < 10%)")
    print(f"ratio engine / client loop: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
