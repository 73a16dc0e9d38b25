"""The paper's prompts rendered for the paper's models with their real vocabularies, offline.

No model hub is reachable, so each real tokenizer is rebuilt from a vocab-only GGUF shipped in
the llama-cpp-python sdist (tests/fetch_vocabs.py) and checked against llama.cpp's reference
tokenisations, which were produced with the original Hugging Face tokenizers. Processors are put
together like the real checkpoints' (tokenizer + the chat template stagelens ships + the image
processor with the checkpoint's settings, PIL backend), saved, and loaded back through the
adapter's own loader; prompts go through `stagelens.prompts.build_inputs`, the function the
adapters feed to the forward pass. Every expectation (rendered text, token ids, image token
counts) is written out or computed here independently of transformers' processors.

Skipped with a reason when the vocab files are absent; under CI=true their absence is a failure.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest
import yaml
from PIL import Image

import fetch_vocabs
from stagelens.adapters import hf
from stagelens.adapters.architectures import ARCHITECTURES
from stagelens.adapters.base import ANSWER_WORDS
from stagelens import prompts as prompt_module
from stagelens.prompt_layout import IMAGE_PASS_QUESTION, expanded_layout, prompt_layout, shared_image_prefix_problem
from stagelens.prompts import answer_token_ids, build_inputs, render_prompt
from stagelens.spec import ModelSpec

# Two-token answer paths ("▁" then "1" for Llama-2 digits) in the adapter's answer scoring.
HAS_PATHS = hasattr(prompt_module, "answer_token_paths")

REPO = Path(__file__).resolve().parent.parent
PAPER_CONFIG = REPO / "config" / "paper.yaml"

# Image tokens the real checkpoints use (config.json `image_token_index` / `image_token_id`).
LLAVA_IMAGE_ID = 32000
LLAMA3_IMAGE_ID = 128256
QWEN_IMAGE_ID = 151655

# Qwen2-VL's added tokens at their real ids; the qwen2 GGUF holds placeholders "[PAD<id>]" there.
QWEN2_VL_ADDED = {
    151646: "<|object_ref_start|>", 151647: "<|object_ref_end|>", 151648: "<|box_start|>",
    151649: "<|box_end|>", 151650: "<|quad_start|>", 151651: "<|quad_end|>",
    151652: "<|vision_start|>", 151653: "<|vision_end|>", 151654: "<|vision_pad|>",
    151655: "<|image_pad|>", 151656: "<|video_pad|>",
}

# LLaVA-NeXT's anyres grid of llava-hf/llama3-llava-next-8b-hf (height, width in pixels).
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# The Qwen2-VL-7B-Instruct image processor's own limits; the paper config lowers max_pixels.
QWEN_MIN_PIXELS = 56 * 56
QWEN_CHECKPOINT_MAX_PIXELS = 28 * 28 * 16384

# (width, height): typical ImageNet/Stanford Dogs shapes, portrait, square, panoramas, tiny, huge.
IMAGE_SIZES = [(500, 375), (375, 500), (336, 336), (1024, 768), (800, 200), (200, 800), (60, 45), (2000, 1500)]


# ----------------------------------------------------------------------------------------------
# The vocab files
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    cache = fetch_vocabs.default_cache_dir()
    if not fetch_vocabs.cache_complete(cache):
        reason = (
            f"real vocab files missing or changed in {cache}; run `python tests/fetch_vocabs.py` "
            "(part of `make setup-test`)"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return cache


def _gguf_json(vocab_dir: Path, vocab: str) -> dict:
    """The tokenizers JSON transformers builds from a vocab-only GGUF."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(vocab_dir), gguf_file=fetch_vocabs.vocab_files(vocab)[0])
    return json.loads(tok.backend_tokenizer.to_str())


def _fast(spec: dict, **special: str):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), **special)


def _bos_template(bos: str, bos_id: int) -> dict:
    token = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [token, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [token, {"Sequence": {"id": "A", "type_id": 0}}, token, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def llava15_tokenizer(vocab_dir: Path):
    """llava-hf/llava-1.5-7b-hf's tokenizer: Llama-2 SPM (legacy: every text segment gets a
    leading "▁", also after an added token) + <image> 32000 + <pad> 32001."""
    spec = _gguf_json(vocab_dir, "llama-spm")
    spec["normalizer"] = {
        "type": "Sequence",
        "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        ],
    }
    spec["pre_tokenizer"] = None
    tok = _fast(spec, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def llama3_next_tokenizer(vocab_dir: Path):
    """llava-hf/llama3-llava-next-8b-hf's tokenizer: Llama-3 BPE (whole-word lookup before merges,
    BOS prepended) + <image> 128256 + <pad> 128257. The GGUF import adds an <|endoftext|> at
    128256 that the real tokenizer does not have; it is dropped."""
    spec = _gguf_json(vocab_dir, "llama-bpe")
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < 128256]
    spec["model"]["ignore_merges"] = True
    spec["post_processor"] = _bos_template("<|begin_of_text|>", 128000)
    tok = _fast(spec, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def qwen2_vl_tokenizer(vocab_dir: Path):
    """Qwen/Qwen2-VL-7B-Instruct's tokenizer: Qwen2 BPE with the vision tokens at their ids."""
    spec = _gguf_json(vocab_dir, "qwen2")
    vocab = spec["model"]["vocab"]
    for token in spec["added_tokens"]:
        real = QWEN2_VL_ADDED.get(token["id"])
        if real is not None:
            vocab[real] = vocab.pop(token["content"], token["id"])
            token["content"], token["special"] = real, True
    return _fast(spec, eos_token="<|im_end|>", pad_token="<|endoftext|>")


# ----------------------------------------------------------------------------------------------
# The models: processors like the real checkpoints', expectations written out by hand
# ----------------------------------------------------------------------------------------------


def shipped_template(name: str) -> str:
    return resources.files("stagelens.builders").joinpath("chat_templates", name).read_text(encoding="utf-8")


def paper_config() -> dict:
    with open(PAPER_CONFIG, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def paper_prompts() -> list[dict]:
    prompts = paper_config()["prompts"]
    return [prompts["anchor"], *prompts["variants"]]


def llava_next_image_tokens(width: int, height: int) -> int:
    """Image tokens of LLaVA-NeXT (CLIP-L/14 at 336 px, anyres), after the original LLaVA code:
    the grid resolution that keeps the most of the image, then its 24x24-per-tile feature map
    with the letterbox padding cut off, one newline vector per row, plus the 24x24 base image."""
    best, best_key = None, None
    for grid_h, grid_w in NEXT_PINPOINTS:
        scale = min(grid_w / width, grid_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        key = (kept, -(grid_w * grid_h - kept))
        if best_key is None or key > best_key:
            best, best_key = (grid_h, grid_w), key
    rows, cols = best[0] // 336 * 24, best[1] // 336 * 24
    if width / height > cols / rows:
        new_rows = int(height * cols / width)
        rows -= 2 * ((rows - new_rows) // 2)
    else:
        new_cols = int(width * rows / height)
        cols -= 2 * ((cols - new_cols) // 2)
    return rows * cols + rows + 24 * 24


def qwen2_vl_image_tokens(width: int, height: int, max_pixels: int) -> int:
    """Image tokens of Qwen2-VL: one per 28x28 px after Qwen's smart_resize to multiples of 28
    within [min_pixels, max_pixels] (a 2x2 merge of 14 px patches)."""
    f = 28
    h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
    elif h * w < QWEN_MIN_PIXELS:
        beta = math.sqrt(QWEN_MIN_PIXELS / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return (h // f) * (w // f)


@dataclass(frozen=True)
class PaperModel:
    name: str  # key in config/paper.yaml
    image_token_id: int
    last_token_id: int  # the template token that ends every prompt
    last_token_text: str
    answer_ids: dict[str, int]  # the token the model emits first when answering with the word

    def rendered(self, question: str, before_image: str = "") -> str:
        """The prompt text of the real chat template, written out by hand (before_image: the
        text right before the image)."""
        if self.name == "llava-1.5-7b":
            return f"USER: {before_image}<image>\n{question} ASSISTANT:"
        if self.name == "llava-next-llama3-8b":
            return (
                f"<|start_header_id|>user<|end_header_id|>\n\n{before_image}<image>\n"
                f"{question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
            )
        return (
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            f"{before_image}<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
        )

    def image_tokens(self, width: int, height: int) -> int:
        if self.name == "llava-1.5-7b":
            return 24 * 24  # CLIP-L/14 at 336 px, CLS dropped
        if self.name == "llava-next-llama3-8b":
            return llava_next_image_tokens(width, height)
        return qwen2_vl_image_tokens(width, height, paper_config()["models"][self.name]["max_pixels"])


PAPER_MODELS = {
    m.name: m
    for m in (
        # After "ASSISTANT:" Llama-2 answers " Yes": the "▁"-prefixed word tokens. A digit has no
        # "▁"-prefixed token in Llama-2: " 1" is "▁" + "1", so the digit itself is scored.
        PaperModel("llava-1.5-7b", LLAVA_IMAGE_ID, 29901, ":",
                   {"yes": 4874, "Yes": 3869, "no": 694, "No": 1939, "1": 29896, "0": 29900}),
        # After the "\n\n" of the assistant header the answer starts a line: bare word tokens.
        PaperModel("llava-next-llama3-8b", LLAMA3_IMAGE_ID, 271, "\n\n",
                   {"yes": 9891, "Yes": 9642, "no": 2201, "No": 2822, "1": 16, "0": 15}),
        PaperModel("qwen2-vl-7b", QWEN_IMAGE_ID, 198, "\n",
                   {"yes": 9693, "Yes": 9454, "no": 2152, "No": 2753, "1": 16, "0": 15}),
    )
}


@pytest.fixture(scope="session")
def tokenizers(vocab_dir):
    return {
        "llava-1.5-7b": llava15_tokenizer(vocab_dir),
        "llava-next-llama3-8b": llama3_next_tokenizer(vocab_dir),
        "qwen2-vl-7b": qwen2_vl_tokenizer(vocab_dir),
    }


def _save_checkpoint_processor(name: str, tokenizer, out: Path) -> None:
    """Save a processor configured like the real checkpoint's (its preprocessor/processor configs)."""
    from transformers import (
        CLIPImageProcessorPil,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        LlavaProcessor,
        Qwen2VLImageProcessorPil,
    )

    from stagelens.adapters.qwen_processor import Qwen2VLImageOnlyProcessor

    clip = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    vit = {"patch_size": 14, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    if name == "llava-1.5-7b":
        processor = LlavaProcessor(CLIPImageProcessorPil(do_center_crop=True, **clip), tokenizer,
                                   chat_template=shipped_template("llava-1.5-7b-hf.jinja"), **vit)
    elif name == "llava-next-llama3-8b":
        processor = LlavaNextProcessor(LlavaNextImageProcessorPil(image_grid_pinpoints=NEXT_PINPOINTS, **clip),
                                       tokenizer, chat_template=shipped_template("llama3-llava-next-8b-hf.jinja"),
                                       **vit)
    else:
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_CHECKPOINT_MAX_PIXELS,
            patch_size=14, merge_size=2, temporal_patch_size=2,
        )
        processor = Qwen2VLImageOnlyProcessor(image_processor, tokenizer,
                                              chat_template=shipped_template("Qwen2-VL-7B-Instruct.jinja"))
    processor.save_pretrained(out)


MODEL_TYPES = {"llava-1.5-7b": "llava", "llava-next-llama3-8b": "llava_next", "qwen2-vl-7b": "qwen2_vl"}


@pytest.fixture(scope="session")
def processors(tokenizers, tmp_path_factory):
    """name -> processor loaded by the adapter's loader, with the paper config's model settings."""
    loaded = {}
    for name, tokenizer in tokenizers.items():
        out = tmp_path_factory.mktemp(name)
        _save_checkpoint_processor(name, tokenizer, out)
        model_cfg = paper_config()["models"][name]
        facts = ARCHITECTURES[MODEL_TYPES[name]]
        spec = ModelSpec(name=name, checkpoint=str(out), max_pixels=model_cfg.get("max_pixels"))
        loaded[name] = hf._load_processor(facts, spec)
    return loaded


def photo(width: int, height: int) -> Image.Image:
    """A deterministic RGB test image of the given size."""
    return Image.new("RGB", (width, height), (width % 251, height % 241, 120))


def collapse_image_run(ids: list[int], image_id: int) -> tuple[list[int], int, int]:
    """ids with the (single, contiguous) run of image tokens replaced by one; run start and length."""
    where = [i for i, t in enumerate(ids) if t == image_id]
    assert where, "no image token in the prompt"
    start, length = where[0], len(where)
    assert where == list(range(start, start + length)), "image tokens are not one contiguous run"
    return ids[: start + 1] + ids[start + length:], start, length


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

VOCAB_OF = {"llava-1.5-7b": "llama-spm", "llava-next-llama3-8b": "llama-bpe", "qwen2-vl-7b": "qwen2"}


@pytest.mark.parametrize("name", sorted(VOCAB_OF))
def test_tokenizer_matches_reference_tokenisations(name, tokenizers, vocab_dir):
    """llama.cpp's reference ids (made with the original HF tokenizers): whitespace runs,
    unicode, digits, code; the rebuilt tokenizer must reproduce every one."""
    inp_name, out_name = fetch_vocabs.vocab_files(VOCAB_OF[name])[1:]
    texts = (vocab_dir / inp_name).read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = (vocab_dir / out_name).read_text(encoding="utf-8").split("\n")
    texts = texts[:-1] if texts[-1] == "" else texts
    assert len(texts) > 30
    tok = tokenizers[name]
    wrong = [
        (text, tok.encode(text, add_special_tokens=False), line)
        for text, line in zip(texts, expected)
        if tok.encode(text, add_special_tokens=False) != [int(v) for v in line.split()]
    ]
    assert not wrong, f"{len(wrong)} of {len(texts)} differ, first: {wrong[0]!r}"


@pytest.mark.parametrize(
    "name, token, token_id",
    [
        ("llava-1.5-7b", "<s>", 1), ("llava-1.5-7b", "<image>", 32000), ("llava-1.5-7b", "<pad>", 32001),
        ("llava-next-llama3-8b", "<|begin_of_text|>", 128000), ("llava-next-llama3-8b", "<|start_header_id|>", 128006),
        ("llava-next-llama3-8b", "<|end_header_id|>", 128007), ("llava-next-llama3-8b", "<|eot_id|>", 128009),
        ("llava-next-llama3-8b", "<image>", 128256),
        ("qwen2-vl-7b", "<|endoftext|>", 151643), ("qwen2-vl-7b", "<|im_start|>", 151644),
        ("qwen2-vl-7b", "<|im_end|>", 151645), ("qwen2-vl-7b", "<|vision_start|>", 151652),
        ("qwen2-vl-7b", "<|vision_end|>", 151653), ("qwen2-vl-7b", "<|image_pad|>", 151655),
    ],
)
def test_special_token_ids(name, token, token_id, tokenizers):
    tok = tokenizers[name]
    assert tok.convert_tokens_to_ids(token) == token_id
    assert tok.encode(token, add_special_tokens=False) == [token_id], "special token is split"


def test_llava15_matches_published_tokenisation(tokenizers):
    """The llava-1.5-7b-hf tokenizer's ids for this prompt, as published (vLLM's LLaVA docs,
    mllm's tokenizer test): a "▁" before <image> and another before the "\\n" after it."""
    ids = tokenizers["llava-1.5-7b"]("USER: <image>\nWhat is the content of this image?\nASSISTANT:")["input_ids"]
    assert ids == [1, 3148, 1001, 29901, 29871, 32000, 29871, 13, 5618, 338, 278, 2793, 310, 445, 1967,
                   29973, 13, 22933, 9047, 13566, 29901]


@pytest.mark.parametrize("prompt", paper_prompts(), ids=lambda p: p["id"])
@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_paper_prompt_renders_like_the_real_template(name, prompt, processors, tokenizers):
    """Every paper prompt x model: rendered text, image run inside the user turn before the
    question, the whole token sequence, the template's last token at the end."""
    model, processor, tok = PAPER_MODELS[name], processors[name], tokenizers[name]
    question = prompt["text"]
    assert render_prompt(processor, question) == model.rendered(question)

    ids = build_inputs(processor, [photo(500, 375)], question)["input_ids"][0].tolist()
    collapsed, start, length = collapse_image_run(ids, model.image_token_id)
    assert length == model.image_tokens(500, 375)
    assert collapsed == tok(model.rendered(question))["input_ids"]
    # The question follows the image and ends the user turn.
    question_ids = tok.encode(question, add_special_tokens=False)
    after_image = collapsed[start + 1:]
    assert any(after_image[i:i + len(question_ids) - 1] == question_ids[1:] for i in range(len(after_image)))
    assert ids[-1] == model.last_token_id
    assert tok.decode([ids[-1]]) == model.last_token_text


@pytest.mark.parametrize("size", IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_image_token_count(name, size, processors):
    """Image placeholders per image: 576 (LLaVA-1.5), the anyres count (LLaVA-NeXT), the
    28-px grid under the paper config's max_pixels (Qwen2-VL)."""
    model = PAPER_MODELS[name]
    inputs = build_inputs(processors[name], [photo(*size)], "Does this image show an animal?")
    assert int((inputs["input_ids"] == model.image_token_id).sum()) == model.image_tokens(*size)


def test_qwen_max_pixels_caps_large_photos(processors):
    """The paper config's max_pixels reaches the processor: a 2000x1500 photo gets at most
    max_pixels/784 tokens instead of the checkpoint's thousands."""
    cap = paper_config()["models"]["qwen2-vl-7b"]["max_pixels"]
    inputs = build_inputs(processors["qwen2-vl-7b"], [photo(2000, 1500)], "Does this image show an animal?")
    n = int((inputs["input_ids"] == QWEN_IMAGE_ID).sum())
    assert n <= cap // 784 < qwen2_vl_image_tokens(2000, 1500, QWEN_CHECKPOINT_MAX_PIXELS)


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_batch_is_left_padded(name, processors, tokenizers):
    """A batch of differently shaped images: every row ends with the template's last token and
    keeps its own image count; padding sits on the left."""
    model, tok = PAPER_MODELS[name], tokenizers[name]
    sizes = [(500, 375), (200, 800), (1024, 768)]
    inputs = build_inputs(processors[name], [photo(*s) for s in sizes], paper_prompts()[0]["text"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids[:, -1].tolist() == [model.last_token_id] * len(sizes)
    assert (mask[:, -1] == 1).all()
    for row, size in enumerate(sizes):
        assert int((ids[row] == model.image_token_id).sum()) == model.image_tokens(*size)
        n_pad = int((mask[row] == 0).sum())
        assert mask[row, :n_pad].sum() == 0 and (ids[row, :n_pad] == tok.pad_token_id).all()


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            "llava-1.5-7b",
            marks=pytest.mark.xfail(
                not HAS_PATHS,
                strict=True,
                reason="the first-token rule finds no id for Llama-2 digits ('1' is '▁' then '1'); "
                "fixed where stagelens.prompts has answer_token_paths",
            ),
        ),
        "llava-next-llama3-8b",
        "qwen2-vl-7b",
    ],
)
def test_answer_token_ids(name, tokenizers):
    """The adapter's answer-word ids: the token the model emits first for each word is among
    them, every id spells the word, and no two words share an id."""
    tok, expected = tokenizers[name], PAPER_MODELS[name].answer_ids
    ids = answer_token_ids(tok)
    assert set(ids) == set(ANSWER_WORDS)
    for word in ANSWER_WORDS:
        assert expected[word] in ids[word], f"{word!r}: {ids[word]} lacks {expected[word]}"
        assert all(tok.decode([t]).strip() == word for t in ids[word]), (word, ids[word])
    flat = [t for word in ANSWER_WORDS for t in ids[word]]
    assert len(flat) == len(set(flat))


@pytest.mark.skipif(not HAS_PATHS, reason="stagelens.prompts has no answer_token_paths yet")
@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_answer_token_paths(name, tokenizers):
    """The paths the adapter scores: one token per word, except Llama-2 digits, which are the
    lone "▁" (29871) and then the digit; no path is shared between words."""
    tok, model = tokenizers[name], PAPER_MODELS[name]
    paths = prompt_module.answer_token_paths(tok)
    for word, token_id in model.answer_ids.items():
        two_step = name == "llava-1.5-7b" and word in ("1", "0")
        assert ((29871, token_id) if two_step else (token_id,)) in paths[word], (word, paths[word])
        for path in paths[word]:
            assert tok.decode([path[-1]]).strip() == word
            assert all(not tok.decode([t]).strip() for t in path[:-1])
    flat = [path for word in ANSWER_WORDS for path in paths[word]]
    assert len(flat) == len(set(flat))


def test_answer_words_are_single_tokens_after_the_template(tokenizers):
    """Independent of the adapter: the expected first answer token is what each real tokenizer
    produces when the answer is appended to the template's last token."""
    cases = {"llava-1.5-7b": ("ASSISTANT:", " "), "llava-next-llama3-8b": ("<|end_header_id|>\n\n", ""),
             "qwen2-vl-7b": ("assistant\n", "")}
    for name, (tail, sep) in cases.items():
        tok, model = tokenizers[name], PAPER_MODELS[name]
        base = tok.encode(tail, add_special_tokens=False)
        for word, token_id in model.answer_ids.items():
            continuation = tok.encode(tail + sep + word, add_special_tokens=False)[len(base):]
            if name == "llava-1.5-7b" and word in ("1", "0"):
                assert continuation == [29871, token_id]  # "▁" then the digit: no "▁1" token exists
            else:
                assert continuation[0] == token_id, (name, word, continuation)


def test_control_rewording_keeps_the_length(tokenizers):
    """ctl_reword is a same-length rewording of the anchor in every paper model's vocabulary."""
    prompts = {p["id"]: p["text"] for p in paper_prompts()}
    for name, tok in tokenizers.items():
        anchor = len(tok.encode(prompts["anchor"], add_special_tokens=False))
        reword = len(tok.encode(prompts["ctl_reword"], add_special_tokens=False))
        assert abs(anchor - reword) <= 1, (name, anchor, reword)


# What follows the question in each paper template: the end of the user turn and the assistant
# prefix, written out by hand (PaperModel.rendered).
AFTER_QUESTION = {
    "llava-1.5-7b": " ASSISTANT:",
    "llava-next-llama3-8b": "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2-vl-7b": "<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize("prompt", paper_prompts(), ids=lambda p: p["id"])
@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_question_last_is_the_questions_last_token(name, prompt, processors, tokenizers):
    """question_last: the tokens up to it spell the template's text up to the end of the question,
    the tokens after it spell exactly the end of turn + assistant prefix; the same token sits at
    the same distance from the end of the processor's (image-expanded, left-padded) batch."""
    model, processor, tok = PAPER_MODELS[name], processors[name], tokenizers[name]
    question = prompt["text"]
    rendered = model.rendered(question)
    layout = prompt_layout(tok, rendered, question, model.image_token_id)
    ids = list(layout.ids)
    assert ids == tok(rendered)["input_ids"]
    assert tok.decode(ids[: layout.question_last + 1]).endswith(question)
    # (SentencePiece drops the leading space of a decoded span: compare without outer whitespace)
    assert tok.decode(ids[layout.question_last + 1:]).strip() == AFTER_QUESTION[name].strip()
    assert ids[-1] == model.last_token_id and layout.question_last < len(ids) - 1
    batch = build_inputs(processor, [photo(500, 375), photo(336, 336)], question)["input_ids"]
    for row in batch.tolist():
        assert row[len(row) - 1 - layout.from_end(layout.question_last)] == ids[layout.question_last]
        assert row[len(row) - 1 - layout.from_end(layout.image_last)] == model.image_token_id
        assert row[len(row) - layout.from_end(layout.image_last)] != model.image_token_id


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_paper_prompts_share_the_image_pass_tokens(name, tokenizers):
    """Every paper prompt renders to the image pass's ids up to the last image token (so the
    image tokens cannot see the question); a template with text before the image is caught."""
    model, tok = PAPER_MODELS[name], tokenizers[name]
    reference = prompt_layout(tok, model.rendered(IMAGE_PASS_QUESTION), IMAGE_PASS_QUESTION, model.image_token_id)
    assert reference.ids[reference.image_last] == model.image_token_id
    for prompt in paper_prompts():
        question = prompt["text"]
        layout = prompt_layout(tok, model.rendered(question), question, model.image_token_id)
        assert shared_image_prefix_problem(layout, reference, tok) is None, prompt["id"]
        assert layout.image_prefix == reference.image_prefix
    question = paper_prompts()[0]["text"]
    text_first = question + "\n" + model.rendered(question)
    problem = shared_image_prefix_problem(prompt_layout(tok, text_first, question, model.image_token_id), reference, tok)
    assert problem is not None and "differ from the image pass's from token" in problem


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_text_before_the_image_lies_before_the_image_run(name, processors, tokenizers):
    """A prompt's before_image text in the real templates (LLaVA-1.5's and LLaVA-NeXT's render
    every image before every text of a content list): right before the image, in the user turn;
    its image prefix differs from the image pass's; the question and question_last as without it."""
    model, processor, tok = PAPER_MODELS[name], processors[name], tokenizers[name]
    question, before = paper_prompts()[0]["text"], "Look at this photo. "
    rendered = render_prompt(processor, question, before)
    assert rendered == model.rendered(question, before)
    ids = build_inputs(processor, [photo(500, 375)], question, before_image=before)["input_ids"][0].tolist()
    collapsed, start, length = collapse_image_run(ids, model.image_token_id)
    assert collapsed == tok(rendered)["input_ids"] and length == model.image_tokens(500, 375)
    assert tok.decode(collapsed[:start]).rstrip().removesuffix("<|vision_start|>").rstrip().endswith(before.strip())
    layout = expanded_layout(tok, rendered, question, ids, model.image_token_id)
    plain_ids = build_inputs(processor, [photo(500, 375)], question)["input_ids"][0].tolist()
    plain = expanded_layout(tok, model.rendered(question), question, plain_ids, model.image_token_id)
    reference = prompt_layout(tok, model.rendered(IMAGE_PASS_QUESTION), IMAGE_PASS_QUESTION, model.image_token_id)
    assert shared_image_prefix_problem(prompt_layout(tok, rendered, question, model.image_token_id), reference, tok)
    assert shared_image_prefix_problem(prompt_layout(tok, model.rendered(question), question, model.image_token_id),
                                       reference, tok) is None
    assert layout.from_end(layout.question_last) == plain.from_end(plain.question_last)
    assert tok.decode(ids[layout.question_last + 1:]).strip() == AFTER_QUESTION[name].strip()
    assert len(ids) - len(plain_ids) == len(tok(rendered)["input_ids"]) - len(tok(model.rendered(question))["input_ids"]) > 0


@pytest.mark.parametrize("name", sorted(PAPER_MODELS))
def test_expanded_layout_finds_the_positions_in_the_processors_ids(name, processors, tokenizers):
    """The layout the HF adapter uses (on the processor's image-expanded ids) counts the same
    tokens from the end as the rendered text's; text a processor adds around the prompt
    (PaliGemma prepends the image run, appends a newline) shifts the counts with it."""
    model, processor, tok = PAPER_MODELS[name], processors[name], tokenizers[name]
    question = paper_prompts()[0]["text"]
    rendered = model.rendered(question)
    plain = prompt_layout(tok, rendered, question, model.image_token_id)
    ids = build_inputs(processor, [photo(500, 375)], question)["input_ids"][0].tolist()
    layout = expanded_layout(tok, rendered, question, ids, model.image_token_id)
    assert layout.ids == tuple(ids) and len(ids) > len(plain.ids)
    assert layout.from_end(layout.question_last) == plain.from_end(plain.question_last)
    assert layout.from_end(layout.image_last) == plain.from_end(plain.image_last)

    newline = tok.convert_tokens_to_ids(tok.tokenize("\n"))[-1]
    wrapped = [model.image_token_id] * 4 + list(plain.ids) + [newline]
    layout = expanded_layout(tok, rendered, question, wrapped, model.image_token_id)
    assert layout.from_end(layout.question_last) == plain.from_end(plain.question_last) + 1
    assert layout.image_last == 4 + plain.image_last
    changed = list(plain.ids)
    changed[plain.question_last] = newline
    with pytest.raises(ValueError, match="changed the question's last token"):
        expanded_layout(tok, rendered, question, changed, model.image_token_id)
