"""Model shapes: the Llama 2 presets (7B/13B/34B/70B), tiny shapes for tests and CPUs, and validation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import Llama2Error


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Feed-forward hidden size exactly as Meta derives it (Meta's reference model.py)."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelConfig:
    """The shape of a Llama 2 transformer. `hidden_dim` is derived from dim/multiple_of/ffn_dim_multiplier
    unless given explicitly (as Hugging Face configs do)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    hidden_dim: int | None = None

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = ffn_hidden_size(self.dim, self.multiple_of, self.ffn_dim_multiplier)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        positive = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len", "hidden_dim")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise Llama2Error(f"model config: {name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise Llama2Error(f"model config: dim {self.dim} is not divisible by n_heads {self.n_heads}; "
                              "choose n_heads that divides dim")
        if self.head_dim % 2:
            raise Llama2Error(f"model config: head_dim {self.head_dim} (dim / n_heads) must be even for rotary "
                              "embeddings")
        if self.n_heads % self.n_kv_heads:
            raise Llama2Error(f"model config: n_heads {self.n_heads} is not divisible by n_kv_heads "
                              f"{self.n_kv_heads}; each key/value head must serve the same number of query heads")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise Llama2Error("model config: norm_eps and rope_theta must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise Llama2Error(f"model config: unknown key(s) {unknown}; allowed: {sorted(fields)}")
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelConfig":
        """The real Llama 2 shapes ("7B", "13B", "34B", "70B") or a tiny preset ("tiny", "tiny-gqa", ...)."""
        key = name.strip()
        matches = [k for k in PRESETS if k.lower() == key.lower()]
        if not matches:
            raise Llama2Error(f"unknown model preset {name!r}; choose one of {list(PRESETS)}")
        return cls(**{**PRESETS[matches[0]], **overrides})

    def num_params(self) -> int:
        """Parameter count computed from the shape (equals sum(p.numel()) of the Transformer)."""
        kv_dim = self.n_kv_heads * self.head_dim
        attn = self.dim * self.dim * 2 + 2 * self.dim * kv_dim
        ffn = 3 * self.dim * self.hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        return self.n_layers * per_layer + 2 * self.vocab_size * self.dim + self.dim


PRESETS: dict[str, dict[str, Any]] = {
    "7B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, multiple_of=256),
    "13B": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, multiple_of=256),
    "34B": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, multiple_of=256),
    "70B": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
    # Small shapes for tests, laptops and CPU runs.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, multiple_of=32, vocab_size=512, max_seq_len=256),
    "tiny-gqa": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=512, max_seq_len=256),
    "5M": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=8, multiple_of=64, vocab_size=4096, max_seq_len=512),
    "25M": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=8, multiple_of=64, vocab_size=8192, max_seq_len=1024),
    "1.1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, hidden_dim=5632, max_seq_len=2048),
}
