"""Device and dtype choice shared by every command: cuda if present, bf16 where supported."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import Llama2Error

if TYPE_CHECKING:  # torch is imported inside the functions so that command parsers load fast
    import torch


def resolve_device(name: str | None = None) -> torch.device:
    import torch

    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise Llama2Error(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Llama2Error(f"device {name!r} requested but no CUDA GPU is available; use --device cpu")
    return device


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """A dtype name (see llama2.dtypes); None/auto: bf16 on a GPU that supports it, else fp32."""
    import torch

    from .dtypes import parse_dtype  # imports torch (see above)

    dtype = parse_dtype(name)
    if dtype is not None:
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def add_device_args(parser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if present)")
    parser.add_argument("--dtype", default="auto", help="fp32, bf16, fp16 or auto (default: bf16 on GPU, else fp32)")
