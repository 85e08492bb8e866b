"""Generating from an FSDP2-sharded policy (PPO, rejection sampling) with the weights gathered once per rollout.

FSDP2 all-gathers a module's parameters in its pre-forward hook and frees them in its post-forward hook, so a
decode loop would all-gather the whole model for every token (the Llama 2 paper notes a ~20x slowdown of
generation from this). `gathered_for_generation(model)` unshards every FSDP module once (one all-gather per
parameter group), makes the forward hooks keep them (reshard_after_forward off, so each pre-forward unshard is a
no-op), and on exit restores the modules' settings and frees the gathered weights:

    with gathered_for_generation(policy):
        rollouts = Generator(policy, tokenizer).generate(prompts, params)   # no all-gather per token
    loss = ...sequence_logprobs(policy, tokens, mask)...                    # training as usual after

Every rank must enter and leave it together (the all-gathers are collective). Inside, forward passes do not
communicate, so each rank may generate from its own prompts for as many tokens as it needs. A model without FSDP
modules passes through unchanged. Memory: the full weights are resident on every rank while inside.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


def is_fsdp(model: nn.Module) -> bool:
    """Whether any module of model is FSDP2-sharded (fully_shard)."""
    return bool(_fsdp_modules(model))


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    # A model can only be sharded once torch.distributed.fsdp was imported (fully_shard lives there); that import
    # takes ~1 s, so an unsharded model (every single-process run) never pays it.
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is None:
        return []
    return [m for m in model.modules() if isinstance(m, fsdp.FSDPModule)]


def _reshard_after_forward(module: nn.Module) -> bool:
    """The module's current reshard_after_forward setting (FSDP2 keeps it per parameter group)."""
    groups = module._get_fsdp_state()._fsdp_param_groups
    return any(g.post_forward_mesh_info is not None for g in groups)


@contextmanager
def gathered_for_generation(model: nn.Module) -> Iterator[nn.Module]:
    """Unshard every FSDP2 module of model once and keep it unsharded until exit (see the module docstring).
    Yields model itself."""
    modules = _fsdp_modules(model)
    if not modules:
        yield model
        return
    settings = [(m, _reshard_after_forward(m)) for m in modules]
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
        for m in modules:
            m.unshard()
        yield model
    finally:
        for m, reshard in settings:
            m.set_reshard_after_forward(reshard, recurse=False)
        for m in modules:
            m.reshard()
