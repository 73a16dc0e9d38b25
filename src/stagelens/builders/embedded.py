"""Assemble a new embedded model (layout and classes in stagelens.adapters.embedded): a causal LM,
its tokenizer with `<image>` added, EfficientNet-Lite0 weights and a seeded fresh projector."""

from __future__ import annotations

import torch

from stagelens.adapters.efficientnet_vision import PatchEncoder
from stagelens.adapters.embedded import IMAGE_TOKEN, EmbeddedConfig, EmbeddedMLLM, Projector


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
