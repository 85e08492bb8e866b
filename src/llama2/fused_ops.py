"""Hand-written autograd functions that cut memory traffic in training.

- `linear_cross_entropy`: the LM head and the cross-entropy in one pass over chunks of tokens. The full
  (tokens x vocab) logits are never stored: each chunk's logits are turned into their gradient in place
  (softmax minus one-hot) right away, and the gradients of the hidden states and of the head's weight are
  computed in forward. Activation memory drops from tokens x vocab to tokens x dim. Per chunk the softmax is one
  fused log-softmax pass (which gives the loss) and one in-place exponential, into buffers reused by every chunk.
- `apply_rope`: rotary embeddings with a backward that needs no saved activations and no zero-filled
  slice gradients.
- `rms_norm`: RMSNorm of an fp32 input with fp32 weights whose output is already in the dtype its consumers
  compute in (bf16 under autocast: the value autocast would make of it, rounded once instead of once per
  consuming Linear), and a backward of a few fused passes instead of autograd's chain of elementwise ops.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .errors import Llama2Error

IGNORE_INDEX = -100


def _chunk_rows(n_rows: int, vocab: int, dim: int, device: torch.device) -> int:
    """Rows per chunk: ~8 MiB of fp32 logits on CPU (~128 MiB on accelerators; a chunk holds two fp32 buffers,
    the logits and their log-softmax), but at least `dim` rows, since every chunk re-reads the head's weight and
    updates its gradient (vocab x dim each): with fewer rows than dim that traffic would outweigh the logits it
    saves. On CPU larger buffers measured slower (bf16, 2048 tokens, vocab 4096-8192: 4x the rows 25-30% slower
    per step of the head): they come fresh from the OS on every call (page faults)."""
    budget = 1 << (21 if device.type == "cpu" else 25)
    return max(1, min(n_rows, max(budget // max(vocab, 1), dim)))


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
        # one set of chunk buffers, reused by every chunk: fresh multi-MiB buffers per chunk cost page faults
        # on CPU that were measured to be as slow as the softmax itself
        rows, vocab = min(chunk, x.shape[0]), w.shape[0]
        low = dtype != acc
        logits_buf = torch.empty((rows, vocab), dtype=dtype, device=x.device)
        wide_buf = torch.empty((rows, vocab), dtype=acc, device=x.device) if low else None
        logp_buf = torch.empty((rows, vocab), dtype=acc, device=x.device)
        g_buf = torch.empty((rows, vocab), dtype=dtype, device=x.device) if low and (need_x or need_w) else None
        if need_w:  # the fp32 sum of the chunks' weight gradients (in low precision via one reused buffer)
            grad_w = torch.empty(weight.shape, dtype=acc, device=x.device)
            prod_buf = torch.empty(weight.shape, dtype=dtype, device=x.device) if low else None
            if low and x.shape[0] > chunk:  # the widened product of the later chunks: the logits buffer when
                # it is large enough (chunks of >= dim rows, the default), else a buffer of its own
                n_w = grad_w.numel()
                wide_prod = (wide_buf.view(-1)[:n_w] if wide_buf.numel() >= n_w
                             else torch.empty(n_w, dtype=acc, device=x.device)).view(weight.shape)
        for start in range(0, x.shape[0], chunk):
            xc = x[start:start + chunk].to(dtype)
            r = xc.shape[0]
            tc = targets[start:start + chunk]
            valid = tc != ignore_index
            safe = torch.where(valid, tc, 0)[:, None]
            logits = torch.mm(xc, w.t(), out=logits_buf[:r])
            if low:
                logits = wide_buf[:r].copy_(logits)
            # log-softmax in fp32: one fused row-wise pass instead of max, exp, sum and divide
            logp = torch.log_softmax(logits, 1, out=logp_buf[:r])
            picked = logp.gather(1, safe).squeeze(1)
            total -= (picked * valid).sum() if any_ignored else picked.sum()
            if not (need_x or need_w):
                continue
            probs = logp.exp_()  # softmax; becomes d(loss)/d(logits) below
            probs.scatter_add_(1, safe, -valid[:, None].to(probs.dtype))
            if any_ignored:
                probs.mul_(valid[:, None])
            g = g_buf[:r].copy_(probs) if low else probs
            if need_x:
                if grad_x.dtype == dtype:
                    torch.mm(g, w, out=grad_x[start:start + chunk])
                else:
                    grad_x[start:start + chunk] = g @ w
            if need_w:
                if not low:
                    torch.addmm(grad_w, g.t(), xc, beta=0 if start == 0 else 1, out=grad_w)
                elif start == 0:
                    grad_w.copy_(torch.mm(g.t(), xc, out=prod_buf))
                else:  # widened into a reused buffer: a mixed-dtype add_ would allocate a fresh one each time
                    grad_w.add_(wide_prod.copy_(torch.mm(g.t(), xc, out=prod_buf)))
        if need_w and x.shape[0] == 0:  # no rows at all
            grad_w.zero_()
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
    dtype = compute_dtype(x, weight.dtype)
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


# ---------------------------------------------------------------------------------------------------------------
# Log-probabilities of given targets, one chunk of positions at a time (scoring for PPO and evaluation)


def scoring_rows_per_chunk(n_rows: int, vocab: int, device: torch.device) -> int:
    """Positions per chunk of chunked_target_logprobs: ~16 MiB of fp32 logits per chunk on CPU, ~256 MiB on accelerators."""
    budget = 1 << (22 if device.type == "cpu" else 26)
    return max(1, min(n_rows, max(budget // max(vocab, 1), 16)))


def _chunk_logprobs(x: Tensor, targets: Tensor, head: nn.Module, temperature: float) -> Tensor:
    logits = head(x).float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    return picked - torch.logsumexp(logits, dim=1)


def chunked_target_logprobs(hidden: Tensor, head: nn.Module, targets: Tensor, temperature: float = 1.0,
                            chunk_rows: int | None = None) -> Tensor:
    """log_softmax(head(hidden) / temperature) at targets, (B, T) in fp32, one chunk of positions at a time.

    hidden (B, T, dim), targets (B, T); negative targets score token 0 (mask them afterwards)."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match hidden states {tuple(hidden.shape)}")
    if temperature <= 0:
        raise Llama2Error(f"scoring: temperature must be > 0, got {temperature}")
    x, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    chunk = chunk_rows or scoring_rows_per_chunk(x.shape[0], vocab, x.device)
    differentiable = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in head.parameters()))
    parts = []
    for start in range(0, x.shape[0], chunk):
        xc, tc = x[start:start + chunk], t[start:start + chunk]
        if differentiable:  # keep only xc for backward; the chunk's logits are recomputed there
            parts.append(checkpoint(_chunk_logprobs, xc, tc, head, temperature, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(xc, tc, head, temperature))
    out = torch.cat(parts) if parts else x.new_zeros(0, dtype=torch.float32)
    return out.view(targets.shape)


def target_logprobs_and_top(hidden: Tensor, head: nn.Module, targets: Tensor, k: int,
                            chunk_rows: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """log_softmax(head(hidden)) at targets (B, T) and its k largest values and their ids (B, T, k), one chunk
    of positions at a time, without gradients; a target that is the most likely token gets exactly the top
    value (both are the same logit minus the same log-sum-exp)."""
    x, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]
    chunk = chunk_rows or scoring_rows_per_chunk(x.shape[0], vocab, x.device)
    picked, values, ids = [], [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], chunk):
            logits = head(x[start:start + chunk]).float()
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            picked.append((logits.gather(1, t[start:start + chunk].clamp(min=0)[:, None]) - lse).squeeze(1))
            top = logits.topk(min(k, vocab), dim=1)
            values.append(top.values - lse)
            ids.append(top.indices)
    shape = (*targets.shape, min(k, vocab))
    return torch.cat(picked).view(targets.shape), torch.cat(values).view(shape), torch.cat(ids).view(shape)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, sign: float) -> Tensor:
    """y = x * cos + rotate_half(x) * sin (sign 1), or the transpose map, for backward (sign -1).

    Halves layout: y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2; transposed: g1 c1 + g2 s2, g2 c2 - g1 s1."""
    half = x.shape[-1] // 2
    out = x * cos
    x1, x2 = x[..., :half], x[..., half:]
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
