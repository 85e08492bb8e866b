"""2. Generating: batched greedy generation through the one generation path, each batched row checked against
the same prompt generated alone."""

from __future__ import annotations

import time

from ...checkpoint import load_model
from ...tokenizer import Tokenizer
from ..report import Section
from .artifacts import Pretrained
from .common import Demo, Done, generate
from .pretrain import FALLBACK_PROMPTS

NEW_TOKENS = 24

FLOOR_S = 0.5  # seconds it takes on the reference machine, 2 idle cores

def run(demo: Demo, section: Section, pretrained: Pretrained) -> Done[None]:
    model, tok = load_model(pretrained.checkpoint), Tokenizer(pretrained.checkpoint)
    prompts = FALLBACK_PROMPTS
    if demo.gold is not None:  # the world's openings: a fact, a mayor, a sum
        person = next(iter(demo.gold.world.people.values()))
        town = demo.gold.world.towns[0]
        prompts = (f"{person.name} lives in", f"In 2020, the mayor of {town} was", "17 + 25 =")
    t0 = time.time()
    batched = generate(model, tok, prompts, NEW_TOKENS)
    alone = [generate(model, tok, [p], NEW_TOKENS)[0] for p in prompts]
    same = sum(a == b for a, b in zip(batched, alone))
    demo.results["batched_equals_alone"] = f"{same}/{len(prompts)}"
    section.text("Greedy decoding with the KV cache, the three prompts (of different lengths) in one left-padded "
                 f"batch; each row is compared with the same prompt generated alone: {same} of {len(prompts)} "
                 f"identical. {time.time() - t0:.1f} s for both runs.")
    section.samples(prompts, {"completion (batched)": batched})
    return Done(f"generation: 3 batched greedy completions, {same}/{len(prompts)} identical to one-at-a-time", None)
