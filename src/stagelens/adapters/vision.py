"""Read the vision encoder's layers in the image pass: per image, the mean over its patch tokens
(and its CLS token where the encoder has one) at every kept vision layer.

The blocks and the token layout come from `architectures.VISION_TOWERS`. Vision layer convention
(as the LM's, base.LayerConvention): layer 0 = input to the first block, layer v = output of
block v, before any post-norm. Each hook reduces its output to (images, dim) float32 right away
(`VisionSegments.reduce`), so no layer's token stack is kept.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from stagelens.adapters.architectures import VISION_COUNTS, VISION_LAYOUTS, VisionTowerFacts, module_at

# What a vision file's columns hold: the mean over an image's patch tokens (CLS excluded; over
# every tile for tiled towers; over the spatial positions of a CNN stage) and, where the encoder
# has one, its CLS token (of the whole-image tile for tiled towers).
VISION_POSITIONS = ("patch_mean", "cls")
VISION_LAYER_CONVENTION = (
    "vision layer 0 = input to the vision encoder's first block (patch embeddings; a CNN's stem output); "
    "vision layer v (1..V) = output of block v (a CNN's stage v; the last is its head), before any post-norm"
)


@dataclass(frozen=True)
class VisionSegments:
    """Where each image's tokens lie in one batch's vision-block outputs (see VISION_LAYOUTS).

    counts: per image its tiles ("tiles") or its patches ("packed"); unused otherwise.
    whole_image_tile: "first" or "last": the tile whose CLS is the image's ("tiles").
    """

    layout: str
    cls_token: bool
    n_images: int
    counts: tuple[int, ...] = ()
    whole_image_tile: str = "first"

    def reduce(self, hidden: torch.Tensor, position: str) -> torch.Tensor:
        """A block's output -> (images, dim) float32 at one vision position."""
        if self.layout in ("batch", "spatial") and hidden.shape[0] != self.n_images:
            raise RuntimeError(f"vision tower output has {hidden.shape[0]} rows for a batch of {self.n_images} images")
        if self.layout == "spatial":
            if position != "patch_mean":
                raise ValueError(f"a CNN stage has no {position!r} (only patch_mean)")
            # A stage's (images, C, H, W) map, or the encoder's (images, H*W, C) patch vectors.
            return hidden.float().mean(dim=(2, 3)) if hidden.dim() == 4 else hidden.float().mean(dim=1)
        if self.layout == "packed":
            hidden = hidden.reshape(-1, hidden.shape[-1])  # (sum of patches, dim)
            self._check(hidden.shape[0], "patches")
            if position != "patch_mean":
                raise ValueError(f"a packed vision tower has no {position!r} (only patch_mean)")
            return torch.stack([part.float().mean(dim=0) for part in torch.split(hidden, list(self.counts))])
        if position == "cls":
            if not self.cls_token:
                raise ValueError("this vision tower has no CLS token")
            cls = hidden[:, 0]
            if self.layout == "tiles":
                self._check(hidden.shape[0], "tiles")
                ends = np.cumsum(self.counts)
                rows = ends - np.asarray(self.counts) if self.whole_image_tile == "first" else ends - 1
                cls = cls[torch.tensor(rows, device=hidden.device)]
            return cls.float()
        patches = hidden[:, 1:] if self.cls_token else hidden
        if self.layout == "batch":
            return patches.float().mean(dim=1)
        self._check(hidden.shape[0], "tiles")
        return torch.stack([part.float().mean(dim=(0, 1)) for part in torch.split(patches, list(self.counts))])

    def _check(self, rows: int, what: str) -> None:
        if len(self.counts) != self.n_images or sum(self.counts) != rows:
            raise RuntimeError(f"vision tower output has {rows} {what}; the batch's images account for {sum(self.counts)} "
                               f"in {len(self.counts)} images ({self.n_images} in the batch)")


class VisionCapture:
    """Forward hooks on the vision blocks that keep the vision positions at `layers` for one batch."""

    def __init__(
        self, blocks: Sequence[nn.Module], layers: Sequence[int], positions: Sequence[str], segments: VisionSegments
    ):
        n = len(blocks)
        bad = [layer for layer in layers if not 0 <= int(layer) <= n]
        if bad:
            raise ValueError(f"vision layers {bad} out of range 0..{n} (the vision encoder has {n} blocks)")
        self.blocks, self.layers, self.positions, self.segments = blocks, [int(v) for v in layers], list(positions), segments
        self._kept: dict[str, list[torch.Tensor | None]] = {p: [None] * len(self.layers) for p in self.positions}

    def _store(self, slot: int, hidden: torch.Tensor) -> None:
        for position in self.positions:
            self._kept[position][slot] = self.segments.reduce(hidden, position)

    def _hook(self, slot: int, before: bool):
        def pre_hook(_module, args, kwargs):
            self._store(slot, args[0] if args else kwargs["hidden_states"])

        def hook(_module, _args, output):
            self._store(slot, output[0] if isinstance(output, (tuple, list)) else output)

        return pre_hook if before else hook

    @contextmanager
    def attached(self) -> Iterator["VisionCapture"]:
        """Register the hooks for the duration of the block; always removes them."""
        handles = []
        try:
            for slot, layer in enumerate(self.layers):
                if layer == 0:
                    handles.append(self.blocks[0].register_forward_pre_hook(self._hook(slot, True), with_kwargs=True))
                else:
                    handles.append(self.blocks[layer - 1].register_forward_hook(self._hook(slot, False)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def vectors(self) -> dict[str, list[np.ndarray]]:
        """position -> per kept layer (in the order of `layers`) an (images, dim_v) float32 array."""
        missing = sorted({self.layers[i] for kept in self._kept.values() for i, t in enumerate(kept) if t is None})
        if missing:
            raise RuntimeError(f"no vision state captured at vision layers {missing}: did the vision tower run?")
        return {p: [t.cpu().numpy() for t in kept] for p, kept in self._kept.items()}


@dataclass
class VisionTower:
    """A loaded model's vision encoder as stagelens reads it: its blocks and what feeds the projector."""

    facts: VisionTowerFacts
    blocks: Sequence[nn.Module]
    projector_input: dict[str, object]

    @property
    def num_layers(self) -> int:
        """Blocks V of the encoder; its vision layers are 0..V."""
        return len(self.blocks)

    @property
    def positions(self) -> tuple[str, ...]:
        return VISION_POSITIONS if self.facts.cls_token else VISION_POSITIONS[:1]

    def metadata(self) -> dict[str, object]:
        """What every vision file records about the tower."""
        return {"vision_layout": self.facts.layout, "vision_counts": self.facts.counts,
                "whole_image_tile": self.facts.whole_image_tile, "vision_blocks": self.facts.blocks, "cls_token": self.facts.cls_token,
                "projector_input": self.projector_input, "layer_convention": VISION_LAYER_CONVENTION}

    def capture(self, layers: Sequence[int], n_images: int, inputs: Mapping[str, object], config) -> VisionCapture:
        """Hooks for one batch, given the processor outputs that say how its images split."""
        counts = _counts(self.facts.counts, inputs, config)
        segments = VisionSegments(self.facts.layout, self.facts.cls_token, n_images, counts, self.facts.whole_image_tile)
        return VisionCapture(self.blocks, layers, self.positions, segments)


def _counts(source: str, inputs: Mapping[str, object], config) -> tuple[int, ...]:
    """Per image its tiles or its patches, read from the processor outputs as `source` says
    (architectures.VISION_COUNTS); () for layouts that need none."""
    if source == "anyres":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return tuple(
            int(image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size))
            for size in inputs["image_sizes"].tolist()
        )
    if source == "grid_thw":
        return tuple(int(n) for n in inputs["image_grid_thw"].prod(dim=-1).tolist())
    if source == "patch_grid":
        patch = config.vision_config.patch_size
        return tuple((int(h) // patch) * (int(w) // patch) for h, w in inputs["image_sizes"].tolist())
    if source == "image_tokens":
        token = getattr(config, "image_token_id", None)
        token = config.image_token_index if token is None else token
        per_image = (inputs["input_ids"] == token).sum(dim=1).tolist()
        tiles, total = int(inputs["pixel_values"].shape[0]), sum(per_image)
        if total == 0 or any(n * tiles % total for n in per_image):
            raise RuntimeError(f"{tiles} tiles do not split in proportion to the image tokens per prompt {per_image}")
        return tuple(n * tiles // total for n in per_image)
    return ()


def projector_input(facts: VisionTowerFacts, config, n_blocks: int) -> dict[str, object]:
    """Which vision layer(s) the projector reads and whether it drops CLS, from the model config."""
    if not facts.feature_layer_key:
        return {"vision_layers": [n_blocks], "drops_cls": False, "projector": facts.projector}
    chosen = getattr(config, facts.feature_layer_key)
    # hidden_states has n_blocks + 1 entries: a negative index counts from its end.
    layers = [v if v >= 0 else n_blocks + 1 + v for v in (chosen if isinstance(chosen, (list, tuple)) else [chosen])]
    strategy = getattr(config, "vision_feature_select_strategy", None)
    return {facts.feature_layer_key: chosen, "vision_layers": layers, "select_strategy": strategy,
            "drops_cls": bool(facts.cls_token and strategy == "default"), "projector": facts.projector}


def check_vision_request(vision: VisionTower | None, vision_layers: Sequence[int], architecture: str) -> None:
    """Clear error for vision layers asked of a model whose tower is not read here. Any pass that
    runs the image may read them: the vision tower does not see the prompt."""
    if not vision_layers:
        return
    if vision is None:
        raise ValueError(f"the vision layers of {architecture} cannot be read: its family has no entry in "
                         "stagelens.adapters.architectures.VISION_TOWERS; set vision_num_layers: null")


def load_vision_tower(model: nn.Module, facts: VisionTowerFacts | None, config=None) -> VisionTower | None:
    """The vision tower of a loaded model (None where its family has no VISION_TOWERS entry)."""
    if facts is None:
        return None
    if facts.layout not in VISION_LAYOUTS:
        raise ValueError(f"vision layout {facts.layout!r} is not one of {VISION_LAYOUTS}")
    if facts.layout in ("tiles", "packed") and facts.counts not in VISION_COUNTS:
        raise ValueError(f"a {facts.layout!r} vision layout needs counts, one of {VISION_COUNTS}; got {facts.counts!r}")
    blocks = module_at(model, facts.blocks)
    return VisionTower(facts, blocks, projector_input(facts, config, len(blocks)))
