"""Speculative decoding: greedy output equals the target's alone; sampled tokens follow the target's distribution
(checked against the exact distribution by enumeration on a 6-token vocabulary); the acceptance rate."""

from __future__ import annotations

import pytest
import torch

from llama2.config import ModelConfig
from llama2.errors import Llama2Error
from llama2.inference.sampling import SamplingParams
from llama2.inference.speculative import SpeculativeDecoder, distribution, lookup
from llama2.model import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


def model(seed: int, std: float, vocab: int = 64, dim: int = 32, n_layers: int = 2, n_kv: int = 2) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(dim=dim, n_layers=n_layers, n_heads=4, n_kv_heads=n_kv, vocab_size=vocab,
                                hidden_dim=64, max_seq_len=128))
    m.init_weights(std)
    return m.eval()


def target_greedy(m: Transformer, prompt: list[int], n: int) -> list[int]:
    """The target alone: one token per step with its KV cache."""
    cache = m.make_cache(1, 128)
    with torch.no_grad():
        logits = m(torch.tensor([prompt]), 0, cache)[0, -1]
        out, pos = [], len(prompt)
        for _ in range(n):
            out.append(int(logits.argmax()))
            logits = m(torch.tensor([[out[-1]]]), pos, cache)[0, -1]
            pos += 1
    return out


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_output_equals_the_target_alone(k):
    target, draft = model(0, 0.2), model(1, 0.2, dim=16, n_layers=1, n_kv=1)
    prompt = [1, 5, 9, 3]
    want = target_greedy(target, prompt, 40)
    res = SpeculativeDecoder(target, draft, k=k).generate(prompt, SamplingParams(temperature=0, max_new_tokens=40))
    assert res.tokens == want and res.finish_reason == "length"
    assert res.proposed > 0 and 0 <= res.acceptance_rate <= 1
    self_draft = SpeculativeDecoder(target, target, k=k).generate(prompt, SamplingParams(temperature=0,
                                                                                          max_new_tokens=40))
    assert self_draft.tokens == want and self_draft.acceptance_rate == 1.0
    assert self_draft.target_calls == -(-40 // (k + 1))  # k + 1 tokens per target pass


def test_stop_ids_end_the_output():
    target = model(0, 0.2)
    want = target_greedy(target, [1, 2], 30)
    stop = want[7]
    res = SpeculativeDecoder(target, model(1, 0.2), k=4).generate(
        [1, 2], SamplingParams(temperature=0, max_new_tokens=30, stop_ids=[stop]))
    assert res.finish_reason == "stop" and res.tokens == want[:want.index(stop)]


def perturbed(m: Transformer, scale: float, seed: int = 9) -> Transformer:
    """A draft that overlaps the target but differs from it: its weights plus relative noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return m


def exact_marginals(m: Transformer, prompt: list[int], n: int, params: SamplingParams) -> list[torch.Tensor]:
    """The exact distribution of each of the n generated tokens under the target alone (by enumeration)."""
    vocab = m.config.vocab_size
    marg = [torch.zeros(vocab, dtype=torch.float64) for _ in range(n)]
    probs = {(): 1.0}
    with torch.no_grad():
        for pos in range(n):
            nxt = {}
            for prefix, pr in probs.items():
                p = distribution(m(torch.tensor([prompt + list(prefix)]))[0, -1], params).double()
                marg[pos] += pr * p
                for t in range(vocab):
                    if p[t] > 0:
                        nxt[prefix + (t,)] = pr * float(p[t])
            probs = nxt
    return marg


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=3),
                                    SamplingParams(temperature=0.7, top_p=0.9, top_k=4, max_new_tokens=3)])
def test_sampled_tokens_follow_the_target_distribution(params):
    target, draft = model(2, 0.3, vocab=6), perturbed(model(2, 0.3, vocab=6), 0.1)
    prompt = [1, 2]
    exact = exact_marginals(target, prompt, 3, params)
    tv, accepted, proposed = sampled_against_exact(SpeculativeDecoder(target, draft, k=3), prompt, params, exact)
    assert max(tv) < 0.04, tv
    draft_alone = exact_marginals(draft, prompt, 3, params)
    assert max(0.5 * (d - e).abs().sum().item() for d, e in zip(draft_alone, exact)) > 0.15  # the draft differs
    assert 0 < accepted / proposed < 1


def sampled_against_exact(spec: SpeculativeDecoder, prompt: list[int], params: SamplingParams,
                          exact: list[torch.Tensor], n: int = 3000) -> tuple[list[float], int, int]:
    """n seeded runs of spec: the total variation distance of each position's token counts from the exact
    marginals, and the draft tokens accepted and proposed in all."""
    gen = torch.Generator().manual_seed(0)
    counts = [torch.zeros(len(exact[0]), dtype=torch.float64) for _ in exact]
    proposed = accepted = 0
    for _ in range(n):
        res = spec.generate(prompt, params, generator=gen)
        for pos, t in enumerate(res.tokens):
            counts[pos][t] += 1
        proposed, accepted = proposed + res.proposed, accepted + res.accepted
    return [0.5 * (c / n - e).abs().sum().item() for c, e in zip(counts, exact)], accepted, proposed


def test_a_perfect_draft_is_always_accepted_when_sampling():
    target = model(4, 0.3)
    res = SpeculativeDecoder(target, target, k=4).generate([1, 3], SamplingParams(temperature=1.0, top_p=1.0,
                                                                                   max_new_tokens=20, seed=0))
    assert len(res.tokens) == 20 and res.acceptance_rate == pytest.approx(1.0)


def test_prompt_lookup_proposes_what_followed_the_latest_occurrence():
    seq = [1, 2, 3, 9, 8, 1, 2, 3, 7, 5, 4, 1, 2, 3]
    assert lookup(seq, 3, 2) == [7, 5]  # [1, 2, 3] last occurred at 5..7, followed by 7, 5
    assert lookup(seq, 3, 9) == [7, 5, 4, 1, 2, 3]  # at most what follows (the tail itself included)
    assert lookup([4, 6, 5, 6], 3, 2) == [5, 6]  # no [6, 5, 6] or [5, 6] before: the last token alone
    assert lookup([4, 6, 5], 3, 2) == [] and lookup([7], 3, 2) == []
    assert lookup([4, 6, 5, 6], 3, 2, ngram_min=2) == []  # a single token is not enough


def test_prompt_lookup_keeps_the_target_s_greedy_output():
    """No draft model: the proposals come from the text; the output is the target's own, in fewer passes when the
    text repeats itself."""
    target = model(0, 0.2)
    prompt = [1, 5, 9, 3, 7, 5, 9, 3, 7, 5]
    want = target_greedy(target, prompt, 40)
    res = SpeculativeDecoder(target, None, k=4).generate(prompt, SamplingParams(temperature=0, max_new_tokens=40))
    assert res.tokens == want and res.finish_reason == "length"
    assert res.proposed > 0 and res.target_calls == 40 - res.accepted


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=3),
                                    SamplingParams(temperature=0.7, top_p=0.9, top_k=4, max_new_tokens=3)])
def test_prompt_lookup_samples_follow_the_target_distribution(params):
    target = model(2, 0.3, vocab=6)
    prompt = [1, 2, 3, 1, 2, 4, 1, 2]  # "1 2" is followed by 3 and by 4: proposals that are sometimes wrong
    exact = exact_marginals(target, prompt, 3, params)
    tv, accepted, proposed = sampled_against_exact(SpeculativeDecoder(target, None, k=3, ngram=2), prompt, params,
                                                   exact)
    assert max(tv) < 0.04, tv
    assert 0 < accepted / proposed < 1


def test_errors():
    with pytest.raises(Llama2Error, match="vocabulary"):
        SpeculativeDecoder(model(0, 0.2), model(1, 0.2, vocab=65))
    with pytest.raises(Llama2Error, match="positive integer"):
        SpeculativeDecoder(model(0, 0.2), model(1, 0.2), k=0)
    with pytest.raises(Llama2Error, match="exceed the context"):
        SpeculativeDecoder(model(0, 0.2), model(1, 0.2)).generate([1] * 100, SamplingParams(max_new_tokens=40))
    with pytest.raises(Llama2Error, match="ngram"):
        SpeculativeDecoder(model(0, 0.2), None, ngram=0)
    with pytest.raises(Llama2Error, match="ngram_min"):
        SpeculativeDecoder(model(0, 0.2), None, ngram=2, ngram_min=3)
    with pytest.raises(Llama2Error, match="non-empty"):
        SpeculativeDecoder(model(0, 0.2), model(1, 0.2)).generate([], SamplingParams())


def test_enumeration_is_a_distribution():
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=2)
    for m in exact_marginals(model(2, 0.6, vocab=6), [1], 2, params):
        assert m.sum().item() == pytest.approx(1.0)


def test_generate_with_a_draft_prints_the_target_greedy_text(tmp_path, sp_model_path):
    """`llama2 generate --draft`: the same greedy text as the target alone, and the acceptance rate on stderr."""
    import subprocess
    import sys

    from helpers import SUB_ENV

    from llama2.checkpoint import save_model
    from llama2.tokenizer import Tokenizer

    tok = Tokenizer(sp_model_path)
    torch.manual_seed(0)
    big = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1000, multiple_of=16,
                                  max_seq_len=96))
    small = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=1, vocab_size=1000, multiple_of=16,
                                    max_seq_len=96))
    save_model(big, tmp_path / "target", tok)
    save_model(small, tmp_path / "draft", tok)
    base = [sys.executable, "-m", "llama2", "generate", str(tmp_path / "target"), "--prompt", "The value of",
            "--temperature", "0", "--max-new-tokens", "20", "--device", "cpu"]
    alone = subprocess.run(base, capture_output=True, text=True, env=SUB_ENV)
    spec = subprocess.run(base + ["--draft", str(tmp_path / "draft"), "--draft-k", "3"], capture_output=True,
                          text=True, env=SUB_ENV)
    assert alone.returncode == 0 and spec.returncode == 0, spec.stderr
    assert spec.stdout == alone.stdout and alone.stdout.strip()
    assert "draft tokens accepted" in spec.stderr
    looked = subprocess.run(base + ["--draft", "lookup"], capture_output=True, text=True, env=SUB_ENV)
    assert looked.returncode == 0 and looked.stdout == alone.stdout, looked.stderr
    bad = subprocess.run(base + ["--draft", str(tmp_path / "nowhere")], capture_output=True, text=True, env=SUB_ENV)
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
