"""The step-level engine against independent oracles: transformers' greedy `generate` and full-forward logits, the
sampling distribution (temperature, top-k, top-p) written out in the test, and requests run alone."""

from __future__ import annotations

import math

import pytest
import torch

from llama2.errors import Llama2Error
from llama2.inference.engine import Engine, Request
from llama2.inference.generate import Generator, SamplingParams
from helpers import TEXTS, greedy_pair, hf_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = dict(temperature=0.0, stop_ids=[])


@pytest.fixture(scope="module")
def pair():
    return greedy_pair(seed=4)


def hf_logits(hf, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([seq])).logits[0].float()


def drain(engine: Engine, done: dict[int, object], slots: dict[int, str], steps: int | None = None) -> None:
    """step() `steps` times (or until idle), filing completions under the names in `slots`."""
    n = 0
    while engine.active and (steps is None or n < steps):
        for ev in engine.step():
            if ev.completion is not None:
                done[slots.pop(ev.slot)] = ev.completion
        n += 1


def test_cache_is_fixed_slots_sized_by_the_engine(pair, tok):
    _, model = pair
    engine = Engine(model, tok, max_slots=3, max_len=40)
    c = model.config
    assert len(engine.cache) == c.n_layers
    assert all(tuple(layer.k.shape) == (3, c.n_kv_heads, 40, c.head_dim) for layer in engine.cache)
    slots = [engine.add([1, 5, 6], SamplingParams(max_new_tokens=4, **GREEDY)) for _ in range(3)]
    assert slots == [0, 1, 2] and engine.free_slots == 0
    with pytest.raises(Llama2Error, match="all 3 slots are busy"):
        engine.add([1, 2], SamplingParams(max_new_tokens=4, **GREEDY))
    with pytest.raises(Llama2Error, match="context of 40"):
        Engine(model, tok, max_slots=1, max_len=40).add([1] * 30, SamplingParams(max_new_tokens=20, **GREEDY))
    with pytest.raises(Llama2Error, match="max_slots"):
        Engine(model, tok, max_slots=0)


def test_requests_joining_midway_equal_transformers_and_running_alone(pair, tok):
    """Greedy: prompts of different lengths, two of them joining after some decode steps, one cancelled; every
    finished request has transformers' tokens, and the logprobs it has alone."""
    hf, model = pair
    prompts = {name: tok.encode(t) for name, t in zip("abcd", TEXTS)}
    assert len({len(p) for p in prompts.values()}) == 4
    lengths = {"a": 14, "b": 6, "c": 11, "d": 9}
    params = {k: SamplingParams(max_new_tokens=n, logprobs=True, **GREEDY) for k, n in lengths.items()}
    engine = Engine(model, tok, max_slots=4, max_len=64)
    done: dict[str, object] = {}
    slots: dict[int, str] = {}
    slots[engine.add(prompts["a"], params["a"])] = "a"
    slots[engine.add(Request(prompts["b"], params["b"]))] = "b"
    drain(engine, done, slots, steps=3)
    slots[engine.add(prompts["c"], params["c"])] = "c"
    victim = engine.add([1, 7, 8, 9], SamplingParams(max_new_tokens=30, **GREEDY))
    drain(engine, done, slots, steps=4)  # b finished after 6 steps: its slot is free again
    assert "b" in done and engine.free_slots == 1
    assert engine.add(prompts["d"], params["d"]) == 1
    slots[1] = "d"
    drain(engine, done, slots, steps=2)
    cancelled = engine.cancel(victim)
    assert cancelled.finish_reason == "cancelled" and 0 < len(cancelled.tokens) < 30
    assert engine.cancel(victim) is None
    drain(engine, done, slots)
    assert sorted(done) == ["a", "b", "c", "d"] and not engine.active
    alone = Generator(model, tok, fast_fp32=False)
    for k, c in done.items():
        assert c.tokens == hf_greedy(hf, prompts[k], lengths[k]), k
        assert c.finish_reason == "length" and c.prompt_tokens == prompts[k] and c.text == tok.decode(c.tokens)
        a = alone.generate([prompts[k]], params[k])[0]
        assert a.tokens == c.tokens
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=1e-4)


def test_generate_with_more_prompts_than_slots_equals_one_at_a_time(pair, tok):
    hf, model = pair
    gen = Generator(model, tok, max_batch_size=2)
    prompts = [tok.encode(t) for t in TEXTS] + [tok.encode(TEXTS[0] + " jumps")]
    per = [SamplingParams(max_new_tokens=n, **GREEDY) for n in (3, 9, 5, 7, 4)]
    batched = gen.generate(prompts, per)
    assert gen.engine().max_slots == 2
    for p, q, c in zip(prompts, per, batched):
        assert c.tokens == hf_greedy(hf, p, q.max_new_tokens)
    with pytest.raises(Llama2Error, match="2 SamplingParams for 5 prompts"):
        gen.generate(prompts, per[:2])


def test_seeded_sample_depends_only_on_its_own_seed(pair, tok):
    """A seeded request gives the same tokens alone and in a batch with other requests (greedy and sampled,
    other settings, joining at other steps)."""
    _, model = pair
    mine = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, max_new_tokens=16, seed=11, stop_ids=[],
                          logprobs=True)
    prompt = tok.encode(TEXTS[1])
    alone = Generator(model, tok, fast_fp32=False).generate([prompt], mine)[0]
    engine = Engine(model, tok, max_slots=4, max_len=64)
    others = [(tok.encode(TEXTS[0]), SamplingParams(temperature=1.3, top_p=1.0, max_new_tokens=20, seed=1)),
              (tok.encode(TEXTS[3]), SamplingParams(max_new_tokens=5, **GREEDY)),
              (tok.encode(TEXTS[2]), SamplingParams(temperature=0.5, top_p=0.5, max_new_tokens=9, seed=2))]
    engine.add(*others[0])
    engine.step()
    slot = engine.add(prompt, mine)
    engine.add(*others[1])
    engine.step()
    engine.add(*others[2])
    got = None
    while engine.active:
        for ev in engine.step():
            if ev.slot == slot and ev.completion is not None and got is None:
                got = ev.completion
    assert got.tokens == alone.tokens and len(got.tokens) == 16
    torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(alone.logprobs), atol=1e-4, rtol=1e-4)
    # another seed gives another sample; one SamplingParams for K copies of a prompt gives K samples
    assert Generator(model, tok).generate([prompt], mine.replace(seed=12))[0].tokens != alone.tokens
    k = Generator(model, tok).generate([prompt] * 3, mine)
    assert k[0].tokens == alone.tokens and len({tuple(c.tokens) for c in k}) == 3


def nucleus(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    """The sampling distribution written out: token -> probability, after temperature, top-k, top-p."""
    z = (logits.double() / temperature).tolist()
    ranked = sorted(range(len(z)), key=lambda i: -z[i])
    if top_k:
        ranked = ranked[:top_k]
    peak = z[ranked[0]]
    weights = {i: math.exp(z[i] - peak) for i in ranked}
    total = sum(weights.values())
    kept, mass = {}, 0.0
    for i in ranked:
        kept[i] = weights[i] / total
        mass += weights[i] / total
        if mass >= top_p:
            break
    s = sum(kept.values())
    return {i: p / s for i, p in kept.items()}


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 0.8), (1.6, 50, 0.95), (0.5, 0, 1.0)])
def test_logprobs_are_of_the_distribution_sampled_from(pair, tok, temperature, top_k, top_p):
    hf, model = pair
    ids = tok.encode(TEXTS[0])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=14, seed=5,
                            stop_ids=[], logprobs=True)
    c = Generator(model, tok).generate([ids], params)[0]
    logits = hf_logits(hf, ids + c.tokens)[len(ids) - 1:-1]
    for step, token in enumerate(c.tokens):
        dist = nucleus(logits[step], temperature, top_k, top_p)
        assert token in dist  # never outside the nucleus
        assert c.logprobs[step] == pytest.approx(math.log(dist[token]), abs=2e-4)
        raw = torch.log_softmax(logits[step].double(), dim=-1)[token].item()
        assert c.raw_logprobs[step] == pytest.approx(raw, abs=2e-4)
    # greedy: both are the raw distribution's
    g = Generator(model, tok).generate([ids], SamplingParams(max_new_tokens=6, logprobs=True, **GREEDY))[0]
    assert g.logprobs == g.raw_logprobs


def test_stream_events_and_root_forward(pair, tok):
    """Prefill and decode are calls of the model's root module (hooks on it see every forward); event texts
    join to the completion's text."""
    _, model = pair
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape), with_kwargs=True)
    try:
        engine = Engine(model, tok, max_slots=2, max_len=64)
        params = SamplingParams(temperature=0.8, max_new_tokens=12, seed=3, stop_ids=[])
        slot = engine.add(TEXTS[0], params)
        engine.add(TEXTS[2], params.replace(max_new_tokens=4))
        pieces, steps, done = [], 0, None
        while engine.active:
            steps += 1
            for ev in engine.step():
                if ev.slot == slot:
                    pieces.append(ev.text)
                    done = ev.completion or done
    finally:
        handle.remove()
    assert steps == 12 and "".join(pieces) == done.text and len(done.tokens) == 12
    assert len(calls) == 2 + 11  # two prefills, then one decode forward per step for every active request
    assert sorted(s[0] for s in calls[2:]) == [1] * 8 + [2] * 3


def test_zero_new_tokens_with_echo_scores_the_prompt(pair, tok):
    hf, model = pair
    ids = tok.encode(TEXTS[3])
    c = Generator(model, tok).generate([ids], SamplingParams(max_new_tokens=0, echo=True, logprobs=True))[0]
    want = torch.log_softmax(hf_logits(hf, ids)[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    assert c.tokens == ids and c.finish_reason == "length"
    torch.testing.assert_close(torch.tensor(c.logprobs[1:]), want, atol=1e-4, rtol=1e-4)


def test_requests_joining_together_prefill_in_one_forward(pair, tok):
    """Requests added before the same step are prefilled in one right-padded forward and give transformers'
    tokens; a request added with stream=False gets its whole text in its last event (none before)."""
    hf, model = pair
    prompts = [[1] + list(range(40, 40 + n)) for n in (9, 7, 8)]
    calls = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(tuple(args[0].shape)),
                                             with_kwargs=True)
    try:
        engine = Engine(model, tok, max_slots=3, max_len=64)
        slots = [engine.add(p, SamplingParams(max_new_tokens=6, **GREEDY), stream=i != 1)
                 for i, p in enumerate(prompts)]
        texts: dict[int, list[str]] = {s: [] for s in slots}
        done: dict[int, object] = {}
        while engine.active:
            for ev in engine.step():
                texts[ev.slot].append(ev.text)
                if ev.completion is not None:
                    done[ev.slot] = ev.completion
    finally:
        handle.remove()
    assert calls[0] == (3, 10) and len(calls) == 1 + 5  # one prefill forward, then one decode forward per step
    for s, p in zip(slots, prompts):
        assert done[s].tokens == hf_greedy(hf, p, 6)
        assert "".join(texts[s]) == done[s].text == tok.decode(done[s].tokens)
    assert texts[slots[1]][:-1] == [""] * 5 and texts[slots[1]][-1] == done[slots[1]].text
