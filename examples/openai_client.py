"""Ask an OpenAI-compatible server a few greedy questions with the official `openai` client, and print the answers
as JSON: the same script for `llama2 serve`, vLLM's `vllm serve` or llama.cpp's `llama-server`.

    python examples/openai_client.py --base-url http://127.0.0.1:8000/v1 --model sft-hf

The tests run it against `llama2 serve` and `vllm serve` on the same checkpoint and compare the outputs.
"""

from __future__ import annotations

import argparse
import json

from openai import OpenAI

CHATS = [
    [{"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "What is a tokenizer?"}],
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "An apple."},
     {"role": "user", "content": "Another one?"}],
]
PROMPTS = ["The quick brown fox", "Return the value of", "If the object is a class instance, the method"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="the model name the server serves")
    p.add_argument("--api-key", default="none", help="the server's key, if it asks for one")
    p.add_argument("--max-tokens", type=int, default=24)
    args = p.parse_args()
    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=300)
    out = {"chat": [], "completions": []}
    for messages in CHATS:
        r = client.chat.completions.create(model=args.model, messages=messages, temperature=0,
                                           max_tokens=args.max_tokens)
        out["chat"].append({"content": r.choices[0].message.content, "finish_reason": r.choices[0].finish_reason,
                            "completion_tokens": r.usage.completion_tokens})
    for prompt in PROMPTS:
        r = client.completions.create(model=args.model, prompt=prompt, temperature=0, max_tokens=args.max_tokens)
        out["completions"].append({"text": r.choices[0].text, "finish_reason": r.choices[0].finish_reason,
                                   "completion_tokens": r.usage.completion_tokens})
    print(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
