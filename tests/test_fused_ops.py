"""The fused training ops against the unfused PyTorch formulas they replace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llama2 import ModelConfig, Transformer
from llama2.fused_ops import apply_rope, linear_cross_entropy, rms_norm
from llama2.model import RMSNorm


def _reference_ce(x, w, t):
    return F.cross_entropy(F.linear(x, w).flatten(0, -2), t.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
def test_linear_cross_entropy_equals_cross_entropy_of_logits(chunk):
    torch.manual_seed(0)
    x = torch.randn(3, 21, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 101, (3, 21))
    t[:, ::4] = -100
    ref = _reference_ce(x, w, t)
    gx, gw = torch.autograd.grad(ref * 0.37, (x, w))
    out = linear_cross_entropy(x, w, t, chunk_rows=chunk)
    fx, fw = torch.autograd.grad(out * 0.37, (x, w))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fx, gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fw, gw, rtol=1e-10, atol=1e-12)


def test_linear_cross_entropy_edge_cases():
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    none = torch.full((5,), -100)
    out = linear_cross_entropy(x, w, none)
    out.backward()
    assert out.item() == 0.0 and not x.grad.any() and not w.grad.any()
    t = torch.randint(0, 11, (5,))
    with torch.no_grad():
        val = linear_cross_entropy(x, w, t)
    assert val.grad_fn is None
    torch.testing.assert_close(val, _reference_ce(x, w, t))
    with pytest.raises(ValueError, match="does not match"):
        linear_cross_entropy(x, w, t[:4])


@pytest.mark.parametrize("chunk,ignored", [(16, False), (23, True), (None, True)])
def test_linear_cross_entropy_under_bf16_autocast(chunk, ignored):
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(50, 32, requires_grad=True)
    t = torch.randint(0, 50, (64,))
    if ignored:
        t[::5] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(x, w).float(), t, ignore_index=-100, reduction="sum")
        out = linear_cross_entropy(x, w, t, chunk_rows=chunk)
    gx, gw = torch.autograd.grad(ref, (x, w))
    fx, fw = torch.autograd.grad(out, (x, w))
    assert fx.dtype == fw.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-2)  # both from bf16 logits
    torch.testing.assert_close(fx, gx, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fw, gw, rtol=2e-2, atol=2e-2)


def test_model_loss_and_gradients_equal_the_unfused_path():
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=16)
    model = Transformer(cfg).double()
    tokens = torch.randint(0, 97, (2, 12))
    targets = torch.randint(0, 97, (2, 12))
    targets[0, :5] = -100
    ref = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    out = model(tokens, targets=targets)
    grads = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=name)


def _rope_reference(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def test_rope_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    cos, sin = torch.randn(1, 1, 5, 8, dtype=torch.float64), torch.randn(1, 1, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, cos, sin), _rope_reference(x, cos, sin))
    torch.autograd.gradcheck(lambda v: apply_rope(v, cos, sin), (x,))
    with torch.no_grad():
        torch.testing.assert_close(apply_rope(x, cos, sin), _rope_reference(x, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_the_formula(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(24, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24))
    x = torch.randn(3, 7, 24).to(dtype)
    xf = x.float()
    ref = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    torch.testing.assert_close(norm(x), ref)


def test_linear_cross_entropy_backward_twice_is_a_clear_error():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    out = linear_cross_entropy(x, w, torch.randint(0, 11, (4,)))
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.backward()


def test_rope_keeps_the_input_dtype_with_fp32_tables():
    x = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    y = apply_rope(x, cos, sin)
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y, _rope_reference(x.float(), cos, sin).to(torch.bfloat16))


def _rms_reference(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_rms_norm_values_and_gradients():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 7, 24, dtype=torch.float64)
    out = rms_norm(x, w, 1e-5)
    ref = _rms_reference(x, w, 1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x[:1, :3], w))
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(x, w, 1e-5), ref)


def test_rms_norm_rounds_once_to_the_output_dtype():
    torch.manual_seed(0)
    x = torch.randn(5, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    out = rms_norm(x, w, 1e-5, torch.bfloat16)
    ref = _rms_reference(x, w, 1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.to(torch.bfloat16), rtol=0, atol=0)  # what autocast makes of it
    g = torch.randn(5, 32).to(torch.bfloat16)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g.float())
    assert gx.dtype == gw.dtype == torch.float32
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


@pytest.mark.parametrize("autocast", [False, True])
def test_model_gradients_equal_the_unfused_modules(autocast, monkeypatch):
    """The fp32 model (training's master weights) with the fused norm against plain ops."""
    import llama2.model as M

    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16, max_seq_len=16)
    model = Transformer(cfg)
    tokens, targets = torch.randint(0, 97, (2, 12)), torch.randint(0, 97, (2, 12))
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast)

    def run():
        with amp:
            loss = model(tokens, targets=targets)
        return loss, torch.autograd.grad(loss, list(model.parameters()))

    loss, grads = run()
    monkeypatch.setattr(M, "rms_norm", lambda x, w, eps, dt: F.rms_norm(x, w.shape, w, eps).to(dt))
    ref_loss, ref_grads = run()
    tol = dict(rtol=3e-2, atol=3e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, **tol, msg=name)
