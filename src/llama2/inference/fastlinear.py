"""Exact fp32 batch-1 decoding through the matrix-vector kernel of `cpu_kernels`.

At batch 1 each decode step multiplies one activation row by every weight matrix. PyTorch's CPU path for
that (MKL sgemv) reads weights at about half the memory bandwidth one core reaches and gains nothing from
more threads; `cpu_kernels.f32_matvec` reads them at about the bandwidth of a plain sum and splits rows
over threads. The result is the same fp32 dot products summed in another order (differences at fp32
rounding). `with_matvec_kernel(model)` returns a copy of the model whose nn.Linear layers are `MatvecLinear`,
sharing every parameter with the original (no copy, in-place updates stay visible). One row goes through the
kernel; with `max_rows` (the Generator uses ROWS = 8) up to that many rows (a short prompt, a few requests
decoded together) go through `cpu_kernels.f32_rows`, which reads each weight once for all rows
(MKL's sgemm reads fp32 weights at a half to a third of the bandwidth there). Inside a torch.compile'd decode
step the kernels are called as the custom operator llama2::f32_rows. More rows, other dtypes or devices, and
anything needing gradients go through F.linear as before.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernels


@torch.library.custom_op("llama2::f32_rows", mutates_args=())
def f32_rows_op(x: Tensor, weight: Tensor) -> Tensor:
    """The fp32 few-row kernel as an opaque operator, so a torch.compile'd decode step calls it too."""
    return cpu_kernels.f32_rows(x, weight)


@f32_rows_op.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


class MatvecLinear(nn.Module):
    """An nn.Linear's weight (and bias), shared: up to max_rows fp32 CPU rows run through the C kernels (one
    row: f32_matvec; a few: f32_rows, which reads each weight once for all of them), the rest through F.linear."""

    def __init__(self, linear: nn.Linear, max_rows: int = 1) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_kernel_rows = max_rows
        self.weight = linear.weight
        self.bias = linear.bias

    def _kernel_ok(self, x: Tensor) -> bool:
        w = self.weight
        return (x.shape[-1] == self.in_features and x.numel() <= self.max_kernel_rows * self.in_features
                and x.dtype == torch.float32 and w.dtype == torch.float32
                and x.device.type == "cpu" and w.device.type == "cpu" and w.is_contiguous()
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)))

    def forward(self, x: Tensor) -> Tensor:
        if not self._kernel_ok(x):
            return F.linear(x, self.weight, self.bias)
        kernel = f32_rows_op if torch.compiler.is_compiling() else cpu_kernels.f32_rows
        y = kernel(x.reshape(-1, self.in_features).contiguous(), self.weight)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp32 kernels up to {self.max_kernel_rows} rows"


ROWS = 8  # the generator's kernel rows: beyond this MKL's sgemm is as fast (measured on the 2-core box)
# ... except for wide matrices (the LM head: many outputs, few inputs), where MKL's sgemm stays 1.6-2.5x slower
# than the kernel up to 16-32 rows (32000 x 256 at 16 rows: 4.2 against 1.9 ms; 32000 x 2048: 37 against 24 ms)
WIDE_ROWS, WIDE_OUT = 32, 16384


def with_matvec_kernel(model: nn.Module, max_rows: int = 1) -> nn.Module:
    """A copy of model whose nn.Linear layers are MatvecLinear (kernels for up to max_rows rows; with max_rows > 1,
    up to WIDE_ROWS for layers of at least WIDE_OUT outputs). Every parameter and buffer is shared with model (the
    same objects); model itself is unchanged."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    out = copy.deepcopy(model, memo)
    for name, m in list(out.named_modules()):
        if type(m) is not MatvecLinear and isinstance(m, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            rows = max(max_rows, WIDE_ROWS) if max_rows > 1 and m.out_features >= WIDE_OUT else max_rows
            setattr(out.get_submodule(parent_name) if parent_name else out, attr, MatvecLinear(m, rows))
    return out
