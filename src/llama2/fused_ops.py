"""Hand-written autograd functions that cut memory traffic in training.

- `linear_cross_entropy`: the LM head and the cross-entropy in one pass over chunks of tokens. The full
  (tokens x vocab) logits are never stored: each chunk's logits are turned into their gradient in place
  (softmax minus one-hot) right away, and the gradients of the hidden states and of the head's weight are
  computed in forward. Activation memory drops from tokens x vocab to tokens x dim, and the softmax needs one
  exponential per logit instead of two.
- `apply_rope`: rotary embeddings with a backward that needs no saved activations and no zero-filled
  slice gradients.
- `rms_norm`: RMSNorm of an fp32 input with fp32 weights whose output is already in the dtype its consumers
  compute in (bf16 under autocast: the value autocast would make of it, rounded once instead of once per
  consuming Linear), and a backward of a few fused passes instead of autograd's chain of elementwise ops.
- `swiglu`: the SwiGLU feed-forward down(silu(gate(x)) * up(x)) with gate and up as one matrix multiply (under
  autocast their weights are cast into one bf16 matrix, which costs no more than the two casts autocast does),
  and a backward that writes both branches' gradients into one buffer, so the input's gradient is one GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def _chunk_rows(n_rows: int, vocab: int, dim: int, device: torch.device) -> int:
    """Rows per chunk: ~8 MiB of fp32 logits on CPU (~256 MiB on accelerators), but at least `dim` rows, since
    every chunk re-reads the head's weight and updates its gradient (vocab x dim each): with fewer rows than dim
    that traffic would outweigh the logits it saves. On CPU, buffers much larger than that are fresh memory from
    the OS on every allocation (page faults): measured 25-30% slower per step of the head in bf16 at 4x the rows."""
    budget = 1 << (21 if device.type == "cpu" else 26)
    return max(1, min(n_rows, max(budget // max(vocab, 1), dim)))


def _compute_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, chunk: int,
                dtype: torch.dtype, grad_enabled: bool) -> Tensor:  # type: ignore[override]
        need_x, need_w = (grad_enabled and ctx.needs_input_grad[i] for i in (0, 1))
        acc = torch.promote_types(dtype, torch.float32)  # softmax and accumulation dtype
        w = weight.to(dtype)
        grad_x = torch.empty_like(x) if need_x else None
        grad_w: Tensor | None = None
        total = torch.zeros((), dtype=acc, device=x.device)
        any_ignored = bool((targets == ignore_index).any())
        for start in range(0, x.shape[0], chunk):
            xc = x[start:start + chunk].to(dtype)
            tc = targets[start:start + chunk]
            valid = tc != ignore_index
            safe = torch.where(valid, tc, 0)[:, None]
            # log-softmax in fp32: one fused row-wise pass (after the cast) instead of max, exp, sum and divide
            logp = torch.log_softmax(xc @ w.t(), dim=1, dtype=acc)
            picked = logp.gather(1, safe).squeeze(1)
            total -= (picked * valid).sum() if any_ignored else picked.sum()
            if not (need_x or need_w):
                continue
            probs = logp.exp_()  # softmax; becomes d(loss)/d(logits) below
            probs.scatter_add_(1, safe, -valid[:, None].to(probs.dtype))
            if any_ignored:
                probs.mul_(valid[:, None])
            g = probs.to(dtype)
            del logp, probs
            if need_x:
                if grad_x.dtype == dtype:
                    torch.mm(g, w, out=grad_x[start:start + chunk])
                else:
                    grad_x[start:start + chunk] = g @ w
            if need_w:
                if grad_w is None:
                    grad_w = (g.t() @ xc).to(acc)
                elif dtype == acc:
                    grad_w.addmm_(g.t(), xc)
                else:  # low-precision product, added to the fp32 sum in one pass
                    grad_w += g.t() @ xc
        if need_w and grad_w is None:  # no rows at all
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        # kept on ctx (not save_for_backward): backward scales them in place and hands them over, once
        ctx.grads = (grad_x, grad_w.to(weight.dtype) if grad_w is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        if ctx.grads is None:
            raise RuntimeError("linear_cross_entropy: backward can run only once (its gradients were computed "
                               "in forward and handed over); recompute the loss instead of retain_graph=True")
        grad_x, grad_w = ctx.grads
        ctx.grads = None
        if grad_x is not None:
            grad_x.mul_(grad_out.to(grad_x.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_out.to(grad_w.dtype))
        return grad_x, grad_w, None, None, None, None, None


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX,
                         chunk_rows: int | None = None) -> Tensor:
    """Sum over positions of cross_entropy(x @ weight.T, targets), skipping targets == ignore_index.

    x (..., dim), weight (vocab, dim), targets (...) of the same leading shape. Equal to
    `F.cross_entropy(F.linear(x, weight).float().flatten(0, -2), targets.flatten(), reduction="sum")` to float
    rounding; under autocast the matmuls run in the autocast dtype and the softmax in fp32."""
    if x.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden states {tuple(x.shape)}")
    x2, t = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
    dtype = _compute_dtype(x, weight)
    chunk = chunk_rows or _chunk_rows(x2.shape[0], weight.shape[0], weight.shape[1], x.device)
    grad_enabled = torch.is_grad_enabled()
    with torch.autocast(x.device.type, enabled=False):
        return _LinearCrossEntropy.apply(x2, weight, t, ignore_index, chunk, dtype, grad_enabled)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, sign=1.0)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, sin, sign=-1.0), None, None


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """y = x * cos + rotate_half(x) * sin (sign 1), or the transpose map, for backward (sign -1).

    Halves layout: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2; transposed: g1 c1 + g2 s2, g2 c2 - g1 s1."""
    half = x.shape[-1] // 2
    # low-precision x (bf16 q/k with fp32 tables under autocast) is widened once, so that every op below runs
    # the same-dtype kernels rather than mixed-dtype ones (the values are the same)
    wide = x.to(torch.promote_types(x.dtype, cos.dtype))
    out = wide * cos
    x1, x2 = wide[..., :half], wide[..., half:]
    s1, s2 = sin[..., :half], sin[..., half:]
    out[..., :half].addcmul_(x2, s1 if sign > 0 else s2, value=-sign)
    out[..., half:].addcmul_(x1, s2 if sign > 0 else s1, value=sign)
    return out.to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, H, T, D) by cos/sin tables broadcastable to it (halves layout, as Hugging Face)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rope.apply(x, cos, sin)
    return _rotate(x, cos, sin, sign=1.0)


def compute_dtype(x: Tensor, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a Linear reading `x` computes in: the autocast dtype where autocast is on, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight_dtype


def _rstd(x: Tensor, eps: float) -> Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, from one reduction pass (the 2-norm) instead of pow + mean."""
    norm = torch.linalg.vector_norm(x, 2, dim=-1, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    return norm.square_().div_(x.shape[-1]).add_(eps).rsqrt_()


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        # rstd = 1 / sqrt(mean(x^2) + eps) from one reduction pass (the 2-norm) instead of pow + mean
        rstd = _rstd(x, eps)
        xhat = x * rstd
        out = torch.mul(xhat, weight, out=torch.empty(x.shape, dtype=out_dtype, device=x.device))
        ctx.save_for_backward(xhat, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        xhat, rstd, weight = ctx.saved_tensors
        g = grad.to(xhat.dtype)
        d = xhat.shape[-1]
        gw = None
        prod = g * xhat  # d(loss)/d(weight) summed over rows; its rows dotted with weight give (g * w) . xhat
        if ctx.needs_input_grad[1]:
            gw = prod.reshape(-1, d).sum(0)
        gx = None
        if ctx.needs_input_grad[0]:
            dot = torch.mv(prod.reshape(-1, d), weight).view(*xhat.shape[:-1], 1)
            # gx = rstd * (g w - xhat * mean(g w xhat)); g w written in place of g when g is our own copy
            gx = torch.mul(g, weight, out=g if g is not grad else None)
            gx.addcmul_(xhat, dot.div_(d), value=-1.0).mul_(rstd)
        return gx, gw, None, None


def rms_norm(x: Tensor, weight: Tensor, eps: float, out_dtype: torch.dtype | None = None) -> Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, computed in x's dtype (fp32 for the model's fp32
    master weights) and rounded once to `out_dtype` (default: x's dtype)."""
    out_dtype = out_dtype or x.dtype
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        with torch.autocast(x.device.type, enabled=False):
            return _RMSNorm.apply(x, weight, eps, out_dtype)
    return torch.mul(x * _rstd(x, eps), weight, out=torch.empty(x.shape, dtype=out_dtype, device=x.device))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor,  # type: ignore[override]
                dtype: torch.dtype) -> Tensor:
        h, d = w_gate.shape
        x2 = x.reshape(-1, d).to(dtype)
        gu = torch.empty((x2.shape[0], 2 * h), dtype=dtype, device=x.device)
        if w_gate.dtype != dtype:  # cast both into one matrix (autocast would cast each anyway): one GEMM
            w_gu = torch.empty((2 * h, d), dtype=dtype, device=x.device)
            w_gu[:h].copy_(w_gate)
            w_gu[h:].copy_(w_up)
            torch.mm(x2, w_gu.t(), out=gu)
        else:  # no copy of the weights: two GEMMs into the halves of one buffer
            w_gu = None
            torch.mm(x2, w_gate.t(), out=gu[:, :h])
            torch.mm(x2, w_up.t(), out=gu[:, h:])
        s = F.silu(gu[:, :h])
        a = s * gu[:, h:]
        wd = w_down.to(dtype)
        y = a @ wd.t()
        ctx.save_for_backward(x2, gu, s, a, wd, *((w_gu,) if w_gu is not None else (w_gate, w_up)))
        ctx.shapes = x.shape, x.dtype, (w_gate.dtype, w_up.dtype, w_down.dtype)
        return y.view(*x.shape[:-1], wd.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x2, gu, s, a, wd, *w = ctx.saved_tensors
        x_shape, x_dtype, (dt_gate, dt_up, dt_down) = ctx.shapes
        h = s.shape[1]
        gy = grad.reshape(-1, wd.shape[0]).to(a.dtype)
        g_down = (gy.t() @ a).to(dt_down) if ctx.needs_input_grad[3] else None
        ga = gy @ wd
        dgu = torch.empty_like(gu)  # [d/d gate | d/d up], each rounded as autograd's own ops would
        dg = dgu[:, :h]
        torch.mul(ga, gu[:, h:], out=dg)  # d/d silu(gate)
        torch.ops.aten.silu_backward(dg, gu[:, :h], grad_input=dg)
        torch.mul(ga, s, out=dgu[:, h:])
        del ga
        gx = None
        if ctx.needs_input_grad[0]:
            if len(w) == 1:
                gx = dgu @ w[0]
            else:
                gx = torch.mm(dg, w[0])
                gx.addmm_(dgu[:, h:], w[1])
            gx = gx.view(x_shape).to(x_dtype)
        g_gate = g_up = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g_gu = dgu.t() @ x2
            g_gate, g_up = g_gu[:h].to(dt_gate), g_gu[h:].to(dt_up)
        return gx, g_gate, g_up, g_down, None


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """down(silu(gate(x)) * up(x)) with bias-free weights (out, in), in the dtype a Linear would compute in
    (the autocast dtype under autocast). Equal to the three F.linear calls to float rounding."""
    dtype = compute_dtype(x, w_gate.dtype)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_gate, w_up, w_down)):
        with torch.autocast(x.device.type, enabled=False):
            return _SwiGLU.apply(x, w_gate, w_up, w_down, dtype)
    xc = x.to(dtype)
    return F.linear(F.silu(F.linear(xc, w_gate.to(dtype))) * F.linear(xc, w_up.to(dtype)), w_down.to(dtype))
