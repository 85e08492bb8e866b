"""`llama2 demo`: the system end to end on a laptop CPU in a few minutes.

Builds the default corpus, a tokenizer and token shards (cached), pretrains a tiny Llama 2 with the shared
training loop, generates from it through the one generation path, encodes a dialogue in the chat format, and
round-trips the checkpoint through Meta's format — every step the library's own code, nothing faked.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..errors import Llama2Error

# The recipes live in the source checkout's configs/ (the quickstart installs the package in editable mode).
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "tiny" / "pretrain.yaml"
PROMPTS = ["Return the number of", "The default value is", "Raise ValueError if"]


def _say(text: str) -> None:
    """The demo's report always prints; `quiet` only turns off the progress bars and the loop's notes."""
    print(text, flush=True)


def run_demo(out: Path, steps: int, quiet: bool = False) -> dict:
    """Run every stage the project has so far; returns the figures it printed."""
    import torch

    from ..chat import encode_dialog
    from ..checkpoint import load_model, save_meta
    from ..inference.generate import Generator, SamplingParams
    from ..tokenizer import Tokenizer
    from ..train.config import PretrainRecipe, load_recipe
    from ..train.distributed import shutdown
    from ..stages.pretrain import pretrain

    if not RECIPE.is_file():
        raise Llama2Error(f"the demo recipe is missing ({RECIPE}); run the demo from a source checkout "
                          "(`./run demo`), where configs/ lives")
    started = time.time()
    _say(f"== 1. Pretraining a tiny Llama 2 on Python's docstrings ({steps} steps) -> {out}")
    recipe = load_recipe(PretrainRecipe, RECIPE, [f"out_dir={out / 'pretrain'}", f"max_steps={steps}",
                                                   f"save_every={steps}", f"eval_every={steps}"])
    try:
        result = pretrain(recipe, quiet=quiet)
    finally:
        shutdown()
    if result.checkpoint is None:
        raise Llama2Error("the demo's pretraining saved no checkpoint")
    ckpt = Path(result.checkpoint)
    figures = {"step": result.step, "loss": result.last.get("loss"), "val_loss": result.last.get("val_loss"),
               "checkpoint": str(ckpt)}
    _say(f"   step {result.step}: train loss {figures['loss']:.3f}"
                + (f", validation loss {figures['val_loss']:.3f}" if figures["val_loss"] is not None else ""))

    _say("\n== 2. Generating (greedy, KV cache, batched prompts of different lengths)")
    model = load_model(ckpt)
    tok = Tokenizer(ckpt)
    gen = Generator(model, tok)
    for c in gen.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=24)):
        _say(f"   {tok.decode(c.prompt_tokens)!r} -> {c.text!r}")

    _say("\n== 3. The Llama 2 chat format")
    dialog = [{"role": "system", "content": "Answer briefly."},
              {"role": "user", "content": "What does len() return?"}]
    ids = encode_dialog(tok, dialog)
    figures["dialog_tokens"] = len(ids)
    _say(f"   {len(ids)} tokens: BOS + {tok.decode(ids)!r}")
    answer = gen.generate([ids], SamplingParams(temperature=0.0, max_new_tokens=24))[0].text
    _say(f"   answer (a tiny pretrained model, not yet fine-tuned for chat): {answer!r}")

    _say("\n== 4. Checkpoint formats: Hugging Face -> Meta (2 model-parallel shards) -> Hugging Face")
    meta_dir = out / "meta"
    shutil.rmtree(meta_dir, ignore_errors=True)
    save_meta(model, meta_dir, shards=2)
    back = load_model(meta_dir)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    figures["meta_roundtrip_exact"] = same
    _say(f"   {meta_dir}: {sorted(p.name for p in meta_dir.iterdir())}; weights identical after the round "
                f"trip: {same}")
    if not same:
        raise Llama2Error("Meta round trip changed the weights (a bug: please report it)")

    figures["seconds"] = round(time.time() - started, 1)
    _say(f"\nDone in {figures['seconds']} s. Next:\n"
                f"   llama2 generate {ckpt} --prompt 'Return the'\n"
                f"   llama2 chat {ckpt}\n"
                f"   llama2 plot {out / 'pretrain'}\n"
                f"   llama2 pretrain --config configs/tiny/pretrain.yaml   (the full tiny recipe)")
    return figures
