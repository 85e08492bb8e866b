"""Chat answers to prompts through the one generation path, for the evaluations (red teaming, model comparison)
and the safety distillation: each prompt's messages (anything with `.messages`) encoded with the chat format,
batched through `Generator`, prompt i sampled with seed `seed + i`, the answer cut to fit the context."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..chat import encode_dialog
from ..checkpoint import load_checkpoint
from ..checkpoint.runs import load_tokenizer, resolve_base
from ..inference.generate import Generator, SamplingParams

EVAL_TEMPERATURE, EVAL_TOP_P = 0.1, 0.9  # the paper's evaluation decoding


def answer(model_or_checkpoint: Any, prompts: Sequence[Any], *, max_new_tokens: int = 96,
           temperature: float = EVAL_TEMPERATURE, top_p: float = EVAL_TOP_P, seed: int = 0, batch_size: int = 32,
           device: str = "cpu", quantize: str | None = None, system: str | None = None, prefill: str = "",
           quiet: bool = True) -> list[str]:
    """A model's answers to each prompt through the one generation path (`system`: a system message put before
    each prompt's own messages, e.g. a safety pre-prompt; `prefill`: text the answer starts with, generation
    continues it); a checkpoint path is loaded first."""
    model, tok = _load(model_or_checkpoint, device)
    context = model.config.max_seq_len
    gen = Generator(model, tok, max_batch_size=min(batch_size, max(1, len(prompts))), quantize=quantize)
    out: list[str] = []
    desc = f"answers ({Path(str(model_or_checkpoint)).name})" if not isinstance(model_or_checkpoint, tuple) else "answers"
    with tqdm(total=len(prompts), unit="prompt", desc=desc, disable=quiet, dynamic_ncols=True) as bar:
        for lo in range(0, len(prompts), batch_size):
            ids, params = [], []
            for i, p in enumerate(prompts[lo:lo + batch_size], start=lo):
                prompt_ids = encode_dialog(tok, with_system(p.messages, system))
                if prefill:
                    prompt_ids = prompt_ids + tok.encode(prefill, bos=False)
                room = max(1, min(max_new_tokens, context - min(len(prompt_ids), context - 1)))
                ids.append(prompt_ids)
                params.append(SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=room,
                                             seed=seed + i, truncate=True))
            with torch.no_grad():
                out.extend(f"{prefill} {c.text.strip()}".strip() for c in gen.generate(ids, params))
            bar.update(len(ids))
    return out


def with_system(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """`messages` with `system` as the system message (before an existing one, which it extends)."""
    if not system:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{system}\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def _load(model_or_checkpoint: Any, device: str) -> tuple[Any, Any]:
    if isinstance(model_or_checkpoint, tuple):
        return model_or_checkpoint

    ckpt = resolve_base(str(model_or_checkpoint))
    return load_checkpoint(ckpt, kind="causal_lm", device=device).eval(), load_tokenizer(ckpt)


__all__ = ["EVAL_TEMPERATURE", "EVAL_TOP_P", "answer", "with_system"]
