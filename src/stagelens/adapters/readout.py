"""The answer readout per layer (logit lens): the model's own final norm and unembedding applied
to a layer's last-token residual state, softmax over the full vocabulary.

At the last layer this is the model's own next-token distribution (the hooks keep the residual
stream before the final norm, base.LayerConvention). A word is scored as the max over its
word-start token ids, as the adapters score the model's own answers; a whitespace-then-word path
(Llama-2 digits) is read as its word token alone, since no decode step exists at an inner layer.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from stagelens.adapters.layers import text_config_value

READOUT_RULE = (
    "layer l: softmax over the full vocabulary of unembedding(final_norm(h_l)) at the last prompt token, "
    "h_l = residual stream after block l (the model's own final norm, unembedding and logit soft-capping); "
    "a word's probability is the max over its word-start token ids (a whitespace-then-word path is read as "
    "its word token)"
)


# At most this many logits (float32) are held at once: 256 MB.
LOGIT_ELEMENTS = 1 << 26


class AnswerReadout:
    """Answer-word log-probabilities of residual states through the model's final norm and unembedding."""

    def __init__(self, final_norm: nn.Module, unembedding: nn.Module, word_ids: Sequence[Sequence[int]],
                 softcap: float | None = None):
        if not word_ids or any(not ids for ids in word_ids):
            raise ValueError("every answer word needs at least one token id")
        self.final_norm = final_norm
        self.unembedding = unembedding
        self.word_ids = [list(map(int, ids)) for ids in word_ids]
        self.softcap = float(softcap) if softcap else None
        weight = next(unembedding.parameters())
        norm_params = list(final_norm.parameters())
        self._norm_device = norm_params[0].device if norm_params else weight.device
        self._device, self._dtype = weight.device, weight.dtype

    @torch.no_grad()
    def log_probs(self, states: torch.Tensor) -> torch.Tensor:
        """(..., hidden) states -> (..., words) float32 log-probabilities.

        Every layer's rows go through the unembedding together (one weight read per chunk, not per
        layer: with a batch of a few images the product is bound by reading the weight), in chunks
        of at most LOGIT_ELEMENTS logits. States are cast to the model's dtype first (the captured
        float32 copies of its own activations are exact).
        """
        rows = states.reshape(-1, states.shape[-1])
        vocab = self.unembedding.weight.shape[0] if hasattr(self.unembedding, "weight") else None
        chunk = max(1, LOGIT_ELEMENTS // vocab) if vocab else rows.shape[0]
        out = []
        for start in range(0, rows.shape[0], chunk):
            normed = self.final_norm(rows[start : start + chunk].to(self._norm_device, self._dtype))
            logits = self.unembedding(normed.to(self._device)).float()
            if self.softcap is not None:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            log_probs = logits.log_softmax(dim=-1)
            out.append(torch.stack([log_probs[:, ids].max(dim=1).values for ids in self.word_ids], dim=1))
        return torch.cat(out).reshape(*states.shape[:-1], len(self.word_ids))


def logit_softcap(model: nn.Module) -> float | None:
    """The text config's final logit soft-capping (Gemma-2 style), applied by the model to its logits."""
    return text_config_value(model, "final_logit_softcapping")


def causal_lm_parts(lm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(final norm, unembedding) of a transformers causal LM: its decoder's `norm` and its output
    embeddings (the embedded model's LM, and checkpoints outside the architecture table)."""
    get_decoder = getattr(lm, "get_decoder", None)
    norm = getattr(get_decoder(), "norm", None) if callable(get_decoder) else None
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if not isinstance(norm, nn.Module) or not isinstance(head, nn.Module):
        raise ValueError(
            f"cannot find the final norm and unembedding of {type(lm).__name__} for the answer readout: "
            "add its family to stagelens/adapters/architectures.py (final_norm, unembedding)"
        )
    return norm, head
