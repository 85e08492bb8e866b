"""Checkpoint I/O against transformers' LlamaForCausalLM (the oracle for the HF layout and for logits), Meta's
model-parallel layout built here independently of the library, and bad input."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import random_hf_llama
from llama2 import Llama2Error, ModelConfig, Transformer, load_model, save_model
from llama2.checkpoint import detect_layout, load_config, save_meta
from llama2.cli import main as cli_main

TOKENS = torch.tensor([[1, 5, 9, 200, 3, 77, 42, 11, 0, 250], [7, 7, 7, 1, 2, 3, 4, 5, 6, 8]])


def hf_logits(model, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def our_logits(model: Transformer, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# Meta's layout, written here from first principles (not through llama2.checkpoint).

def interleave_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-halves rows -> Meta's adjacent-pair rows: within each head, Meta row 2i is HF row i and Meta row
    2i+1 is HF row i + head_dim/2."""
    hd = w.shape[0] // n_heads
    order = []
    for h in range(n_heads):
        for i in range(hd // 2):
            order += [h * hd + i, h * hd + hd // 2 + i]
    return w[torch.tensor(order)]


SPLIT = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1, "tok_embeddings": 1}


def write_meta(hf_model, directory: Path, shards: int, params: dict, dtype=torch.float32,
               rope_freqs: bool = False) -> dict[str, torch.Tensor]:
    """Write consolidated.NN.pth files as Meta's model-parallel code holds them; return the merged Meta dict."""
    c = hf_model.config
    sd = {k: v.detach().to(dtype) for k, v in hf_model.state_dict().items()}
    full = {"tok_embeddings.weight": sd["model.embed_tokens.weight"], "norm.weight": sd["model.norm.weight"],
            "output.weight": sd["lm_head.weight"]}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        full.update({
            f"layers.{i}.attention.wq.weight": interleave_rows(sd[p + "self_attn.q_proj.weight"],
                                                               c.num_attention_heads),
            f"layers.{i}.attention.wk.weight": interleave_rows(sd[p + "self_attn.k_proj.weight"],
                                                               c.num_key_value_heads),
            f"layers.{i}.attention.wv.weight": sd[p + "self_attn.v_proj.weight"],
            f"layers.{i}.attention.wo.weight": sd[p + "self_attn.o_proj.weight"],
            f"layers.{i}.feed_forward.w1.weight": sd[p + "mlp.gate_proj.weight"],
            f"layers.{i}.feed_forward.w2.weight": sd[p + "mlp.down_proj.weight"],
            f"layers.{i}.feed_forward.w3.weight": sd[p + "mlp.up_proj.weight"],
            f"layers.{i}.attention_norm.weight": sd[p + "input_layernorm.weight"],
            f"layers.{i}.ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
        })
    directory.mkdir(parents=True, exist_ok=True)
    for r in range(shards):
        piece = {}
        for name, t in full.items():
            kind = name.split(".")[-2]
            if kind in SPLIT:
                t = torch.chunk(t, shards, dim=SPLIT[kind])[r]
            piece[name] = t.clone()
        if rope_freqs:
            piece["rope.freqs"] = torch.ones(c.hidden_size // c.num_attention_heads // 2, dtype=dtype)
        torch.save(piece, directory / f"consolidated.{r:02d}.pth")
    (directory / "params.json").write_text(json.dumps(params))
    return full


def meta_params_for(c, **extra) -> dict:
    p = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
         "vocab_size": c.vocab_size, "norm_eps": c.rms_norm_eps}
    if c.num_key_value_heads != c.num_attention_heads:
        p["n_kv_heads"] = c.num_key_value_heads
    p.update(extra)
    return p


def read_meta(directory: Path) -> list[dict[str, torch.Tensor]]:
    files = sorted(directory.glob("consolidated.*.pth"))
    return [torch.load(f, weights_only=True) for f in files]


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face layout, both directions

SHAPES = [
    pytest.param(dict(), id="multi-head"),
    pytest.param(dict(num_key_value_heads=2, vocab_size=1001), id="gqa-2-groups-vocab-1001"),
    pytest.param(dict(num_attention_heads=8, num_key_value_heads=2, intermediate_size=192),
                 id="gqa-4-groups-derived-ffn"),
    pytest.param(dict(num_key_value_heads=1, rope_theta=500000.0, intermediate_size=80), id="mqa-rope-theta"),
    pytest.param(dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3, num_hidden_layers=3,
                      rms_norm_eps=1e-6, vocab_size=300), id="odd-shape"),
]


@pytest.mark.parametrize("kw", SHAPES)
def test_hf_both_directions_match_transformers(tmp_path, kw):
    from transformers import LlamaForCausalLM

    hf = random_hf_llama(1, **kw)
    want = hf_logits(hf)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    assert ours.config.vocab_size == hf.config.vocab_size and ours.config.hidden_dim == hf.config.intermediate_size
    assert ours.lm_head.weight.dtype == torch.float32
    assert max_diff(our_logits(ours), want) <= 1e-4

    save_model(ours, tmp_path / "ours")
    back = LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert max_diff(hf_logits(back), want) <= 1e-4
    for name, t in hf.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name


def test_sharded_checkpoints_load_in_both(tmp_path):
    from transformers import LlamaForCausalLM

    hf = random_hf_llama(2, num_key_value_heads=2)
    want = hf_logits(hf)
    save_model(load_model(_saved(hf, tmp_path / "src")), tmp_path / "ours", max_shard_bytes=60_000)
    names = sorted(p.name for p in (tmp_path / "ours").iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors" not in names
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in hf.state_dict().values())
    assert max_diff(hf_logits(LlamaForCausalLM.from_pretrained(tmp_path / "ours")), want) <= 1e-4
    assert max_diff(our_logits(load_model(tmp_path / "ours")), want) <= 1e-4

    hf.save_pretrained(tmp_path / "hf-sharded", max_shard_size="50KB")
    assert (tmp_path / "hf-sharded" / "model.safetensors.index.json").exists()
    assert max_diff(our_logits(load_model(tmp_path / "hf-sharded")), want) <= 1e-4


def _saved(hf, d: Path) -> Path:
    hf.save_pretrained(d)
    return d


def test_files_we_write_read_back_with_the_safetensors_library(tmp_path):
    from safetensors import safe_open

    hf = random_hf_llama(3)
    save_model(load_model(_saved(hf, tmp_path / "hf")), tmp_path / "ours", dtype="bf16")
    with safe_open(tmp_path / "ours" / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(hf.state_dict())
        for name in f.keys():
            assert torch.equal(f.get_tensor(name), hf.state_dict()[name].to(torch.bfloat16)), name


def test_tied_embeddings_are_copied(tmp_path):
    hf = random_hf_llama(4, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "hf")
    from safetensors import safe_open

    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    ours = load_model(tmp_path / "hf")
    assert max_diff(our_logits(ours), hf_logits(hf)) <= 1e-4
    assert torch.equal(ours.lm_head.weight, ours.embed_tokens.weight)
    assert ours.lm_head.weight.data_ptr() != ours.embed_tokens.weight.data_ptr()


def test_transformers_4x_config_with_rope_theta_and_torch_dtype(tmp_path):
    hf = random_hf_llama(5, rope_theta=1_000_000.0)
    hf.save_pretrained(tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    d = json.loads(cfg_path.read_text())
    d.pop("rope_parameters")
    d.pop("dtype")
    d.update(rope_theta=1_000_000.0, torch_dtype="float32", rope_scaling=None)
    cfg_path.write_text(json.dumps(d))
    ours = load_model(tmp_path / "hf")
    assert ours.config.rope_theta == 1_000_000.0
    assert max_diff(our_logits(ours), hf_logits(hf)) <= 1e-4


def test_config_json_we_write_is_complete(tmp_path):
    hf = random_hf_llama(6, num_key_value_heads=2, rope_theta=250000.0)
    ours = load_model(_saved(hf, tmp_path / "hf"))

    class StubTokenizer:
        def save(self, directory):
            (Path(directory) / "tokenizer.model").write_bytes(b"stub")

    save_model(ours, tmp_path / "ours", StubTokenizer(), dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["rope_theta"] == 250000.0
    assert cfg["rope_parameters"] == {"rope_theta": 250000.0, "rope_type": "default"}
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 2 and cfg["tie_word_embeddings"] is False
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"
    assert cfg["num_key_value_heads"] == 2 and cfg["intermediate_size"] == hf.config.intermediate_size
    gen = json.loads((tmp_path / "ours" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["temperature"], gen["top_p"]) == (1, 2, 0.6, 0.9)
    assert (tmp_path / "ours" / "tokenizer.model").read_bytes() == b"stub"
    from transformers import GenerationConfig, LlamaConfig

    tcfg = LlamaConfig.from_pretrained(tmp_path / "ours")
    assert tcfg.rope_parameters["rope_theta"] == 250000.0 and tcfg.dtype == torch.bfloat16
    assert GenerationConfig.from_pretrained(tmp_path / "ours").top_p == 0.9


def test_dtype_on_load(tmp_path):
    hf = random_hf_llama(7)
    hf.save_pretrained(tmp_path / "fp32")
    bf = load_model(tmp_path / "fp32", dtype=torch.bfloat16)
    for name, p in bf.named_parameters():
        assert p.dtype == torch.bfloat16
        hf_name = name if name.startswith("lm_head") else f"model.{name}"
        assert torch.equal(p, hf.state_dict()[hf_name].to(torch.bfloat16)), name
    # dtype None follows the checkpoint: a bf16 checkpoint loads as bf16, and converts up on request
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert load_model(tmp_path / "bf16").lm_head.weight.dtype == torch.bfloat16
    up = load_model(tmp_path / "bf16", dtype="fp32")
    assert up.lm_head.weight.dtype == torch.float32
    assert torch.equal(up.lm_head.weight, hf.lm_head.weight.float())


@pytest.mark.parametrize("key,value", [
    ("rope_scaling", {"type": "linear", "factor": 2.0}),
    ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),
    ("rope_parameters", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}),
])
def test_unimplemented_rope_scaling_is_refused(tmp_path, key, value):
    d = _saved(random_hf_llama(8), tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Llama2Error, match=r"config\.json.*not implemented"):
        load_model(d)


# ---------------------------------------------------------------------------------------------------------------
# Meta layout

META_CASES = [
    pytest.param(1, dict(num_key_value_heads=1, rope_theta=40000.0), {"multiple_of": 32}, 192, id="1-shard-mqa"),
    pytest.param(2, dict(num_key_value_heads=2, vocab_size=258), {"multiple_of": 64, "ffn_dim_multiplier": 1.3},
                 256, id="2-shards-gqa-multiplier"),
    pytest.param(4, dict(num_attention_heads=8, num_key_value_heads=4, vocab_size=1000), {"multiple_of": 32}, 192,
                 id="4-shards-gqa"),
]


@pytest.mark.parametrize("shards,kw,ffn,hidden", META_CASES)
def test_meta_import_matches_transformers(tmp_path, shards, kw, ffn, hidden):
    # hidden: the paper's FFN size for dim 64: int(2*4*64/3)=170 (x1.3 -> 221), rounded up to multiple_of
    hf = random_hf_llama(10 + shards, intermediate_size=hidden, **kw)
    params = meta_params_for(hf.config, **ffn)
    if "rope_theta" in kw:
        params["rope_theta"] = kw["rope_theta"]
    write_meta(hf, tmp_path / "meta", shards, params, rope_freqs=True)
    assert detect_layout(tmp_path / "meta") == "meta"
    assert load_config(tmp_path / "meta").hidden_dim == hidden
    ours = load_model(tmp_path / "meta")
    assert max_diff(our_logits(ours), hf_logits(hf)) <= 1e-4


def test_meta_vocab_size_minus_one_comes_from_the_weights(tmp_path):
    hf = random_hf_llama(20, intermediate_size=192, vocab_size=320)
    write_meta(hf, tmp_path / "meta", 2, meta_params_for(hf.config, vocab_size=-1, multiple_of=32))
    assert load_config(tmp_path / "meta").vocab_size == 320
    ours = load_model(tmp_path / "meta")
    assert ours.config.vocab_size == 320
    assert max_diff(our_logits(ours), hf_logits(hf)) <= 1e-4


def test_meta_legacy_pickle_format_loads(tmp_path):
    hf = random_hf_llama(21, intermediate_size=192, vocab_size=256)
    write_meta(hf, tmp_path / "meta", 2, meta_params_for(hf.config, multiple_of=32))
    shard = tmp_path / "meta" / "consolidated.01.pth"
    torch.save(torch.load(shard, weights_only=True), shard, _use_new_zipfile_serialization=False)
    assert max_diff(our_logits(load_model(tmp_path / "meta")), hf_logits(hf)) <= 1e-4


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_meta_hf_meta_round_trip_is_bit_exact(tmp_path, shards):
    hf = random_hf_llama(30, num_attention_heads=8, num_key_value_heads=4, intermediate_size=192, vocab_size=512)
    full = write_meta(hf, tmp_path / "meta", shards, meta_params_for(hf.config, multiple_of=32), dtype=torch.bfloat16)
    original = read_meta(tmp_path / "meta")
    model = load_model(tmp_path / "meta")
    assert model.lm_head.weight.dtype == torch.bfloat16
    save_model(model, tmp_path / "hf")
    save_meta(load_model(tmp_path / "hf"), tmp_path / "back", shards=shards)
    back = read_meta(tmp_path / "back")
    assert len(back) == shards
    for a, b in zip(original, back):
        assert list(a) == list(b)
        for name in a:
            assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    params = json.loads((tmp_path / "back" / "params.json").read_text())
    assert params["n_kv_heads"] == 4 and params["vocab_size"] == 512 and "ffn_dim_multiplier" not in params
    m = params["multiple_of"]  # any multiple_of that gives back the FFN size by the paper's formula will do
    assert m * ((int(2 * 4 * 64 / 3) + m - 1) // m) == 192
    # and the HF copy in between is what transformers holds (checks the permutation direction)
    assert full["layers.0.attention.wq.weight"].shape == (64, 64)
    assert max_diff(our_logits(load_model(tmp_path / "hf", dtype="fp32")),
                    hf_logits(hf.to(torch.bfloat16).float())) <= 1e-4


def test_save_meta_refuses_an_uneven_split(tmp_path):
    ours = load_model(_saved(random_hf_llama(31, num_key_value_heads=2, vocab_size=256), tmp_path / "hf"))
    with pytest.raises(Llama2Error, match="n_kv_heads 2 is not divisible"):
        save_meta(ours, tmp_path / "meta", shards=4)
    assert not (tmp_path / "meta").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one Llama2Error naming the file and the problem

@pytest.fixture
def hf_dir(tmp_path) -> Path:
    return _saved(random_hf_llama(40), tmp_path / "hf")


@pytest.fixture
def meta_dir(tmp_path) -> Path:
    hf = random_hf_llama(41, intermediate_size=192, vocab_size=256)
    write_meta(hf, tmp_path / "meta", 2, meta_params_for(hf.config, multiple_of=32))
    return tmp_path / "meta"


def test_missing_directory_and_unknown_layout(tmp_path):
    with pytest.raises(Llama2Error, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(Llama2Error, match="is a file"):
        load_model(tmp_path / "file")
    (tmp_path / "download" / "llama-2-7b").mkdir(parents=True)
    (tmp_path / "download" / "llama-2-7b" / "params.json").write_text("{}")
    with pytest.raises(Llama2Error, match=r"unknown checkpoint layout.*llama-2-7b"):
        load_model(tmp_path / "download")


def test_a_training_run_and_its_latest_pointer_stand_for_the_latest_checkpoint(tmp_path, sp_model_path):
    """load_model, load_config, Tokenizer and resolve_base take a run directory, its checkpoints/ directory or
    checkpoints/latest as the checkpoint `latest` names: the same logits as transformers on that checkpoint."""
    from transformers import LlamaForCausalLM

    from llama2.checkpoint.runs import base_exists, resolve_base
    from llama2.tokenizer import Tokenizer
    from llama2.train.checkpoints import commit_checkpoint, staging_dir

    run = tmp_path / "run"
    for step in (1, 2):  # two checkpoints written as the training loop writes them; `latest` names step 2
        staging = staging_dir(run, step)
        random_hf_llama(step).save_pretrained(staging)
        Tokenizer(sp_model_path).save(staging)
        (staging / "training_state.pt").write_bytes(b"state")
        last = commit_checkpoint(run, staging, step, keep_last=2)
    assert last.name == "step-000002" and (run / "checkpoints" / "step-000001").is_dir()
    want = hf_logits(LlamaForCausalLM.from_pretrained(last))
    for given in (run, run / "checkpoints", run / "checkpoints" / "latest", str(run / "checkpoints" / "latest")):
        assert max_diff(our_logits(load_model(given)), want) <= 1e-4, given
        assert load_config(given) == load_config(last)
        assert Tokenizer(given).model_path == last / "tokenizer.model"
        assert resolve_base(str(given)) == last and base_exists(str(given))
    assert Tokenizer(sp_model_path.parent).model_path == sp_model_path  # a directory holding one: itself
    (run / "checkpoints" / "latest").write_text("step-000009\n")
    for load in (load_model, Tokenizer):
        with pytest.raises(Llama2Error, match="names 'step-000009', which is not a complete checkpoint"):
            load(run)
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    for load in (load_model, load_config, Tokenizer):
        with pytest.raises(Llama2Error, match="training run without a checkpoint yet"):
            load(fresh)
    assert not base_exists(str(fresh))


def test_a_stage_run_stands_for_the_model_its_sub_run_trained(tmp_path, sp_model_path):
    """A rejection-sampling run (iter-N/sft, the last iteration with a checkpoint) and a GAtt or safety run (sft/)
    stand for the checkpoint their fine-tuning run's `latest` names, as the run itself would."""
    from llama2.checkpoint.runs import base_exists, resolve_base
    from llama2.train.checkpoints import commit_checkpoint, staging_dir

    def finetuned(run: Path, step: int) -> Path:
        staging = staging_dir(run, step)
        random_hf_llama(step).save_pretrained(staging)
        (staging / "training_state.pt").write_bytes(b"state")
        return commit_checkpoint(run, staging, step, keep_last=1)

    rs = tmp_path / "rejection"
    first = finetuned(rs / "iter-1" / "sft", 3)
    (rs / "iter-2" / "sft" / "checkpoints").mkdir(parents=True)  # the second iteration not saved yet
    assert resolve_base(str(rs)) == first and base_exists(str(rs))
    second = finetuned(rs / "iter-2" / "sft", 4)
    assert resolve_base(str(rs)) == second
    assert max_diff(our_logits(load_model(rs)), our_logits(load_model(second))) == 0
    gatt = tmp_path / "gatt"
    model = finetuned(gatt / "sft", 5)
    (gatt / "gatt_dialogues.jsonl").write_text("")
    assert resolve_base(str(gatt)) == model and load_config(gatt) == load_config(model)
    assert not base_exists(str(tmp_path / "empty-stage")) and not base_exists(str(tmp_path))


def _cut(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_bad_safetensors_files(hf_dir):
    weights = hf_dir / "model.safetensors"
    original = weights.read_bytes()
    _cut(weights, 0.5)
    with pytest.raises(Llama2Error, match=r"model\.safetensors: truncated"):
        load_model(hf_dir)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + original[100:])
    with pytest.raises(Llama2Error, match=r"model\.safetensors: corrupt safetensors header"):
        load_model(hf_dir)
    weights.write_bytes(b"garbage")
    with pytest.raises(Llama2Error, match=r"model\.safetensors: not a safetensors file"):
        load_model(hf_dir)
    weights.unlink()
    with pytest.raises(Llama2Error, match=r"no model\.safetensors"):
        load_model(hf_dir)
    (hf_dir / "config.json").write_text("{broken")
    with pytest.raises(Llama2Error, match=r"config\.json: not valid JSON"):
        load_model(hf_dir)


def test_index_naming_a_missing_shard(tmp_path):
    save_model(load_model(_saved(random_hf_llama(42), tmp_path / "hf")), tmp_path / "ours", max_shard_bytes=80_000)
    shards = sorted((tmp_path / "ours").glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[1].unlink()
    with pytest.raises(Llama2Error, match=rf"index\.json names shard {shards[1].name}.*does not exist"):
        load_model(tmp_path / "ours")


@pytest.mark.parametrize("change,needle", [
    ({"num_hidden_layers": 3}, r"lacks tensor\(s\) layers\.2\."),
    ({"num_hidden_layers": 1}, r"tensor\(s\) layers\.1\..*\(model\.safetensors\).*does not describe"),
    ({"intermediate_size": 100}, r"model\.safetensors: tensor layers\.0\.mlp\.\w+_proj\.weight has shape"),
    ({"vocab_size": 300}, r"model\.safetensors: tensor embed_tokens\.weight has shape \[257, 64\]"),
])
def test_config_that_does_not_match_the_tensors(hf_dir, change, needle):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(change)
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Llama2Error, match=needle):
        load_model(hf_dir)


def test_bad_meta_files(meta_dir):
    shard1 = meta_dir / "consolidated.01.pth"
    original = shard1.read_bytes()
    _cut(shard1, 0.6)
    with pytest.raises(Llama2Error, match=r"consolidated\.01\.pth: not a readable PyTorch checkpoint"):
        load_model(meta_dir)
    shard1.write_bytes(b"\x00" * 100)
    with pytest.raises(Llama2Error, match=r"consolidated\.01\.pth: not a readable PyTorch checkpoint"):
        load_model(meta_dir)
    shard1.write_bytes(original)
    params = json.loads((meta_dir / "params.json").read_text())
    (meta_dir / "params.json").write_text(json.dumps({**params, "n_layers": 3}))
    with pytest.raises(Llama2Error, match=r"meta: checkpoint lacks tensor\(s\) layers\.2\."):
        load_model(meta_dir)
    (meta_dir / "params.json").write_text(json.dumps({**params, "multiple_of": 256}))
    with pytest.raises(Llama2Error, match=r"consolidated\.00\.pth, consolidated\.01\.pth: tensor "
                                          r"layers\.0\.mlp\.\w+_proj\.weight has shape"):
        load_model(meta_dir)
    (meta_dir / "params.json").write_text(json.dumps(params))
    os.rename(shard1, meta_dir / "consolidated.02.pth")
    with pytest.raises(Llama2Error, match=r"consolidated\.01\.pth is missing"):
        load_model(meta_dir)


class Exploit:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "plain-pickle"])
def test_malicious_pickle_is_refused_and_not_run(meta_dir, tmp_path, fmt):
    marker = tmp_path / "pwned"
    payload = {"tok_embeddings.weight": torch.zeros(256, 32), "evil": Exploit(marker)}
    target = meta_dir / "consolidated.00.pth"
    if fmt == "plain-pickle":
        with open(target, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, target, _use_new_zipfile_serialization=fmt == "torch-zip")
    with pytest.raises(Llama2Error, match=r"consolidated\.00\.pth: refused to load.*weights_only"):
        load_model(meta_dir)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):  # the check is real: the same file is refused by torch itself
        torch.load(target, weights_only=True)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# Atomic saves

def test_failed_save_leaves_old_checkpoint_and_keeps_other_files(tmp_path):
    hf = random_hf_llama(50)
    ours = load_model(_saved(hf, tmp_path / "hf"))
    dest = tmp_path / "ckpt"
    save_model(ours, dest, max_shard_bytes=60_000)
    (dest / "train_state.json").write_text('{"step": 3}')
    old_files = sorted(p.name for p in dest.iterdir())

    class Failing:
        def save(self, directory):
            raise RuntimeError("disk full")

    with torch.no_grad():
        ours.norm.weight.mul_(2)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(ours, dest, Failing())
    assert sorted(p.name for p in dest.iterdir()) == old_files
    assert max_diff(our_logits(load_model(dest)), hf_logits(hf)) <= 1e-4
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    save_model(ours, dest)  # re-save into the same directory: one file now, stale shards gone, other files kept
    names = sorted(p.name for p in dest.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "train_state.json"]
    assert torch.equal(load_model(dest).norm.weight, ours.norm.weight)


def test_killed_save_never_leaves_a_loadable_half_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys, time, torch
        from llama2 import ModelConfig, Transformer, save_model
        class Hang:
            def save(self, directory):
                print("weights written", flush=True)
                time.sleep(60)
        torch.manual_seed(0)
        save_model(Transformer(ModelConfig.from_name("tiny")), {str(tmp_path / 'ckpt')!r}, Hang())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "weights written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(Llama2Error, match="does not exist"):
        load_model(tmp_path / "ckpt")


# ---------------------------------------------------------------------------------------------------------------
# llama2 convert

def test_convert_meta_to_hf_to_meta(tmp_path, sp_model_path, capsys):
    hf = random_hf_llama(60, num_key_value_heads=2, intermediate_size=192, vocab_size=1000)
    download = tmp_path / "download"
    write_meta(hf, download / "llama-2-tiny", 2, meta_params_for(hf.config, multiple_of=32, vocab_size=-1))
    (download / "tokenizer.model").write_bytes(sp_model_path.read_bytes())  # where Meta's download puts it

    assert cli_main(["convert", str(download / "llama-2-tiny"), str(tmp_path / "hf"), "--to", "hf", "--quiet",
                     "--max-shard-size", "100KB"]) == 0
    assert "converted" in capsys.readouterr().out
    out = tmp_path / "hf"
    assert (out / "tokenizer.model").read_bytes() == sp_model_path.read_bytes()
    assert (out / "tokenizer_config.json").exists() and (out / "model.safetensors.index.json").exists()
    from transformers import LlamaForCausalLM

    assert max_diff(hf_logits(LlamaForCausalLM.from_pretrained(out)), hf_logits(hf)) <= 1e-4

    assert cli_main(["convert", str(out), str(tmp_path / "meta"), "--to", "meta", "--shards", "2",
                     "--dtype", "bf16", "--quiet"]) == 0
    back = read_meta(tmp_path / "meta")
    assert len(back) == 2 and back[0]["output.weight"].dtype == torch.bfloat16
    assert (tmp_path / "meta" / "tokenizer.model").exists()
    assert max_diff(our_logits(load_model(tmp_path / "meta", dtype="fp32")),
                    hf_logits(hf.to(torch.bfloat16).float())) <= 1e-4


def test_convert_errors_are_one_line(tmp_path, hf_dir, capsys):
    assert cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--to", "hf"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert cli_main(["convert", str(hf_dir), str(tmp_path / "busy"), "--to", "meta", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llama2: error:") and "--force" in err and err.count("\n") == 1
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert cli_main(["convert", str(hf_dir), str(tmp_path / "m"), "--to", "meta", "--shards", "3", "--quiet"]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_read_rows_into_reads_each_shard_of_a_sharded_save(tmp_path):
    from llama2.checkpoint import read_rows_into

    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=37, multiple_of=16, max_seq_len=8))
    save_model(model, tmp_path / "ck", max_shard_bytes=20_000)  # several safetensors files
    assert len(list((tmp_path / "ck").glob("model-*.safetensors"))) > 1
    sd = model.state_dict()
    for start, stop in ((0, 13), (13, 26), (26, None)):  # three processes' rows, the last one shorter
        targets = {}
        for name, t in sd.items():
            lo, hi = min(start, t.shape[0]), min(stop or t.shape[0], t.shape[0])
            targets[name] = (torch.full((hi - lo, *t.shape[1:]), float("nan")), lo)
        read_rows_into(tmp_path / "ck", targets)
        for name, (dest, lo) in targets.items():
            assert torch.equal(dest, sd[name][lo:lo + dest.shape[0]]), name
    bad = {name: (torch.empty_like(t), 0) for name, t in sd.items() if name != "norm.weight"}
    with pytest.raises(Llama2Error, match="missing.*unexpected .*norm.weight"):
        read_rows_into(tmp_path / "ck", bad)
    bad = {name: (torch.empty(t.shape[0], *[d + 1 for d in t.shape[1:]]), 0) for name, t in sd.items()}
    with pytest.raises(Llama2Error, match="has shape"):
        read_rows_into(tmp_path / "ck", bad)


# ---------------------------------------------------------------------------------------------------------------
# Kinds: one entry point for causal LMs, classifiers and adapters (test_classifier.py and test_lora.py go deeper)

def test_meta_checkpoint_opens_as_a_classifier_backbone(tmp_path):
    from llama2.checkpoint import detect_kind, load_checkpoint
    from llama2.classifier import SequenceClassifier

    hf = random_hf_llama(80, intermediate_size=192, vocab_size=256)
    write_meta(hf, tmp_path / "meta", 2, meta_params_for(hf.config, multiple_of=32))
    assert detect_kind(tmp_path / "meta") == "causal_lm"
    rm = load_checkpoint(tmp_path / "meta", kind="classifier")
    assert isinstance(rm, SequenceClassifier) and "lm_head.weight" not in rm.state_dict()
    with torch.no_grad():
        assert max_diff(rm.hidden(TOKENS), hf.model(TOKENS).last_hidden_state) <= 1e-4
    with pytest.raises(Llama2Error, match="Meta's layout holds only causal LMs"):
        save_meta(rm, tmp_path / "back")
    assert not (tmp_path / "back").exists()


def test_kind_mismatches_are_one_clear_error(tmp_path, hf_dir):
    from llama2.checkpoint import load_checkpoint, save_checkpoint

    with pytest.raises(Llama2Error, match="unknown checkpoint kind 'rm'; choose causal_lm, classifier, adapter"):
        load_checkpoint(hf_dir, kind="rm")
    with pytest.raises(Llama2Error, match="holds a causal LM .*, not a PEFT LoRA adapter"):
        load_model(hf_dir, kind="adapter")
    model = load_model(hf_dir)
    with pytest.raises(Llama2Error, match="cannot save a causal LM .* as a sequence classifier"):
        save_checkpoint(model, tmp_path / "x", kind="classifier")
    with pytest.raises(Llama2Error, match="no LoRA adapters to save as an adapter"):
        save_model(model, tmp_path / "x", kind="adapter")
    assert not (tmp_path / "x").exists()
