"""The sequence classifier: the reward model of Llama 2 (and the value model of PPO).

The Transformer's backbone (embed_tokens, layers, norm) without the LM head, plus `score`, a bias-free
Linear(dim, 1): one scalar per row, read at the row's last real (non-padding) token. On disk it is Hugging Face's
`LlamaForSequenceClassification` with one label (llama2.checkpoint).

The fresh head is drawn from N(0, (0.1)^2 / dim) (SCORE_INIT_SCALE / sqrt(dim)): the final hidden states are
RMS-normalised (about unit scale per coordinate), so starting scores are about N(0, 0.01): near zero, so the
ranking loss starts at about log 2 and sigmoid scores at about 0.5, yet not exactly zero, so gradients reach the
backbone from the first step (a zero head would pass none to it until the head itself had moved).

The likelihood term (`likelihood=True`, an extension of ours, off by default): the classifier keeps the chat
model's LM head and adds w x (the summed log-probability of the response's tokens under that head) plus a constant
to the score: `likelihood_weight` = (w, b), w trained (starting at LIKELIHOOD_INIT), b set once when training
starts so that the term averages 0 over training answers (a sum of log-probabilities is negative, and the ranking
loss never moves a constant). A scalar head read at one position learns an answer's form quickly but rarely
whether its facts are right, although the LM head still predicts them: this term hands that knowledge to the
reward. The response is given per row (`response_from`: where its first token is; it runs to the row's last real
token). On disk the LM head and (w, b) are two extra tensors and config.json says `llama2_likelihood_term: true`;
Hugging Face's LlamaForSequenceClassification ignores both (it reads the scalar head's part only).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NoReturn

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .errors import Llama2Error
from .fused_ops import chunked_target_logprobs
from .model import Device, Linear, PackedRows, Transformer, causal_mask

DEFAULT_PAD_ID = 0  # <unk> in Llama 2's vocabulary: the tokenizer never emits it for text, and it is not EOS (2)


SCORE_INIT_SCALE = 0.1  # the standard deviation of the starting scores
LIKELIHOOD_INIT = 0.3  # w of the likelihood term at the start of reward-model training (b is set from the data)
LIKELIHOOD_KEYS = ("lm_head.weight", "likelihood_weight")  # the likelihood term's tensors in a state dict


def init_score_(weight: Tensor) -> Tensor:
    """Draw a fresh reward head in place: N(0, std = SCORE_INIT_SCALE / sqrt(dim)) (see the module docstring)."""
    with torch.no_grad():
        return nn.init.normal_(weight, 0.0, SCORE_INIT_SCALE / math.sqrt(weight.shape[-1]))


class SequenceClassifier(Transformer):
    """Scores token sequences: `model(tokens, lengths=...)` -> (B,) rewards, one per row.

    The row's score is read at its last real token, given by (first match wins) `lengths` (B,) per-row
    token counts of a right-padded batch, `attention_mask` (B, T) with 1/True for real tokens (right- or
    left-padded; left padding shifts positions so each row scores as it would alone), or else as
    Hugging Face does: the rightmost token that is not `pad_id`. Padding is never recognised by the EOS id.
    """

    def __init__(self, config: ModelConfig, device: Device = None, pad_id: int = DEFAULT_PAD_ID,
                 likelihood: bool = False) -> None:
        """`device="meta"` builds a skeleton that costs no memory; otherwise the weights are initialised
        (backbone as Transformer.init_weights, head as init_score_). likelihood: keep an LM head and add the
        likelihood term (the module docstring)."""
        if not isinstance(pad_id, int) or isinstance(pad_id, bool) or not 0 <= pad_id < config.vocab_size:
            raise Llama2Error(f"pad_id must be a token id in [0, {config.vocab_size}), got {pad_id!r}")
        target = torch.device(device) if device is not None else torch.get_default_device()
        super().__init__(config, device="meta")  # built without the LM head's memory, then materialised
        if not likelihood:
            del self.lm_head
        self.score = Linear(config.dim, 1, device="meta")
        self.likelihood = likelihood
        if likelihood:
            self.likelihood_weight = nn.Parameter(torch.empty(2, device="meta"))  # (w, b)
        self.pad_id = pad_id
        if target.type != "meta":
            self.to_empty(device=target)
            self.init_weights()

    @classmethod
    def from_causal_lm(cls, lm: Transformer, pad_id: int = DEFAULT_PAD_ID) -> SequenceClassifier:
        """A classifier sharing `lm`'s backbone tensors (no copy), with a fresh head; `lm_head` is dropped."""
        if isinstance(lm, SequenceClassifier):
            raise Llama2Error("the model is already a sequence classifier")
        clf = cls(lm.config, device="meta", pad_id=pad_id)
        state = {n: t for n, t in lm.state_dict().items() if not n.startswith("lm_head.")}
        ref = lm.embed_tokens.weight
        state["score.weight"] = init_score_(torch.empty(1, lm.config.dim, dtype=ref.dtype, device=ref.device))
        clf.load_state_dict(state, strict=True, assign=True)
        return clf

    def init_weights(self, std: float = 0.02) -> None:
        super().init_weights(std)
        score = getattr(self, "score", None)
        if score is not None and not score.weight.is_meta:
            init_score_(score.weight)
        weight = getattr(self, "likelihood_weight", None)
        if weight is not None and not weight.is_meta:
            with torch.no_grad():
                weight.copy_(torch.tensor([LIKELIHOOD_INIT, 0.0]))

    def make_cache(self, *args: object, **kwargs: object) -> NoReturn:
        raise Llama2Error("a sequence classifier scores whole sequences; it has no KV cache or generation "
                          "(load the causal LM for that)")

    def last_index(self, tokens: Tensor, lengths: Tensor | Sequence[int] | None = None,
                   attention_mask: Tensor | None = None) -> Tensor:
        """(B,) position of each row's last real token (see the class docstring); rows without one are an error."""
        B, T = tokens.shape
        if lengths is not None:
            lengths = torch.as_tensor(lengths, device=tokens.device).long().reshape(-1)
            if lengths.shape[0] != B or bool(((lengths < 1) | (lengths > T)).any()):
                raise Llama2Error(f"lengths must give one count in [1, {T}] per row ({B} rows), got "
                                  f"{lengths.tolist()}")
            return lengths - 1
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise Llama2Error(f"attention_mask must have shape {(B, T)} like the tokens, got "
                                  f"{tuple(attention_mask.shape)}")
            real = attention_mask.to(tokens.device).bool()
        else:
            real = tokens != self.pad_id
        if not bool(real.any(dim=1).all()):
            raise Llama2Error("a row of the batch has no real token (all padding); drop it or fix the padding")
        positions = torch.arange(T, device=tokens.device)
        return torch.where(real, positions, -1).amax(dim=1)

    def forward(self, tokens: Tensor, lengths: Tensor | Sequence[int] | None = None,
                attention_mask: Tensor | None = None, *, per_token: bool = False, positions: Tensor | None = None,
                mask: Tensor | PackedRows | None = None, read_at: Tensor | None = None,
                response_from: Tensor | Sequence[int] | None = None) -> Tensor:
        """(B,) one score per row, read at its last real token. per_token=True: (B, T) the head applied at
        every position (a per-token value estimate, as PPO's value model needs; padded positions hold
        meaningless values for the caller to mask).

        Packed rows (several sequences per row, as the reward stage trains): `positions` (B, T) and `mask`
        (B, 1, T, T) as Transformer.hidden takes them, and `read_at` (N,) flat indices into B x T: the N scores
        read at those positions.

        With the likelihood term, `response_from` says where each response starts: (B,) positions in the rows, or
        with `read_at`, (N,) flat indices like it; per_token scores leave the term out (a value estimate)."""
        if self.likelihood and response_from is None and not per_token:
            raise Llama2Error("this reward model has the likelihood term: give response_from (where each response "
                              "starts), as llama2.reward.RewardModel does")
        if read_at is not None:
            h = self.hidden(tokens, positions=positions, mask=mask)
            flat = h.reshape(-1, h.shape[-1])
            scores = self.score(flat[read_at]).squeeze(-1)
            if self.likelihood:
                scores = scores + self.likelihood_term(flat, tokens.reshape(-1), torch.as_tensor(response_from),
                                                       read_at)
            return scores
        last = None if per_token else self.last_index(tokens, lengths, attention_mask)
        positions = mask = None
        if lengths is None and attention_mask is not None:
            real = attention_mask.to(tokens.device).bool()
            if bool((real[:, 1:] & ~real[:, :-1]).any()):  # a real token after padding: left padding or holes
                positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
                T = tokens.shape[1]
                eye = torch.eye(T, dtype=torch.bool, device=tokens.device)
                # causal and real keys only; each position also sees itself, so padded queries have a key
                mask = ((causal_mask(T, T, tokens.device) & real[:, None, :]) | eye)[:, None]
        h = self.hidden(tokens, positions=positions, mask=mask)
        if last is None:
            return self.score(h).squeeze(-1)
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        scores = self.score(h[rows, last]).squeeze(-1)
        if self.likelihood:
            T = tokens.shape[1]
            start = torch.as_tensor(response_from, device=tokens.device).long().reshape(-1)
            if start.shape[0] != tokens.shape[0] or bool(((start < 1) | (start > last)).any()):
                raise Llama2Error(f"response_from must give one position in [1, last token] per row, got "
                                  f"{start.tolist()}")
            scores = scores + self.likelihood_term(h.reshape(-1, h.shape[-1]), tokens.reshape(-1),
                                                   rows * T + start, rows * T + last)
        return scores

    def likelihood_term(self, hidden: Tensor, tokens: Tensor, first: Tensor, last: Tensor) -> Tensor:
        """(N,) w x sum of log p(token_i | tokens before it) + b over flat positions first[n]..last[n] of the flat
        hidden states (N', dim) and tokens (N',); each token is predicted from the hidden state before it."""
        first, last = first.to(hidden.device).long(), last.to(hidden.device).long()
        counts = last - first + 1
        seq = torch.repeat_interleave(torch.arange(len(counts), device=hidden.device), counts)
        offsets = torch.arange(int(counts.sum()), device=hidden.device) - torch.repeat_interleave(
            counts.cumsum(0) - counts, counts)
        at = first[seq] + offsets
        token_lp = chunked_target_logprobs(hidden[at - 1][None], self.lm_head, tokens[at][None])[0]
        summed = torch.zeros(len(counts), dtype=token_lp.dtype, device=hidden.device).index_add_(0, seq, token_lp)
        w, b = self.likelihood_weight.float()
        return w * summed + b
