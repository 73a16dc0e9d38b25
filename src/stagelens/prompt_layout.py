"""Where the kept token positions lie in a rendered prompt, found from its token ids and offsets.

Tokenizer-only (no model, no torch), so the real vocabularies can be checked offline, and the
check that every prompt shares the image pass's tokens up to the last image token runs before any
forward pass.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence


def adds_special_tokens(tokenizer, prompt: str) -> bool:
    """Whether `prompt` is tokenised with the tokenizer's special tokens (BOS for Llama-family
    tokenizers): yes unless the template already starts with BOS, as apply_chat_template does."""
    bos = tokenizer.bos_token
    return not (bos is not None and prompt.startswith(bos))


# The question the prompt-independent image pass renders: only its tokens up to the last image
# token are fed, and every configured prompt must render to those same tokens (PromptLayout).
IMAGE_PASS_QUESTION = "What is in the image?"


@dataclass(frozen=True)
class PromptLayout:
    """Where the kept positions lie in the token ids a model is fed for one image under one
    prompt; counts from the end of the sequence hold for every row of a left-padded batch."""

    text: str  # the rendered prompt
    ids: tuple[int, ...]  # the ids fed to the model, special tokens and image run included
    image_last: int  # index of the last image token in ids
    question_last: int  # index of the token holding the question's last character

    def from_end(self, index: int) -> int:
        """Tokens after `index` (the same in the expanded, left-padded batch)."""
        return len(self.ids) - 1 - index

    @property
    def image_prefix(self) -> tuple[int, ...]:
        """The ids up to and including the last image token: all the image tokens can attend to."""
        return self.ids[: self.image_last + 1]


def _question_last(tokenizer, rendered: str, question: str) -> tuple[tuple[int, ...], int]:
    """The rendered prompt's token ids and the index of the last token whose character span
    overlaps the question's last character (its last occurrence: templates put it after any
    system text)."""
    if not question.strip():
        raise ValueError("the question is empty: question_last is undefined")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer: no character offsets to find the question")
    enc = tokenizer(rendered, add_special_tokens=adds_special_tokens(tokenizer, rendered), return_offsets_mapping=True)
    ids, offsets = tuple(int(i) for i in enc["input_ids"]), enc["offset_mapping"]
    start = rendered.rfind(question.rstrip())
    if start < 0:
        raise ValueError(f"the question does not appear verbatim in the rendered prompt: question_last is undefined\n{rendered!r}")
    end = start + len(question.rstrip()) - 1  # the question's last character
    holding = [i for i, (a, b) in enumerate(offsets) if a <= end < b]
    if not holding:
        raise ValueError(f"no token covers the question's last character in {rendered!r}")
    return ids, holding[-1]


def _checked_layout(rendered: str, ids: tuple[int, ...], question_last: int, image_token_id: int) -> PromptLayout:
    image = [i for i, t in enumerate(ids) if t == image_token_id]
    if not image:
        raise ValueError(f"the prompt holds no image token (id {image_token_id}): image_mean is undefined\n{rendered!r}")
    if question_last <= image[-1]:
        raise ValueError(f"the question ends before the last image token in {rendered!r}")
    return PromptLayout(rendered, ids, image[-1], question_last)


def prompt_layout(tokenizer, rendered: str, question: str, image_token_id: int) -> PromptLayout:
    """The layout of `rendered` (a chat-template render of `question` whose image placeholder is
    `image_token_id` itself), from the tokenizer's offsets."""
    ids, question_last = _question_last(tokenizer, rendered, question)
    return _checked_layout(rendered, ids, question_last, image_token_id)


def expanded_layout(tokenizer, rendered: str, question: str, expanded_ids: Sequence[int], image_token_id: int) -> PromptLayout:
    """The layout of a processor's output ids for one image under `rendered`.

    Processors expand the template's placeholder into the image run (Aya's `<image>`, Gemma 3's
    `<start_of_image>`, ...) or add text of their own (PaliGemma prepends the image and appends a
    newline), so the question's last token is found in the rendered text by its offsets and
    carried over to the expanded ids through the token runs both share.
    """
    ids, question_last = _question_last(tokenizer, rendered, question)
    expanded = tuple(int(i) for i in expanded_ids)
    matcher = difflib.SequenceMatcher(None, ids, expanded, autojunk=False)
    for a, b, size in matcher.get_matching_blocks():
        if a <= question_last < a + size:
            return _checked_layout(rendered, expanded, b + question_last - a, image_token_id)
    raise ValueError(f"the processor changed the question's last token: question_last is undefined in {rendered!r}")


def shared_image_prefix_problem(layout: PromptLayout, reference: PromptLayout, tokenizer=None) -> str | None:
    """Why the image tokens of `layout` could see other tokens than those of `reference`
    (None: both render to the same ids up to the last image token, so under causal attention the
    image-token states of one image are the same under both prompts). The tokenizer, where
    given, spells the differing tokens."""
    a, b = layout.image_prefix, reference.image_prefix
    if a == b:
        return None
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    def spell(ids: tuple[int, ...]) -> str:
        part = list(ids[first : first + 8])
        return repr(tokenizer.decode(part)) if tokenizer is not None else str(part)

    return (
        f"its tokens up to the last image token differ from the image pass's from token {first} on: "
        f"{spell(a)} vs {spell(b)} (text before the image would make the image tokens depend on the prompt)"
    )
