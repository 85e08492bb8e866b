"""Process groups and model sharding (FSDP2), activation checkpointing and torch.compile per block.

Launch: `torchrun --nproc-per-node N llama2 pretrain ...` on one machine, or on each of M machines
`torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id RUN llama2 ...`.
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything runs in one process, unsharded.
Backends: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import functools
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..device import resolve_device
from ..errors import Llama2Error
from ..model import Block


@dataclass
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun job if there is one (idempotent) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if world > 1 and local_rank >= torch.cuda.device_count():
            raise Llama2Error(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node; "
                              "lower --nproc-per-node")
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, **kwargs)
    return DistEnv(rank, world, local_rank, dev)


def shutdown() -> None:
    """Leave the process group, after every process got here: tearing down gloo while a peer still works (rank
    0 writing samples, say) can abort the process that left first. Unreachable models and optimizers are
    collected first, while the group and the interpreter are alive: gloo work objects left holding tensors until
    interpreter finalisation abort the process ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        try:
            dist.barrier()
        except RuntimeError:  # a peer already failed; leave anyway
            pass
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few float64 numbers over all processes."""
    if not env.enabled:
        return list(values)
    dev = env.device if env.device.type == "cuda" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """Rank 0's `obj` on every process."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    """Every process's `obj`, in rank order, on every process."""
    if not env.enabled:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_tensor(t: Tensor, env: DistEnv) -> Tensor:
    """Rank 0's tensor (same shape and dtype on every process) on every process, through the backend's device."""
    if not env.enabled:
        return t
    dev = env.device if env.device.type == "cuda" else torch.device("cpu")
    moved = t.to(dev)
    dist.broadcast(moved, src=0)
    return moved


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the unit of sharding, recomputation and compilation."""
    return [m for m in model.modules() if isinstance(m, Block)]


def _checkpointed(module: nn.Module, forward, *args: Any, **kwargs: Any) -> Tensor:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every block's activations in backward (parameter names stay unchanged)."""
    for block in find_blocks(model):
        block.forward = functools.partial(_checkpointed, block, block.forward)  # type: ignore[method-assign]


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (names unchanged, so checkpoints are unaffected)."""
    for block in find_blocks(model):
        block.compile()


def shard_model(model: nn.Module, env: DistEnv, param_dtype: torch.dtype | None = None,
                training: bool = True) -> None:
    """FSDP2: fully_shard each block, then the root (embeddings, final norm, head).

    Parameters stay fp32 (the master weights); with param_dtype=bf16 they are gathered in bf16 for compute
    and gradients are reduced in fp32. training=False (a frozen reference model, forward only): every block
    is resharded after its forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # ~1 s to import: only when sharding

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs: dict[str, Any] = {"mp_policy": mp} if mp is not None else {}
    blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, reshard_after_forward=not training or i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)
