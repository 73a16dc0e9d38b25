"""Per-architecture facts, in one table: where a family keeps its parts and what its forward needs.

Keyed by the checkpoint's config `model_type`. Module paths are dotted attribute paths from the
loaded `*ForConditionalGeneration` model (`module_at` resolves them), so readers of the vision
tower, the final norm or the unembedding look them up here instead of branching on the family.
A family stagelens cannot read carries its reason in `unsupported`, raised at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from stagelens.adapters import EMBEDDED_MODEL_TYPE


@dataclass(frozen=True)
class ArchitectureFacts:
    """What stagelens needs to know about one transformers MLLM family."""

    model_type: str
    model_class: str  # transformers class the checkpoint loads into
    processor_class: str  # transformers processor class
    decoder_layers: str  # the LM's decoder block list
    final_norm: str  # norm applied after the last block, before the unembedding
    unembedding: str  # the LM head (hidden -> vocabulary logits)
    vision_tower: str  # the image encoder (before any projector)
    image_tokens_in_sequence: bool = True  # False: cross-attention, no image positions in the LM sequence
    # Processor outputs the forward needs beyond input_ids / attention_mask / pixel_values.
    extra_inputs: tuple[str, ...] = ()
    # Pass position_ids = cumsum(attention_mask) - 1 (1-D RoPE LMs under left padding); False
    # where the model builds its own positions (M-RoPE) or would reject them.
    position_ids: bool = True
    nested_images: bool = False  # the processor wants one image list per prompt
    image_only_processor: bool = False  # the processor insists on a video processor (torchvision)
    needs_torchvision: str = ""  # why its processor cannot run without torchvision ("" where it can)
    # Without torchvision, a processor module that imports a helper from a torchvision-only image
    # processor module whose PIL twin defines the same helper: (processor module, torchvision-only
    # module, PIL module), under transformers.models; the PIL twin stands in during the import.
    pil_twin: tuple[str, str, str] = ()
    max_pixels: bool = False  # the processor honours max_pixels (Qwen2-VL style)
    chat_template: str = ""  # file under stagelens/builders/chat_templates/
    template_is_stand_in: bool = False  # no published template: a stand-in written for stagelens
    unsupported: str | None = None  # why stagelens cannot read it (raised at load time)


def _hf(model_type: str, model_class: str, processor_class: str, lm: str = "model.language_model", vision: str = "model.vision_tower",
        **facts) -> ArchitectureFacts:
    """Facts of the common transformers 5.x layout: model.language_model / model.vision_tower / lm_head."""
    return ArchitectureFacts(
        model_type=model_type, model_class=model_class, processor_class=processor_class, decoder_layers=f"{lm}.layers", final_norm=f"{lm}.norm",
        unembedding="lm_head", vision_tower=vision, **facts,
    )


def _mrope(model_type: str, model_class: str, processor_class: str, chat_template: str, max_pixels: bool = True,
           **facts) -> ArchitectureFacts:
    """Qwen-VL-style families: vision tower `model.visual`, 3-D M-RoPE positions built by the model
    from `image_grid_thw` / `mm_token_type_ids`, a processor that insists on a video processor."""
    return _hf(model_type, model_class, processor_class, vision="model.visual",
               extra_inputs=("image_grid_thw", "mm_token_type_ids"), position_ids=False, image_only_processor=True,
               max_pixels=max_pixels, chat_template=chat_template, **facts)


_FACTS = [
    _hf("llava", "LlavaForConditionalGeneration", "LlavaProcessor", extra_inputs=(), chat_template="llava-1.5-7b-hf.jinja"),
    _hf("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextProcessor", extra_inputs=("image_sizes",),
        chat_template="llama3-llava-next-8b-hf.jinja"),
    _mrope("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2-VL-7B-Instruct.jinja"),
    _mrope("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor", "Qwen2.5-VL-7B-Instruct.jinja"),
    _mrope("qwen3_vl", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen3-VL-8B-Instruct.jinja"),
    _mrope("qwen3_vl_moe", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor", "Qwen3-VL-8B-Instruct.jinja"),
    _mrope("glm4v", "Glm4vForConditionalGeneration", "Glm4vProcessor", "stand-in-glm4v.jinja", max_pixels=False,
           template_is_stand_in=True),
    _mrope("glm4v_moe", "Glm4vMoeForConditionalGeneration", "Glm4vProcessor", "stand-in-glm4v.jinja",
           max_pixels=False, template_is_stand_in=True),
    _mrope("glm46v", "Glm46VForConditionalGeneration", "Glm46VProcessor", "stand-in-glm4v.jinja", max_pixels=False,
           template_is_stand_in=True),
    _hf("gemma3", "Gemma3ForConditionalGeneration", "Gemma3Processor", extra_inputs=("token_type_ids",),
        nested_images=True, chat_template="gemma-3-4b-it.jinja"),
    _hf("paligemma", "PaliGemmaForConditionalGeneration", "PaliGemmaProcessor", extra_inputs=("token_type_ids",),
        chat_template="stand-in-paligemma.jinja", template_is_stand_in=True),
    _hf("llava_onevision", "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionProcessor",
        extra_inputs=("image_sizes",), image_only_processor=True, chat_template="llava-onevision-qwen2-7b-ov-hf.jinja"),
    _hf("internvl", "InternVLForConditionalGeneration", "InternVLProcessor", image_only_processor=True,
        chat_template="InternVL3-1B-hf.jinja"),
    _hf("idefics3", "Idefics3ForConditionalGeneration", "Idefics3Processor", lm="model.text_model",
        vision="model.vision_model", extra_inputs=("pixel_attention_mask",), nested_images=True,
        chat_template="stand-in-idefics3.jinja", template_is_stand_in=True),
    _hf("smolvlm", "SmolVLMForConditionalGeneration", "SmolVLMProcessor", lm="model.text_model",
        vision="model.vision_model", extra_inputs=("pixel_attention_mask",), nested_images=True,
        image_only_processor=True, chat_template="SmolVLM-256M-Instruct.jinja"),
    _hf("mistral3", "Mistral3ForConditionalGeneration", "PixtralProcessor", extra_inputs=("image_sizes",),
        pil_twin=("pixtral.processing_pixtral", "pixtral.image_processing_pixtral", "pixtral.image_processing_pil_pixtral"),
        chat_template="stand-in-mistral3.jinja", template_is_stand_in=True),
    ArchitectureFacts(
        "llama4", "Llama4ForConditionalGeneration", "Llama4Processor", decoder_layers="language_model.model.layers",
        final_norm="language_model.model.norm", unembedding="language_model.lm_head", vision_tower="vision_model",
        needs_torchvision="Llama4ImageProcessor has only a torchvision backend",
        chat_template="Llama-4-Scout-17B-16E-Instruct.jinja",
    ),
    ArchitectureFacts(
        "lfm2_vl", "Lfm2VlForConditionalGeneration", "Lfm2VlProcessor", decoder_layers="model.language_model.layers",
        final_norm="model.language_model.embedding_norm", unembedding="lm_head", vision_tower="model.vision_tower",
        extra_inputs=("spatial_shapes", "pixel_attention_mask"),
        needs_torchvision="Lfm2VlImageProcessor has only a torchvision backend",
        chat_template="LFM2-VL-1.6B.jinja",
    ),
    _hf("aya_vision", "AyaVisionForConditionalGeneration", "AyaVisionProcessor",
        chat_template="stand-in-aya-vision.jinja", template_is_stand_in=True),
    _hf("mllama", "MllamaForConditionalGeneration", "MllamaProcessor", vision="model.vision_model",
        image_tokens_in_sequence=False, extra_inputs=("aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask"),
        nested_images=True, chat_template="Llama-3.2-11B-Vision-Instruct.jinja"),
]

ARCHITECTURES: dict[str, ArchitectureFacts] = {f.model_type: f for f in _FACTS}

# How a vision block's output holds the images of one batch (stagelens.adapters.vision splits it):
# "batch": (images, tokens, dim), one row per image (CLIP / SigLIP towers);
# "tiles": (tiles, tokens, dim), each image's tiles in consecutive rows (LLaVA-NeXT anyres, InternVL
#          crops); "packed": (sum of tokens, dim) or (1, sum of tokens, dim), each image's patches in
#          turn (Qwen2-VL, Pixtral); "spatial": (images, channels, height, width) feature maps (CNN stages).
VISION_LAYOUTS = ("batch", "tiles", "packed", "spatial")
# Where a "tiles" / "packed" layout reads each image's share of the rows / patches:
# "anyres": tiles from image_sizes as LLaVA-NeXT's image_size_to_num_patches counts them;
# "image_tokens": tiles in proportion to the image's image tokens in its prompt (every tile expands
#                 to the same number of image tokens: InternVL / Aya Vision crops);
# "grid_thw": t*h*w patches from image_grid_thw (Qwen-VL / GLM-4V);
# "patch_grid": (height // patch_size) * (width // patch_size) patches from image_sizes (Pixtral).
VISION_COUNTS = ("anyres", "image_tokens", "grid_thw", "patch_grid")


@dataclass(frozen=True)
class VisionTowerFacts:
    """Where a family's vision encoder keeps its blocks and how their outputs split per image.

    Vision layer convention (as the LM's): layer 0 = input to the first block, layer v = output of
    block v (before any post-norm). The projector reads the layer named by the model config's
    `feature_layer_key` (negative: from the end of hidden_states), else the last one.
    """

    blocks: str  # dotted path (from the loaded model) to the vision encoder's block list
    layout: str  # one of VISION_LAYOUTS
    cls_token: bool  # token 0 of each image (of each tile) is a CLS token
    feature_layer_key: str = ""  # config attribute naming the vision layer the projector reads
    projector: str = ""  # what the projector does with that layer, in words (metadata, docs)
    counts: str = ""  # one of VISION_COUNTS for "tiles" / "packed" layouts
    # The tile holding the whole image (its CLS is the image's): "first" (LLaVA-NeXT's base image)
    # or "last" (InternVL's thumbnail, appended after the crops; a single tile is the whole image).
    whole_image_tile: str = "first"


_CLIP_LLAVA = "multi_modal_projector (2-layer MLP) on the patch tokens of vision_feature_layer; strategy " \
    "'default' drops CLS"
_QWEN_MERGER = "PatchMerger (norm + MLP over 2x2 neighbouring patches) on the last block's output"
_GLM_MERGER = "post_layernorm, 2x2 stride-2 conv downsample and Glm4vVisionPatchMerger on the last block's output"
_SIGLIP_POST = "on the last block's output after the tower's post_layernorm"
_ANYRES = "; tiles unpadded and one image_newline vector per row appended (pack_image_features)"
VISION_TOWERS: dict[str, VisionTowerFacts] = {
    "llava": VisionTowerFacts("model.vision_tower.encoder.layers", "batch", cls_token=True,
                              feature_layer_key="vision_feature_layer", projector=_CLIP_LLAVA),
    "llava_next": VisionTowerFacts("model.vision_tower.encoder.layers", "tiles", cls_token=True,
                                   feature_layer_key="vision_feature_layer", projector=_CLIP_LLAVA + _ANYRES,
                                   counts="anyres"),
    "llava_onevision": VisionTowerFacts("model.vision_tower.encoder.layers", "tiles", cls_token=False,
                                        feature_layer_key="vision_feature_layer",
                                        projector="multi_modal_projector (2-layer MLP) on vision_feature_layer of "
                                        "the SigLIP tower" + _ANYRES, counts="anyres"),
    "qwen2_vl": VisionTowerFacts("model.visual.blocks", "packed", cls_token=False, projector=_QWEN_MERGER,
                                 counts="grid_thw"),
    # Window attention reorders the patches inside each image only: the per-image mean is unchanged.
    "qwen2_5_vl": VisionTowerFacts("model.visual.blocks", "packed", cls_token=False, projector=_QWEN_MERGER,
                                   counts="grid_thw"),
    "qwen3_vl": VisionTowerFacts("model.visual.blocks", "packed", cls_token=False, counts="grid_thw",
                                 projector=_QWEN_MERGER + "; DeepStack mergers also read the blocks of "
                                 "vision_config.deepstack_visual_indexes and add them to early LM layers"),
    "qwen3_vl_moe": VisionTowerFacts("model.visual.blocks", "packed", cls_token=False, counts="grid_thw",
                                     projector=_QWEN_MERGER + "; DeepStack mergers also read the blocks of "
                                     "vision_config.deepstack_visual_indexes and add them to early LM layers"),
    "glm4v": VisionTowerFacts("model.visual.blocks", "packed", cls_token=False, projector=_GLM_MERGER,
                              counts="grid_thw"),
    "glm4v_moe": VisionTowerFacts("model.visual.blocks", "packed", cls_token=False, projector=_GLM_MERGER,
                                  counts="grid_thw"),
    "glm46v": VisionTowerFacts("model.visual.blocks", "packed", cls_token=False, projector=_GLM_MERGER,
                               counts="grid_thw"),
    "gemma3": VisionTowerFacts("model.vision_tower.encoder.layers", "batch", cls_token=False,
                               projector="Gemma3MultiModalProjector " + _SIGLIP_POST + ": 4x4 average pooling to "
                               "256 tokens, RMSNorm, linear"),
    "paligemma": VisionTowerFacts("model.vision_tower.encoder.layers", "batch", cls_token=False,
                                  projector="PaliGemmaMultiModalProjector (linear) " + _SIGLIP_POST +
                                  ", scaled by 1/sqrt(hidden_size)"),
    "internvl": VisionTowerFacts("model.vision_tower.encoder.layer", "tiles", cls_token=True,
                                 feature_layer_key="vision_feature_layer", counts="image_tokens",
                                 whole_image_tile="last",
                                 projector="pixel shuffle (downsample_ratio) and a 2-layer MLP on the patch tokens of "
                                 "vision_feature_layer; strategy 'default' drops CLS"),
    "aya_vision": VisionTowerFacts("model.vision_tower.encoder.layers", "tiles", cls_token=False,
                                   feature_layer_key="vision_feature_layer", counts="image_tokens",
                                   whole_image_tile="last",
                                   projector="pixel shuffle (downsample_factor) and a SwiGLU MLP on "
                                   "vision_feature_layer of the SigLIP tower"),
    "mistral3": VisionTowerFacts("model.vision_tower.transformer.layers", "packed", cls_token=False,
                                 feature_layer_key="vision_feature_layer", counts="patch_grid",
                                 projector="Mistral3MultiModalProjector: RMSNorm, 2x2 patch merger, 2-layer MLP on "
                                 "vision_feature_layer"),
    # The embedded model (stagelens.adapters.embedded): EfficientNet-Lite0's MBConv stages and its
    # 1x1 head conv (PatchEncoder.stages); layer 0 is the stem's output.
    EMBEDDED_MODEL_TYPE: VisionTowerFacts("vision.stages", "spatial", cls_token=False,
                                          projector="2-layer MLP on each of the head's 7x7 = 49 patch vectors"),
}

# Families of ARCHITECTURES whose vision layers are not read, and why (the coverage matrix shows it).
VISION_UNREAD: dict[str, str] = {
    "idefics3": "sub-images padded inside the tower (patch_attention_mask) and all-padding sub-images dropped "
                "by pixel value: no per-image token split of the existing layouts",
    "smolvlm": "sub-images padded inside the tower (patch_attention_mask) and all-padding sub-images dropped "
               "by pixel value: no per-image token split of the existing layouts",
    "mllama": "two block lists (local transformer, then global_transformer) over aspect-ratio tiles with "
              "padding tiles; the projector reads the last state concatenated with intermediate layers",
    "llama4": "tower not examined: its tiny model needs torchvision, absent where VISION_TOWERS was built",
    "lfm2_vl": "tower not examined: its tiny model needs torchvision, absent where VISION_TOWERS was built",
}


def vision_facts_for(model_type: str) -> VisionTowerFacts | None:
    """The vision tower entry of a model_type, or None (its vision layers cannot be read here)."""
    return VISION_TOWERS.get(model_type)


def facts_for(model_type: str) -> ArchitectureFacts | None:
    """The table entry of a config model_type, or None (the generic path guesses)."""
    return ARCHITECTURES.get(model_type)


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted attribute path, with an error naming the missing step."""
    module = model
    for step in path.split("."):
        if not hasattr(module, step):
            raise AttributeError(f"{type(model).__name__} has no {path!r} (missing {step!r} in {type(module).__name__})")
        module = getattr(module, step)
    return module
