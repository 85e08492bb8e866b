"""Instruction adherence over many turns (the paper's Table 30 and Figure 10), the measure of Ghost Attention.

`adherence(...)` (`llama2 eval gatt`): each checkable instruction as the system message, later user turns from
held-out dialogues, greedy answers turn by turn (the context trimmed as `llama2 chat` trims it), and the share of
answers that pass the instruction's checker at each turn. `attention_figure` draws where the last turn's tokens
look: the attention mass on the system message, layer by layer.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..chat import B_INST, B_SYS, encode_dialog
from ..chat_session import ChatSession
from ..checkpoint import load_checkpoint
from ..checkpoint.runs import load_tokenizer, resolve_base
from ..data.dialogues import ensure_dialogues, read_dialogues, user_turns, without_system
from ..data.instructions import CHECKABLE, USER_FAMILIES, Instruction, instruction
from ..errors import Llama2Error
from ..figures import pyplot, save_png
from ..inference.generate import Generator, SamplingParams
from ..inference.prefix_cache import BLOCK
from ..model import Attention, apply_rope
from ..train.memory import kv_cache_bytes


PREFIX_CACHE_BYTES = 1 << 30  # the most keys and values TurnByTurn keeps across turns


class TurnByTurn:
    """Greedy or sampled answers, one turn at a time, for many dialogues at once (the one generation path);
    the context is trimmed as `llama2 chat` does (the oldest exchanges dropped, the system message kept)."""

    def __init__(self, model: Any, tokenizer: Any, max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, batch_size: int = 64) -> None:
        self.model, self.tok = model, tokenizer
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        # 64 dialogues a step rather than 16: the same greedy answers, ~25% faster for the world model on 2 cores
        self.batch_size = batch_size

    def answers(self, systems: Sequence[str | None], users: Sequence[Sequence[str]],
                per_turn: Callable[[int, str], str] | None = None) -> list[list[str]]:
        """Answers to every dialogue's user turns (per_turn(i, user) rewrites the user message of turn i)."""
        context = self.model.config.max_seq_len
        sessions = [ChatSession(self.tok, context, self.max_new_tokens, system=s) for s in systems]
        # every dialogue's keys and values kept from turn to turn (as much as PREFIX_CACHE_BYTES holds): a turn
        # computes only its new user message, not the whole dialogue again (the same answers, 1.6x faster over
        # 20 turns of the world model)
        per_position = kv_cache_bytes(self.model.config, 1, 1, next(self.model.parameters()).element_size())
        positions = min(len(users) * context, PREFIX_CACHE_BYTES // per_position)
        gen = Generator(self.model, self.tok, max_batch_size=self.batch_size,
                        prefix_cache=positions if positions >= BLOCK else 0)
        out: list[list[str]] = [[] for _ in users]
        for t in range(max(len(u) for u in users)):
            live = [i for i, u in enumerate(users) if t < len(u)]
            prompts, params = [], []
            for i in live:
                text = per_turn(t, users[i][t]) if per_turn else users[i][t]
                prompts.append(sessions[i].prepare(text).tokens)
                params.append(SamplingParams(temperature=self.temperature, top_p=1.0,
                                             max_new_tokens=self.max_new_tokens, seed=self.seed + 7919 * i + t))
            with torch.no_grad():
                done = gen.generate(prompts, params)
            for i, c in zip(live, done):
                answer = c.text.strip()
                text = per_turn(t, users[i][t]) if per_turn else users[i][t]
                sessions[i].add_turn(text, answer or "...")
                out[i].append(answer)
        return out


def adherence(model: Any, tokenizer: Any, instructions: Sequence[Instruction], users: Sequence[Sequence[str]],
              max_new_tokens: int = 32) -> dict[str, list[float]]:
    """Per checkable family, the share of dialogues whose greedy answer at turn t passes the checker (t = 1..the
    dialogues' length), with each instruction as the system message of every dialogue."""
    return adherence_of(model, tokenizer, [(inst, u) for inst in instructions for u in users], max_new_tokens)


def adherence_of(model: Any, tokenizer: Any, pairs: Sequence[tuple[Instruction, Sequence[str]]],
                 max_new_tokens: int = 32) -> dict[str, list[float]]:
    """Per checkable family, the share of its (instruction, dialogue) pairs whose greedy answer at turn t passes
    the instruction's checker (t = 1..the dialogues' length), the instruction as the system message."""
    checked = [(inst, u) for inst, u in pairs if inst.check is not None]
    # every dialogue in one batch per turn (greedy answers do not depend on the batch)
    answers = TurnByTurn(model, tokenizer, max_new_tokens).answers([inst.text for inst, _ in checked],
                                                                   [u for _, u in checked])
    fams: dict[str, list[list[bool]]] = {}
    for (inst, _), row in zip(checked, answers):
        fams.setdefault(inst.family, []).append([inst.check(a) for a in row])
    return {f: [sum(r[t] for r in rows) / len(rows) for t in range(len(rows[0]))] for f, rows in fams.items()}


def adherence_report(ckpt: Path | str, turns: int, dialogues: int, seed: int = 0, max_new_tokens: int = 32,
                     device: str = "cpu", families: Sequence[str] | None = None,
                     source: Path | None = None) -> dict[str, Any]:
    """Adherence by turn for `ckpt` on held-out dialogues' user turns (`source`: a dialogues file; default the
    built-in held-out dialogues): {"turns", "families": {f: [per turn]}}."""
    path = resolve_base(str(ckpt))  # a `llama2 gatt` run: its fine-tuned model
    model = load_checkpoint(path, kind="causal_lm", device=device).eval()
    rng = random.Random(seed)
    held = read_dialogues(source or ensure_dialogues(quiet=True)[1]).dialogues
    plain = without_system(held)
    users = user_turns(plain[:dialogues], turns, rng, borrow_from=plain)
    # each dialogue its own draw of the family's instruction (the word to end with, to mention, ...): a family's
    # figure is not one word's
    pairs = [(instruction(f, rng), u) for f in (families or [*CHECKABLE, *USER_FAMILIES]) for u in users]
    texts: dict[str, list[str]] = {}
    for inst, _ in pairs:
        texts.setdefault(inst.family, []).append(inst.text)
    return {"checkpoint": str(path), "turns": turns, "dialogues": len(users),
            "instruction": "the system message, kept when old exchanges are dropped to fit the context",
            "instructions": texts, "families": adherence_of(model, load_tokenizer(path), pairs, max_new_tokens)}


def adherence_rows(reports: dict[str, dict[str, Any]], turns: Sequence[int] = (1, 2, 4, 6, 20)
                   ) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): one row per (model, family), adherence % at the given turns (those the reports have), as
    the paper's Table 30 (turns 2, 4, 6, 20)."""
    n = min(r["turns"] for r in reports.values())
    cols = [t for t in turns if t <= n] or [n]
    rows = [[name, fam, *(f"{100 * per[t - 1]:.0f}%" for t in cols)]
            for name, r in reports.items() for fam, per in r["families"].items()]
    return ["model", "instruction", *(f"turn {t}" for t in cols)], rows


def adherence_table(reports: dict[str, dict[str, Any]], turns: Sequence[int] = (1, 2, 4, 6, 20)) -> str:
    """adherence_rows as a Markdown table."""
    headers, rows = adherence_rows(reports, turns)
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def adherence_plot(reports: dict[str, dict[str, Any]], path: Path) -> Path:
    """A PNG: adherence against turn, one panel per family, one line per model."""
    plt = pyplot()


    fams = sorted({f for r in reports.values() for f in r["families"]})
    fig, axes = plt.subplots(1, len(fams), figsize=(3.6 * len(fams), 3.2), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        for name, r in reports.items():
            per = r["families"].get(fam)
            if per:
                ax.plot(range(1, len(per) + 1), [100 * x for x in per], "o-", markersize=3, label=name)
        ax.set_title(fam)
        ax.set_xlabel("turn")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("adherence (%)")
    axes[0][0].legend(fontsize=8)
    save_png(fig, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Where the last turn looks (the paper's Figure 10)


@torch.no_grad()
def attention_maps(model: Any, tokens: Sequence[int]) -> torch.Tensor:
    """(n_layers, T, T): each layer's attention probabilities for one sequence, averaged over heads (recomputed
    from each attention module's inputs: q and k with their rotary embeddings, causal softmax)."""
    captured: list[tuple] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: captured.append((mod, args)))
             for m in model.modules() if isinstance(m, Attention)]
    try:
        model(torch.tensor([list(tokens)], device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    maps = []
    for mod, (x, cos, sin, *_rest) in captured:
        B, T, _ = x.shape
        q = mod.q_proj(x).view(B, T, mod.n_heads, mod.head_dim).transpose(1, 2)
        k = mod.k_proj(x).view(B, T, mod.n_kv_heads, mod.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = k.repeat_interleave(mod.n_heads // mod.n_kv_heads, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) / mod.head_dim ** 0.5
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        maps.append(scores.masked_fill(~causal, float("-inf")).softmax(-1)[0].mean(0))
    return torch.stack(maps)


def system_attention(model: Any, tokenizer: Any, messages: Sequence[dict[str, str]]) -> tuple[torch.Tensor, list[str]]:
    """For a dialogue ending with a user message (system message first): (n_layers, L) the attention mass each
    token of the last turn puts on the system message's tokens, per layer, and those L tokens' text."""
    if not messages or messages[0]["role"] != "system":
        raise Llama2Error("system_attention needs a dialogue that starts with a system message")
    ids = encode_dialog(tokenizer, messages)
    start = 1 + len(tokenizer.encode(f"{B_INST} {B_SYS}", bos=False))  # after BOS and the system tag
    end = 1 + len(tokenizer.encode(f"{B_INST} {B_SYS}{messages[0]['content'].strip()}", bos=False))
    last = max(i for i, t in enumerate(ids) if t == tokenizer.bos_id)
    maps = attention_maps(model, ids)
    return maps[:, last:, start:end].sum(-1), [tokenizer.decode([t]) for t in ids[last:]]


def attention_figure(models: dict[str, Any], tokenizer: Any, messages: Sequence[dict[str, str]], path: Path) -> Path:
    """A PNG heatmap per model: layers x the last turn's tokens, the attention mass on the system message, on one
    colour scale for all models (0 to the largest mass any of them puts there)."""
    plt = pyplot()
    maps = {name: system_attention(model, tokenizer, messages) for name, model in models.items()}
    top = max(float(mass.max()) for mass, _ in maps.values())
    top = min(1.0, max(0.05, math.ceil(top * 20) / 20))  # up to the next 0.05
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.2), squeeze=False)
    for ax, (name, (mass, words)) in zip(axes[0], maps.items()):
        im = ax.imshow(mass.cpu().numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=top)
        ax.set_title(f"{name}: attention on the system message")
        ax.set_ylabel("layer")
        ax.set_yticks(range(mass.shape[0]))
        ax.set_xticks(range(len(words)), [w.strip() or "_" for w in words], rotation=90, fontsize=6)
        fig.colorbar(im, ax=ax, label="share of attention")
    save_png(fig, path)
    return path
