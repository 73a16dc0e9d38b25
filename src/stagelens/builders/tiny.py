"""Seeded, randomly initialised tiny models of the real MLLM architectures, built offline.

Each recipe writes an ordinary checkpoint directory (save_pretrained of model + processor)
that loads through the same `load_adapter` path as a real hub checkpoint. The tokenizer is a
byte-level BPE trained in memory on a small corpus holding the prompt and chat-template words;
the chat templates are the real checkpoints' (shipped as package data).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from stagelens.atomic import atomic_path
from stagelens.builders import MATRIX_RECIPES, TINY_RECIPES

# Words the prompts and the chat templates use, so they become few BPE tokens.
_CORPUS = [
    "Does this image show an animal? The answer must be always yes or no.",
    "Does this picture show an animal? Does this image feature an animal?",
    "Does this image show a plane? The answer must be always 1 or 0.",
    "Answer with one word. Please look carefully. Yes No yes no 1 0",
    "Yes. No. Yes, yes. No, no. Yes or No? yes or no? 1 or 0?",
    "USER: ASSISTANT: system user assistant You are a helpful assistant.",
    "dog cat bird shirt trouser pullover dress coat sandal sneaker bag boot photo",
    "the a of and to in is it that this what which with one word answer question",
]
_VOCAB_SIZE = 400

# Chat template file per recipe: the real checkpoints' templates.
_TEMPLATES = {
    "tiny-llava": "llava-1.5-7b-hf.jinja",
    "tiny-llava-next": "llama3-llava-next-8b-hf.jinja",
    "tiny-qwen2-vl": "Qwen2-VL-7B-Instruct.jinja",
}


def chat_template(recipe: str) -> str:
    """The real chat template the recipe's processor carries."""
    name = _TEMPLATES[recipe]
    return resources.files("stagelens.builders").joinpath("chat_templates", name).read_text(encoding="utf-8")


def train_tokenizer(special_tokens: list[str], **named_specials: str) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in memory; `special_tokens` are added as unsplittable tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **named_specials)
    fast.padding_side = "left"
    return fast


# LLaVA-NeXT's anyres grid scaled down to the 32-pixel tiny vision tower.
_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]


def make_processor(recipe: str, tokenizer):
    """The recipe's processor (tiny image settings, real chat template) around any tokenizer.

    Also lets real vocabularies be checked offline: pass e.g. a Llama-3 tokenizer with
    "tiny-llava-next" and inspect `stagelens.prompts.build_inputs` output.
    """
    if recipe == "tiny-llava":
        from transformers import CLIPImageProcessorPil, LlavaProcessor

        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_center_crop=True
        )
        return LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=chat_template(recipe),
        )
    if recipe == "tiny-llava-next":
        from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_grid_pinpoints=_PINPOINTS
        )
        return LlavaNextProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
            chat_template=chat_template(recipe),
        )
    if recipe == "tiny-qwen2-vl":
        from transformers import Qwen2VLImageProcessorPil

        from stagelens.adapters.qwen_processor import Qwen2VLImageOnlyProcessor

        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28, patch_size=14, merge_size=2, temporal_patch_size=2
        )
        return Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=chat_template(recipe))
    raise ValueError(f"unknown tiny recipe {recipe!r}; known: {', '.join(TINY_RECIPES)}")


def _llama_text_config(vocab_size: int, hidden_size: int, num_layers: int, pad_id: int, bos_id: int, eos_id: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )


def _build_llava(out: Path, hidden_size: int, num_layers: int) -> None:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer = train_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
    )
    # LLaVA-1.5's tokenizer prepends <s>, like the Llama-2 tokenizer of the real checkpoint.
    tokenizer = _with_bos(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=_clip_vision_config(),
        text_config=_llama_text_config(
            len(tokenizer), hidden_size, num_layers, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
        ),
        image_token_index=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    processor = make_processor("tiny-llava", tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_llava_next(out: Path, hidden_size: int, num_layers: int) -> None:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    tokenizer = train_tokenizer(
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>", "<image>"],
        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token="<pad>",
    )
    tokenizer = _with_bos(tokenizer)
    config = LlavaNextConfig(
        vision_config=_clip_vision_config(),
        text_config=_llama_text_config(
            len(tokenizer), hidden_size, num_layers, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=_PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    processor = make_processor("tiny-llava-next", tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _build_qwen2_vl(out: Path, hidden_size: int, num_layers: int) -> None:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tokenizer = train_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    heads = 4
    half_head = hidden_size // heads // 2
    # M-RoPE sections (temporal, height, width) must sum to head_dim / 2.
    mrope = [half_head - 2 * (half_head // 3), half_head // 3, half_head // 3]
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rope_parameters": {"rope_type": "default", "mrope_section": mrope, "rope_theta": 10000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2, "embed_dim": 32, "hidden_size": hidden_size, "num_heads": 2, "mlp_ratio": 2,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config).eval()
    # Saved through the image-only processor: its files are the ones Qwen2VLProcessor reads.
    processor = make_processor("tiny-qwen2-vl", tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    _mark_processor_class(out, "Qwen2VLProcessor")


def _with_bos(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Make the tokenizer prepend its BOS token, as Llama tokenizers do."""
    from tokenizers import processors

    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    return tokenizer


def _mark_processor_class(out: Path, name: str) -> None:
    """Record the real processor class so a torchvision install loads the regular processor."""
    import json

    for fname in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        path = out / fname
        if path.exists():
            data = json.loads(path.read_text())
            if "processor_class" in data:
                data["processor_class"] = name
                path.write_text(json.dumps(data, indent=2, sort_keys=True))


_BUILDERS = {"tiny-llava": _build_llava, "tiny-llava-next": _build_llava_next, "tiny-qwen2-vl": _build_qwen2_vl}


def build(recipe: str, out_dir: str | os.PathLike, seed: int = 0, hidden_size: int = 64, num_layers: int = 4) -> Path:
    """Build the seeded tiny checkpoint `recipe` into out_dir (created; existing files overwritten).

    hidden_size / num_layers size the language model (defaults: the tiny test models); the
    benchmark uses a wider variant so the forward pass, not Python overhead, dominates.
    """
    if recipe not in _BUILDERS:
        from stagelens.builders import tiny_matrix

        model_type = recipe.removeprefix("tiny-").replace("-", "_")
        if recipe in MATRIX_RECIPES:
            if hidden_size != tiny_matrix.HIDDEN:
                raise ValueError(f"{recipe} is built at width {tiny_matrix.HIDDEN} only, got hidden_size={hidden_size}")
            return tiny_matrix.build(model_type, out_dir, seed, num_layers)
        raise ValueError(f"unknown tiny recipe {recipe!r}; known: {', '.join(TINY_RECIPES)}")
    if hidden_size % 8:
        raise ValueError(f"hidden_size must be a multiple of 8 (4 heads, even head dim), got {hidden_size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    _BUILDERS[recipe](out, hidden_size, num_layers)
    return out


def build_atomic(recipe: str, out_dir: str | os.PathLike, seed: int = 0, **sizes: int) -> Path:
    """`build`, written whole or not at all (`atomic_path`): the build_model job."""
    with atomic_path(out_dir) as tmp:
        build(recipe, tmp, seed, **sizes)
    return Path(out_dir)
