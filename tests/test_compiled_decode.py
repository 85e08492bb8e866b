"""Compiled decoding and chunked prefill: torch.compile of the decode step compiles one graph per engine whatever
the prompt lengths and the number of concurrent requests (a counting backend is the oracle), and gives the eager
tokens; prefilling a long prompt in chunks gives the unchunked logits (and a full forward's prompt
log-probabilities) while no prefill activation grows past one chunk."""

from __future__ import annotations

import pytest
import torch

from conftest import random_hf_llama
from llama2.config import ModelConfig
from llama2.errors import Llama2Error
from llama2.inference.engine import Engine
from llama2.inference.generate import Generator, SamplingParams
from llama2.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 1000  # the tok fixture's vocabulary
GREEDY = dict(temperature=0.0, stop_ids=[])


class CountingBackend:
    """A torch.compile backend that counts the graphs it is given (every compilation, recompilation or graph
    break reaches it once) and runs them as they are."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs) -> object:
        self.graphs += 1
        return gm.forward


def ours_from_hf(hf) -> Transformer:
    c = hf.config
    cfg = ModelConfig(dim=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                      n_kv_heads=c.num_key_value_heads, vocab_size=c.vocab_size, hidden_dim=c.intermediate_size,
                      norm_eps=c.rms_norm_eps, max_seq_len=c.max_position_embeddings)
    model = Transformer(cfg)
    model.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return ours_from_hf(random_hf_llama(seed=5, vocab_size=VOCAB, num_key_value_heads=2))


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_compilations_do_not_depend_on_prompt_lengths_or_batch_sizes(model, tok, quantize):
    """Rounds of 1, 3 and 6 requests (4 slots: the last two join as others leave) with prompts of 1 to 40
    tokens, greedy and seeded sampling mixed, logprobs on and off, then a stream: the backend sees one graph
    per row bucket met (1, 4 and 2 rows: 3 graphs; the engine's documented bound for 4 slots), none more when
    the rounds run again with other prompt lengths, and every request's tokens equal the eager engine's."""
    torch._dynamo.reset()
    counter = CountingBackend()
    compiled = Generator(model, tok, max_batch_size=4, cache_len=96, compile=counter, quantize=quantize)
    eager = Generator(model, tok, max_batch_size=1, cache_len=96, quantize=quantize)
    g = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return [1] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist()

    def rounds(d: int) -> list[list[tuple[list[int], SamplingParams]]]:
        return [
            [(prompt(7 + d), SamplingParams(max_new_tokens=6, **GREEDY))],
            [(prompt(n + d), SamplingParams(max_new_tokens=m, logprobs=True, **GREEDY))
             for n, m in ((1, 5), (23, 9), (40, 3))],
            [(prompt(n + d), SamplingParams(max_new_tokens=m, **GREEDY)) for n, m in ((2, 4), (11, 7), (30, 5), (5, 8))]
            + [(prompt(17 + d), SamplingParams(temperature=0.9, top_p=0.8, max_new_tokens=6, seed=3, stop_ids=[])),
               (prompt(3 + d), SamplingParams(temperature=1.0, top_k=20, max_new_tokens=5, seed=4, stop_ids=[]))],
        ]

    for d, graphs in ((0, 3), (9, 3)):
        for requests in rounds(d):
            got = compiled.generate([p for p, _ in requests], [q for _, q in requests])
            for (p, q), c in zip(requests, got):
                want = eager.generate([p], q)[0]
                assert c.tokens == want.tokens
                if q.logprobs:
                    torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(want.logprobs), atol=1e-5,
                                               rtol=1e-5)
        assert counter.graphs == graphs
    p = prompt(13)
    q = SamplingParams(max_new_tokens=6, **GREEDY)
    assert "".join(compiled.stream(p, q)) == eager.generate([p], q)[0].text
    assert counter.graphs == 3


def test_bad_decoding_options(model, tok):
    with pytest.raises(Llama2Error, match="prefill_chunk"):
        Generator(model, tok, prefill_chunk=0)
    with pytest.raises(Llama2Error, match="prefill_chunk"):
        Engine(model, tok, prefill_chunk=1.5)
    with pytest.raises(Llama2Error, match="compile"):
        Generator(model, tok, compile=3)


# ------------------------------------------------------------------------------------------ chunked prefill


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
