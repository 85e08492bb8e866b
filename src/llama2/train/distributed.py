"""Process groups and model sharding (FSDP2 or HSDP), activation checkpointing and torch.compile per block.

Launch: `torchrun --nproc-per-node N llama2 pretrain ...` on one machine, or on each of M machines
`torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id RUN llama2 ...`.
torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them everything runs in one process, unsharded.
Backends: NCCL on GPUs, gloo on CPU. Sharding (the recipe's `sharding`, `with_sharding`): fsdp shards every
parameter over all processes; hsdp shards it within groups of `shard_size` consecutive ranks (a node) and
replicates it across the groups (a 2-D DeviceMesh ("replicate", "shard")). Either way every process trains on
its own slice of the data: the data-parallel degree is the whole world.
"""

from __future__ import annotations

import dataclasses
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
    shard_size: int | None = None  # processes per shard group (HSDP); None: one group over the whole world
    mesh: Any = None  # HSDP's 2-D DeviceMesh ("replicate", "shard"); None: FSDP2's default (the whole world)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shards(self) -> int:
        """Processes a parameter is sharded over (the shard group's size)."""
        return self.shard_size or self.world_size

    @property
    def shard_rank(self) -> int:
        """This process's place in its shard group (which rows it holds)."""
        return self.rank % self.shards

    @property
    def first_replica(self) -> bool:
        """In the first shard group: the processes that write the sharded checkpoint files."""
        return self.rank < self.shards


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


def with_sharding(env: DistEnv, sharding: str = "fsdp", shard_size: int | None = None) -> DistEnv:
    """`env` for the recipe's `sharding`: fsdp leaves it as is (one shard group over the whole world); hsdp adds
    the 2-D mesh: groups of `shard_size` consecutive ranks (default LOCAL_WORLD_SIZE, torchrun's processes per
    node) shard, the groups replicate. Every process must call it (the mesh's process groups are collective)."""
    if sharding == "fsdp":
        return env
    if not env.enabled:
        raise Llama2Error("sharding=hsdp needs several processes started by torchrun (WORLD_SIZE is unset or 1); "
                          "launch with torchrun --nnodes M --nproc-per-node N, or set sharding=fsdp")
    size = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if size < 1:
        raise Llama2Error("sharding=hsdp: LOCAL_WORLD_SIZE (set by torchrun) is missing; set shard_size to the "
                          "processes per shard group")
    if env.world_size % size:
        raise Llama2Error(f"sharding=hsdp: {env.world_size} processes do not split into groups of shard_size {size}; "
                          f"set shard_size to a divisor of {env.world_size} (e.g. the processes per node)")
    from torch.distributed.device_mesh import init_device_mesh  # ~1 s to import: only when sharding

    mesh = init_device_mesh(env.device.type, (env.world_size // size, size), mesh_dim_names=("replicate", "shard"))
    return dataclasses.replace(env, shard_size=size, mesh=mesh)


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
    """FSDP2: fully_shard each block, then the root (embeddings, final norm, head), over env.mesh (HSDP: sharded
    within each group, replicated across groups) or the whole world.

    Parameters stay fp32 (the master weights); with param_dtype=bf16 they are gathered in bf16 for compute
    and gradients are reduced in fp32. training=False (a frozen reference model, forward only): every block
    is resharded after its forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # ~1 s to import: only when sharding

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs: dict[str, Any] = {"mp_policy": mp} if mp is not None else {}
    if env.mesh is not None:
        kwargs["mesh"] = env.mesh
    blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once by backward: keep them gathered
        fully_shard(block, reshard_after_forward=not training or i < len(blocks) - 1, **kwargs)
    fully_shard(model, **kwargs)
