"""3. The Llama 2 chat format: a dialogue encoded with `encode_dialog`, answered by the pretrained (not yet
fine-tuned) model."""

from __future__ import annotations

from ...chat import encode_dialog
from ...checkpoint import load_model
from ...tokenizer import Tokenizer
from ..report import Section
from .artifacts import Pretrained
from .common import Demo, Done, generate

DIALOG = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What does len() return?"}]

FLOOR_S = 0.5  # seconds it takes on the reference machine, 2 idle cores

def run(demo: Demo, section: Section, pretrained: Pretrained) -> Done[None]:
    model, tok = load_model(pretrained.checkpoint), Tokenizer(pretrained.checkpoint)
    dialog = DIALOG
    if demo.gold is not None:
        person = next(iter(demo.gold.world.people.values()))
        dialog = [DIALOG[0], {"role": "user", "content": f"Where does {person.name} live?"}]
    ids = encode_dialog(tok, dialog)
    demo.results["dialog_tokens"] = len(ids)
    answer = generate(model, tok, [ids], 24)[0]
    section.text(f"`encode_dialog` gives {len(ids)} tokens: BOS + the text below (Meta's `chat_completion` "
                 "format). The pretrained model's greedy answer (it has not been fine-tuned for chat yet):")
    section.samples([tok.decode(ids)], {"answer": [answer]})
    return Done(f"chat format: a {len(ids)}-token dialogue prompt", None)
