"""The one table of floating-point dtype names: what users may type (fp32, bf16, fp16, ...), the torch.dtype
each stands for, and the name a Hugging Face config.json uses for it.

torch is imported here at module level; modules that must stay light at import (command parsers) import this
one inside their functions."""

from __future__ import annotations

import torch

from .errors import Llama2Error

# Every accepted spelling (lower case, without a "torch." prefix) -> its torch.dtype.
DTYPE_BY_NAME: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp64": torch.float64, "float64": torch.float64,
}
# torch.dtype -> the name Hugging Face writes in config.json ("dtype" / "torch_dtype").
HF_DTYPE_NAME: dict[torch.dtype, str] = {torch.float32: "float32", torch.bfloat16: "bfloat16",
                                         torch.float16: "float16", torch.float64: "float64"}
# The short names, as help texts and error messages list them.
SHORT_NAMES = ("fp32", "bf16", "fp16")
CHOICES_TEXT = "fp32, bf16 or fp16"


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None or "auto" -> None (the caller decides: keep a checkpoint's dtype, pick one for the device); a
    torch.dtype is returned as is; names like "bf16", "BFloat16", "torch.float32" -> torch.dtype.
    An unknown name is a Llama2Error listing the choices."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).strip().lower().removeprefix("torch.")
    if key == "auto":
        return None
    if key not in DTYPE_BY_NAME:
        raise Llama2Error(f"unknown dtype {dtype!r}; choose {CHOICES_TEXT} (or auto)")
    return DTYPE_BY_NAME[key]


def hf_dtype_name(dtype: torch.dtype, default: str = "float32") -> str:
    """The config.json name of a dtype ("bfloat16", ...); `default` for a dtype without one."""
    return HF_DTYPE_NAME.get(dtype, default)


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype as people read it: torch.bfloat16 -> "bfloat16" (no "torch." prefix)."""
    return str(dtype).removeprefix("torch.")
