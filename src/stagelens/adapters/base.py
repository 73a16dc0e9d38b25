"""The one interface every model goes through: images + a question in, per-layer vectors out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

# The token positions an adapter can keep per layer (what each means: stagelens.positions).
from stagelens.positions import IMAGE_POSITIONS, POSITIONS, PROMPT_POSITIONS  # noqa: F401 (re-exported)
from stagelens.prompt_layout import IMAGE_PASS_QUESTION, PromptLayout

# Words whose next-token probability is recorded as the model's own answer. Each word is
# scored as the first token of the word and of the word with a leading space; case variants
# are separate entries so `answer_shares` can tell "Yes" from "yes".
ANSWER_WORDS = ("yes", "Yes", "no", "No", "1", "0")
# Answer word -> the ANSWER_WORDS entries whose probabilities are summed for it.
WORD_SPELLINGS = {"yes": ("yes", "Yes"), "no": ("no", "No"), "1": ("1",), "0": ("0",)}
# The answer a prompt's expected answer is weighed against (the answer margin, the patching score).
OPPOSITE = {"yes": "no", "no": "yes", "1": "0", "0": "1"}


@dataclass(frozen=True)
class LayerConvention:
    """What a layer index means; written into every embedding file's metadata."""

    description: str = (
        "layer 0 = input embeddings with image features merged; layer l (1..L) = residual "
        "stream after decoder block l, before the final norm"
    )


@dataclass
class BatchVectors:
    """Result of one forward pass over a batch.

    vectors[position] has shape (n_layers_kept, batch, hidden) in float32, in the order of
    the `layers` argument of `ModelAdapter.forward`. answer_probs has shape
    (batch, len(ANSWER_WORDS)): softmax next-token probabilities after the prompt; (batch, 0)
    for the image pass, which stops at the last image token. readout (prompt pass only) has
    shape (n_layers_kept, batch, len(ANSWER_WORDS)): log-probabilities of the answer words read
    from each kept layer's last-token state through the model's own final norm and unembedding
    (stagelens.adapters.readout); None for the image pass. vision (image pass with vision layers
    requested only): vision position -> per requested vision layer an (batch, dim_v) float32 array
    (dims differ per layer in a CNN; stagelens.adapters.vision).
    """

    vectors: dict[str, np.ndarray]
    answer_probs: np.ndarray
    n_image_tokens: np.ndarray  # (batch,) image placeholder tokens per sample
    readout: np.ndarray | None = None
    vision: dict[str, list[np.ndarray]] | None = None
    extra: dict[str, object] = field(default_factory=dict)


def image_pass_vectors(vectors: dict[str, np.ndarray], image_mask: Any, vision: Any = None) -> BatchVectors:
    """What the image pass keeps, whichever forward read it (the image pass, or a prompt's prefix):
    the image positions, the vision layers (`vision`: a `VisionCapture`, or None), no answers.
    image_mask: (batch, tokens) torch bool tensor of the image tokens."""
    n_image_tokens = image_mask.sum(dim=1).cpu().numpy().astype(np.int32)
    return BatchVectors(vectors=vectors, answer_probs=np.zeros((len(n_image_tokens), 0), dtype=np.float32),
                        n_image_tokens=n_image_tokens, vision=vision.vectors() if vision else None)


@dataclass(frozen=True)
class ModelInfo:
    """What is recorded about a model in every output's metadata."""

    model_id: str  # hub id or local path as given in config
    revision: str  # requested revision, or the commit hash where resolvable
    architecture: str  # e.g. LlavaForConditionalGeneration
    dtype: str  # torch dtype name the forward ran in, e.g. "bfloat16"
    device: str
    num_layers: int  # number of decoder blocks L; hidden-state layers are 0..L
    hidden_size: int


class ModelAdapter(Protocol):
    """Any MLLM stagelens can read. Implementations live in stagelens.adapters.*."""

    info: ModelInfo

    def render_prompt(self, question: str, before_image: str = "") -> str:
        """The exact text fed to the tokenizer for one image + question (chat template applied);
        before_image: text put verbatim right before the image in the user turn."""
        ...

    def layout(self, question: str, before_image: str = "") -> PromptLayout:
        """Token ids of the rendered prompt and where its image tokens and question end."""
        ...

    def forward_image(
        self, images: Sequence[Image.Image], layers: Sequence[int], vision_layers: Sequence[int] = ()
    ) -> BatchVectors:
        """The image pass: only the tokens up to the last image token, keeping IMAGE_POSITIONS (and
        the vision encoder's `vision_layers`)."""
        ...

    def forward(
        self,
        images: Sequence[Image.Image],
        question: str,
        layers: Sequence[int],
        positions: Sequence[str],
        before_image: str = "",
    ) -> BatchVectors:
        """One forward pass over a batch; keeps only `positions` at `layers`."""
        ...


class PreparingAdapter:
    """Base of adapters that split a forward into `prepare` (CPU: template, tokenizer, image
    processing; thread-safe) and `forward_prepared` (the model), so extraction can prepare the
    next batch while the model runs this one."""

    def prepare(
        self, images: Sequence[Image.Image], question: str, image_only: bool = False, before_image: str = ""
    ) -> Any:
        """image_only: cut the sequence after the last image token (the image pass); before_image:
        text put right before the image (see ModelAdapter.render_prompt)."""
        raise NotImplementedError

    def forward_prepared(
        self, prepared: Any, layers: Sequence[int], positions: Sequence[str], vision_layers: Sequence[int] = ()
    ) -> BatchVectors:
        """vision_layers: the vision encoder's layers to keep (any pass: the tower does not see the prompt)."""
        raise NotImplementedError

    def forward(
        self,
        images: Sequence[Image.Image],
        question: str,
        layers: Sequence[int],
        positions: Sequence[str],
        before_image: str = "",
    ) -> BatchVectors:
        return self.forward_prepared(self.prepare(images, question, before_image=before_image), layers, positions)

    def forward_image(
        self, images: Sequence[Image.Image], layers: Sequence[int], vision_layers: Sequence[int] = ()
    ) -> BatchVectors:
        prepared = self.prepare(images, IMAGE_PASS_QUESTION, image_only=True)
        return self.forward_prepared(prepared, layers, IMAGE_POSITIONS, vision_layers)


def check_positions(positions: Sequence[str], image_only: bool) -> None:
    """Clear error for a position the pass cannot read (the image pass has no question tokens)."""
    allowed = IMAGE_POSITIONS if image_only else POSITIONS
    bad = [p for p in positions if p not in allowed]
    if bad:
        what = "the image pass (tokens up to the last image token)" if image_only else "a forward pass"
        raise ValueError(f"positions {bad} are not read by {what}; known: {list(allowed)}")
