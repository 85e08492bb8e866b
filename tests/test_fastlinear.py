"""The fp32 matrix-vector kernel (cpu_kernels.f32_matvec) and its use for batch-1 decoding (fastlinear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama2.inference import cpu_kernels
from llama2.inference.fastlinear import MatvecLinear, with_matvec_kernel
from llama2.inference.generate import Generator, SamplingParams

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="no C compiler or no AVX2/FMA on this machine")


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_matvec_matches_f_linear_on_odd_shapes(threads: int) -> None:
    """Rows not a multiple of 4 or 8, in_features below 8, between the 8- and 32-wide loops, and with
    scalar tails; the last shape is large enough to be split over threads."""
    g = torch.Generator().manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for N, K in [(1, 1), (3, 5), (37, 29), (13, 8), (9, 40), (50, 263), (257, 256), (1031, 517)]:
            w = torch.randn(N, K, generator=g) / K ** 0.5
            x = torch.randn(1, K, generator=g)
            got = cpu_kernels.f32_matvec(x, w)
            assert got.shape == (1, N) and got.dtype == torch.float32
            torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(old)


@needs_kernel
def test_matvec_linear_kernel_and_fallbacks() -> None:
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(45, 19, bias=True)
    m = MatvecLinear(lin)
    assert m.weight is lin.weight and m.bias is lin.bias  # shared, not copied
    with torch.no_grad():
        one = torch.randn(1, 1, 45, generator=g)
        torch.testing.assert_close(m(one), lin(one), rtol=1e-5, atol=1e-5)  # the kernel path
        many = torch.randn(2, 3, 45, generator=g)
        assert torch.equal(m(many), lin(many))  # more than one row: F.linear itself
        m64 = MatvecLinear(torch.nn.Linear(45, 19, dtype=torch.float64))
        assert torch.equal(m64(one.double()), F.linear(one.double(), m64.weight, m64.bias))  # fp64: F.linear
    # with gradients wanted, the result must carry them: F.linear, not the kernel
    y = m(torch.randn(1, 45, generator=g))
    y.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_with_matvec_kernel_shares_parameters(tiny_model) -> None:
    model = tiny_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = with_matvec_kernel(model)
    assert isinstance(fast.lm_head, MatvecLinear) and type(model.lm_head) is not MatvecLinear
    assert fast.layers[0].mlp.down_proj.weight is model.layers[0].mlp.down_proj.weight
    assert fast.embed_tokens.weight is model.embed_tokens.weight
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(fast.state_dict()) == set(model.state_dict())


@needs_kernel
def test_generator_uses_kernel_and_decodes_like_pytorch(tiny_model) -> None:
    """Greedy decoding through the kernel equals decoding through F.linear, logprobs to fp32 rounding."""

    class Tok:
        bos_id, eos_id = 1, 2

        def encode(self, text, bos=True, eos=False):
            raise NotImplementedError

        def decode(self, ids):
            return ""

    fast = Generator(tiny_model, Tok())
    plain = Generator(tiny_model, Tok(), fast_fp32=False)
    assert isinstance(fast.model.lm_head, MatvecLinear) and plain.model is tiny_model
    params = SamplingParams(temperature=0.0, max_new_tokens=16, stop_ids=[], logprobs=True)
    prompts = [[1, 5, 9, 200, 31]]
    a, b = fast.generate(prompts, params)[0], plain.generate(prompts, params)[0]
    assert a.tokens == b.tokens
    torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-4, atol=1e-4)


@pytest.fixture
def tiny_model():
    from llama2.config import ModelConfig
    from llama2.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=172, max_seq_len=64)
    return Transformer(cfg).eval()


@needs_kernel
@pytest.mark.parametrize("rows", [2, 3, 4, 5, 16, 33, 300])
def test_row_kernels_and_packed_onednn_match_f_linear(rows: int) -> None:
    """Several rows: the tiled row kernel (no packing) and oneDNN on the packed weight (packed=True) both give
    F.linear's result to fp32 rounding, with a bias and an odd number of outputs."""
    from llama2.inference.fastlinear import onednn_available

    g = torch.Generator().manual_seed(rows)
    lin = torch.nn.Linear(70, 33, bias=True)
    x = torch.randn(rows, 70, generator=g)
    with torch.no_grad():
        want = lin(x)
        rows_kernel = MatvecLinear(lin, max_rows=512)(x)
        torch.testing.assert_close(rows_kernel, want, rtol=1e-5, atol=1e-5)
        packed = MatvecLinear(lin, max_rows=8, packed=True)
        torch.testing.assert_close(packed(x.view(1, rows, 70)), want.view(1, rows, 33), rtol=1e-5, atol=1e-5)
        assert (packed._packed is not None) == onednn_available()


def test_a_packed_weight_follows_in_place_updates() -> None:
    """The packed copy is remade when the shared weight changes (an optimiser step between two rollouts)."""
    lin = torch.nn.Linear(16, 8, bias=False)
    m = MatvecLinear(lin, max_rows=8, packed=True)
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x), lin(x), rtol=1e-5, atol=1e-5)
        lin.weight.mul_(-2.0)  # in place, as an optimiser does
        torch.testing.assert_close(m(x), lin(x), rtol=1e-5, atol=1e-5)
        lin.weight = torch.nn.Parameter(torch.randn(8, 16))  # replaced: m still holds the old parameter object
        m.weight = lin.weight
        torch.testing.assert_close(m(x), lin(x), rtol=1e-5, atol=1e-5)
