"""Find a language model's decoder blocks and read kept token positions with forward hooks.

Layer convention (see base.LayerConvention): layer 0 = input to the first decoder block
(token embeddings with image features merged in), layer l = output of block l, before the
final norm. Each hook reduces its (batch, tokens, width) hidden state to the kept positions
right away and converts only those to float32, so the full layers x tokens x width stack is
never held in memory.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

# Module-name fragments of vision towers and projectors, whose block lists are never the LM's.
_VISION_NAME_PARTS = ("vision", "visual", "image", "vit", "projector", "patch", "siglip", "clip")


def text_config_value(model: nn.Module, key: str):
    """`key` of the model's text config (its config where it has no separate one), or None."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, key, None)


def text_num_layers(model: nn.Module) -> int | None:
    """num_hidden_layers of the model's text config, where it has one."""
    return text_config_value(model, "num_hidden_layers")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The language model's decoder block list, found without hard-coded attribute paths.

    Prefers `get_decoder().layers` (transformers models and wrappers that expose it); otherwise
    searches every ModuleList outside vision towers whose length is the text config's
    num_hidden_layers (or, without a config, the longest such list).
    """
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
        blocks = getattr(decoder, "layers", None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    expected = text_num_layers(model)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and not any(part in name.lower() for part in _VISION_NAME_PARTS)
    ]
    if expected is not None:
        candidates = [(n, m) for n, m in candidates if len(m) == expected]
    else:
        longest = max((len(m) for _, m in candidates), default=0)
        candidates = [(n, m) for n, m in candidates if len(m) == longest]
    if len(candidates) != 1:
        found = [f"{n} ({len(m)})" for n, m in candidates] or ["none"]
        raise ValueError(
            f"cannot identify the decoder block list of {type(model).__name__} "
            f"(expected {expected} blocks); candidates: {', '.join(found)}"
        )
    return candidates[0][1]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last attended token per row (T-1 under left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.to(torch.long) * (positions + 1)).argmax(dim=1)


class _Positions:
    """Where the kept positions are in one batch, as index tensors computed once per batch.

    Gathering with precomputed indices never synchronises with the device inside a hook
    (boolean-mask indexing would, once per layer and row).
    """

    def __init__(self, indices: dict[str, torch.Tensor], image_mask: torch.Tensor | None):
        self.indices = indices  # single-token positions: name -> (batch,) token index
        self.batch = int(indices["last"].shape[0])
        self.rows = torch.arange(self.batch, device=indices["last"].device)
        self.image_rows = self.image_cols = self.image_counts = None
        if image_mask is not None:
            self.image_rows, self.image_cols = image_mask.nonzero(as_tuple=True)
            self.image_counts = image_mask.sum(dim=1, keepdim=True).to(torch.float32)

    def reduce(self, hidden: torch.Tensor, position: str) -> torch.Tensor:
        """(batch, tokens, width) -> (batch, width) float32 at one kept position."""
        device = hidden.device
        if position in self.indices:
            return hidden[self.rows.to(device), self.indices[position].to(device)].to(torch.float32)
        if position == "image_mean":
            if self.image_rows is None:
                raise ValueError("position 'image_mean' needs an image token mask")
            rows = self.image_rows.to(device)
            # Only the image tokens are converted to float32, then summed per row.
            tokens = hidden[rows, self.image_cols.to(device)].to(torch.float32)
            sums = torch.zeros(self.batch, hidden.shape[-1], dtype=torch.float32, device=device).index_add_(0, rows, tokens)
            return sums / self.image_counts.to(device)
        raise ValueError(f"position {position!r} was not located in this batch (have {sorted(self.indices)}, image_mean)")


class LayerCapture:
    """Forward hooks on the decoder blocks that keep `positions` at `layers` for one batch.

    Set `last_index` (batch,), `image_mask` (batch, tokens) and, for `question_last`, the
    question's last token index (batch,) with `set_batch` before the forward; read `vectors()`
    after it.
    """

    def __init__(self, blocks: nn.ModuleList, layers: Sequence[int], positions: Sequence[str]):
        n = len(blocks)
        bad = [layer for layer in layers if not 0 <= int(layer) <= n]
        if bad:
            raise ValueError(f"layers {bad} out of range 0..{n} (the model has {n} decoder blocks)")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must not repeat, got {list(layers)}")
        if not positions:
            raise ValueError("at least one position is required")
        self.blocks = blocks
        self.layers = [int(layer) for layer in layers]
        self.positions = list(positions)
        self._slot = {layer: i for i, layer in enumerate(self.layers)}
        self._kept: dict[str, list[torch.Tensor | None]] = {}
        self._where: _Positions | None = None

    def set_batch(
        self, last_index: torch.Tensor, image_mask: torch.Tensor | None, question_last: torch.Tensor | None = None
    ) -> None:
        if "image_mean" in self.positions and image_mask is not None:
            empty = (image_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"batch rows {empty} hold no image tokens: image_mean is undefined")
        if "question_last" in self.positions and question_last is None:
            raise ValueError("position 'question_last' needs the question's last token index")
        indices = {"last": last_index}
        if question_last is not None:
            indices["question_last"] = question_last
        self._where = _Positions(indices, image_mask)
        self._kept = {pos: [None] * len(self.layers) for pos in self.positions}

    def _store(self, layer: int, hidden: torch.Tensor) -> None:
        if self._where is None:
            raise RuntimeError("LayerCapture.set_batch was not called before the forward pass")
        slot = self._slot[layer]
        for pos in self.positions:
            # The first forward of a batch is the prompt's; later ones (a cached continuation's
            # answer-scoring decode steps) run one new token and must not overwrite it.
            if self._kept[pos][slot] is None:
                self._kept[pos][slot] = self._where.reduce(hidden, pos)

    def _pre_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self._store(0, hidden)

    def _make_hook(self, layer: int):
        def hook(_module: nn.Module, _args: tuple, output) -> None:
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            self._store(layer, hidden)

        return hook

    @contextmanager
    def attached(self) -> Iterator["LayerCapture"]:
        """Register the hooks for the duration of the block; always removes them."""
        handles = []
        try:
            for layer in self.layers:
                if layer == 0:
                    handles.append(self.blocks[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True))
                else:
                    handles.append(self.blocks[layer - 1].register_forward_hook(self._make_hook(layer)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def states(self, position: str) -> torch.Tensor:
        """(n_layers, batch, width) float32 on the device of the first kept layer, in the order of `layers`."""
        kept = self._kept[position]
        missing = [self.layers[i] for i, t in enumerate(kept) if t is None]
        if missing:
            raise RuntimeError(f"no hidden state captured at layers {missing}: did the forward run?")
        # Blocks may sit on several devices: one stack on the first, then one host copy per position.
        return torch.stack([t.to(kept[0].device) for t in kept])

    def vectors(self, positions: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """position -> (n_layers, batch, width) float32, in the order of `layers` (all kept
        positions, or only `positions`)."""
        return {pos: self.states(pos).cpu().numpy() for pos in (self._kept if positions is None else positions)}
