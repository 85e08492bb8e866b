"""QLoRA: the frozen base in 4-bit NF4 (bitsandbytes) under trainable LoRA adapters, against bitsandbytes' own
Linear4bit, and a 4-bit SFT run whose PEFT adapter gives peft's logits on the dequantised base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llama2.model import ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")
bnb = pytest.importorskip("bitsandbytes", reason="installed by the test setup (.ci/requirements-test.txt)")
CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=32, max_seq_len=96)
DIALOGUES = [[{"role": "user", "content": f"What does function number {i} return?"},
              {"role": "assistant", "content": f"It returns the number {i} squared, which is {i * i}."}]
             for i in range(24)]


def test_nf4_layer_equals_bitsandbytes_linear4bit():
    from llama2.lora import NF4Linear

    torch.manual_seed(0)
    w = torch.randn(96, 128)
    ours = NF4Linear(w)
    ref = bnb.nn.Linear4bit(128, 96, bias=False, quant_type="nf4", compress_statistics=True,
                            compute_dtype=torch.float32)
    ref.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                   compress_statistics=True)
    ref = ref.to("cpu")  # Params4bit quantises on the move to a device
    x1 = torch.randn(5, 128, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ours(x1), ref(x2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)
    # NF4 is a 16-level code per block of 64 scaled by the block's absmax: the error is a fraction of it
    err = (ours.dequantized() - w).abs()
    assert err.max() < 0.2 * w.abs().max() and err.mean() < 0.1 * w.abs().mean()
    assert ours.nbytes() < 0.16 * w.numel() * 4  # ~4.1 bits per weight against 32


def _train(tmp_path: Path, base: Path, name: str, steps: int, extra=()):
    from llama2.stages.sft import SFTRecipe, sft
    from llama2.recipe import load_recipe

    recipe = load_recipe(SFTRecipe, None, [f"base={base}", f"out_dir={tmp_path / name}", "max_seq_len=96",
                                           "batch_size=4", f"max_steps={steps}", "epochs=50", "device=cpu",
                                           "precision=fp32", "optim.lr=1e-2", "optim.warmup_steps=2", "optim.schedule=constant",
                                           "samples.count=0", "peak_tflops=1", "save_every=8", "log_every=1",
                                           "lora.rank=8", "lora.alpha=16", "lora.dropout=0",
                                           "lora.targets=[q, k, v, o, gate, up, down]", "lora.quantize_base=4bit",
                                           *extra])
    return sft(recipe, quiet=True, dialogues=DIALOGUES)


def test_qlora_sft_trains_resumes_and_its_adapter_matches_peft_on_the_dequantised_base(tmp_path, sp_model_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from llama2.checkpoint import save_model
    from llama2.lora import NF4Linear, lora_layers
    from llama2.model import Transformer
    from llama2.tokenizer import Tokenizer

    torch.manual_seed(0)
    save_model(Transformer(CFG), tmp_path / "base", Tokenizer(sp_model_path))
    whole = _train(tmp_path, tmp_path / "base", "whole", 16)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x]
    assert losses[-1] < losses[0] - 0.5  # the adapters learn on the 4-bit base
    adapter = whole.checkpoint
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()

    # resume: 8 steps, then to 16 (constant rate: the schedule does not depend on the length) continues from step
    # 8 and ends where the uninterrupted run did
    _train(tmp_path, tmp_path / "base", "split", 8)
    again = _train(tmp_path, tmp_path / "base", "split", 16)
    assert again.resumed_from == 8
    from safetensors.torch import load_file

    a, b = load_file(adapter / "adapter_model.safetensors"), load_file(again.checkpoint / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # our QLoRA model (base quantised, adapter loaded) against peft on transformers' model whose targeted
    # weights are the same NF4 weights dequantised by bitsandbytes
    from llama2.checkpoint import load_model
    from llama2.lora import apply_lora, quantize_base_4bit

    model = load_model(tmp_path / "base", device="cpu")
    apply_lora(model, 8, 16.0, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    state = load_file(adapter / "adapter_model.safetensors")
    from llama2.checkpoint.adapter import peft_key

    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in own.items():
            if "lora_" in name:
                p.copy_(state[peft_key(name)])
    quantize_base_4bit(model)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    hf_modules = dict(hf.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(model):
            q: NF4Linear = layer.__dict__["base4"]
            hf_modules[f"model.{name}"].weight.copy_(q.dequantized())
    peft = PeftModel.from_pretrained(hf, adapter).eval()
    tokens = torch.tensor([Tokenizer(sp_model_path).encode("What does function number 3 return?")])
    with torch.no_grad():
        got = model.eval()(tokens)
        want = peft(tokens).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
