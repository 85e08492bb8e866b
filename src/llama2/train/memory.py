"""What a recipe needs per GPU: the bytes of each model, gradient, optimizer state, activation and KV cache the
training loop keeps, and a roofline estimate of its step time (`llama2 plan`).

The accounting follows what the loop does (train/loop.py, train/distributed.py):
- a trained model keeps fp32 master weights, fp32 gradients and AdamW's two fp32 moments (16 bytes per trained
  parameter), each sharded by FSDP2 over the GPUs of its shard group; frozen parameters (a LoRA run's base) keep
  only their fp32 weights;
- in bf16 FSDP2 gathers a block's weights in bf16 for compute: the block being computed, the next (prefetched),
  the last (kept for backward), and the embedding and head (the root);
- a frozen reference model (PPO, DPO, GRPO) is sharded like a trained one, weights only; the reward models are
  loaded whole on every GPU in bf16, or with `reward_models: sharded` (PPO, GRPO) sharded like the reference
  (fp32, the dtype the reward stage saves them in);
- activations saved for backward, per token of a micro-batch, per layer: 3 x dim + 2 x kv_dim + 4 x ffn_dim
  values in the compute dtype, and 3 x dim (the fp32 residual stream) + n_heads + 2 fp32 values (attention's
  log-sum-exp, the norms' 1/rms); outside the layers about 9-10 x dim bytes. With activation checkpointing each
  layer keeps only its fp32 input and one layer is recomputed at a time. The fused LM-head loss never stores
  (tokens x vocab) logits. (The tests hold these counts within 10% of what autograd's saved-tensor hooks see on
  the model itself.)
- rollouts (PPO, GRPO, rejection sampling) gather the whole policy on every GPU in the compute dtype and keep a
  KV cache for each sequence generated there; with `rollout_engine: vllm` (PPO, GRPO) they run on the vLLM
  server's own GPUs instead, and the trainer's GPUs hold neither. That server needs the policy's weights in the
  compute dtype plus the KV cache of the answers in flight at once (every trainer process sends up to
  MAX_IN_FLIGHT of its answers concurrently), split over its tensor-parallel GPUs (`RolloutServer`: the smallest
  of 1, 2, 4, 8 GPUs that holds them all, else 8 holding as many answers as fit, vLLM queueing the rest).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import ModelConfig
from ..errors import Llama2Error

GiB = 1 << 30


@dataclass(frozen=True)
class GPU:
    """An accelerator's memory (GB, 1e9 bytes), dense bf16 peak (TFLOP/s) and memory bandwidth (TB/s)."""

    name: str
    memory_gb: float
    bf16_tflops: float
    bandwidth_tbs: float


GPUS = {g.name: g for g in [
    GPU("a100-40gb", 40, 312, 1.555), GPU("a100-80gb", 80, 312, 2.039), GPU("h100-80gb", 80, 989, 3.35),
    GPU("h200", 141, 989, 4.8), GPU("l40s", 48, 362, 0.864),
]}


@dataclass(frozen=True)
class Parameters:
    """Parameter counts of a Llama shape, by part."""

    embedding: int
    head: int
    block: int
    final_norm: int
    layers: int

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.final_norm + self.layers * self.block

    @property
    def root(self) -> int:
        """What FSDP2 keeps outside the blocks: embedding, final norm and head."""
        return self.embedding + self.head + self.final_norm


def parameters(cfg: ModelConfig, head: int | None = None) -> Parameters:
    """Counts of a causal LM of shape cfg (head: the output rows, default the vocabulary; 1 for a reward or value
    model's score head)."""
    d, f, kv = cfg.dim, cfg.hidden_dim, (cfg.n_kv_heads or cfg.n_heads) * cfg.head_dim
    block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    rows = cfg.vocab_size if head is None else head
    return Parameters(cfg.vocab_size * d, rows * d, block, d, cfg.n_layers)


def activation_bytes(cfg: ModelConfig, tokens: int, compute_bytes: int, checkpointing: bool) -> int:
    """Bytes saved for backward by a micro-batch of `tokens` positions (see the module docstring)."""
    d = cfg.dim
    layer = layer_activation_bytes(cfg, compute_bytes)
    outside = 8 * d + compute_bytes * d
    if checkpointing:  # each block's fp32 input, and one block's activations while it is recomputed
        return tokens * (cfg.n_layers * 4 * d + layer + outside)
    return tokens * (cfg.n_layers * layer + outside)


def layer_activation_bytes(cfg: ModelConfig, compute_bytes: int) -> int:
    """Bytes one block saves for backward per token: 3 x dim + 2 x kv_dim + 4 x ffn_dim values in the compute
    dtype, and 3 x dim (the residual stream, kept in fp32 under autocast) + n_heads + 2 fp32 values."""
    d, f, kv = cfg.dim, cfg.hidden_dim, (cfg.n_kv_heads or cfg.n_heads) * cfg.head_dim
    return compute_bytes * (3 * d + 2 * kv + 4 * f) + 4 * (3 * d + cfg.n_heads + 2)


def kv_cache_bytes(cfg: ModelConfig, sequences: int, length: int, compute_bytes: int) -> int:
    kv = (cfg.n_kv_heads or cfg.n_heads) * cfg.head_dim
    return 2 * cfg.n_layers * kv * length * sequences * compute_bytes


@dataclass(frozen=True)
class RolloutServer:
    """What a vLLM rollout server needs (rollout_engine: vllm), all its GPUs together: the policy's weights, and
    the KV cache of one answer times the answers in flight at once."""

    weights: int
    per_sequence: int
    sequences: int
    sizes: tuple[int, ...] = (1, 2, 4, 8)  # tensor-parallel sizes tried (dividing the policy's heads)

    def tensor_parallel(self, usable: float) -> tuple[int, int]:
        """(tensor-parallel size, answers held at once) on GPUs of `usable` bytes: the smallest size whose share of
        the weights and of every answer's cache fits, else the largest size and the answers that fit beside the
        weights there (0: not even the weights fit)."""
        for tp in self.sizes:
            if (self.weights + self.sequences * self.per_sequence) / tp <= usable:
                return tp, self.sequences
        tp = self.sizes[-1]
        return tp, max(0, min(self.sequences, int((usable * tp - self.weights) // self.per_sequence)))


@dataclass
class Plan:
    """Per-GPU bytes of each part, in the phase that needs the most, and the time estimates."""

    rows: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    step_flops: float = 0.0  # per optimiser step (or per iteration), all GPUs together
    rollout_bytes_per_token: float = 0.0  # weights and cache read per decoded token step, per GPU
    rollout_tokens: int = 0  # decode steps per iteration
    server: RolloutServer | None = None  # rollout_engine: vllm, the rollouts' own GPUs

    def add(self, label: str, nbytes: float) -> None:
        if nbytes:
            self.rows.append((label, int(nbytes)))

    @property
    def total(self) -> int:
        return sum(b for _, b in self.rows)


@dataclass(frozen=True)
class Layout:
    """How the job is spread: GPUs per node, nodes, and the compute precision."""

    gpus_per_node: int = 8
    nodes: int = 1
    bf16: bool = True

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def compute_bytes(self) -> int:
        return 2 if self.bf16 else 4

    def check(self) -> None:
        if self.gpus_per_node < 1 or self.nodes < 1:
            raise Llama2Error(f"--gpus and --nodes must be >= 1, got {self.gpus_per_node} and {self.nodes}")


def trained_model(plan: Plan, label: str, p: Parameters, trainable: int, layout: Layout) -> None:
    """A model the optimiser updates: sharded fp32 weights, gradients and AdamW moments, and the bf16 blocks
    FSDP2 holds gathered for compute."""
    world = layout.world
    plan.add(f"{label}: weights (fp32, sharded over {world})", 4 * p.total / world)
    plan.add(f"{label}: gradients (fp32, sharded)", 4 * trainable / world)
    plan.add(f"{label}: AdamW moments (2 x fp32, sharded)", 8 * trainable / world)
    if world > 1:
        plan.add(f"{label}: gathered for compute (3 blocks + root)", layout.compute_bytes * (3 * p.block + p.root))


def frozen_sharded(plan: Plan, label: str, p: Parameters, layout: Layout) -> None:
    plan.add(f"{label}: weights (fp32, sharded)", 4 * p.total / layout.world)


def training_flops(p: Parameters, cfg: ModelConfig, tokens: int, seq_len: int) -> float:
    """Model FLOPs of forward and backward for `tokens` positions: 6 per (non-embedding) parameter per token plus
    attention, PaLM's 12 x layers x dim x sequence length per token. MFU counts these; activation checkpointing's
    extra forward is the hardware's overhead, not model FLOPs."""
    per_token = 6 * (p.total - p.embedding) + 12 * cfg.n_layers * cfg.dim * seq_len
    return per_token * tokens


def step_seconds(flops: float, gpu: GPU, layout: Layout, mfu: float) -> float:
    peak = gpu.bf16_tflops * 1e12 * (1 if layout.bf16 else 0.5)
    return flops / (layout.world * peak * mfu)
