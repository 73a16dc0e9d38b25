"""Prompt rendering and tokenisation with a model's own processor and chat template.

Usable without a model: `build_inputs(processor, images, question)` returns exactly the
tensors the adapters feed to the forward pass, so real vocabularies can be checked offline.
"""

from __future__ import annotations

from typing import Sequence

from PIL import Image

from stagelens.models.base import ANSWER_WORDS


def user_message(question: str) -> list[dict]:
    """One user turn holding one image followed by the question, in chat-template form."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def render_prompt(processor, question: str) -> str:
    """The exact text fed to the tokenizer: the processor's chat template + generation prompt."""
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"{type(processor).__name__} has no chat template; stagelens renders prompts with it")
    return processor.apply_chat_template(user_message(question), add_generation_prompt=True, tokenize=False)


def set_left_padding(processor) -> None:
    """Left padding puts every prompt's last token at index T-1."""
    processor.tokenizer.padding_side = "left"


def build_inputs(processor, images: Sequence[Image.Image], question: str, **processor_kwargs):
    """Processor outputs (every key it returns) for a batch of images under one question.

    The rendered prompt is tokenised with the tokenizer's special tokens (BOS for Llama-family
    tokenizers), unless the template already starts with BOS, as apply_chat_template does.
    """
    if not images:
        raise ValueError("build_inputs needs at least one image")
    set_left_padding(processor)
    prompt = render_prompt(processor, question)
    bos = processor.tokenizer.bos_token
    add_special = not (bos is not None and prompt.startswith(bos))
    return processor(
        images=list(images),
        text=[prompt] * len(images),
        padding=True,
        add_special_tokens=add_special,
        return_tensors="pt",
        **processor_kwargs,
    )


def _first_token(tokenizer, text: str) -> int | None:
    """First token id of `text`, or None when that token is only whitespace (e.g. a lone space)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        return None
    if not tokenizer.decode(ids[:1]).strip():
        return None
    return int(ids[0])


def answer_token_ids(tokenizer, words: Sequence[str] = ANSWER_WORDS) -> dict[str, list[int]]:
    """Token ids scored for each answer word: first token of the bare word and of " word".

    A word's probability is the max over its ids (the model emits one spelling or the other
    after the template's last token; max never double counts). Candidates that decode to
    whitespace only are dropped; duplicates are merged. Raises if a word has no usable id or
    two words share one (their probabilities would be confounded).
    """
    ids: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    for word in words:
        cands = [t for t in (_first_token(tokenizer, word), _first_token(tokenizer, " " + word)) if t is not None]
        cands = list(dict.fromkeys(cands))
        if not cands:
            raise ValueError(f"answer word {word!r} has no non-whitespace first token in {type(tokenizer).__name__}")
        for t in cands:
            if t in owner:
                raise ValueError(
                    f"answer words {owner[t]!r} and {word!r} share first token id {t} "
                    f"({tokenizer.convert_ids_to_tokens(t)!r}); their probabilities cannot be told apart"
                )
            owner[t] = word
        ids[word] = cands
    return ids
