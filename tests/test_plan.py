"""`llama2 plan`: parameter counts against transformers' Llama (7B, 13B, 70B on the meta device), activation bytes
against what autograd saves for backward on our model (saved-tensor hooks, CPU, fp32 and bf16 autocast, with and
without activation checkpointing), optimizer and gradient bytes against a real AdamW step, and the command's
verdicts and errors."""

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
    # as implemented, PPO keeps both 70B reward models whole on every GPU: 8 x 8 A100-80GB cannot hold them
    assert main(["plan", "--config", "configs/70B/ppo.yaml", "--nodes", "8"]) == 1
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "reward models x 2" in out
    # the training recipes of every size fit 8 nodes of 8 A100-80GB (the 70B reward and DPO micro-batches were
    # lowered to 1 comparison for it)
    for size in ("7B", "13B", "70B"):
        for stage in ("pretrain", "sft", "reward-helpfulness", "reward-safety", "dpo"):
            assert main(["plan", "--config", f"configs/{size}/{stage}.yaml", "--nodes", "8"]) == 0, (size, stage)
    assert main(["plan", "--config", "configs/7B/ppo.yaml", "--nodes", "8"]) == 0
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
