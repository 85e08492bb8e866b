"""Exact fp32 batch-1 decoding through the matrix-vector kernel of `cpu_kernels`.

At batch 1 each decode step multiplies one activation row by every weight matrix. PyTorch's CPU path for
that (MKL sgemv) reads weights at about half the memory bandwidth one core reaches and gains nothing from
more threads; `cpu_kernels.f32_matvec` reads them at about the bandwidth of a plain sum and splits rows
over threads. The result is the same fp32 dot products summed in another order (differences at fp32
rounding). `with_matvec_kernel(model)` returns a copy of the model whose nn.Linear layers are `MatvecLinear`,
sharing every parameter with the original (no copy, in-place updates stay visible); anything but one fp32
row on the CPU, and anything needing gradients, goes through F.linear as before.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernels


class MatvecLinear(nn.Module):
    """An nn.Linear's weight (and bias), shared: one fp32 CPU row runs through the C kernel, the rest
    through F.linear."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def _kernel_ok(self, x: Tensor) -> bool:
        w = self.weight
        return (x.numel() == self.in_features and x.dtype == torch.float32 and w.dtype == torch.float32
                and x.device.type == "cpu" and w.device.type == "cpu" and w.is_contiguous()
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))
                and not torch.compiler.is_compiling())

    def forward(self, x: Tensor) -> Tensor:
        if not self._kernel_ok(x):
            return F.linear(x, self.weight, self.bias)
        y = cpu_kernels.f32_matvec(x.reshape(1, -1).contiguous(), self.weight)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp32 matvec kernel at batch 1"


def with_matvec_kernel(model: nn.Module) -> nn.Module:
    """A copy of model whose nn.Linear layers are MatvecLinear. Every parameter and buffer is shared with
    model (the same objects); model itself is unchanged."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    out = copy.deepcopy(model, memo)
    for name, m in list(out.named_modules()):
        if type(m) is not MatvecLinear and isinstance(m, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, attr, MatvecLinear(m))
    return out
