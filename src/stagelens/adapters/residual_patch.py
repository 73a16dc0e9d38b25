"""Record and overwrite the residual stream at chosen layers and token columns (activation patching).

Same layer convention as layers.py: layer 0 = input of the first decoder block, layer l = output
of block l, before the final norm. The blocks come from `find_decoder_layers` (no attribute paths).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Continuation:
    """What a prompt suffix run from a cached prefix gives (see stagelens.patching.PrefixRun)."""

    logits: torch.Tensor  # (rows, vocab) next-token logits after the prompt
    answer_log_probs: torch.Tensor  # (rows, len(ANSWER_WORDS)) by the adapter's answer-word scoring


def _check_layers(blocks: nn.ModuleList, layers: Sequence[int]) -> None:
    bad = [layer for layer in layers if not 0 <= int(layer) <= len(blocks)]
    if bad:
        raise ValueError(f"layers {bad} out of range 0..{len(blocks)} (the model has {len(blocks)} decoder blocks)")


def _register(blocks: nn.ModuleList, layer: int, edit) -> torch.utils.hooks.RemovableHandle:
    """Hook that passes layer `layer`'s hidden state (batch, tokens, width) through `edit`, on the
    first forward only: a cached decode step that scores a two-token answer afterwards continues
    from the patched state and is neither recorded nor patched again.

    `edit` returns a replacement tensor or None (leave it as is).
    """
    fired = [False]

    def first(hidden: torch.Tensor):
        if fired[0]:
            return None
        fired[0] = True
        return edit(hidden)

    if layer == 0:

        def pre_hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            new = first(hidden)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}

        return blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_module, _args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        new = first(hidden)
        if new is None:
            return None
        return (new, *output[1:]) if isinstance(output, (tuple, list)) else new

    return blocks[layer - 1].register_forward_hook(hook)


@contextmanager
def record_residuals(
    blocks: nn.ModuleList, layers: Sequence[int], cols: torch.Tensor
) -> Iterator[dict[int, torch.Tensor]]:
    """Filled during the forward: layer -> hidden[:, cols] (batch, len(cols), width), a copy."""
    _check_layers(blocks, layers)
    kept: dict[int, torch.Tensor] = {}
    handles = []

    def keeper(layer: int):
        def edit(hidden: torch.Tensor) -> None:
            kept[layer] = hidden[:, cols.to(hidden.device)].detach().clone()

        return edit

    try:
        for layer in layers:
            handles.append(_register(blocks, int(layer), keeper(int(layer))))
        yield kept
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def overwrite_residuals(
    blocks: nn.ModuleList, writes: Mapping[int, tuple[torch.Tensor, torch.Tensor]], cols: torch.Tensor
) -> Iterator[None]:
    """Replace hidden[rows, cols] by values at each layer: writes[layer] = (rows, values), values of
    shape (len(rows), len(cols), width). Everything else in the forward is left as computed."""
    _check_layers(blocks, list(writes))
    handles = []

    def writer(rows: torch.Tensor, values: torch.Tensor):
        def edit(hidden: torch.Tensor) -> torch.Tensor:
            device = hidden.device
            patched = hidden.clone()
            patched[rows.to(device).unsqueeze(1), cols.to(device).unsqueeze(0)] = values.to(device, hidden.dtype)
            return patched

        return edit

    try:
        for layer, (rows, values) in writes.items():
            if values.shape[:2] != (len(rows), len(cols)):
                raise ValueError(f"layer {layer}: values {tuple(values.shape)} do not fit {len(rows)} rows x {len(cols)} columns")
            handles.append(_register(blocks, int(layer), writer(rows, values)))
        yield
    finally:
        for handle in handles:
            handle.remove()
