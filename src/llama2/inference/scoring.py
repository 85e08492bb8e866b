"""Scoring sequences for training and evaluation: log p(token | the tokens before it), through the model's forward.

`sequence_logprobs(model, tokens, mask)` calls the root module (so FSDP2's hooks gather and free the weights as
in training) and works with or without gradients: PPO differentiates the policy's logprobs, evaluation and
reward shaping do not. The LM head runs over chunks of positions (the idea of fused_ops.linear_cross_entropy):
each chunk's logits are turned into log-probabilities of the targets and dropped, and under autograd each chunk
is recomputed in backward (activation checkpointing), so the B x T x vocab fp32 logits are never held at once
(fused_ops.chunked_target_logprobs, which the model's `output="logprobs"` uses too).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import Llama2Error


def sequence_logprobs(model: nn.Module, tokens: Tensor, mask: Tensor | None = None, *,
                      temperature: float = 1.0, start: int = 0) -> Tensor:
    """log p(tokens[:, i + 1] | tokens[:, :i + 1]) under softmax(logits / temperature): (B, T - 1) fp32.

    model: a Transformer (or an FSDP2-sharded one; it is called through its root forward). tokens (B, T) ids.
    mask (B, T), True/1 for real tokens: right padding is free (causal attention keeps pads out of the real
    tokens); any other pattern (left padding) gets per-row rotary positions and an attention mask, so a row
    scores as it would alone. Entries whose token, or the token before it, is masked are 0. Gradients flow
    when autograd is on (PPO's policy logprobs); wrap in torch.no_grad() for evaluation. `start`: entries before
    it are not computed (0), e.g. the shortest prompt's length - 1 when only the answers matter."""
    if tokens.ndim != 2:
        raise Llama2Error(f"sequence_logprobs: tokens must be (batch, length), got shape {tuple(tokens.shape)}")
    B, T = tokens.shape
    if T < 2:
        return torch.zeros(B, max(T - 1, 0), device=tokens.device)
    vocab = model.config.vocab_size
    if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        raise Llama2Error(f"sequence_logprobs: token ids must be in 0..{vocab - 1} (mask padding instead of "
                          "using negative ids)")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    positions = attn = None
    valid = None
    if mask is not None:
        if mask.shape != tokens.shape:
            raise Llama2Error(f"sequence_logprobs: mask shape {tuple(mask.shape)} must equal tokens' "
                              f"{tuple(tokens.shape)}")
        mask = mask.to(device=tokens.device, dtype=torch.bool)
        valid = mask[:, 1:] & mask[:, :-1]
        right_padded = not bool((mask[:, 1:] & ~mask[:, :-1]).any())  # no real token after a pad
        if not right_padded:
            m = mask[:, :-1]
            n = T - 1
            positions = (m.long().cumsum(1) - 1).clamp(min=0)
            causal = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril()
            eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
            # a pad query attends to itself only: finite, and never seen by a real token
            attn = (causal & (m[:, None, :] | eye))[:, None]
    lp = model(inputs, positions=positions, mask=attn, targets=targets, output="logprobs", temperature=temperature,
               keep_from=start)
    if valid is not None:
        lp = torch.where(valid, lp, torch.zeros((), dtype=lp.dtype, device=lp.device))
    return lp
