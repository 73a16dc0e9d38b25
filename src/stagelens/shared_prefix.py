"""Prompt passes that share their prefix: the tokens every prompt has in common (the template's
head and the image) run once per batch with a KV cache, and each prompt's own tail continues from
it, so extracting P prompts of one image pays for the image tokens once instead of P times."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from stagelens.adapters.base import BatchVectors
from stagelens.adapters.layers import LayerCapture


def tail_lengths(adapter, prompts: Sequence[Mapping[str, str]]) -> list[int]:
    """Per prompt, the tokens from its question's last token to the end: they must run after the
    shared prefix, since the kept positions (last, question_last) are read in the tail's forward."""
    layouts = [adapter.layout(p["text"]) for p in prompts]
    return [layout.from_end(layout.question_last) + 1 for layout in layouts]


def forward_prompts(
    adapter, images: Sequence[Image.Image], prompts: Sequence[Mapping[str, str]], layers: Sequence[int],
    positions: Sequence[str], tails: Sequence[int], image_layers: Sequence[int] = (), vision_layers: Sequence[int] = (),
) -> tuple[list[BatchVectors], BatchVectors | None]:
    """One `BatchVectors` per prompt, as the adapter's own prompt pass gives it (vectors at the
    prompt positions, answer probabilities, answer readout), from one prefix pass over `images`;
    and, where image_layers or vision_layers are asked for, the image pass's vectors read from
    that prefix (it holds every token up to the last image token), else None.

    The values equal the full forwards' up to float rounding (a cached continuation multiplies
    matrices of other shapes); tails: `tail_lengths(adapter, prompts)`.
    """
    run = adapter.prefix_pass(images, [p["text"] for p in prompts], tails, image_layers, vision_layers)
    kept = positions if "last" in positions else [*positions, "last"]  # the readout reads `last`
    results = []
    for suffix, tail in zip(run.suffix_ids, tails):
        capture = LayerCapture(adapter.blocks, layers, kept)
        last = torch.full((suffix.shape[0],), suffix.shape[1] - 1, dtype=torch.long)
        capture.set_batch(last, None, last - (tail - 1))
        with torch.no_grad():
            with capture.attached():
                continued = run.continue_with(suffix, 1)
            readout = adapter.readout.log_probs(capture.states("last"))
        results.append(BatchVectors(
            vectors=capture.vectors(positions),
            answer_probs=continued.answer_log_probs.exp().float().cpu().numpy(),
            n_image_tokens=run.image_tokens.numpy().astype(np.int32),
            readout=readout.cpu().numpy(),
        ))
    return results, run.image
