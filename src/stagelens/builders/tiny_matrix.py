"""Seeded tiny random checkpoints of the coverage matrix's architectures, built offline.

One recipe per transformers `model_type`: the real config class with small sizes (LM width 64,
2 decoder blocks, a 1-2 block vision tower on 32-pixel images), the real processor class, a
byte-level BPE tokenizer trained in memory (`tiny.train_tokenizer`) carrying the family's
special tokens, and the family's published chat template where one was collected (else a
stand-in, marked so in `stagelens.adapters.architectures`). A checkpoint loads through the same
`load_adapter` path as a hub checkpoint.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from stagelens.builders.tiny import train_tokenizer

HIDDEN = 64  # LM width
LAYERS = 2  # LM decoder blocks (default; the workflow's num_layers overrides it)
HEADS = 4
KV_HEADS = 2


def template(name: str) -> str:
    """A chat template shipped as package data (stagelens/builders/chat_templates/)."""
    return resources.files("stagelens.builders").joinpath("chat_templates", name).read_text(encoding="utf-8")


def _text(layers: int, **extra) -> dict:
    """Small LM settings shared by every recipe; `extra` overrides or adds family keys."""
    base = {
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 2048,
    }
    base.update(extra)
    return base


def _siglip(image_size: int = 32, patch_size: int = 8, **extra) -> dict:
    return {
        "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": image_size, "patch_size": patch_size, **extra,
    }


def _ids(tokenizer, names: dict[str, str]) -> dict[str, int]:
    return {key: tokenizer.convert_tokens_to_ids(tok) for key, tok in names.items()}


def _save(out: Path, model, processor) -> None:
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _gemma3(out: Path, layers: int) -> None:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil, Gemma3Processor

    tok = train_tokenizer(
        ["<pad>", "<eos>", "<bos>", "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>",
         "<end_of_turn>"],
        pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )
    ids = _ids(tok, {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "boi": "<start_of_image>",
                     "eoi": "<end_of_image>", "image": "<image_soft_token>"})
    config = Gemma3Config(
        text_config=_text(
            layers, model_type="gemma3_text", vocab_size=len(tok), head_dim=HIDDEN // HEADS, query_pre_attn_scalar=HIDDEN // HEADS,
            sliding_window=512, pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"],
        ),
        vision_config=_siglip(),
        mm_tokens_per_image=4,
        boi_token_index=ids["boi"], eoi_token_index=ids["eoi"], image_token_index=ids["image"],
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    # transformers initialises the image projection to zeros (image features would all be 0).
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    processor = Gemma3Processor(
        Gemma3ImageProcessorPil(size={"height": 32, "width": 32}), tok, image_seq_length=4,
        chat_template=template("gemma-3-4b-it.jinja"),
    )
    _save(out, model, processor)


def _paligemma(out: Path, layers: int) -> None:
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessorPil

    tok = train_tokenizer(["<pad>", "<eos>", "<bos>", "<image>"], pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    image_processor.image_seq_length = 16
    # PaliGemma publishes no chat template: a stand-in that passes the question through.
    processor = PaliGemmaProcessor(image_processor, tok, chat_template=template("stand-in-paligemma.jinja"))
    tok = processor.tokenizer  # the processor adds <loc>/<seg> tokens
    ids = _ids(tok, {"pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "image": "<image>"})
    config = PaliGemmaConfig(
        text_config=_text(layers, model_type="gemma", vocab_size=len(tok), head_dim=HIDDEN // HEADS,
                          pad_token_id=ids["pad"], bos_token_id=ids["bos"], eos_token_id=ids["eos"]),
        vision_config=_siglip(projection_dim=HIDDEN),
        image_token_index=ids["image"], vocab_size=len(tok), projection_dim=HIDDEN, hidden_size=HIDDEN,
    )
    model = PaliGemmaForConditionalGeneration(config).eval()
    _save(out, model, processor)


# Qwen-style byte-level specials shared by Qwen2.5-VL, Qwen3-VL, InternVL3 and LLaVA-OneVision.
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def _qwen_tokenizer(extra: list[str] = (), **named):
    return train_tokenizer(_QWEN_SPECIALS + list(extra), eos_token="<|im_end|>", pad_token="<|endoftext|>", **named)


def _mrope(head_dim: int) -> list[int]:
    """M-RoPE sections (temporal, height, width) summing to head_dim / 2."""
    half = head_dim // 2
    return [half - 2 * (half // 3), half // 3, half // 3]


def _image_only(processor_class, out: Path) -> None:
    """Saved through the image-only subclass; record the real class so torchvision installs load it."""
    from stagelens.builders.tiny import _mark_processor_class

    _mark_processor_class(out, processor_class.__name__)


def _qwen_vl(out: Path, layers: int, family: str, processor_class: str, chat_template: str, patch: int,
             vision_extra: dict, rope_extra: dict, **text_extra) -> None:
    """Qwen2.5-VL / Qwen3-VL (dense and MoE): ViT of `patch`-pixel patches merged 2x2, M-RoPE LM."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    from stagelens.adapters.qwen_processor import image_only_processor

    tok = _qwen_tokenizer()
    ids = _ids(tok, {t: t for t in _QWEN_SPECIALS})
    head_dim = HIDDEN // HEADS
    config = getattr(transformers, f"{family}Config")(
        text_config=_text(
            layers, vocab_size=len(tok), head_dim=head_dim,
            rope_parameters={"rope_type": "default", "mrope_section": _mrope(head_dim), "rope_theta": 10000.0,
                             **rope_extra},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            **text_extra,
        ),
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": HIDDEN,
                       "patch_size": patch, "spatial_merge_size": 2, "temporal_patch_size": 2, **vision_extra},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = getattr(transformers, f"{family}ForConditionalGeneration")(config).eval()
    merged = 2 * patch  # pixels per side of one image token
    image_processor = Qwen2VLImageProcessorPil(min_pixels=4 * merged * merged, max_pixels=16 * merged * merged,
                                               patch_size=patch, merge_size=2, temporal_patch_size=2)
    cls = getattr(transformers, processor_class)
    processor = image_only_processor(cls)(image_processor, tok, chat_template=template(chat_template))
    _save(out, model, processor)
    _image_only(cls, out)


def _qwen2_5_vl(out: Path, layers: int) -> None:
    _qwen_vl(out, layers, "Qwen2_5_VL", "Qwen2_5_VLProcessor", "Qwen2.5-VL-7B-Instruct.jinja", patch=14,
             vision_extra={"window_size": 56, "fullatt_block_indexes": [1]}, rope_extra={})


# Qwen3-VL: deepstack adds the first ViT block's features to the image positions after LM block 1.
_QWEN3_VISION = {"num_position_embeddings": 16, "deepstack_visual_indexes": [0]}


def _qwen3_vl(out: Path, layers: int) -> None:
    _qwen_vl(out, layers, "Qwen3VL", "Qwen3VLProcessor", "Qwen3-VL-8B-Instruct.jinja", patch=16,
             vision_extra=_QWEN3_VISION, rope_extra={"mrope_interleaved": True})


def _qwen3_vl_moe(out: Path, layers: int) -> None:
    _qwen_vl(out, layers, "Qwen3VLMoe", "Qwen3VLProcessor", "Qwen3-VL-8B-Instruct.jinja", patch=16,
             vision_extra=_QWEN3_VISION, rope_extra={"mrope_interleaved": True}, moe_intermediate_size=32,
             num_experts=4, num_experts_per_tok=2)


def _glm4v(out: Path, layers: int, config_class: str = "Glm4vConfig", model_class: str = "Glm4vForConditionalGeneration",
           processor_class: str = "Glm4vProcessor", image_processor_class: str = "Glm4vImageProcessorPil",
           **text_extra) -> None:
    import transformers

    from stagelens.adapters.qwen_processor import image_only_processor

    specials = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_image|>",
                "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"]
    tok = train_tokenizer(specials, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                          extra_special_tokens={"image_token": "<|image|>", "video_token": "<|video|>"})
    ids = _ids(tok, {t: t for t in specials})
    config = getattr(transformers, config_class)(
        text_config=_text(
            layers, vocab_size=len(tok),
            # GLM-4.1V rotates half of each head: the sections cover head_dim / 2.
            rope_parameters={"rope_type": "default", "mrope_section": _mrope(HIDDEN // HEADS // 2),
                             "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
            eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], **text_extra,
        ),
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": HIDDEN,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "image_size": 56},
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
    )
    model = getattr(transformers, model_class)(config).eval()
    image_processor = getattr(transformers, image_processor_class)(
        size={"shortest_edge": 4 * 28 * 28, "longest_edge": 16 * 28 * 28}, patch_size=14, merge_size=2,
        temporal_patch_size=2,
    )
    cls = getattr(transformers, processor_class)
    # No verbatim GLM-4.1V template was collected: a stand-in in its documented turn format.
    processor = image_only_processor(cls)(image_processor, tok, chat_template=template("stand-in-glm4v.jinja"))
    _save(out, model, processor)
    _image_only(cls, out)


def _glm4v_moe(out: Path, layers: int) -> None:
    _glm4v(out, layers, "Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration", moe_intermediate_size=32, n_routed_experts=4,
           num_experts_per_tok=2, first_k_dense_replace=1, n_shared_experts=1)


def _glm46v(out: Path, layers: int) -> None:
    _glm4v(out, layers, "Glm46VConfig", "Glm46VForConditionalGeneration", "Glm46VProcessor", "Glm46VImageProcessorPil")


def _internvl(out: Path, layers: int) -> None:
    from transformers import GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor

    from stagelens.adapters.qwen_processor import image_only_processor

    tok = _qwen_tokenizer(
        ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
        extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                              "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
    )
    ids = _ids(tok, {"image": "<IMG_CONTEXT>", "eos": "<|im_end|>", "pad": "<|endoftext|>"})
    config = InternVLConfig(
        text_config=_text(layers, model_type="qwen2", vocab_size=len(tok), eos_token_id=ids["eos"], pad_token_id=ids["pad"]),
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": [32, 32], "patch_size": [8, 8]},
        image_token_id=ids["image"], image_seq_length=4, downsample_ratio=0.5,
    )
    model = InternVLForConditionalGeneration(config).eval()
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                               max_patches=4)
    processor = image_only_processor(InternVLProcessor)(image_processor, tok, image_seq_length=4,
                                                        chat_template=template("InternVL3-1B-hf.jinja"))
    _save(out, model, processor)
    _image_only(InternVLProcessor, out)


def _llava_onevision(out: Path, layers: int) -> None:
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil,
                              LlavaOnevisionProcessor)

    from stagelens.adapters.qwen_processor import image_only_processor

    tok = _qwen_tokenizer(["<image>", "<video>"], extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
    ids = _ids(tok, {"image": "<image>", "video": "<video>", "eos": "<|im_end|>", "pad": "<|endoftext|>"})
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    config = LlavaOnevisionConfig(
        text_config=_text(layers, model_type="qwen2", vocab_size=len(tok), eos_token_id=ids["eos"], pad_token_id=ids["pad"]),
        vision_config=_siglip(),
        image_token_index=ids["image"], video_token_index=ids["video"], image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9",
    )
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    processor = image_only_processor(LlavaOnevisionProcessor)(
        image_processor, tok, num_image_tokens=16, vision_feature_select_strategy="full",
        chat_template=template("llava-onevision-qwen2-7b-ov-hf.jinja"),
    )
    _save(out, model, processor)
    _image_only(LlavaOnevisionProcessor, out)


def _idefics_tokenizer():
    specials = ["<|endoftext|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>", "<global-img>",
                "<video>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    return train_tokenizer(specials, eos_token="<end_of_utterance>", pad_token="<|endoftext|>", bos_token="<|endoftext|>",
                           extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                                                 "end_of_utterance_token": "<end_of_utterance>",
                                                 "global_image_token": "<global-img>", "video_token": "<video>"})


def _idefics3(out: Path, layers: int, family: str = "Idefics3",
              chat_template: str = "stand-in-idefics3.jinja", image_only: bool = False) -> None:
    """Idefics3 (and SmolVLM, its successor with the same layout: `family="SmolVLM"`)."""
    import transformers

    from stagelens.adapters.qwen_processor import image_only_processor

    tok = _idefics_tokenizer()
    ids = _ids(tok, {"image": "<image>", "eos": "<end_of_utterance>", "pad": "<|endoftext|>"})
    config = getattr(transformers, f"{family}Config")(
        text_config=_text(layers, model_type="llama", vocab_size=len(tok), eos_token_id=ids["eos"], pad_token_id=ids["pad"]),
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        image_token_id=ids["image"], scale_factor=2,
    )
    model = getattr(transformers, f"{family}ForConditionalGeneration")(config).eval()
    image_processor = getattr(transformers, f"{family}ImageProcessorPil")(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}, do_image_splitting=True
    )
    processor_class = getattr(transformers, f"{family}Processor")
    cls = image_only_processor(processor_class) if image_only else processor_class
    processor = cls(image_processor, tok, image_seq_len=4, chat_template=template(chat_template))
    _save(out, model, processor)
    if image_only:
        _image_only(processor_class, out)


def _smolvlm(out: Path, layers: int) -> None:
    _idefics3(out, layers, "SmolVLM", "SmolVLM-256M-Instruct.jinja", image_only=True)


def _mistral3(out: Path, layers: int) -> None:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralImageProcessorPil

    from stagelens.adapters.architectures import ARCHITECTURES
    from stagelens.adapters.qwen_processor import transformers_processor

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<pad>"]
    tok = train_tokenizer(specials, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    ids = _ids(tok, {t: t for t in specials})
    config = Mistral3Config(
        text_config=_text(layers, model_type="mistral", vocab_size=len(tok), head_dim=HIDDEN // HEADS, sliding_window=None,
                          bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"]),
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 8, "head_dim": 16},
        image_token_index=ids["[IMG]"], spatial_merge_size=2, vision_feature_layer=-1,
    )
    model = Mistral3ForConditionalGeneration(config).eval()
    image_processor = PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size={"height": 8, "width": 8})
    # No verified Mistral-Small-3.1 template was collected: a stand-in in Mistral's [INST] format.
    facts = ARCHITECTURES["mistral3"]
    processor_class = transformers_processor(facts.processor_class, facts.pil_twin)  # PIL-only machines too
    processor = processor_class(image_processor, tok, patch_size=8, spatial_merge_size=2,
                                chat_template=template("stand-in-mistral3.jinja"))
    _save(out, model, processor)


def _aya_vision(out: Path, layers: int) -> None:
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor, GotOcr2ImageProcessorPil

    specials = ["<PAD>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>",
                "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>", "<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>",
                "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL"]
    tok = train_tokenizer(specials, pad_token="<PAD>", bos_token="<BOS_TOKEN>", eos_token="<|END_OF_TURN_TOKEN|>")
    ids = _ids(tok, {t: t for t in specials})
    config = AyaVisionConfig(
        text_config=_text(layers, model_type="cohere2", vocab_size=len(tok), head_dim=HIDDEN // HEADS, sliding_window=512,
                          bos_token_id=ids["<BOS_TOKEN>"], eos_token_id=ids["<|END_OF_TURN_TOKEN|>"],
                          pad_token_id=ids["<PAD>"]),
        vision_config=_siglip(),
        image_token_index=ids["<|IMG_PATCH|>"], downsample_factor=2,
    )
    model = AyaVisionForConditionalGeneration(config).eval()
    image_processor = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                               max_patches=4)
    # No Aya Vision template was collected: a stand-in in Cohere's turn-token format.
    processor = AyaVisionProcessor(image_processor, tok, patch_size=8, img_size=32, downsample_factor=2,
                                   chat_template=template("stand-in-aya-vision.jinja"))
    _save(out, model, processor)


def _mllama(out: Path, layers: int) -> None:
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil, MllamaProcessor

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|finetune_right_pad_id|>", "<|image|>", "<|python_tag|>"]
    tok = train_tokenizer(specials, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                          pad_token="<|finetune_right_pad_id|>")
    ids = _ids(tok, {t: t for t in specials})
    config = MllamaConfig(
        # One cross-attention layer after the first self-attention block (layers >= 2).
        text_config=_text(layers, vocab_size=len(tok), cross_attention_layers=[1],
                          bos_token_id=ids["<|begin_of_text|>"], eos_token_id=ids["<|eot_id|>"],
                          pad_token_id=ids["<|finetune_right_pad_id|>"]),
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_global_layers": 1,
                       "attention_heads": 2, "image_size": 32, "patch_size": 8, "max_num_tiles": 2,
                       "intermediate_layers_indices": [0], "vision_output_dim": 64,
                       "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]]},
        image_token_index=ids["<|image|>"],
    )
    model = MllamaForConditionalGeneration(config).eval()
    # Cross-attention gates start at 0 (tanh(0): the image would not reach the text); open them
    # as the vision tower's own gated layers start, at pi/4.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
                param.fill_(torch.pi / 4)
    image_processor = MllamaImageProcessorPil(size={"height": 32, "width": 32}, max_image_tiles=2)
    processor = MllamaProcessor(image_processor, tok, chat_template=template("Llama-3.2-11B-Vision-Instruct.jinja"))
    _save(out, model, processor)


def _tiny(recipe: str) -> Callable[[Path, int], None]:
    """The pipeline's own tiny recipes (stagelens.builders.tiny)."""
    from stagelens.builders import tiny

    def build_recipe(out: Path, layers: int) -> None:
        tiny.build(recipe, out, num_layers=layers)

    return build_recipe


RECIPES: dict[str, Callable[[Path, int], None]] = {
    "llava": _tiny("tiny-llava"),
    "llava_next": _tiny("tiny-llava-next"),
    "qwen2_vl": _tiny("tiny-qwen2-vl"),
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "qwen3_vl_moe": _qwen3_vl_moe,
    "gemma3": _gemma3,
    "llava_onevision": _llava_onevision,
    "internvl": _internvl,
    "idefics3": _idefics3,
    "smolvlm": _smolvlm,
    "mistral3": _mistral3,
    "mllama": _mllama,
    "paligemma": _paligemma,
    "aya_vision": _aya_vision,
    "glm4v": _glm4v,
    "glm4v_moe": _glm4v_moe,
    "glm46v": _glm46v,
}


def build(model_type: str, out_dir: str | os.PathLike, seed: int = 0, num_layers: int = LAYERS) -> Path:
    """Build the seeded tiny checkpoint of `model_type` with `num_layers` LM blocks into out_dir (created)."""
    if model_type not in RECIPES:
        raise ValueError(f"no tiny recipe for model_type {model_type!r}; known: {', '.join(RECIPES)}")
    if num_layers < 2:
        raise ValueError(f"num_layers must be at least 2, got {num_layers}")
    from stagelens.adapters.architectures import ARCHITECTURES
    from stagelens.adapters.qwen_processor import torchvision_available

    why = ARCHITECTURES[model_type].needs_torchvision
    if why and not torchvision_available():
        raise ValueError(f"the tiny {model_type} needs torchvision: {why}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    RECIPES[model_type](out, num_layers)
    return out
