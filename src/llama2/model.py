"""The Llama 2 transformer: RMSNorm, rotary embeddings, grouped-query attention with a KV cache, SwiGLU.

Module and parameter names follow the Hugging Face Llama layout (without its `model.` prefix), and rotary
embeddings rotate halves as Hugging Face does, so HF checkpoints load without any permutation; Meta
checkpoints are permuted once at import (see checkpoint.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .fused_ops import (IGNORE_INDEX, apply_rope, chunked_target_logprobs, compute_dtype, linear_cross_entropy,
                        rms_norm)

Device = torch.device | str | None


class Linear(nn.Linear):
    """nn.Linear without bias whose weights are initialised once by Transformer.init_weights (not here), so
    building on the meta device runs no random-number code."""

    def __init__(self, in_features: int, out_features: int, device: Device = None) -> None:
        super().__init__(in_features, out_features, bias=False, device=device)

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding initialised by Transformer.init_weights, like Linear."""

    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, device: Device = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # fp32 master weights (training)
            # under autocast the output is already what autocast would cast it to for the Linears that read it
            out_dtype = compute_dtype(x, torch.float32)
            if torch.compiler.is_compiling():  # the compiler fuses the plain ops itself
                return F.rms_norm(x, self.weight.shape, self.weight, self.eps).to(out_dtype)
            return rms_norm(x, self.weight, self.eps, out_dtype)
        # normalise in fp32, round to the input dtype, then scale (Hugging Face's order, for bf16 weights)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_tables(head_dim: int, length: int, theta: float, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """cos and sin tables (length, head_dim) in fp32, halves layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    t = torch.arange(length, dtype=torch.float64, device=device)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


class KVCache(nn.Module):
    """A preallocated key/value cache for one layer, holding n_kv_heads heads (not n_heads)."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None) -> None:
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, device: Device = None) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = Linear(cfg.dim, cfg.n_heads * cfg.head_dim, device)
        self.k_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, device)
        self.v_proj = Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, device)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, device)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | PackedRows | None,
                cache: KVCache | None, start_pos: int) -> Tensor:
        if isinstance(mask, PackedRows):
            return self.o_proj(mask.attend(self.packed_attention, self.q_proj(x), self.k_proj(x), self.v_proj(x),
                                           cos, sin))
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start_pos, k, v)
        is_causal = mask is None and T > 1
        if is_causal and k.shape[2] != T:  # chunked prefill after earlier tokens: causal with an offset
            mask = causal_mask(T, k.shape[2], x.device)
            is_causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def packed_attention(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Causal attention over a batch of whole sequences (N, L, heads x head_dim), each starting at position 0
        and right-padded: PackedRows.attend's `attention`."""
        N, L, _ = q.shape
        q = apply_rope(q.view(N, L, self.n_heads, self.head_dim).transpose(1, 2), cos[:L], sin[:L])
        k = apply_rope(k.view(N, L, self.n_kv_heads, self.head_dim).transpose(1, 2), cos[:L], sin[:L])
        v = v.view(N, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1, enable_gqa=self.n_kv_heads != self.n_heads)
        return y.transpose(1, 2).reshape(N, L, -1)


@dataclass(frozen=True)
class PackedRows:
    """Rows that pack several sequences, each attending only to itself, causally, with rotary positions restarting
    at 0 (what SFT, the reward models and DPO train on), as attention computes them: every sequence taken out of
    its row into a batch of sequences of about its length, causal attention over each batch (no (T, T) mask,
    nothing computed across sequences, the plain rotary table instead of per-row position lookups), the results
    put back. Exact: the same outputs as the block-diagonal causal mask over the packed rows, up to rounding.

    Sequences are grouped by length (up to 32 tokens, then up to each power of two) so that padding costs at most
    about half of a group's attention. `groups[g]`: (flat indices into the B x T positions, one (n_g, L_g) block
    per group: a sequence's slots past its end repeat its last token, which causal attention never lets reach a
    real one);
    `back` (B x T,): each position's row in the groups' outputs flattened one after another, or the row of zeros
    after them for padding (segment -1), whose attention output is zero."""

    groups: tuple[tuple[Tensor, int, int], ...]  # (indices (n * L,), n, L)
    back: Tensor

    @classmethod
    def from_segments(cls, segments: Tensor) -> PackedRows:
        """From `segments` (B, T): each position's sequence number within its row (contiguous runs), -1 on
        padding (llama2.data.packing.collate)."""
        B, T = segments.shape
        device = segments.device
        flat = segments.reshape(-1)
        key = torch.arange(B, device=device).repeat_interleave(T) * (T + 1) + flat
        _, owner, counts = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        real = flat >= 0
        is_seq = torch.zeros(counts.shape[0], dtype=torch.bool, device=device)
        is_seq[owner[real]] = True  # runs of padding are not sequences
        offset = torch.arange(B * T, device=device) - starts[owner]
        bucket = torch.ceil(torch.log2(counts.clamp(min=32).double())).long()  # up to 32 tokens: one group
        back = torch.full((B * T,), 0, dtype=torch.long, device=device)
        groups, done = [], 0
        for b in torch.unique(bucket[is_seq]).tolist():
            members = torch.nonzero(is_seq & (bucket == b)).squeeze(1)
            n, L = members.shape[0], int(counts[members].max())
            slot = torch.full(counts.shape, -1, dtype=torch.long, device=device)
            slot[members] = torch.arange(n, device=device)
            mine = real & (slot[owner] >= 0)
            back[mine] = done + slot[owner[mine]] * L + offset[mine]
            j = torch.arange(L, device=device)
            into = starts[members, None] + torch.minimum(j[None, :], counts[members, None] - 1)
            groups.append((into.reshape(-1), n, L))
            done += n * L
        back[~real] = done  # the zero row
        return cls(tuple(groups), back)

    def attend(self, attention: Callable[..., Tensor], q: Tensor, k: Tensor, v: Tensor, cos: Tensor,
               sin: Tensor) -> Tensor:
        """`attention(q, k, v, cos, sin)` over each group of sequences ((n, L, width) projections; cos and sin
        (positions, head_dim)); q, k, v (B, T, width) in the packed rows; the result (B, T, width of q)."""
        B, T, _ = q.shape
        q2, k2, v2 = (t.reshape(B * T, t.shape[-1]) for t in (q, k, v))
        outs = []
        for into, n, L in self.groups:
            outs.append(attention(*(t.index_select(0, into).view(n, L, -1) for t in (q2, k2, v2)), cos, sin)
                        .reshape(n * L, -1))
        outs.append(q2.new_zeros(1, q2.shape[-1]))
        return torch.cat(outs).index_select(0, self.back).view(B, T, -1)


def causal_mask(q_len: int, kv_len: int, device: torch.device | str | None = None) -> Tensor:
    """Boolean (q_len, kv_len) mask, True where attention is allowed; queries are the last q_len positions."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= q_pos


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, device: Device = None) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.dim, cfg.hidden_dim, device)
        self.up_proj = Linear(cfg.dim, cfg.hidden_dim, device)
        self.down_proj = Linear(cfg.hidden_dim, cfg.dim, device)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, device: Device = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, device)
        self.self_attn = Attention(cfg, device)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps, device)
        self.mlp = FeedForward(cfg, device)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | PackedRows | None,
                cache: KVCache | None = None, start_pos: int = 0) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder-only Llama 2. `model(tokens)` maps a LongTensor (B, T) to logits (B, T, vocab_size).

    Incremental decoding: pass `cache=model.make_cache(B, max_len)` and `start_pos` (the cache slot of the
    first token). `positions` (B, T) overrides rotary positions per row (left-padded batches), and `mask`
    (B, 1, T, start_pos + T) booleans, True = may attend, overrides the causal mask; `mask` may instead be
    PackedRows (rows packing several sequences, each attending only to itself; `positions` is then not needed).
    """

    def __init__(self, config: ModelConfig, device: Device = None) -> None:
        """`device="meta"` builds a skeleton that costs no memory (what checkpoint loading starts from)."""
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.dim, device=device)
        self.layers = nn.ModuleList(Block(config, device) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, device)
        self.lm_head = Linear(config.dim, config.vocab_size, device)
        self._rope: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Random initialisation for training from scratch: N(0, std); output projections scaled by depth."""
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if p.ndim == 1:
                nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def rope(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """fp32 rotary tables for 2 x max_seq_len positions, built once per device."""
        if device not in self._rope:
            self._rope[device] = rope_tables(self.config.head_dim, 2 * self.config.max_seq_len,
                                             self.config.rope_theta, device)
        return self._rope[device]

    def make_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> list[KVCache]:
        ref = self.lm_head.weight
        cfg = self.config
        return [KVCache(batch, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.head_dim,
                        dtype or ref.dtype, device or ref.device) for _ in range(cfg.n_layers)]

    def hidden(self, tokens: Tensor, start_pos: int = 0, cache: list[KVCache] | None = None,
               positions: Tensor | None = None, mask: Tensor | PackedRows | None = None) -> Tensor:
        """Final-norm hidden states (B, T, dim): what the LM head and reward heads read."""
        B, T = tokens.shape
        x = self.embed_tokens(tokens)
        cos_t, sin_t = self.rope(x.device)
        if isinstance(mask, PackedRows):  # every sequence starts at position 0: attention reads the plain table
            if cache is not None:
                raise ValueError("packed rows are for training and scoring whole sequences, not with a KV cache")
            cos, sin = cos_t[:T], sin_t[:T]
        elif positions is None:
            if start_pos + T > cos_t.shape[0]:
                raise ValueError(f"position {start_pos + T} beyond the rotary table ({cos_t.shape[0]})")
            cos, sin = cos_t[start_pos:start_pos + T][None, None], sin_t[start_pos:start_pos + T][None, None]
        else:
            cos, sin = cos_t[positions][:, None], sin_t[positions][:, None]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache[i], start_pos)
        return self.norm(x)

    def forward(self, tokens: Tensor, start_pos: int | Tensor = 0, cache: list[KVCache] | None = None,
                positions: Tensor | None = None, mask: Tensor | PackedRows | None = None,
                targets: Tensor | None = None, *, output: str = "logits",
                temperature: float = 1.0, index: Tensor | None = None, keep_from: int = 0) -> Tensor:
        """What `output` asks for; every caller (generation, scoring, training) goes through here, so hooks
        on the root module (FSDP2's all-gathers) run.

        "logits": logits (B, T, vocab_size); with `targets` (B, T) instead the summed cross-entropy over the
        positions whose target is not -100, computed without materialising the logits (fused_ops).
        "last": the last position's logits (B, vocab_size), what a prefill or decode step samples from; with
        `index` (B,) row b's logits at position index[b] instead (a right-padded batch of prompts).
        "hidden": the final-norm hidden states (B, T, dim).
        "logprobs": log_softmax(logits / temperature) at `targets` (B, T), computed over chunks of positions
        so the B x T x vocab fp32 logits never exist at once; differentiable (chunks are recomputed in
        backward). Negative targets score token 0 (the caller masks them). `keep_from`: positions before it are
        not projected through the LM head and get 0 (a caller that needs only the answers after a prompt).
        A cache whose `update` takes per-row write positions may get them as a LongTensor `start_pos`."""
        h = self.hidden(tokens, start_pos, cache, positions, mask)
        if output == "hidden":
            return h
        if output == "last":
            if index is not None:
                return self.lm_head(h[torch.arange(h.shape[0], device=h.device), index])
            return self.lm_head(h[:, -1])
        if output == "logprobs":
            if targets is None:
                raise ValueError('output="logprobs" needs targets (the token ids to score, (B, T))')
            if keep_from <= 0:
                return chunked_target_logprobs(h, self.lm_head, targets, temperature)
            kept = chunked_target_logprobs(h[:, keep_from:], self.lm_head, targets[:, keep_from:], temperature)
            return F.pad(kept, (min(keep_from, h.shape[1]), 0))
        if output != "logits":
            raise ValueError(f"unknown output {output!r}; choose logits, last, hidden or logprobs")
        if targets is not None:
            return linear_cross_entropy(h, self.lm_head.weight, targets, IGNORE_INDEX)
        return self.lm_head(h)
