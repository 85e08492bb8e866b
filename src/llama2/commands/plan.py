"""`llama2 plan --config RECIPE [key=value ...] [--gpu NAME] [--gpus N] [--nodes M]`: the memory each GPU needs
for a recipe, part by part, whether it fits, and a roofline estimate of its step time (llama2.train.memory)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

STAGE_OF_FILE = {"pretrain": "pretrain", "sft": "sft", "reward-helpfulness": "reward", "reward-safety": "reward",
                 "reward": "reward", "rejection": "rejection-sampling", "ppo": "ppo", "dpo": "dpo", "grpo": "grpo",
                 "gatt": "gatt", "distill-safety": "distill-safety"}
SIZES = ("7B", "13B", "34B", "70B")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="per-GPU memory of a recipe (weights, gradients, optimizer, activations, frozen models, KV "
                     "cache), whether it fits, and its step time at a given MFU",
        description="Plan a recipe on GPUs before renting them: the bytes each GPU holds for every part of the "
                    "stage (FSDP2 shards the trained and reference models over all GPUs), in the phase that needs "
                    "the most, against the GPU's memory; and a roofline step time (bf16 FLOPs at --mfu of the "
                    "GPU's peak). Nothing is allocated: the model is counted from its shape.")
    p.add_argument("--config", "-c", required=True, help="the recipe YAML, e.g. configs/70B/sft.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, as the stage takes them")
    p.add_argument("--stage", default=None, help="the recipe's stage (default: from its file name)")
    p.add_argument("--model", default=None, choices=SIZES,
                   help="the model shape when `base` is not a local checkpoint (default: the size in the recipe's "
                        "path, e.g. configs/70B/)")
    p.add_argument("--gpu", default="a100-80gb", help="the accelerator: a100-40gb, a100-80gb (default, what the paper "
                                                       "trained on), h100-80gb, h200 or l40s")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB", help="its memory, if not the table's")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the time (0.4)")
    p.add_argument("--headroom", type=float, default=0.1,
                   help="share of the memory kept free for the CUDA context and fragmentation (default 0.1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .. import pipeline
    from ..errors import Llama2Error
    from ..recipe import load_recipe
    from ..train.memory import GPUS, GiB, Layout, step_seconds

    stage = args.stage or STAGE_OF_FILE.get(Path(args.config).stem)
    if stage not in pipeline.STAGES:
        raise Llama2Error(f"cannot tell the stage of {args.config}; give --stage, one of {', '.join(pipeline.STAGES)}")
    if stage in ("gatt", "distill-safety"):
        raise Llama2Error(f"a {stage} recipe fine-tunes with an SFT recipe (its finetune.recipe): plan that one")
    if not 0 < args.mfu <= 1 or not 0 <= args.headroom < 1:
        raise Llama2Error(f"--mfu must be in (0, 1] and --headroom in [0, 1), got {args.mfu} and {args.headroom}")
    if args.gpu not in GPUS:
        raise Llama2Error(f"unknown --gpu {args.gpu!r}; choose from {', '.join(GPUS)}, or give --gpu-memory GB")
    recipe = load_recipe(pipeline.STAGES[stage].recipe, args.config, args.overrides)
    layout = Layout(args.gpus, args.nodes, bf16=getattr(recipe, "precision", "bf16") != "fp32")
    layout.check()
    gpu = GPUS[args.gpu]
    memory = (args.gpu_memory or gpu.memory_gb) * 1e9
    cfg = model_shape(recipe, stage, args)
    plan = plan_stage(stage, recipe, cfg, layout)
    usable = memory * (1 - args.headroom)
    print(f"{stage} recipe {args.config}: {shape_text(cfg)}; {layout.nodes} node(s) x {layout.gpus_per_node} "
          f"{gpu.name} ({memory / 1e9:.0f} GB each), {'bf16' if layout.bf16 else 'fp32'}")
    width = max(len(label) for label, _ in plan.rows)
    for label, nbytes in plan.rows:
        print(f"  {label:<{width}}  {size(nbytes)}")
    verdict = "fits" if plan.total <= usable else "does NOT fit"
    print(f"  {'total per GPU':<{width}}  {plan.total / GiB:9.2f} GiB   {verdict} in {usable / GiB:.1f} GiB "
          f"({memory / GiB:.1f} GiB less {args.headroom:.0%} headroom)")
    for note in plan.notes:
        print(f"  note: {note}")
    if plan.step_flops:
        sec = step_seconds(plan.step_flops, gpu, layout, args.mfu)
        steps = getattr(recipe, "max_steps", None)
        total = f"; {steps} steps: {sec * steps / 3600:.1f} h, {sec * steps * layout.world / 3600:,.0f} GPU-hours" \
            if steps else ""
        print(f"  time: {plan.step_flops:.3g} FLOPs per step, {sec:.2f} s at {args.mfu:.0%} MFU{total}")
    steps, per_step = plan.rollout_tokens, plan.rollout_bytes_per_token
    if plan.server is not None:
        tp, held = server_lines(plan.server, usable, gpu.name)
        waves = -(-plan.server.sequences // held) if held else 0  # vLLM queues what it cannot hold
        steps, per_step = steps * waves, (plan.server.weights + held * plan.server.per_sequence) / tp
    if steps:
        per_token = per_step / (gpu.bandwidth_tbs * 1e12)
        print(f"  rollouts: {steps} decode steps per iteration, at least {per_token * 1e3:.1f} ms each "
              f"(weights and cache read at {gpu.bandwidth_tbs} TB/s): {per_token * steps:.1f} s")
    return 0 if plan.total <= usable else 1


def server_lines(server, usable: float, gpu: str) -> tuple[int, int]:
    """Print what the vLLM rollout server needs on GPUs of `usable` bytes (llama2.train.memory.RolloutServer);
    returns its tensor-parallel size and the answers it holds at once (0: not even the weights fit)."""
    from ..train.memory import GiB

    tp, held = server.tensor_parallel(usable)
    need = server.weights + server.sequences * server.per_sequence
    print(f"  vLLM rollout server, on its own GPUs: the policy's weights {server.weights / GiB:.1f} GiB + KV cache "
          f"{server.per_sequence / GiB:.2f} GiB per answer x {server.sequences} answers in flight = "
          f"{need / GiB:.1f} GiB")
    if held == server.sequences:
        print(f"    tensor-parallel size {tp}: {need / tp / GiB:.1f} GiB per {gpu}, fits in {usable / GiB:.1f} GiB")
    elif held:
        print(f"    tensor-parallel size {tp}: the weights take {server.weights / tp / GiB:.1f} GiB per {gpu}, leaving "
              f"room for {held} of the {server.sequences} answers at once (vLLM queues the rest)")
    else:
        print(f"    the weights alone need more than {tp} x {gpu}: add pipeline parallelism or larger GPUs")
    return tp, held


def size(nbytes: float) -> str:
    return f"{nbytes / (1 << 30):9.2f} GiB" if nbytes >= 1 << 30 else f"{nbytes / (1 << 20):9.1f} MiB"


def shape_text(cfg) -> str:
    from ..train.memory import parameters

    n = parameters(cfg).total
    count = f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    return (f"{count} parameters (dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
            f"{cfg.n_kv_heads or cfg.n_heads} KV heads, ffn {cfg.hidden_dim}, vocab {cfg.vocab_size})")


def model_shape(recipe: Any, stage: str, args: argparse.Namespace):
    """The policy's ModelConfig: pretraining's `model` section; else `base`'s config.json when it is a local
    checkpoint; else --model or the size in the recipe's path."""
    from ..checkpoint import load_config
    from ..config import ModelConfig
    from ..errors import Llama2Error
    from ..paths import resolve_checkpoint

    if stage == "pretrain":
        return recipe.model.build(vocab_size=pretrain_vocab(recipe))
    base = getattr(recipe, "base", "")
    if base and Path(base).expanduser().is_dir():
        return load_config(resolve_checkpoint(Path(base).expanduser()))
    size = args.model or next((s for s in SIZES if s in Path(args.config).resolve().parts), None)
    if size is not None:
        return ModelConfig.from_name(size)
    built_by = getattr(recipe, "base_recipe", None)
    if built_by:  # the recipe that would build the base says its shape
        from .. import pipeline
        from ..recipe import load_recipe

        stage_of = STAGE_OF_FILE.get(Path(built_by).stem)
        if stage_of in pipeline.STAGES:
            return model_shape(load_recipe(pipeline.STAGES[stage_of].recipe, built_by), stage_of,
                               argparse.Namespace(model=None, config=built_by))
    raise Llama2Error(f"base {base!r} is not a local checkpoint, so its shape is unknown; give --model "
                      f"({', '.join(SIZES)})")


def pretrain_vocab(recipe: Any) -> int:
    """A pretraining recipe's vocabulary: model.vocab_size, else the tokenizer it builds or names, else Llama's."""
    from ..tokenizer import Tokenizer

    if recipe.model.vocab_size:
        return recipe.model.vocab_size
    if recipe.data.build is not None:
        return recipe.data.build.vocab_size
    if recipe.data.tokenizer and Path(recipe.data.tokenizer).expanduser().exists():
        return Tokenizer(Path(recipe.data.tokenizer).expanduser()).vocab_size
    return 32000


def add_reward_models(plan, cfg, layout, mode: str, whole_label: str) -> None:
    """A stage's two RMs: sharded over the GPUs as its frozen references are (`reward_models: sharded`), or
    whole on every GPU in bf16."""
    from ..train import memory as m

    rm = m.parameters(cfg, head=1)
    if mode == "sharded":
        for name in ("helpfulness RM", "safety RM"):
            m.frozen_sharded(plan, name, rm, layout)
    else:
        plan.add(whole_label, 2 * 2 * rm.total)


def plan_stage(stage: str, recipe: Any, cfg, layout):
    """The Plan of a stage's recipe on the layout."""
    from ..train import memory as m

    plan = m.Plan()
    p = m.parameters(cfg)
    world, cb = layout.world, layout.compute_bytes
    if stage == "rejection-sampling":
        k, length = recipe.samples_per_prompt, recipe.max_new_tokens + 512
        procs = world if recipe.reward_models == "sharded" else 1  # sharded: under torchrun on every GPU
        sequences = -(-recipe.batch_prompts // procs) * k  # each process samples its share of a batch
        add_reward_models(plan, cfg, layout, recipe.reward_models, "reward models x 2, whole (bf16)")
        plan.notes.append("sampling phase; the fine-tuning of each iteration is its finetune recipe's plan "
                          "(an SFT recipe)")
        if procs > 1:
            plan.notes.append(f"reward_models sharded: run under torchrun on all {world} GPUs, each sampling its "
                              "share of every batch; the sharded RMs stay loaded while each iteration fine-tunes "
                              "(add them to the finetune recipe's plan)")
        plan.rollout_tokens = recipe.max_new_tokens
        if recipe.rollout_engine == "vllm":
            from ..inference.remote import MAX_IN_FLIGHT

            plan.server = m.RolloutServer(cb * p.total, m.kv_cache_bytes(cfg, 1, length, cb),
                                          min(recipe.batch_prompts * k, procs * min(sequences, MAX_IN_FLIGHT)),
                                          tuple(t for t in (1, 2, 4, 8) if cfg.n_heads % t == 0))
            plan.notes.append("rollout_engine vllm: the samples come from the vLLM server's own GPUs; these hold "
                              "the reward models only")
            return plan
        plan.add("policy, gathered for sampling (bf16)", cb * p.total)
        plan.add(f"KV cache ({sequences} sequences of {length})", m.kv_cache_bytes(cfg, sequences, length, cb))
        plan.rollout_bytes_per_token = cb * p.total
        return plan
    trainable = p.total
    lora = getattr(recipe, "lora", None)
    if lora is not None and lora.rank:
        kv = (cfg.n_kv_heads or cfg.n_heads) * cfg.head_dim
        shapes = {"q_proj": (cfg.dim, cfg.dim), "k_proj": (cfg.dim, kv), "v_proj": (cfg.dim, kv),
                  "o_proj": (cfg.dim, cfg.dim), "gate_proj": (cfg.dim, cfg.hidden_dim),
                  "up_proj": (cfg.dim, cfg.hidden_dim), "down_proj": (cfg.hidden_dim, cfg.dim)}
        trainable = cfg.n_layers * sum(lora.rank * (i + o) for name, (i, o) in shapes.items() if name in lora.modules)
        plan.notes.append(f"LoRA rank {lora.rank} on {', '.join(lora.modules)}: {trainable / 1e6:.1f}M trained "
                          "parameters; the base stays frozen in fp32")
    model = "reward model" if stage == "reward" else "policy"
    mp = m.parameters(cfg, head=1) if stage == "reward" else p
    m.trained_model(plan, model, mp, min(trainable, mp.total), layout)
    ckpt = recipe.activation_checkpointing
    if stage in ("pretrain", "sft", "reward", "dpo"):
        seq = cfg.max_seq_len if stage == "pretrain" else (recipe.max_seq_len or cfg.max_seq_len)
        rows = recipe.batch_size * (2 if stage in ("reward", "dpo") else 1)  # a comparison: two answers
        plan.add(f"activations ({rows} x {seq} tokens{', checkpointed' if ckpt else ''})",
                 m.activation_bytes(cfg, rows * seq, cb, ckpt))
        if stage == "dpo" and not (lora is not None and lora.rank):
            m.frozen_sharded(plan, "reference", p, layout)
        per_step = (recipe.global_batch_size or recipe.batch_size * recipe.grad_accum * world) * seq * rows \
            // recipe.batch_size
        plan.step_flops = m.training_flops(mp, cfg, per_step, seq)
        return plan
    # PPO and GRPO: rollouts, then updates on mini-batches
    per_gpu = max(1, recipe.batch_size // world) * (recipe.group_size if stage == "grpo" else 1)
    length = min(cfg.max_seq_len, 512 + recipe.max_new_tokens)
    if stage == "ppo":
        m.trained_model(plan, "value model", m.parameters(cfg, head=1), m.parameters(cfg, head=1).total, layout)
    if stage == "ppo" or recipe.beta > 0:
        m.frozen_sharded(plan, "reference (pi_0)", p, layout)
    if stage == "ppo" or recipe.reward == "rm":
        add_reward_models(plan, cfg, layout, recipe.reward_models, "reward models x 2, whole on every GPU (bf16)")
    rollout = cb * p.total + m.kv_cache_bytes(cfg, per_gpu, length, cb)
    mini = max(1, recipe.mini_batch // world)
    update = m.activation_bytes(cfg, mini * length, cb, ckpt) * (2 if stage == "ppo" else 1)
    answers = recipe.batch_size * (recipe.group_size if stage == "grpo" else 1)
    plan.step_flops = m.training_flops(p, cfg, answers * length, length) * (2 if stage == "ppo" else 1)
    plan.rollout_tokens = recipe.max_new_tokens
    if recipe.rollout_engine == "vllm":
        from ..inference.remote import MAX_IN_FLIGHT

        plan.add(f"activations ({mini} x {length} tokens{', checkpointed' if ckpt else ''})", update)
        plan.server = m.RolloutServer(cb * p.total, m.kv_cache_bytes(cfg, 1, length, cb),
                                      min(answers, world * min(per_gpu, MAX_IN_FLIGHT)),
                                      tuple(t for t in (1, 2, 4, 8) if cfg.n_heads % t == 0))
        plan.notes.append("rollout_engine vllm: the rollouts run on the vLLM server's own GPUs; these hold no "
                          "gathered policy and no KV cache")
        return plan
    if rollout >= update:
        plan.add("policy gathered for rollouts (bf16)", cb * p.total)
        plan.add(f"KV cache ({per_gpu} sequences of {length})", m.kv_cache_bytes(cfg, per_gpu, length, cb))
        plan.notes.append(f"peak in the rollouts; the update's activations ({mini} x {length} tokens) take "
                          f"{update / m.GiB:.1f} GiB")
    else:
        plan.add(f"activations ({mini} x {length} tokens{', checkpointed' if ckpt else ''})", update)
    plan.rollout_bytes_per_token = cb * p.total + m.kv_cache_bytes(cfg, per_gpu, length, cb)
    return plan
