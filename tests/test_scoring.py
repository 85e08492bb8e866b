"""sequence_logprobs against transformers' logits + log_softmax on the same weights, its gradients against autograd
through a plain log_softmax of the full logits, and its chunking (the head never sees more than a chunk)."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import random_hf_llama
from llama2.errors import Llama2Error
from llama2 import fused_ops
from llama2.inference.scoring import sequence_logprobs
from helpers import ours_from_hf

VOCAB = 300


@pytest.fixture(scope="module")
def pair():
    hf = random_hf_llama(seed=7, vocab_size=VOCAB, num_key_value_heads=2)
    return hf, ours_from_hf(hf)


@pytest.fixture
def small_chunks(monkeypatch):
    """7 positions per chunk, so every test crosses chunk boundaries (and rows)."""
    monkeypatch.setattr(fused_ops, "scoring_rows_per_chunk", lambda n, vocab, device: 7)
    return 7


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, 8:] = False  # right padding
    mask[2, 10:] = False
    return tokens, mask


def hf_reference(hf, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / T) at the next tokens, each row alone (no padding involved)."""
    with torch.no_grad():
        logits = hf(tokens).logits.float() / temperature
    return torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_equals_transformers_log_softmax(pair, small_chunks, temperature):
    hf, model = pair
    tokens, mask = batch()
    with torch.no_grad():
        got = sequence_logprobs(model, tokens, mask, temperature=temperature)
    assert got.shape == (3, 11) and got.dtype == torch.float32
    for b in range(3):
        n = int(mask[b].sum())
        want = hf_reference(hf, tokens[b:b + 1, :n], temperature)[0]
        torch.testing.assert_close(got[b, :n - 1], want, atol=1e-4, rtol=1e-4)
        assert torch.all(got[b, n - 1:] == 0)
    # without a mask every position is scored
    with torch.no_grad():
        full = sequence_logprobs(model, tokens)
    torch.testing.assert_close(full, hf_reference(hf, tokens), atol=1e-4, rtol=1e-4)


def test_left_padding_scores_each_row_as_alone(pair, small_chunks):
    hf, model = pair
    tokens, _ = batch(1)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, :4] = False  # left padding: the row's real tokens start at 4
    with torch.no_grad():
        got = sequence_logprobs(model, tokens, mask)
    want = hf_reference(hf, tokens[:1, 4:])[0]
    torch.testing.assert_close(got[0, 4:], want, atol=1e-4, rtol=1e-4)
    assert torch.all(got[0, :4] == 0)
    torch.testing.assert_close(got[1:], hf_reference(hf, tokens[1:]), atol=1e-4, rtol=1e-4)


def test_gradients_equal_autograd_through_plain_log_softmax(pair, small_chunks):
    _, model = pair
    ours, plain = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    tokens, mask = batch(2)
    weights = torch.randn(3, 11, generator=torch.Generator().manual_seed(3))  # like advantages
    shapes = []
    hook = ours.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    (sequence_logprobs(ours, tokens, mask, temperature=0.8) * weights).sum().backward()
    hook.remove()

    logits = plain(tokens).float() / 0.8
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    (lp * (mask[:, 1:] & mask[:, :-1]) * weights).sum().backward()
    for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    # the head only ever saw chunks of 7 positions: 33 positions = 5 chunks in forward, recomputed in backward
    assert sorted(shapes) == [(5, VOCAB)] * 2 + [(7, VOCAB)] * 8


def test_start_skips_the_positions_before_it_and_their_head_work(pair, small_chunks):
    """start=k: the entries before k are 0 and never projected through the LM head, the rest equal transformers'
    (right padding and left padding alike)."""
    hf, model = pair
    tokens, mask = batch()
    shapes = []
    hook = model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(out.shape)))
    with torch.no_grad():
        got = sequence_logprobs(model, tokens, mask, start=5)
        hook.remove()
        full = sequence_logprobs(model, tokens, mask)
    assert got.shape == full.shape and torch.all(got[:, :5] == 0)
    torch.testing.assert_close(got[:, 5:], full[:, 5:], atol=1e-5, rtol=1e-5)
    assert sum(a for a, _ in shapes) == 3 * (11 - 5)  # the head saw the kept positions only
    left = mask.clone()
    left[0, :2] = False
    with torch.no_grad():
        torch.testing.assert_close(sequence_logprobs(model, tokens, left, start=4)[:, 4:],
                                   sequence_logprobs(model, tokens, left)[:, 4:], atol=1e-5, rtol=1e-5)


def test_token_logprobs_convenience_and_errors(pair):
    hf, model = pair
    from llama2.inference.generate import Generator

    class Tok:
        bos_id, eos_id = 1, 2

    seqs = [[1, 5, 9, 33, 2], [1, 8], [1, 200, 4, 4]]
    got = Generator(model, Tok(), max_batch_size=2, fast_fp32=False).token_logprobs(seqs)
    for s, g in zip(seqs, got):
        torch.testing.assert_close(torch.tensor(g), hf_reference(hf, torch.tensor([s]))[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(Llama2Error, match="vocabulary|0..299"):
        sequence_logprobs(model, torch.tensor([[1, VOCAB]]))
    with pytest.raises(Llama2Error, match="mask shape"):
        sequence_logprobs(model, torch.tensor([[1, 2, 3]]), torch.ones(1, 2))
