"""Chunked prefill: a long prompt prefilled in chunks gives the unchunked logits and greedy tokens, its prompt
log-probabilities match a plain full forward of the model (no cache), and no prefill activation grows past one
chunk (forward hooks and the profiler's memory accounting)."""

from __future__ import annotations

import pytest
import torch

from llama2.config import ModelConfig
from llama2.inference.generate import Generator, SamplingParams
from llama2.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 1000  # the tok fixture's vocabulary
GREEDY = dict(temperature=0.0, stop_ids=[])



LONG = 2000  # prompt tokens
HIDDEN = 1024  # the feed-forward width: the widest activation per position


@pytest.fixture(scope="module")
def long_model():
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, hidden_dim=HIDDEN,
                      max_seq_len=2048)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def long_prompt():
    return [1] + torch.randint(3, VOCAB, (LONG - 1,), generator=torch.Generator().manual_seed(1)).tolist()


def test_chunked_prefill_equals_unchunked(long_model, tok, long_prompt):
    """A 2000-token prompt prefilled in chunks of 256 (and 300, not dividing it) decodes the same greedy tokens
    with the same log-probabilities as in one forward; its prompt log-probabilities (echo) match a plain full
    forward of the model, the oracle without any cache."""
    params = SamplingParams(max_new_tokens=8, logprobs=True, **GREEDY)
    whole = Generator(long_model, tok, max_batch_size=1, prefill_chunk=4096).generate([long_prompt], params)[0]
    for chunk in (256, 300):
        got = Generator(long_model, tok, max_batch_size=1, prefill_chunk=chunk).generate([long_prompt], params)[0]
        assert got.tokens == whole.tokens
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(whole.logprobs), atol=1e-5, rtol=1e-5)
    echo = params.replace(echo=True, max_new_tokens=1)
    scored = Generator(long_model, tok, max_batch_size=1, prefill_chunk=256).generate([long_prompt], echo)[0]
    with torch.no_grad():
        full = torch.log_softmax(long_model(torch.tensor([long_prompt]))[0], dim=-1)
    oracle = full[:-1].gather(1, torch.tensor(long_prompt[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(scored.logprobs[1:LONG]), oracle, atol=1e-4, rtol=1e-4)
    assert scored.tokens[:LONG] == long_prompt and scored.ttft is not None and scored.ttft > 0


def test_chunked_prefill_bounds_the_activations(long_model, tok, long_prompt):
    """Every module's output during the prefill of the 2000-token prompt holds at most one chunk of positions
    (forward hooks see each activation), and the largest single allocation of any operator (the profiler's
    memory accounting, which also sees attention's internals) stays within one chunk's: chunk x the widest of
    the feed-forward and the keys attended (the chunk's attention mask), in fp32; unchunked, the feed-forward
    activation of the whole prompt is allocated at once."""
    from torch.profiler import ProfilerActivity, profile

    def measure(chunk: int) -> tuple[int, int]:
        gen = Generator(long_model, tok, max_batch_size=1, prefill_chunk=chunk)
        gen.engine(1)  # the KV cache is allocated before the measurement
        rows = [0]

        def hook(module, args, out):
            if isinstance(out, torch.Tensor) and out.ndim == 3:  # (batch, positions, features)
                rows[0] = max(rows[0], out.shape[1])

        handles = [m.register_forward_hook(hook) for m in gen.model.modules()]
        try:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                gen.generate([long_prompt], SamplingParams(max_new_tokens=1, **GREEDY))
        finally:
            for h in handles:
                h.remove()
        biggest = max(e.self_cpu_memory_usage for e in prof.events())
        return rows[0], biggest

    rows_chunked, mem_chunked = measure(256)
    rows_whole, mem_whole = measure(4096)
    assert rows_chunked == 256 and rows_whole == LONG
    assert mem_chunked <= 256 * max(HIDDEN, LONG) * 4
    assert mem_whole >= LONG * HIDDEN * 4
