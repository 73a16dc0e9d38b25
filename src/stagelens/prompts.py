"""Prompt rendering and tokenisation with a model's own processor and chat template.

Usable without a model: `build_inputs(processor, images, question)` returns exactly the
tensors the adapters feed to the forward pass, so real vocabularies can be checked offline.
"""

from __future__ import annotations

import os
from typing import Sequence

from PIL import Image

from stagelens.adapters.base import ANSWER_WORDS
from stagelens.prompt_layout import adds_special_tokens


def user_message(question: str, image: bool = True) -> list[dict]:
    """One user turn holding one image (image=False: none) followed by the question, in chat-template form."""
    content = [{"type": "image"}] if image else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": question}]}]


def _apply_template(processor, messages: list[dict]) -> str:
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def render_prompt(processor, question: str, before_image: str = "") -> str:
    """The exact text fed to the tokenizer: the processor's chat template + generation prompt.

    before_image: text put verbatim right before the image's rendering in the user turn. Templates
    do not agree on a [text, image, text] content list (LLaVA-1.5's and LLaVA-NeXT's render every
    image before every text), so the image's rendering is found as the part the image adds to the
    template's output (the render with the image against the render without it) and the text is
    inserted where that part starts; a template that keeps the content order gives the same text.
    """
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"{type(processor).__name__} has no chat template; stagelens renders prompts with it")
    rendered = _apply_template(processor, user_message(question))
    if not before_image:
        return rendered
    text_only = _apply_template(processor, user_message(question, image=False))
    start = len(os.path.commonprefix([rendered, text_only]))
    if len(rendered) - len(text_only) <= 0 or not rendered.endswith(text_only[start:]):
        raise ValueError(
            f"cannot find where the image is rendered in {type(processor).__name__}'s chat template "
            f"(with the image: {rendered!r}; without: {text_only!r}): before_image is undefined"
        )
    return rendered[:start] + before_image + rendered[start:]


def set_left_padding(processor) -> None:
    """Left padding puts every prompt's last token at index T-1."""
    processor.tokenizer.padding_side = "left"


def build_inputs(processor, images: Sequence[Image.Image], question: str, nested: bool = False, before_image: str = "",
                 **processor_kwargs):
    """Processor outputs (every key it returns) for a batch of images under one question (and the
    text before the image, see render_prompt).

    nested: pass the images as one single-image list per prompt (Gemma 3, Idefics3, mllama).
    """
    if not images:
        raise ValueError("build_inputs needs at least one image")
    set_left_padding(processor)
    prompt = render_prompt(processor, question, before_image)
    return processor(
        images=[[image] for image in images] if nested else list(images),
        text=[prompt] * len(images),
        padding=True,
        add_special_tokens=adds_special_tokens(processor.tokenizer, prompt),
        return_tensors="pt",
        **processor_kwargs,
    )


def _spelling_path(tokenizer, text: str) -> tuple[int, ...] | None:
    """Token path the model emits to start `text`: its first non-whitespace token, preceded by
    at most one whitespace-only token (Llama-2 spells "1" as "▁" then "1"); None otherwise."""
    ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
    lead = 0
    while lead < len(ids) and not tokenizer.decode(ids[lead : lead + 1]).strip():
        lead += 1
    if lead >= len(ids) or lead > 1:
        return None
    return tuple(ids[: lead + 1])


def answer_token_paths(tokenizer, words: Sequence[str] = ANSWER_WORDS) -> dict[str, list[tuple[int, ...]]]:
    """Per answer word, the token paths scored: the start of the bare word and of " word".

    A path is one token or, only for a word with no one-token spelling (Llama-2 digits: "▁"
    then "1"), a whitespace-only token followed by the word's first token. A word's
    probability is the max over its paths (the model emits one spelling or the other; max
    never double counts); a two-token path scores p(ws) * p(token | ws). Raises if a word has
    no path or two words share one (their probabilities could not be told apart).
    """
    paths: dict[str, list[tuple[int, ...]]] = {}
    owner: dict[tuple[int, ...], str] = {}
    for word in words:
        found = [p for p in (_spelling_path(tokenizer, word), _spelling_path(tokenizer, " " + word)) if p is not None]
        found = list(dict.fromkeys(found))
        if any(len(p) == 1 for p in found):
            found = [p for p in found if len(p) == 1]
        if not found:
            raise ValueError(f"answer word {word!r} has no usable first token in {type(tokenizer).__name__}")
        for path in found:
            if path in owner:
                raise ValueError(
                    f"answer words {owner[path]!r} and {word!r} share first token path {list(path)} "
                    f"({tokenizer.convert_ids_to_tokens(list(path))!r}); their probabilities cannot be told apart"
                )
            owner[path] = word
        paths[word] = found
    return paths


def answer_token_ids(tokenizer, words: Sequence[str] = ANSWER_WORDS) -> dict[str, list[int]]:
    """Per answer word, the distinct word-start token ids of its paths (see answer_token_paths)."""
    return {w: list(dict.fromkeys(p[-1] for p in ps)) for w, ps in answer_token_paths(tokenizer, words).items()}
