"""Compiled decoding: torch.compile of the decode step compiles one graph per power-of-two row bucket, whatever
the prompt lengths and the number of concurrent requests (a counting backend is the oracle), and gives the eager
engine's tokens (the eager engine is tied to transformers' greedy generate in test_generate.py)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_hf_llama
from helpers import ours_from_hf
from llama2.errors import Llama2Error
from llama2.inference.engine import Engine
from llama2.inference.generate import Generator, SamplingParams

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
