"""Shared prefixes in the engine: the K samples of one prompt prefill it once, and a bounded prefix cache keeps keys
and values across requests. Checked against transformers' greedy `generate` and against the same engine without
sharing (tokens equal, logprobs equal up to summation order), and by counting the positions the model computes."""

from __future__ import annotations

import pytest
import torch

from llama2.errors import Llama2Error
from llama2.inference.engine import Engine
from llama2.inference.generate import Generator, SamplingParams
from llama2.inference.prefix_cache import PrefixCache
from llama2.model import KVCache
from helpers import VOCAB, greedy_pair, hf_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = dict(temperature=0.0, stop_ids=[])


@pytest.fixture(scope="module")
def pair():
    return greedy_pair(seed=7)


class Positions:
    """Counts the token positions the model's forwards compute (rows x length), through a forward pre-hook."""

    def __init__(self, model) -> None:
        self.n = 0
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args) -> None:
        self.n += args[0].numel()

    def __enter__(self) -> Positions:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def run(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]):
    slots = {engine.add(p, q): i for i, (p, q) in enumerate(zip(prompts, params))}
    done = {}
    while engine.active:
        for ev in engine.step():
            if ev.completion is not None:
                done[slots.pop(ev.slot)] = ev.completion
    return [done[i] for i in range(len(prompts))]


def prompt_of(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist()


def test_k_samples_of_one_prompt_prefill_it_once(pair, tok):
    """K copies of a prompt beside another prompt: greedy copies equal transformers; seeded samples are the same
    tokens with and without sharing; the shared run computes the prompt once instead of K times."""
    hf, model = pair
    p, other = prompt_of(37, 1), prompt_of(29, 2)
    K, n = 4, 8
    prompts = [p] * K + [other]
    greedy = [SamplingParams(max_new_tokens=n, logprobs=True, **GREEDY)] * (K + 1)
    sampled = [SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=n, seed=s, logprobs=True, stop_ids=[])
               for s in range(K + 1)]
    for params in (greedy, sampled):
        with Positions(model) as shared_count:
            shared = run(Engine(model, tok, max_slots=K + 1, max_len=64), prompts, params)
        with Positions(model) as alone_count:
            alone = run(Engine(model, tok, max_slots=K + 1, max_len=64, share_prompts=False), prompts, params)
        for a, b in zip(shared, alone):
            assert a.tokens == b.tokens
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=1e-5)
        assert alone_count.n - shared_count.n == (K - 1) * len(p)  # the prompt's positions, computed once
        if params is greedy:
            assert shared[0].tokens == hf_greedy(hf, p, n) and shared[K].tokens == hf_greedy(hf, other, n)
    assert len({tuple(c.tokens) for c in shared[:K]}) > 1  # the sampled copies differ from each other


def test_a_stored_prefix_is_not_computed_again(pair, tok):
    """A shared system prompt: the second request (added after the first finished) copies the stored blocks
    and computes only the rest; tokens equal transformers, logprobs equal the engine without a cache."""
    hf, model = pair
    system = prompt_of(40, 3)
    first, second = system + prompt_of(9, 4)[1:], system + prompt_of(12, 5)[1:]
    params = SamplingParams(max_new_tokens=6, logprobs=True, **GREEDY)
    engine = Engine(model, tok, max_slots=2, max_len=96, prefix_cache=256)
    run(engine, [first], [params])
    with Positions(model) as count:
        got = run(engine, [second], [params])[0]
    stored = 32  # the system prompt's two full blocks of 16 (its third block differs between the prompts)
    assert engine.prefix_cache.hit_positions == stored
    assert count.n == len(second) - stored + params.max_new_tokens - 1
    assert got.tokens == hf_greedy(hf, second, 6)
    plain = run(Engine(model, tok, max_slots=2, max_len=96), [second], [params])[0]
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(plain.logprobs), atol=1e-5, rtol=1e-5)


def test_a_later_turn_reuses_the_earlier_prompt_and_answer(pair, tok):
    """Multi-turn: the next prompt repeats the first prompt and the answer the engine generated; both come from
    the cache (the answer is stored when its request ends), and the result equals transformers."""
    hf, model = pair
    turn1 = prompt_of(20, 6)
    gen = Generator(model, tok, max_batch_size=1, cache_len=128, prefix_cache=512, fast_fp32=False)
    params = SamplingParams(max_new_tokens=20, **GREEDY)
    a = gen.generate([turn1], params)[0]
    turn2 = turn1 + a.tokens + prompt_of(10, 7)[1:]
    with Positions(gen.model) as count:
        b = gen.generate([turn2], params)[0]
    cache = gen.engine().prefix_cache
    assert cache.hit_positions == 32  # 39 positions were written by turn 1 (20 + 19 fed): two full blocks
    assert count.n == len(turn2) - 32 + 19
    assert b.tokens == hf_greedy(hf, turn2, 20)


def test_blocks_match_only_after_the_same_tokens_and_leave_least_recently_used_first():
    """The pool on its own: a block matches only where everything before it matched; eviction takes the least
    recently used block and keeps a chain's first blocks longest; loaded keys equal the stored ones."""
    torch.manual_seed(0)
    caches = [KVCache(2, 2, 64, 4, torch.float32) for _ in range(3)]
    for c in caches:
        c.k.normal_()
        c.v.normal_()
    pool = PrefixCache(caches, tokens=3 * 4, block=4)  # three blocks of four positions
    a = list(range(1, 13))  # three blocks
    pool.store(a, row=0, length=12)
    assert pool.lookup(a, 12) == pool.lookup(a, 13) and len(pool.lookup(a, 12)) == 3
    assert len(pool.lookup(a, 11)) == 2  # at most `limit` positions
    changed = [1, 2, 3, 99] + a[4:]  # its first block differs: nothing after it matches either
    assert pool.lookup(changed, 12) == []
    assert len(pool.lookup(a[:4] + [99] + a[5:], 12)) == 1
    chain = pool.lookup(a, 12)
    assert pool.load(chain, row=1) == 12
    for c in caches:
        torch.testing.assert_close(c.k[1, :, :12], c.k[0, :, :12])
        torch.testing.assert_close(c.v[1, :, :12], c.v[0, :, :12])
    b = [50, 51, 52, 53, 54, 55, 56, 57]  # two new blocks: evict a's deepest two, keep its first
    pool.store(b, row=1, length=8)
    assert pool.stored_blocks == 3
    assert len(pool.lookup(b, 8)) == 2 and len(pool.lookup(a, 12)) == 1
    with pytest.raises(Llama2Error, match="prefix_cache"):
        PrefixCache(caches, tokens=3, block=4)


def test_a_small_cache_evicts_and_stays_exact(pair, tok):
    """A cache of two blocks under prompts that share and do not share prefixes: never more than two blocks, and
    every answer equals transformers."""
    hf, model = pair
    engine = Engine(model, tok, max_slots=2, max_len=96, prefix_cache=32)
    heads = [prompt_of(33, 10 + i) for i in range(3)]
    params = SamplingParams(max_new_tokens=4, **GREEDY)
    for i, head in enumerate([0, 0, 1, 1, 0, 2]):  # a repeated head finds its blocks; the next one evicts them
        p = heads[head] + prompt_of(8, 20 + i)[1:]
        got = run(engine, [p], [params])[0]
        assert engine.prefix_cache.stored_blocks <= 2
        assert got.tokens == hf_greedy(hf, p, 4)
    assert engine.prefix_cache.hits == 2
