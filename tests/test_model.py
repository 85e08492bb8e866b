"""The model against the paper's shapes and transformers' LlamaForCausalLM."""

from __future__ import annotations

import pytest
import torch

from conftest import random_hf_llama
from llama2 import Llama2Error, ModelConfig, Transformer
from llama2.config import ffn_hidden_size


@pytest.mark.parametrize("name,params,hidden", [
    ("7B", 6_738_415_616, 11008),
    ("13B", 13_015_864_320, 13824),
    ("34B", None, 22016),
    ("70B", 68_976_648_192, 28672),
])
def test_preset_parameter_counts_on_meta_device(name, params, hidden):
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    count = sum(p.numel() for p in model.parameters())
    assert cfg.hidden_dim == hidden
    assert count == cfg.num_params()
    if params is not None:
        assert count == params
    assert all(p.is_meta for p in model.parameters())


def test_ffn_size_formula_matches_paper():
    # h = int(2*4*dim/3); optional multiplier; round up to multiple_of
    assert ffn_hidden_size(4096, 256, None) == 11008
    assert ffn_hidden_size(8192, 4096, 1.3) == 28672
    assert ffn_hidden_size(64, 32, None) == 192  # int(170.67)=170 -> 192


@pytest.mark.parametrize("kw,needle", [
    (dict(dim=100, n_heads=3), "not divisible by n_heads"),
    (dict(dim=64, n_heads=4, n_kv_heads=3), "not divisible by n_kv_heads"),
    (dict(dim=60, n_heads=4), "must be even"),
    (dict(dim=0, n_heads=4), "dim must be a positive integer"),
])
def test_impossible_shapes_are_clear_errors(kw, needle):
    with pytest.raises(Llama2Error, match=needle):
        ModelConfig(**kw)


def test_unknown_preset_and_unknown_key():
    with pytest.raises(Llama2Error, match="unknown model preset"):
        ModelConfig.from_name("8B")
    with pytest.raises(Llama2Error, match="unknown key"):
        ModelConfig.from_dict({"dim": 64, "heads": 4})


def _ours_from_hf(hf) -> Transformer:
    c = hf.config
    cfg = ModelConfig(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                      n_kv_heads=c.num_key_value_heads, vocab_size=c.vocab_size, hidden_dim=c.intermediate_size,
                      rope_theta=c.rope_parameters["rope_theta"], max_seq_len=c.max_position_embeddings)
    model = Transformer(cfg).eval()
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    return model


@pytest.mark.parametrize("kv_heads,theta", [(4, 10000.0), (2, 10000.0), (1, 500000.0)])
def test_logits_equal_transformers(kv_heads, theta):
    hf = random_hf_llama(seed=kv_heads, num_key_value_heads=kv_heads, rope_theta=theta, vocab_size=301)
    ours = _ours_from_hf(hf)
    tokens = torch.randint(0, 301, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf(tokens).logits - ours(tokens)).abs().max().item()
    assert diff <= 1e-4


def test_cached_chunks_equal_full_forward():
    hf = random_hf_llama(seed=3, num_key_value_heads=2)
    model = _ours_from_hf(hf)
    tokens = torch.randint(0, 257, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = model.make_cache(2, 64)
        parts = [model(tokens[:, :10], 0, cache), model(tokens[:, 10:11], 10, cache), model(tokens[:, 11:], 11, cache)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)
    assert cache[0].k.shape == (2, 2, 64, 16)  # n_kv_heads heads, not n_heads
