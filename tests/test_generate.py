"""Generation against independent oracles: transformers' greedy `generate` and full-forward logits, a
hand-made distribution for top-p/top-k, SentencePiece byte-fallback decoding for streaming."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from conftest import random_hf_llama
from llama2.config import ModelConfig
from llama2.errors import Llama2Error
from llama2.inference.generate import Completion, Generator, SamplingParams, sample, top_k_filter, top_p_filter
from llama2.model import Transformer
from llama2.tokenizer import Tokenizer

from helpers import TEXTS, VOCAB, ours_from_hf

GREEDY = dict(temperature=0.0, stop_ids=[])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["mha", "gqa"])
def pair(request):
    kv = 4 if request.param == "mha" else 2
    hf = random_hf_llama(seed=1, vocab_size=VOCAB, num_key_value_heads=kv)
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf, ours_from_hf(hf)


def hf_logprobs(hf, seq: list[int]) -> torch.Tensor:
    """log_softmax of transformers' full-forward logits, (len(seq), vocab)."""
    with torch.no_grad():
        return torch.log_softmax(hf(torch.tensor([seq])).logits[0].float(), dim=-1)


# ------------------------------------------------------------------------------------ against transformers


def test_greedy_equals_transformers(pair, tok):
    hf, model = pair
    gen = Generator(model, tok)
    for text in TEXTS:
        ids = tok.encode(text)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               do_sample=False, max_new_tokens=24, min_new_tokens=24)[0, len(ids):].tolist()
        got = gen.generate([ids], SamplingParams(max_new_tokens=24, **GREEDY))[0]
        assert got.tokens == want
        assert got.finish_reason == "length" and got.prompt_tokens == ids
        assert prompt_plus(tok, ids, got.text) == tok.sp.decode(ids + want)  # prompt + completion reads as the whole


def test_cached_logprobs_equal_full_forward(pair, tok):
    """Every decode step's (cached) log-probabilities equal log_softmax of a full forward pass, for greedy and
    sampled tokens."""
    hf, model = pair
    gen = Generator(model, tok)
    ids = tok.encode(TEXTS[0])
    for params in (SamplingParams(max_new_tokens=16, logprobs=True, **GREEDY),
                   SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=16, logprobs=True, seed=3, stop_ids=[])):
        c = gen.generate([ids], params)[0]
        full = hf_logprobs(hf, ids + c.tokens)
        want = full[len(ids) - 1:-1].gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-4, rtol=1e-4)
        if params.temperature == 0:  # and the greedy token is the full forward's argmax at every step
            assert full[len(ids) - 1:-1].argmax(-1).tolist() == c.tokens


def test_batched_equals_unbatched(pair, tok):
    _, model = pair
    gen = Generator(model, tok, max_batch_size=4)
    prompts = [tok.encode(t) for t in TEXTS]
    assert len({len(p) for p in prompts}) > 2
    params = SamplingParams(max_new_tokens=12, logprobs=True, **GREEDY)
    alone = [gen.generate([p], params)[0] for p in prompts]
    # a stop id that ends the first prompt early, so rows finish at different steps and leave the batch
    stop = alone[0].tokens[3]
    params_stop = params.replace(stop_ids=[stop])
    alone_stop = [gen.generate([p], params_stop)[0] for p in prompts]
    assert alone_stop[0].finish_reason == "stop" and len(alone_stop[0].tokens) <= 3
    for p in (params, params_stop):
        batched = gen.generate(prompts, p)
        reference = alone if p is params else alone_stop
        for b, a in zip(batched, reference):
            assert b.tokens == a.tokens and b.finish_reason == a.finish_reason and b.text == a.text
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-4, rtol=1e-4)
    # more prompts than max_batch_size run in chunks; text prompts are encoded with BOS
    small = Generator(model, tok, max_batch_size=3)
    assert [c.tokens for c in small.generate(TEXTS, params)] == [a.tokens for a in alone]


def prompt_plus(tok, prompt_ids, completion: str) -> str:
    """The prompt's text followed by a completion's (what SentencePiece decoding the whole sequence must give)."""
    return tok.sp.decode(prompt_ids) + completion


def test_batched_prompt_logprobs_with_echo(pair, tok):
    hf, model = pair
    gen = Generator(model, tok)
    prompts = [tok.encode(t) for t in TEXTS[:3]]
    for c, p in zip(gen.generate(prompts, SamplingParams(max_new_tokens=5, logprobs=True, echo=True, **GREEDY)),
                    prompts):
        assert c.prompt_tokens == p and c.tokens[:len(p)] == p and len(c.tokens) == len(p) + 5
        assert c.text == tok.decode(c.tokens)
        full = hf_logprobs(hf, c.tokens)
        want = [0.0] + full[:-1].gather(-1, torch.tensor(c.tokens[1:])[:, None]).squeeze(-1).tolist()
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(want), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(gen.token_logprobs([c.tokens])[0]), torch.tensor(want[1:]),
                                   atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ sampling


def test_top_p_removes_exactly_the_tail():
    probs = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    torch.testing.assert_close(top_p_filter(probs, 0.75), torch.tensor([[0.0, 0.4, 0.2, 0.3]]) / 0.9)
    torch.testing.assert_close(top_p_filter(probs, 0.65), torch.tensor([[0.0, 0.4, 0.0, 0.3]]) / 0.7)
    torch.testing.assert_close(top_p_filter(probs, 0.1), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(top_p_filter(probs, 1.0), probs)
    # against the definition on random distributions: the smallest prefix of the sorted probabilities whose
    # sum reaches p
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.softmax(torch.randn(2, 50, generator=g) * 2, -1)
        top = float(torch.rand(1, generator=g)) * 0.98 + 0.01
        got = top_p_filter(p, top)
        for row, out in zip(p, got):
            order = row.tolist()
            ranked = sorted(range(50), key=lambda i: -order[i])
            keep, mass = [], 0.0
            for i in ranked:
                keep.append(i)
                mass += order[i]
                if mass >= top:
                    break
            assert sorted(torch.nonzero(out).flatten().tolist()) == sorted(keep)
            torch.testing.assert_close(out[keep], row[keep] / row[keep].sum())


def test_top_k_filter_and_sampling():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).flatten().tolist() == [False, True, False, True, False]
    assert torch.equal(top_k_filter(logits, 0), logits) and torch.equal(top_k_filter(logits, 9), logits)
    g = torch.Generator().manual_seed(0)
    draws = sample(logits.repeat(200, 1), SamplingParams(temperature=1.0, top_p=1.0, top_k=2), g)
    assert set(draws.tolist()) == {1, 3}
    draws = sample(logits.repeat(200, 1), SamplingParams(temperature=5.0, top_p=1.0, top_k=0), g)
    assert set(draws.tolist()) == {0, 1, 2, 3, 4}
    assert sample(logits, SamplingParams(temperature=0.0)).tolist() == [1]


def test_seed_reproduces_a_sample(pair, tok):
    _, model = pair
    gen = Generator(model, tok)
    ids = [tok.encode(TEXTS[1])]
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, max_new_tokens=24, seed=123, stop_ids=[])
    a, b = gen.generate(ids, params)[0], gen.generate(ids, params)[0]
    c = gen.generate(ids, params.replace(seed=124))[0]
    assert a.tokens == b.tokens and len(a.tokens) == 24
    assert a.tokens != c.tokens
    # top_k 1 is greedy whatever the temperature
    greedy = gen.generate(ids, SamplingParams(max_new_tokens=24, **GREEDY))[0]
    assert gen.generate(ids, params.replace(top_k=1))[0].tokens == greedy.tokens


def test_params_are_validated():
    for bad in (dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                dict(max_new_tokens=-1), dict(stop=[""]), dict(seed=1.5), dict(temperature="hot")):
        with pytest.raises(Llama2Error, match=next(iter(bad))):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ["x"]


# ---------------------------------------------------------------------------------------- stop rules, text


class EosTokenizer(Tokenizer):
    """The fixture tokenizer with another EOS id (to make a random model stop on 'EOS')."""

    def __init__(self, path, eos: int) -> None:
        super().__init__(path)
        self._eos = eos

    @property
    def eos_id(self) -> int:
        return self._eos


def test_stop_on_eos_and_stop_ids(pair, tok, sp_model_path):
    _, model = pair
    ids = [tok.encode(TEXTS[3])]
    free = Generator(model, tok).generate(ids, SamplingParams(max_new_tokens=20, **GREEDY))[0]
    eos = free.tokens[6]
    first = free.tokens.index(eos)
    c = Generator(model, EosTokenizer(sp_model_path, eos)).generate(
        ids, SamplingParams(temperature=0, max_new_tokens=20))[0]
    assert c.tokens == free.tokens[:first] and c.finish_reason == "stop"
    assert prompt_plus(tok, ids[0], c.text) == tok.sp.decode(ids[0] + free.tokens[:first])
    # explicit stop_ids override the tokenizer's EOS
    c = Generator(model, EosTokenizer(sp_model_path, eos)).generate(
        ids, SamplingParams(temperature=0, max_new_tokens=20, stop_ids=[]))[0]
    assert c.tokens == free.tokens and c.finish_reason == "length"


def test_stop_strings(pair, tok):
    _, model = pair
    gen = Generator(model, tok)
    ids = [tok.encode(TEXTS[0])]
    free = gen.generate(ids, SamplingParams(max_new_tokens=30, **GREEDY))[0]
    text = free.text
    assert len(text) > 20
    stop = text[12:15]
    at = text.index(stop)
    params = SamplingParams(max_new_tokens=30, stop=["\x00never", stop], **GREEDY)
    c = gen.generate(ids, params)[0]
    assert c.text == text[:at] and c.finish_reason == "stop"
    assert c.tokens == free.tokens[:len(c.tokens)] and tok.decode(c.tokens).startswith(text[:at] + stop)
    assert "".join(gen.stream(ids[0], params)) == c.text
    # with echo the prompt comes first and the stop string is still cut
    e = gen.generate(ids, params.replace(echo=True))[0]
    full, prompt_text = tok.decode(ids[0] + free.tokens), tok.decode(ids[0])
    assert e.tokens == ids[0] + c.tokens and e.text == full[:full.index(stop, len(prompt_text))]
    assert "".join(gen.stream(ids[0], params.replace(echo=True))) == e.text


def test_stream_equals_generate(pair, tok):
    _, model = pair
    gen = Generator(model, tok)
    for text in TEXTS[:2]:
        params = SamplingParams(temperature=0.8, max_new_tokens=25, seed=7, stop_ids=[])
        pieces = list(gen.stream(text, params))
        assert len(pieces) > 3
        assert "".join(pieces) == gen.generate([text], params)[0].text
        echo = params.replace(echo=True)
        assert "".join(gen.stream(text, echo)) == gen.generate([text], echo)[0].text


def byte_chain_model(tok: Tokenizer, chain: list[int], dim: int = 64) -> Transformer:
    """A model whose greedy next token after chain[i] is chain[i + 1]: attention and MLP outputs are zero, so
    the last hidden state is the current token's embedding, a basis vector the LM head maps to the next id."""
    cfg = ModelConfig(dim=dim, n_layers=1, n_heads=4, vocab_size=tok.vocab_size, hidden_dim=96, max_seq_len=64)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        model.lm_head.weight.zero_()
        for i, (a, b) in enumerate(zip(chain, chain[1:])):
            model.embed_tokens.weight[a] = 0.0
            model.embed_tokens.weight[a, i] = 1.0
            model.lm_head.weight[b, i] = 10.0
    return model


def test_stream_multibyte_character_through_byte_fallback(tok):
    text = "the \U0001F600\u4e2d end"  # an emoji and a CJK character, both absent from the 1000-piece vocabulary
    ids = tok.encode(text, bos=False)
    byte_ids = {tok.piece_to_id(f"<0x{b:02X}>") for b in "\U0001F600\u4e2d".encode()}
    assert len(set(ids) & byte_ids) == 7 and len(set(ids)) == len(ids)  # 4 + 3 byte-fallback tokens
    chain = [tok.bos_id] + ids + [tok.eos_id]
    gen = Generator(byte_chain_model(tok, chain), tok)
    params = SamplingParams(temperature=0, max_new_tokens=30)
    c = gen.generate([[tok.bos_id]], params)[0]
    assert c.tokens == ids and c.finish_reason == "stop"
    assert c.text == text
    pieces = list(gen.stream([tok.bos_id], params))
    assert "".join(pieces) == text and len(pieces) >= 4
    assert not any("\ufffd" in p for p in pieces)
    assert any("\U0001F600" in p for p in pieces) and any("\u4e2d" in p for p in pieces)
    # text that may begin a stop string is held back until it can be decided
    stopped = list(gen.stream([tok.bos_id], params.replace(stop=["\u4e2d e"])))
    assert "".join(stopped) == "the \U0001F600"
    assert gen.generate([[tok.bos_id]], params.replace(stop=["\u4e2d e"]))[0].text == "the \U0001F600"


# ------------------------------------------------------------------------------------------- context length


def test_context_overflow_error_and_truncate(pair, tok):
    _, model = pair
    gen = Generator(model, tok, cache_len=32)
    ids = tok.encode(" ".join(["word"] * 40))[:30]
    assert ids[0] == tok.bos_id and len(ids) == 30
    with pytest.raises(Llama2Error, match=r"30 tokens.*max_new_tokens 8.*38.*context of 32.*truncate"):
        gen.generate([ids], SamplingParams(max_new_tokens=8, **GREEDY))
    c = gen.generate([ids], SamplingParams(max_new_tokens=8, truncate=True, **GREEDY))[0]
    kept = [tok.bos_id] + ids[-23:]
    assert c.prompt_tokens == kept and len(c.tokens) == 8
    assert c.tokens == gen.generate([kept], SamplingParams(max_new_tokens=8, **GREEDY))[0].tokens
    with pytest.raises(Llama2Error, match="context of 32"):
        gen.generate([ids], SamplingParams(max_new_tokens=40, truncate=True, **GREEDY))
    with pytest.raises(Llama2Error, match="outside the model's vocabulary"):
        gen.generate([[1, VOCAB + 5]], SamplingParams(**GREEDY))
    with pytest.raises(Llama2Error, match="empty prompt"):
        gen.generate([[]], SamplingParams(**GREEDY))


def test_zero_new_tokens_scores_the_prompt(pair, tok):
    _, model = pair
    gen = Generator(model, tok)
    ids = tok.encode(TEXTS[0])
    c = gen.generate([ids], SamplingParams(max_new_tokens=0, echo=True, logprobs=True))[0]
    assert isinstance(c, Completion) and c.tokens == ids and c.finish_reason == "length"
    torch.testing.assert_close(torch.tensor(c.logprobs[1:]), torch.tensor(gen.token_logprobs([ids])[0]))


# ----------------------------------------------------------------------------------------------- int8


def test_int8_quantized_decode(pair, tok):
    hf, model = pair
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = Generator(model, tok, quantize="int8")
    from llama2.inference.quantize import Int8Linear

    assert isinstance(gen.model.lm_head, Int8Linear) and isinstance(model.lm_head, torch.nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    assert gen.model.embed_tokens.weight.data_ptr() == model.embed_tokens.weight.data_ptr()  # shared
    ids = tok.encode(TEXTS[0])
    c = gen.generate([ids], SamplingParams(max_new_tokens=12, logprobs=True, **GREEDY))[0]
    # the quantised model's logprobs stay close to the fp32 model's on the same tokens
    full = hf_logprobs(hf, ids + c.tokens)[len(ids) - 1:-1].gather(-1, torch.tensor(c.tokens)[:, None]).squeeze(-1)
    assert (torch.tensor(c.logprobs) - full).abs().max() < 0.05
    with pytest.raises(Llama2Error, match="quantize"):
        Generator(model, tok, quantize="int4")


# ------------------------------------------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sp_model_path):
    hf = random_hf_llama(seed=2, vocab_size=VOCAB)
    d = tmp_path_factory.mktemp("ckpt")
    hf.save_pretrained(d)
    shutil.copy(sp_model_path, d / "tokenizer.model")
    return d, hf


def test_cli_generate(checkpoint, tok, capsys):
    from llama2.cli import main

    d, hf = checkpoint
    assert main(["generate", str(d), "--prompt", TEXTS[0], "--temperature", "0", "--max-new-tokens", "16",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    ids = tok.encode(TEXTS[0])
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           do_sample=False, max_new_tokens=16, eos_token_id=tok.eos_id)[0, len(ids):].tolist()
    if tok.eos_id in want:
        want = want[:want.index(tok.eos_id)]
    assert prompt_plus(tok, ids, out[:-1]) == tok.sp.decode(ids + want) and out.endswith("\n")
    # a stop string ends the greedy completion right before it
    stop = out[5:8]
    assert main(["generate", str(d), "--prompt", TEXTS[0], "--temperature", "0", "--max-new-tokens", "16",
                 f"--stop={stop}", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == out[:out.index(stop)] + "\n"

    def seeded(*extra: str) -> str:
        assert main(["generate", str(d), "--prompt", TEXTS[0], "--seed", "5", "--max-new-tokens", "16",
                     "--device", "cpu", *extra]) == 0
        return capsys.readouterr().out

    # a seed reproduces a sample, and a stop string cuts that same sample
    free = seeded()
    assert seeded() == free and len(free) > 8
    stop = free[4:7]
    assert seeded(f"--stop={stop}") == free[:free.index(stop)] + "\n"


def test_cli_errors_are_one_line(checkpoint, tmp_path, capsys):
    from llama2.cli import main

    d, _ = checkpoint
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "Traceback" not in err
    assert main(["generate", str(d), "--prompt", "word " * 300, "--max-new-tokens", "10", "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "context of 256" in captured.err
    assert main(["generate", str(d), "--prompt", "hi", "--top-p", "0", "--device", "cpu"]) == 2
    assert re.search(r"top[-_]p", capsys.readouterr().err)


@pytest.mark.parametrize("vnni", [False, True])
def test_int8_kernel_matches_q8_0_arithmetic(vnni: bool):
    """The C kernel (its AVX2 dot products, and its AVX-512 VNNI ones) against the q8_0 arithmetic written out in
    float64: int8 weight and activation blocks of 32, exact integer block sums, scaled by the two block scales."""
    from llama2.inference import cpu_kernels

    if not cpu_kernels.available():
        pytest.skip("no C compiler or no AVX2/FMA/F16C on this machine")
    if vnni and not cpu_kernels.has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI (avx512_vnni and avx512vl)")
    lib = cpu_kernels.build(vnni=vnni)
    g = torch.Generator().manual_seed(0)
    for N, K, M in [(37, 64, 1), (50, 288, 3), (9, 2048, 16)]:  # K/32 with and without a multiple of 8 blocks
        w, x = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g) * 3
        q, scale = cpu_kernels.quantize_blocks(w)
        assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.dtype == torch.float16
        torch.testing.assert_close(cpu_kernels.dequantize_blocks(q, scale), w, atol=scale.float().max() / 2, rtol=0)
        xb = x.reshape(M, K // 32, 32)
        xd = xb.abs().amax(-1) / 127
        xq = torch.round(xb * torch.where(xd > 0, 127 / xb.abs().amax(-1), 0)[..., None])
        wq = q.reshape(N, K // 32, 32).double()
        block_sums = torch.einsum("mbi,nbi->mnb", xq.double(), wq)
        want = (block_sums * xd.double()[:, None, :] * scale.double()[None]).sum(-1)
        got = cpu_kernels.q8_matmul(x.contiguous(), q, scale, lib)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_fp32_few_row_kernel_matches_f_linear(pair, tok):
    """cpu_kernels.f32_rows (up to 8 rows, each weight read once) against F.linear on odd shapes (row groups of
    4 with remainders, 8-wide and scalar tails, a shape split over threads), and a Generator decoding 3 requests
    together (its steps go through the kernel) gives the greedy tokens of the plain F.linear path, which
    test_greedy_equals_transformers ties to transformers."""
    import torch.nn.functional as F

    from llama2.inference import cpu_kernels
    from llama2.inference.fastlinear import MatvecLinear

    if not cpu_kernels.available():
        pytest.skip("no C compiler or no AVX2/FMA on this machine")
    g = torch.Generator().manual_seed(0)
    for M, N, K in [(2, 3, 5), (3, 37, 29), (4, 13, 8), (5, 9, 40), (7, 50, 263), (8, 1031, 517)]:
        w, x = torch.randn(N, K, generator=g) / K ** 0.5, torch.randn(M, K, generator=g)
        torch.testing.assert_close(cpu_kernels.f32_rows(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    hf, model = pair
    gen = Generator(model, tok, max_batch_size=3)
    assert isinstance(gen.model.lm_head, MatvecLinear) and gen.model.lm_head.max_kernel_rows == 8
    prompts = [tok.encode(t) for t in TEXTS[:3]]
    params = SamplingParams(max_new_tokens=8, logprobs=True, **GREEDY)
    want = Generator(model, tok, max_batch_size=3, fast_fp32=False).generate(prompts, params)
    for a, b in zip(gen.generate(prompts, params), want):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)


def test_compiled_decode_equals_eager(tok):
    """torch.compile'd fixed-shape decoding (GQA, prompts of different lengths in 2 slots, the third request
    joining when the first leaves) gives the eager tokens."""
    model = ours_from_hf(random_hf_llama(seed=3, vocab_size=VOCAB, num_key_value_heads=2))
    prompts = [tok.encode(t) for t in TEXTS[:3]]
    params = [SamplingParams(max_new_tokens=n, logprobs=True, **GREEDY) for n in (4, 10, 8)]
    eager = [Generator(model, tok).generate([p], q)[0] for p, q in zip(prompts, params)]
    compiled = Generator(model, tok, compile=True, max_batch_size=2).generate(prompts, params)
    for a, b in zip(eager, compiled):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)
