"""Weight-only int8 quantisation for decoding: int8 weights with one fp scale per output channel.

Decoding one token reads every weight once, so its speed is set by memory bandwidth; int8 weights read a
quarter of fp32's bytes. `quantize_int8(model)` returns a model whose linear layers (attention, feed-forward,
LM head) are `Int8Linear`; the embedding and norms stay in the model's dtype and are shared, not copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import Transformer


class Int8Linear(nn.Module):
    """y = x @ (q * scale[:, None]).T with q int8 (out, in): symmetric per-output-channel quantisation."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.register_buffer("weight", q.contiguous())
        self.register_buffer("scale", scale.to(weight.dtype))
        self._fused = weight.device.type == "cpu" and _has_int8pack()

    def dequantized(self) -> Tensor:
        return self.weight.to(self.scale.dtype) * self.scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        if self._fused and x.dtype == self.scale.dtype and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
            shape = x.shape
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).contiguous(), self.weight, self.scale)
            return y.view(*shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _has_int8pack() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_int8(model: Transformer) -> Transformer:
    """A copy of model for inference with every nn.Linear replaced by Int8Linear. Parameters that are not
    quantised are shared with model (no copy); model itself is unchanged."""
    with torch.device("meta"):
        q = Transformer(model.config)
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
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
