"""The sequence classifier (reward model) and its checkpoint layout, against transformers'
LlamaForSequenceClassification (the oracle for the layout and for scores) and LlamaForCausalLM's backbone."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import random_hf_llama
from llama2 import Llama2Error, ModelConfig, load_model, save_model
from llama2.checkpoint import detect_kind, load_checkpoint, read_rows_into, save_checkpoint
from llama2.classifier import SequenceClassifier

PAD = 0
# rows of a right-padded batch: lengths 7, 4 and 9; rows end in EOS (2), which must not be taken for padding
LENGTHS = [7, 4, 9]


def padded_batch(vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.full((len(LENGTHS), max(LENGTHS)), PAD)
    for i, n in enumerate(LENGTHS):
        rows[i, :n] = torch.randint(3, vocab, (n,), generator=g)
        rows[i, n - 1] = 2
    return rows


def random_hf_classifier(seed: int = 0, **kw):
    """A random transformers LlamaForSequenceClassification with one label and pad id 0, head scaled up so
    scores are O(1)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    base = dict(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, num_labels=1,
                pad_token_id=PAD)
    base.update(kw)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(LlamaConfig(**base)).eval()
    with torch.no_grad():
        model.score.weight.mul_(50)
    return model


def hf_scores(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float().squeeze(-1)


def tiny_config(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=257, hidden_dim=96,
                                 max_seq_len=64), **kw})


def test_our_classifier_opens_in_transformers_with_equal_scores(tmp_path):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(0)
    ours = SequenceClassifier(tiny_config()).eval()
    tokens = padded_batch(257)
    with torch.no_grad():
        got = ours(tokens, lengths=LENGTHS)
        alone = torch.cat([ours(tokens[i:i + 1, :n]) for i, n in enumerate(LENGTHS)])
    assert got.shape == (3,)
    assert (got - alone).abs().max() <= 1e-5

    save_checkpoint(ours, tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    assert cfg["id2label"] == {"0": "LABEL_0"} and cfg["label2id"] == {"LABEL_0": 0} and cfg["pad_token_id"] == PAD
    assert detect_kind(tmp_path / "rm") == "classifier"
    hf = LlamaForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert hf.config.num_labels == 1
    assert (hf_scores(hf, tokens) - got).abs().max() <= 1e-5


def test_transformers_classifier_loads_into_ours_with_equal_scores(tmp_path):
    hf = random_hf_classifier(1)
    hf.save_pretrained(tmp_path / "hf-rm")
    tokens = padded_batch(257, seed=1)
    want = hf_scores(hf, tokens)
    ours = load_model(tmp_path / "hf-rm").eval()
    assert isinstance(ours, SequenceClassifier) and ours.pad_id == PAD
    mask = torch.arange(tokens.shape[1])[None] < torch.tensor(LENGTHS)[:, None]
    with torch.no_grad():
        for got in (ours(tokens, lengths=LENGTHS), ours(tokens, attention_mask=mask), ours(tokens)):
            assert (got - want).abs().max() <= 1e-5
    assert want.abs().min() > 1e-3  # the comparison is not between near-zero numbers
    with torch.no_grad():  # per-token values (PPO's value model): the head at every position
        per_token = ours(tokens, per_token=True)
        assert per_token.shape == tokens.shape
        assert (per_token - hf.score(hf.model(tokens).last_hidden_state).squeeze(-1)).abs().max() <= 1e-5


def test_left_padding_with_a_mask_scores_each_row_as_alone():
    hf = random_hf_classifier(2)
    model = SequenceClassifier(tiny_config(), device="meta", pad_id=PAD)
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    right = padded_batch(257, seed=2)
    left = torch.full_like(right, PAD)
    for i, n in enumerate(LENGTHS):
        left[i, -n:] = right[i, :n]
    mask = left != PAD
    alone = torch.cat([hf_scores(hf, right[i:i + 1, :n]) for i, n in enumerate(LENGTHS)])
    with torch.no_grad():
        got = model(left, attention_mask=mask)
    assert (got - alone).abs().max() <= 1e-5


def test_causal_lm_opens_as_a_classifier_with_a_fresh_head(tmp_path):
    hf = random_hf_llama(3, num_key_value_heads=2)
    hf.save_pretrained(tmp_path / "sft")
    torch.manual_seed(0)
    rm = load_checkpoint(tmp_path / "sft", kind="classifier").eval()
    assert isinstance(rm, SequenceClassifier) and not hasattr(rm, "lm_head")
    w = rm.score.weight
    assert w.shape == (1, 64) and 0.05 < w.std().item() * math.sqrt(64) < 0.15  # N(0, 0.1^2/dim)
    tokens = padded_batch(257, seed=3)
    with torch.no_grad():
        h = hf.model(tokens).last_hidden_state  # the backbone, from transformers
        want = h[torch.arange(3), torch.tensor(LENGTHS) - 1] @ w[0]
        got = rm(tokens, lengths=LENGTHS)
    assert (got - want).abs().max() <= 1e-5
    # saved, it is a classifier directory (no generation config) that reads back bit for bit
    save_model(rm, tmp_path / "rm")
    assert detect_kind(tmp_path / "rm") == "classifier"
    assert not (tmp_path / "rm" / "generation_config.json").exists()
    back = load_checkpoint(tmp_path / "rm", kind="classifier").eval()
    with torch.no_grad():
        assert torch.equal(back(tokens, lengths=LENGTHS), got)


def test_sharded_classifier_saves_with_fetch_and_reads_rows(tmp_path):
    torch.manual_seed(4)
    rm = SequenceClassifier(tiny_config(n_layers=3))
    sd = rm.state_dict()
    with torch.device("meta"):
        skeleton = SequenceClassifier(tiny_config(n_layers=3))
    asked = []

    def fetch(name):
        asked.append(name)
        return sd[name]

    save_model(skeleton, tmp_path / "rm", max_shard_bytes=40_000, fetch=fetch)
    assert asked == list(sd) and len(list((tmp_path / "rm").glob("model-*.safetensors"))) > 1
    from safetensors import safe_open

    index = json.loads((tmp_path / "rm" / "model.safetensors.index.json").read_text())
    assert "score.weight" in index["weight_map"] and "model.norm.weight" in index["weight_map"]
    with safe_open(tmp_path / "rm" / index["weight_map"]["score.weight"], framework="pt") as f:
        assert torch.equal(f.get_tensor("score.weight"), sd["score.weight"])
    targets = {}
    for name, t in sd.items():
        lo = min(1, t.shape[0] - 1)
        targets[name] = (torch.full((t.shape[0] - lo, *t.shape[1:]), float("nan")), lo)
    read_rows_into(tmp_path / "rm", targets)
    for name, (dest, lo) in targets.items():
        assert torch.equal(dest, sd[name][lo:]), name


def test_wrong_kinds_and_bad_inputs_are_clear_errors(tmp_path):
    hf = random_hf_classifier(5)
    hf.save_pretrained(tmp_path / "rm")
    with pytest.raises(Llama2Error, match="holds a sequence classifier.*kind='classifier'"):
        load_checkpoint(tmp_path / "rm", kind="causal_lm")
    with pytest.raises(Llama2Error, match="unknown checkpoint kind 'reward'"):
        load_checkpoint(tmp_path / "rm", kind="reward")
    rm = load_model(tmp_path / "rm")
    with pytest.raises(Llama2Error, match="cannot save a sequence classifier .* as a causal LM"):
        save_checkpoint(rm, tmp_path / "x", kind="causal_lm")
    with pytest.raises(Llama2Error, match="no KV cache"):
        rm.make_cache(1)
    tokens = padded_batch(257)
    with pytest.raises(Llama2Error, match=r"lengths must give one count in \[1, 9\]"):
        rm(tokens, lengths=[7, 0, 9])
    with pytest.raises(Llama2Error, match="no real token"):
        rm(torch.full((2, 4), PAD))
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    (tmp_path / "rm" / "config.json").write_text(json.dumps({**cfg, "id2label": {"0": "a", "1": "b"}}))
    with pytest.raises(Llama2Error, match="2 labels; only one label"):
        load_model(tmp_path / "rm")
    (tmp_path / "rm" / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaModel"]}))
    with pytest.raises(Llama2Error, match=r"architectures \['LlamaModel'\] is not supported"):
        load_model(tmp_path / "rm")
    # a classifier config over causal-LM tensors: lm_head is unexpected and score missing; not silently fresh
    random_hf_llama(6).save_pretrained(tmp_path / "lm")
    lm_cfg = json.loads((tmp_path / "lm" / "config.json").read_text())
    (tmp_path / "lm" / "config.json").write_text(json.dumps({**lm_cfg, "architectures":
                                                             ["LlamaForSequenceClassification"]}))
    with pytest.raises(Llama2Error, match=r"lacks tensor\(s\) score\.weight"):
        load_model(tmp_path / "lm")
