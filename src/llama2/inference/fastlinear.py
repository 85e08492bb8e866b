"""Exact fp32 batch-1 decoding through the matrix-vector kernel of `cpu_kernels`.

At batch 1 each decode step multiplies one activation row by every weight matrix. PyTorch's CPU path for
that (MKL sgemv) reads weights at about half the memory bandwidth one core reaches and gains nothing from
more threads; `cpu_kernels.f32_matvec` reads them at about the bandwidth of a plain sum and splits rows
over threads. The result is the same fp32 dot products summed in another order (differences at fp32
rounding). `with_matvec_kernel(model)` returns a copy of the model whose nn.Linear layers are `MatvecLinear`,
sharing every parameter with the original (no copy, in-place updates stay visible). One row goes through the
kernel. With `packed` (the Generator's choice when memory allows), two or more rows (a prompt, requests decoded
together, a speculative check) go through oneDNN's linear on a prepacked copy of the weight, 2-3x the sgemm
behind F.linear on the AMD CPUs measured. Without it, up to `max_rows` rows (the Generator uses ROWS = 8, and
LARGE_ROWS = 32 for large weights) go through `cpu_kernels.f32_rows`, which reads each weight once for all rows
and, from four rows on, multiplies them in register tiles. Inside a torch.compile'd decode step the kernels are
called as the custom operator llama2::f32_rows. More rows, other dtypes or devices, and anything needing
gradients go through F.linear as before.
"""

from __future__ import annotations

import copy
import functools
import warnings

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


@functools.cache
def onednn_available() -> bool:
    """Whether PyTorch's oneDNN linear with a prepacked weight runs here (and gives x @ w.T)."""
    try:
        w, x = torch.randn(8, 8), torch.randn(3, 8)
        packed = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return torch.backends.mkldnn.is_available() and torch.allclose(y, x @ w.T, atol=1e-5)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


PACK_ROWS = 16  # the row count oneDNN lays the packed weight out for (measured as fast from 2 to 512 rows)


class MatvecLinear(nn.Module):
    """An nn.Linear's weight (and bias), shared, for fp32 CPU inference: one row through f32_matvec; with
    `packed`, two or more rows through oneDNN's linear on a prepacked copy of the weight (made on first use and
    again whenever the weight changes); otherwise up to max_rows rows through f32_rows; the rest, anything
    needing gradients and other dtypes or devices through F.linear."""

    def __init__(self, linear: nn.Linear, max_rows: int = 1, packed: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.max_kernel_rows = max_rows
        self.packed = packed
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed: Tensor | None = None
        self._packed_of: tuple[int, int] | None = None  # (data_ptr, version) of the weight packed

    def _fp32_inference(self, x: Tensor) -> bool:
        w = self.weight
        return (x.shape[-1] == self.in_features and x.dtype == torch.float32 and w.dtype == torch.float32
                and x.device.type == "cpu" and w.device.type == "cpu" and w.is_contiguous()
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)))

    def packed_weight(self) -> Tensor:
        """oneDNN's blocked copy of the weight, repacked when the weight was changed in place or replaced."""
        w = self.weight
        now = (w.data_ptr(), w._version)
        if self._packed_of != now:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS)
            self._packed_of = now
        return self._packed

    def forward(self, x: Tensor) -> Tensor:
        if not self._fp32_inference(x):
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // self.in_features
        flat = x.reshape(-1, self.in_features).contiguous()
        if torch.compiler.is_compiling():  # the kernels as an opaque operator inside a compiled decode step
            if rows > self.max_kernel_rows:
                return F.linear(x, self.weight, self.bias)
            y = f32_rows_op(flat, self.weight)
        elif rows > 1 and self.packed and onednn_available():
            y = torch.ops.mkldnn._linear_pointwise(flat, self.packed_weight(), self.bias, "none", [], "")
            return y.view(*x.shape[:-1], self.out_features)
        elif rows <= self.max_kernel_rows:
            y = cpu_kernels.f32_rows(flat, self.weight)
        else:
            return F.linear(x, self.weight, self.bias)
        if self.bias is not None:
            y += self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, fp32 kernels up to "
                f"{self.max_kernel_rows} rows{', oneDNN packed from 2 rows' if self.packed else ''}")


ROWS = 8  # the generator's row-kernel rows (without packed weights): beyond this MKL's sgemm is as fast
# ... except for large weights (>= 1M elements: the LM head, the layers of a 1B model), where MKL's sgemm stays
# slower than the tiled kernel up to 32 rows (2048 x 2048 at 16 rows: 1.4 against 0.8 ms; 32000 x 256: 4.2 against
# 1.8 ms; at 32 rows 2.0 against 1.7 ms)
LARGE_ROWS, LARGE_WEIGHT = 32, 1 << 20


def with_matvec_kernel(model: nn.Module, max_rows: int = 1, packed: bool = False) -> nn.Module:
    """A copy of model whose nn.Linear layers are MatvecLinear (kernels for up to max_rows rows; with max_rows > 1,
    up to LARGE_ROWS for weights of at least LARGE_WEIGHT elements; packed: two or more rows through oneDNN on a
    packed copy of each weight). Every parameter and buffer is shared with model (the same objects); model itself
    is unchanged."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    out = copy.deepcopy(model, memo)
    for name, m in list(out.named_modules()):
        if type(m) is not MatvecLinear and isinstance(m, nn.Linear):
            parent_name, _, attr = name.rpartition(".")
            large = m.in_features * m.out_features >= LARGE_WEIGHT
            rows = max(max_rows, LARGE_ROWS) if max_rows > 1 and large else max_rows
            setattr(out.get_submodule(parent_name) if parent_name else out, attr, MatvecLinear(m, rows, packed))
    return out


def available_memory() -> int | None:
    """Bytes of memory the system can still give (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def fast_fp32_model(model: nn.Module, explicit: bool = False) -> nn.Module:
    """model wrapped for the fp32 kernels (up to ROWS rows, LARGE_ROWS for large weights) when it is an fp32 CPU model
    and the kernel builds; else model itself (with a warning when the kernels were asked for explicitly). oneDNN's
    packed copies (one more copy of every linear weight, made as layers first see two or more rows) are used when
    they take at most half of the memory still available."""
    w = model.embed_tokens.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return model
    if not cpu_kernels.available():
        if explicit:
            warnings.warn("fast_fp32: the C kernel could not be built here (needs gcc and an AVX2 CPU); "
                          "using PyTorch's matmuls", stacklevel=3)
        return model
    weights = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    free = available_memory()
    return with_matvec_kernel(model, ROWS, packed=free is None or weights <= free // 2)
