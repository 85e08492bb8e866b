"""`llama2 plan`: parameter counts against transformers' Llama (7B, 13B, 70B on the meta device), activation bytes
against what autograd saves for backward on our model (saved-tensor hooks, CPU, fp32 and bf16 autocast, with and
without activation checkpointing), optimizer and gradient bytes against a real AdamW step, sharded reward models
against a classifier's parameters, the vLLM rollout server's need against the model and the engine's cache, and the
command's verdicts and errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llama2.config import ModelConfig
from llama2.model import Transformer
from llama2.train.memory import activation_bytes, kv_cache_bytes, layer_activation_bytes, parameters


@pytest.mark.parametrize("size", ["7B", "13B", "70B"])
def test_parameter_counts_equal_transformers(size):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = ModelConfig.from_name(size)
    with torch.device("meta"):
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
                                          intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
                                          num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                                          tie_word_embeddings=False))
    assert parameters(cfg).total == hf.num_parameters() == cfg.num_params()


def saved_for_backward(cfg: ModelConfig, rows: int, T: int, bf16: bool, checkpointing: bool) -> int:
    """Bytes of the distinct tensors autograd saves during a training forward (loss included), parameters and
    autocast's copies of them left out (FSDP2 gathers bf16 weights instead on GPUs)."""
    from llama2.train.distributed import apply_activation_checkpointing

    torch.manual_seed(0)
    model = Transformer(cfg)
    if checkpointing:
        apply_activation_checkpointing(model)
    weights = {tuple(p.shape) for p in model.parameters()}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params and tuple(t.shape) not in weights:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    tokens = torch.randint(0, cfg.vocab_size, (rows, T + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()  # (outside the hooks: the recomputation of checkpointed blocks is not counted)
    return sum(seen.values())


@pytest.mark.parametrize("shape", [(128, 4, 2, 352, 4), (256, 8, 8, 704, 3), (192, 6, 3, 1024, 4)],
                         ids=["gqa", "mha", "wide-ffn"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_activation_bytes_within_ten_percent_of_what_autograd_saves(shape, bf16):
    d, h, kv, f, L = shape
    cfg = ModelConfig(dim=d, n_layers=L, n_heads=h, n_kv_heads=kv, vocab_size=512, hidden_dim=f, max_seq_len=256)
    rows, T = 2, 100  # 200 tokens: no activation reshaped to (tokens, width) takes a weight's shape
    cb = 2 if bf16 else 4
    full = saved_for_backward(cfg, rows, T, bf16, checkpointing=False)
    assert activation_bytes(cfg, rows * T, cb, False) == pytest.approx(full, rel=0.1)
    # per block (two more blocks, the difference), exactly what each block saves, and with checkpointing its input
    # alone, in fp32 (the block being recomputed in backward adds one block's worth, which the hooks do not see)
    deeper = dataclasses.replace(cfg, n_layers=L + 2)
    more = saved_for_backward(deeper, rows, T, bf16, checkpointing=False) - full
    assert more / 2 / (rows * T) == pytest.approx(layer_activation_bytes(cfg, cb), rel=0.1)
    kept = [saved_for_backward(c, rows, T, bf16, checkpointing=True) for c in (cfg, deeper)]
    assert (kept[1] - kept[0]) / 2 / (rows * T) == 4 * cfg.dim
    assert activation_bytes(cfg, rows * T, cb, True) < full / 2


def test_gradient_and_adamw_bytes_are_what_a_step_allocates():
    from llama2.train.memory import Layout, Plan, trained_model

    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 300, (2, 17))
    model(tokens[:, :-1], targets=tokens[:, 1:]).backward()
    opt.step()
    plan = Plan()
    trained_model(plan, "policy", parameters(cfg), parameters(cfg).total, Layout(gpus_per_node=1, bf16=False))
    got = dict(plan.rows)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    moments = sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    assert got["policy: weights (fp32, sharded over 1)"] == weights
    assert got["policy: gradients (fp32, sharded)"] == grads
    assert got["policy: AdamW moments (2 x fp32, sharded)"] == moments


def test_kv_cache_bytes_equal_the_engine_cache():
    from llama2.inference.engine import Engine

    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=64)

    class Tok:
        bos_id, eos_id = 1, 2

    engine = Engine(Transformer(cfg), Tok(), max_slots=5, max_len=48)
    allocated = sum(c.k.numel() * c.k.element_size() + c.v.numel() * c.v.element_size() for c in engine.cache)
    assert kv_cache_bytes(cfg, 5, 48, 4) == allocated


def test_plan_command_verdicts_and_errors(capsys):
    from llama2.cli import main

    assert main(["plan", "--config", "configs/7B/sft.yaml"]) == 0
    out = capsys.readouterr().out
    assert "6.74B parameters" in out and "fits in" in out and "s at 40% MFU" in out
    # with both 70B reward models whole on every GPU and the rollouts in the trainer, 8 x 8 A100-80GB cannot hold
    # PPO; the recipe shards the RMs and leaves the rollouts to a vLLM server, and fits
    assert main(["plan", "--config", "configs/70B/ppo.yaml", "--nodes", "8", "reward_models=whole",
                 "rollout_engine=ours"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "reward models x 2" in out and "gathered for rollouts" in out
    assert main(["plan", "--config", "configs/70B/ppo.yaml", "--nodes", "8"]) == 0
    out = capsys.readouterr().out
    assert "helpfulness RM: weights (fp32, sharded)" in out and "vLLM rollout server" in out
    assert "reward models x 2" not in out and "gathered for rollouts" not in out
    # the training recipes of every size fit 8 nodes of 8 A100-80GB (the 70B reward and DPO micro-batches were
    # lowered to 1 comparison for it)
    for size in ("7B", "13B", "70B"):
        for stage in ("pretrain", "sft", "reward-helpfulness", "reward-safety", "dpo"):
            assert main(["plan", "--config", f"configs/{size}/{stage}.yaml", "--nodes", "8"]) == 0, (size, stage)
    # 70B rejection sampling: the two RMs whole (256 GiB) do not fit one GPU; the recipe shards them over the 64
    # processes and samples from a vLLM server
    assert main(["plan", "--config", "configs/70B/rejection.yaml", "--nodes", "8", "reward_models=whole"]) == 1
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["plan", "--config", "configs/70B/rejection.yaml", "--nodes", "8"]) == 0
    out = capsys.readouterr().out
    assert "safety RM: weights (fp32, sharded)" in out and "8.00 GiB   fits" in out and "vLLM rollout server" in out
    assert "reward models x 2" not in out and "gathered for sampling" not in out
    for size in ("7B", "13B", "70B"):
        for stage in ("ppo", "grpo", "rejection"):
            assert main(["plan", "--config", f"configs/{size}/{stage}.yaml", "--nodes", "8"]) == 0, (size, stage)
    capsys.readouterr()
    for argv, message in [(["--config", "configs/tiny/nothing.yaml"], "cannot tell the stage"),
                          (["--config", "configs/tiny/nothing.yaml", "--stage", "sft"], "recipe not found"),
                          (["--config", "configs/7B/sft.yaml", "--gpus", "0"], "--gpus and --nodes"),
                          (["--config", "configs/7B/sft.yaml", "--mfu", "2"], "--mfu"),
                          (["--config", "configs/7B/sft.yaml", "--gpu", "v100"], "unknown --gpu"),
                          (["--config", "configs/7B/sft.yaml", "bogus=1"], "bogus"),
                          (["--config", "configs/tiny/gatt.yaml"], "plan that one")]:
        assert main(["plan", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("llama2: error:") and message in err and "Traceback" not in err, err


def rl_plan(stage: str, *overrides: str, gpus: int = 4):
    """The Plan of a small PPO or GRPO recipe (the test shape below) on one node of `gpus`."""
    from llama2.commands.plan import plan_stage
    from llama2.pipeline import STAGES
    from llama2.recipe import load_recipe
    from llama2.train.memory import Layout

    group = ["group_size=2"] if stage == "grpo" else []
    recipe = load_recipe(STAGES[stage].recipe, None, ["base=x", "helpfulness_rm=x", "safety_rm=x", "batch_size=8",
                                                      "mini_batch=8", "max_new_tokens=32", *group, *overrides])
    return plan_stage(stage, recipe, RL_CFG, Layout(gpus_per_node=gpus))


RL_CFG = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=300, multiple_of=32, max_seq_len=256)


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_sharded_reward_models_count_as_frozen_sharded_classifiers(stage):
    """reward_models: sharded puts each RM's share on a GPU: its fp32 weights (a SequenceClassifier of the
    policy's shape, counted on the meta device) over the 4 GPUs; whole, both RMs are on every GPU in bf16."""
    from llama2.classifier import SequenceClassifier

    classifier = sum(p.numel() for p in SequenceClassifier(RL_CFG, device="meta").parameters())
    rows = dict(rl_plan(stage, "reward_models=sharded").rows)
    for name in ("helpfulness RM", "safety RM"):
        assert rows[f"{name}: weights (fp32, sharded)"] == 4 * classifier // 4  # 4 bytes each, over 4 GPUs
    assert not any(label.startswith("reward models") for label in rows)
    rows = dict(rl_plan(stage, "reward_models=whole").rows)
    assert rows["reward models x 2, whole on every GPU (bf16)"] == 2 * 2 * classifier
    assert not any(" RM: " in label for label in rows)


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_vllm_rollouts_leave_no_rollout_part_on_the_trainer(stage):
    """rollout_engine: vllm: no gathered policy and no KV cache on the trainer's GPUs (the update's activations
    instead); the server needs the policy's bf16 weights (our Transformer's parameters) and a cache of the
    engine's size for every answer of the iteration."""
    big = ("batch_size=128", "mini_batch=4", "activation_checkpointing=true")  # rollouts outweigh the update
    ours = rl_plan(stage, *big, "rollout_engine=ours")
    assert any("gathered for rollouts" in label for label, _ in ours.rows) and ours.server is None
    plan = rl_plan(stage, *big, "rollout_engine=vllm")
    labels = [label for label, _ in plan.rows]
    assert not any("rollout" in label or "KV cache" in label for label in labels), labels
    assert any(label.startswith("activations") for label in labels)
    weights = sum(p.numel() for p in Transformer(RL_CFG, device="meta").parameters())
    answers = 128 * (2 if stage == "grpo" else 1)  # every answer of the iteration in flight at once
    assert (plan.server.weights, plan.server.sequences) == (2 * weights, answers)
    assert plan.server.per_sequence == kv_cache_bytes(RL_CFG, 1, 256, 2)  # prompt and answer, the model's context
    assert any("vLLM server's own GPUs" in note for note in plan.notes)


def test_rejection_sampling_with_vllm_holds_the_reward_models_only():
    """Rejection sampling with rollout_engine: vllm: the sampling process keeps the two RMs whole (bf16) and neither
    the policy nor a KV cache; the server needs the policy's bf16 weights and a cache for each sample in flight."""
    from llama2.classifier import SequenceClassifier
    from llama2.commands.plan import plan_stage
    from llama2.recipe import load_recipe
    from llama2.stages.rejection import RejectionRecipe
    from llama2.train.memory import Layout

    args = ["base=x", "helpfulness_rm=x", "safety_rm=x", "samples_per_prompt=4", "batch_prompts=3",
            "max_new_tokens=32"]
    classifier = sum(p.numel() for p in SequenceClassifier(RL_CFG, device="meta").parameters())
    ours = plan_stage("rejection-sampling", load_recipe(RejectionRecipe, None, args), RL_CFG, Layout())
    assert dict(ours.rows)["KV cache (12 sequences of 544)"] == kv_cache_bytes(RL_CFG, 12, 544, 2)
    plan = plan_stage("rejection-sampling", load_recipe(RejectionRecipe, None, args + ["rollout_engine=vllm"]),
                      RL_CFG, Layout())
    assert plan.rows == [("reward models x 2, whole (bf16)", 2 * 2 * classifier)]
    weights = sum(p.numel() for p in Transformer(RL_CFG, device="meta").parameters())
    assert (plan.server.weights, plan.server.sequences) == (2 * weights, 12)
    # reward_models: sharded: under torchrun on the 8 GPUs, the RMs' fp32 rows sharded over them; with our engine
    # each process samples its share of a batch (1 of the 3 prompts), with vLLM all 8 send theirs at once
    sharded = args + ["reward_models=sharded"]
    ours = plan_stage("rejection-sampling", load_recipe(RejectionRecipe, None, sharded), RL_CFG, Layout())
    rows = dict(ours.rows)
    assert rows["helpfulness RM: weights (fp32, sharded)"] == rows["safety RM: weights (fp32, sharded)"] \
        == 4 * classifier / 8
    assert rows["KV cache (4 sequences of 544)"] == kv_cache_bytes(RL_CFG, 4, 544, 2)
    assert "policy, gathered for sampling (bf16)" in rows
    plan = plan_stage("rejection-sampling", load_recipe(RejectionRecipe, None, sharded + ["rollout_engine=vllm"]),
                      RL_CFG, Layout())
    assert [label for label, _ in plan.rows] == ["helpfulness RM: weights (fp32, sharded)",
                                                 "safety RM: weights (fp32, sharded)"]
    assert plan.server.sequences == 12


def test_rollout_server_tensor_parallel_size():
    """The smallest tensor-parallel size that holds the weights and every answer's cache, else the largest size
    and the answers that fit beside the weights (0 when the weights alone do not)."""
    from llama2.train.memory import RolloutServer

    server = RolloutServer(weights=100, per_sequence=10, sequences=10)
    assert server.tensor_parallel(200) == (1, 10)
    assert server.tensor_parallel(60) == (4, 10)  # 200 / 2 = 100 > 60, 200 / 4 = 50
    assert server.tensor_parallel(20) == (8, 6)  # 8 x 20 = 160: 100 of weights, 6 answers of 10
    assert server.tensor_parallel(12) == (8, 0)
