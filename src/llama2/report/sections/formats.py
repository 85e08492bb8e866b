"""12. Checkpoint formats: Hugging Face -> Meta (2 model-parallel shards) -> Hugging Face, the weights checked
bit for bit."""

from __future__ import annotations

import torch

from ...checkpoint import load_model, save_meta
from ...errors import Llama2Error
from ..report import Section
from .artifacts import Pretrained
from .common import Demo, Done, say

FLOOR_S = 0.5  # seconds it takes on the reference machine, 2 idle cores

def run(demo: Demo, section: Section, pretrained: Pretrained) -> Done[None]:
    model = load_model(pretrained.checkpoint)
    meta_dir = demo.run_dir("meta")
    save_meta(model, meta_dir, shards=2)
    back = load_model(meta_dir)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    demo.results["meta_roundtrip_exact"] = same
    files = sorted(p.name for p in meta_dir.iterdir())
    section.text(f"The pretrained checkpoint written in Meta's layout for 2 model-parallel ranks ({', '.join(files)} "
                 f"in `{meta_dir}`) and read back: weights identical after the round trip: **{same}**.")
    say(f"   {meta_dir}: {files}; weights identical after the round trip: {same}")
    if not same:
        raise Llama2Error("Meta round trip changed the weights (a bug: please report it)")
    return Done(f"formats: HF -> Meta (2 shards) -> HF, weights identical: {same}", None)
