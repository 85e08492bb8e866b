"""Int8 quantisation for decoding: int8 weights in blocks of 32 with fp16 scales (llama.cpp's q8_0 layout).

Decoding one token reads every weight once, so its speed is set by memory bandwidth; int8 weights read a
little over a quarter of fp32's bytes. `quantize_int8(model)` returns a model whose linear layers (attention,
feed-forward, LM head) are `Int8Linear`; the embedding and norms stay in the model's dtype and are shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import cpu_kernels
from ..model import Transformer


@torch.library.custom_op("llama2::q8_matmul", mutates_args=())
def q8_matmul_op(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """The int8 kernel as an opaque operator, so torch.compile can call it inside a compiled graph."""
    return cpu_kernels.q8_matmul(x, weight, scale)


@q8_matmul_op.register_fake
def _(x: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


class Int8Linear(nn.Module):
    """A linear layer with int8 weights in blocks of 32 along the input, one fp16 scale per block
    (llama.cpp's q8_0 layout): 8.5 bits per weight.

    On the CPU, a few rows at a time (decoding) run through the kernel of `cpu_kernels`, which reads the int8
    weights directly; longer inputs (prefill) and other devices multiply by the dequantised weights."""

    max_kernel_rows = 16

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if self.in_features % cpu_kernels.BLOCK:
            raise ValueError(f"int8 quantisation needs in_features divisible by {cpu_kernels.BLOCK}, "
                             f"got {self.in_features}")
        q, scale = cpu_kernels.quantize_blocks(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scale", scale)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return cpu_kernels.dequantize_blocks(self.weight, self.scale, dtype)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if x.device.type == "cpu" and rows.shape[0] <= self.max_kernel_rows and cpu_kernels.available():
            kernel = q8_matmul_op if torch.compiler.is_compiling() else cpu_kernels.q8_matmul
            y = kernel(rows.float().contiguous(), self.weight, self.scale)
            return y.to(x.dtype).view(*shape[:-1], self.out_features)
        return F.linear(x, self.dequantized(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 blocks of 32"


def quantize_int8(model: Transformer) -> Transformer:
    """A copy of model for inference with every nn.Linear replaced by Int8Linear. Parameters that are not
    quantised are shared with model (no copy); model itself is unchanged."""
    with torch.device("meta"):
        q = Transformer(model.config)
    linears = {name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and m.in_features % cpu_kernels.BLOCK == 0}  # others stay as they are
    for name in linears:
        parent_name, _, attr = name.rpartition(".")
        parent = q.get_submodule(parent_name) if parent_name else q
        setattr(parent, attr, Int8Linear(model.get_submodule(name).weight))
    rest = {k: v for k, v in model.state_dict().items() if k.rpartition(".")[0] not in linears}
    q.load_state_dict(rest, strict=False, assign=True)
    leftover = [n for n, p in q.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"quantize_int8: parameters not carried over: {leftover[:4]}")
    return q.eval()
