"""LoRA layers and PEFT's adapter layout, against peft itself (PeftModel.from_pretrained, get_peft_model,
save_pretrained, merge_and_unload, disable_adapter) on transformers' Llama models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import random_hf_llama
from llama2 import Llama2Error, Transformer, load_model, save_model
from llama2.checkpoint import (AdapterCheckpointIO, detect_kind, detect_layout, load_adapter, load_checkpoint,
                               save_checkpoint)
from llama2.classifier import SequenceClassifier
from llama2.lora import LoRALinear, adapters_disabled, apply_lora, lora_layers, merge_lora

pytest.importorskip("peft")

TOKENS = torch.tensor([[1, 5, 9, 200, 3, 77, 42, 11, 0, 250], [7, 7, 7, 1, 2, 3, 4, 5, 6, 8]])
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def hf_logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def ours_out(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


def perturb_adapters(model, seed: int, names=("lora_B",)) -> None:
    """Make the adapters non-trivial (lora_B starts at zero): fill the named tensors with random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(f"{n}." in name for n in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def base_dir(tmp_path):
    random_hf_llama(70, num_key_value_heads=2).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_adapter_we_save_loads_in_peft_with_equal_logits(tmp_path, base_dir):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    model = apply_lora(load_model(base_dir), r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                       base_model=str(base_dir)).eval()
    perturb_adapters(model, 0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if ".lora_" in n}
    save_checkpoint(model, tmp_path / "adapter")
    assert detect_kind(tmp_path / "adapter") == "adapter"
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == \
        ("LORA", "CAUSAL_LM", 4, 8, "none")
    assert cfg["base_model_name_or_path"] == str(base_dir) and cfg["fan_in_fan_out"] is False

    peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    assert max_diff(hf_logits(peft), ours_out(model)) <= 1e-4
    peft.save_pretrained(tmp_path / "peft-resaved")  # peft's own names for the same adapter: ours must equal them
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", framework="pt") as a, \
            safe_open(tmp_path / "peft-resaved" / "adapter_model.safetensors", framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in a.keys()
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


@pytest.mark.parametrize("rslora", [False, True], ids=["alpha-over-r", "rslora"])
def test_adapter_peft_saves_loads_into_ours(tmp_path, base_dir, rslora):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    peft = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir),
                          LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=ALL, use_rslora=rslora,
                                     task_type="CAUSAL_LM")).eval()
    perturb_adapters(peft, 2)
    peft.save_pretrained(tmp_path / "peft")
    ours = load_checkpoint(tmp_path / "peft").eval()  # the base comes from base_model_name_or_path
    assert len(lora_layers(ours)) == 2 * 7
    layer = ours.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and layer.scale == pytest.approx(16 / (math.sqrt(8) if rslora else 8))
    assert max_diff(ours_out(ours), hf_logits(peft)) <= 1e-4


def test_merge_lora_equals_peft_merge_and_unload(tmp_path, base_dir):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = apply_lora(load_model(base_dir), r=4, alpha=32, target_modules="all-linear").eval()
    perturb_adapters(model, 3)
    save_checkpoint(model, tmp_path / "adapter")  # base_model_name_or_path: where the base was loaded from
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(base_dir)
    merged_peft = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir),
                                            tmp_path / "adapter").merge_and_unload().eval()
    want = ours_out(model)
    merge_lora(model)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
    assert max_diff(ours_out(model), want) <= 1e-4
    assert max_diff(ours_out(model), hf_logits(merged_peft)) <= 1e-4
    peft_sd = merged_peft.state_dict()
    for name, t in model.state_dict().items():
        hf = name if name.startswith("lm_head") else f"model.{name}"
        assert max_diff(t, peft_sd[hf]) <= 1e-6, name
    save_model(model, tmp_path / "merged")  # a plain causal LM again
    assert detect_kind(tmp_path / "merged") == "causal_lm"
    assert max_diff(hf_logits(LlamaForCausalLM.from_pretrained(tmp_path / "merged")), want) <= 1e-4


def test_disabled_adapters_give_the_base_model(base_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir).eval()
    want = hf_logits(base)
    model = apply_lora(load_model(base_dir), r=4, alpha=8).eval()
    assert max_diff(ours_out(model), want) <= 1e-4  # lora_B starts at zero: the base model exactly
    a = model.layers[0].self_attn.q_proj.lora_A.weight
    assert 0.8 / math.sqrt(64) < a.abs().max() <= 1 / math.sqrt(64)  # Kaiming-uniform(a=sqrt(5)): U(+-1/sqrt(in))
    perturb_adapters(model, 4)
    assert max_diff(ours_out(model), want) > 1e-3
    with adapters_disabled(model):
        assert max_diff(ours_out(model), want) <= 1e-4
    assert max_diff(ours_out(model), want) > 1e-3
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with peft.disable_adapter():
        assert max_diff(hf_logits(peft), want) == 0.0


def test_init_on_meta_then_init_weights_gives_pefts_starting_point():
    """The training loop's init_on_meta path: build on meta, apply_lora, to_empty, init_weights()."""
    from llama2 import ModelConfig

    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=50, hidden_dim=48, max_seq_len=16)
    with torch.device("meta"):
        model = apply_lora(SequenceClassifier(cfg), r=2, alpha=4, target_modules=["v_proj"])
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    for _, layer in lora_layers(model):
        assert torch.count_nonzero(layer.lora_B.weight) == 0
        assert 0 < layer.lora_A.weight.abs().max() <= 1 / math.sqrt(32)
    assert model.score.weight.std() * math.sqrt(32) > 0.05  # the fresh reward head, N(0, 0.1^2/dim), trainable
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "layers.0.self_attn.v_proj.lora_A.weight", "layers.0.self_attn.v_proj.lora_B.weight",
        "layers.1.self_attn.v_proj.lora_A.weight", "layers.1.self_attn.v_proj.lora_B.weight", "score.weight"]


def test_seq_cls_adapter_keeps_the_score_head_both_ways(tmp_path):
    """A reward model trained with LoRA on top of a causal LM: the fresh `score` head lives in the adapter
    (modules_to_save) and must survive in both directions."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForSequenceClassification

    random_hf_llama(71).save_pretrained(tmp_path / "sft")
    tokens = TOKENS.clone()
    tokens[0, -2:] = 0  # right padding in row 0 (pad id 0)
    lengths = [8, 10]
    rm = apply_lora(load_checkpoint(tmp_path / "sft", kind="classifier"), r=4, alpha=8,
                    base_model=str(tmp_path / "sft")).eval()
    assert rm.score.weight.requires_grad and not rm.layers[0].self_attn.q_proj.weight.requires_grad
    perturb_adapters(rm, 5, names=("lora_B", "score"))
    with torch.no_grad():
        want = rm(tokens, lengths=lengths)
    save_checkpoint(rm, tmp_path / "rm-lora")
    cfg = json.loads((tmp_path / "rm-lora" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["score"]
    base = LlamaForSequenceClassification.from_pretrained(tmp_path / "sft", num_labels=1, pad_token_id=0)
    peft = PeftModel.from_pretrained(base, tmp_path / "rm-lora").eval()
    assert max_diff(hf_logits(peft, tokens).squeeze(-1), want) <= 1e-5
    assert load_checkpoint(tmp_path / "rm-lora").score.weight.equal(rm.score.weight)

    torch.manual_seed(6)
    peft2 = get_peft_model(LlamaForSequenceClassification.from_pretrained(tmp_path / "sft", num_labels=1,
                                                                          pad_token_id=0),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"],
                                      task_type="SEQ_CLS")).eval()
    perturb_adapters(peft2, 7, names=("lora_B", "modules_to_save"))
    peft2.save_pretrained(tmp_path / "peft-rm")
    ours = load_checkpoint(tmp_path / "peft-rm").eval()
    assert isinstance(ours, SequenceClassifier)
    with torch.no_grad():
        assert max_diff(ours(tokens, lengths=lengths), hf_logits(peft2, tokens).squeeze(-1)) <= 1e-5


def test_adapter_checkpoint_io_for_a_sharded_run(tmp_path, base_dir):
    """What the training loop does under FSDP2: save from a meta skeleton through fetch (every state_dict
    entry, in order), resume by reading each process's rows of every tensor (base ones from the base)."""
    model = apply_lora(load_model(base_dir), r=4, alpha=8, target_modules=["q_proj", "o_proj"])
    perturb_adapters(model, 8, names=("lora_A", "lora_B"))
    sd = model.state_dict()
    with torch.device("meta"):
        skeleton = apply_lora(Transformer(model.config), r=4, alpha=8, target_modules=["q_proj", "o_proj"])
    asked = []

    def fetch(name):
        asked.append(name)
        return sd[name]

    io = AdapterCheckpointIO(base=base_dir)
    io.save(skeleton, tmp_path / "step-1", fetch=fetch)
    assert asked == list(sd)[:len(asked)] and asked[-1] == "layers.1.self_attn.o_proj.lora_B.weight"
    assert sorted(p.name for p in (tmp_path / "step-1").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    for lo in (0, 2):  # two processes' dim-0 shards
        targets = {n: (torch.full((max(t.shape[0] - lo, 1), *t.shape[1:]), float("nan")), min(lo, t.shape[0] - 1))
                   for n, t in sd.items()}
        io.load_into(tmp_path / "step-1", targets)
        for name, (dest, first) in targets.items():
            assert torch.equal(dest, sd[name][first:first + dest.shape[0]]), name
    # save_model on a LoRA model (HFCheckpointIO's path) writes the adapter too, and it loads back whole
    save_model(model, tmp_path / "plain-io", base_model=str(base_dir))
    back = load_model(tmp_path / "plain-io")
    assert all(torch.equal(t, sd[n]) for n, t in back.state_dict().items())


def test_lora_errors_are_clear(tmp_path, base_dir):
    model = load_model(base_dir)
    with pytest.raises(Llama2Error, match="unknown LoRA target module 'qkv'.*q_proj"):
        apply_lora(model, target_modules=["q_proj", "qkv"])
    with pytest.raises(Llama2Error, match="'lm_head' is not supported.*modules_to_save"):
        apply_lora(model, target_modules=["lm_head"])
    with pytest.raises(Llama2Error, match="modules_to_save names 'head'"):
        apply_lora(model, modules_to_save=["head"])
    with pytest.raises(Llama2Error, match="rank r must be a positive integer"):
        apply_lora(model, r=0)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())
    with pytest.raises(Llama2Error, match="no LoRA adapters to save"):
        save_checkpoint(model, tmp_path / "x", kind="adapter")
    apply_lora(model, r=4, alpha=8, base_model=str(base_dir))
    with pytest.raises(Llama2Error, match="already has LoRA adapters"):
        apply_lora(model)
    with pytest.raises(Llama2Error, match="has LoRA adapters: save it with kind='adapter'.*merge_lora"):
        save_checkpoint(model, tmp_path / "x", kind="causal_lm")
    save_checkpoint(model, tmp_path / "adapter")
    with pytest.raises(Llama2Error, match=r"holds a PEFT LoRA adapter \(adapter_config\.json\), not full weights"):
        detect_layout(tmp_path / "adapter")  # what `llama2 convert` and the Meta export look at
    with pytest.raises(Llama2Error, match="holds a PEFT LoRA adapter, not a causal LM"):
        load_checkpoint(tmp_path / "adapter", kind="causal_lm")
    with pytest.raises(Llama2Error, match="holds a causal LM .*, not a PEFT LoRA adapter"):
        load_checkpoint(base_dir, kind="adapter")

    random_hf_llama(72, hidden_size=96, num_attention_heads=6, num_key_value_heads=2).save_pretrained(tmp_path / "o")
    other = load_model(tmp_path / "o")
    with pytest.raises(Llama2Error, match=r"does not match the base model: .*q_proj\.lora_A\.weight has shape "
                                          r"\[4, 64\] but this model needs \[4, 96\]"):
        load_adapter(other, tmp_path / "adapter")
    assert not lora_layers(other)  # left as it was
    with pytest.raises(Llama2Error, match="does not match the base model"):
        load_checkpoint(tmp_path / "adapter", base=tmp_path / "o")
    with pytest.raises(Llama2Error, match="task_type CAUSAL_LM but the model is a sequence classifier"):
        load_adapter(load_checkpoint(base_dir, kind="classifier"), tmp_path / "adapter")

    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for change, needle in [({"use_dora": True}, "use_dora=True is not supported"),
                           ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
                           ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' changes the base"),
                           ({"kasa_config": {"gamma": 0.1}}, "kasa_config is set"),
                           ({"target_modules": ["q_proj", "c_attn"]}, "unknown LoRA target module 'c_attn'"),
                           ({"target_modules": ".*q_proj"}, "regular expression"),
                           ({"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"}, "pass base=")]:
        cfg_path.write_text(json.dumps({**cfg, **change}))
        with pytest.raises(Llama2Error, match=needle):
            load_checkpoint(tmp_path / "adapter")
