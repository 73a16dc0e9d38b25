"""The one interface every model goes through: images + a question in, per-layer vectors out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

# Token positions an adapter can keep per layer. `last` is the last input token (a template
# token under left padding), `image_mean` the mean over the image placeholder tokens.
POSITIONS = ("last", "image_mean")

# Words whose next-token probability is recorded as the model's own answer. Each word is
# scored as the first token of the word and of the word with a leading space; case variants
# are separate entries so `answer_shares` can tell "Yes" from "yes".
ANSWER_WORDS = ("yes", "Yes", "no", "No", "1", "0")


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
    (batch, len(ANSWER_WORDS)): softmax next-token probabilities after the prompt.
    """

    vectors: dict[str, np.ndarray]
    answer_probs: np.ndarray
    n_image_tokens: np.ndarray  # (batch,) image placeholder tokens per sample
    extra: dict[str, object] = field(default_factory=dict)


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

    def render_prompt(self, question: str) -> str:
        """The exact text fed to the tokenizer for one image + question (chat template applied)."""
        ...

    def forward(
        self,
        images: Sequence[Image.Image],
        question: str,
        layers: Sequence[int],
        positions: Sequence[str],
    ) -> BatchVectors:
        """One forward pass over a batch; keeps only `positions` at `layers`."""
        ...


class PreparingAdapter:
    """Base of adapters that split a forward into `prepare` (CPU: template, tokenizer, image
    processing; thread-safe) and `forward_prepared` (the model), so extraction can prepare the
    next batch while the model runs this one."""

    def prepare(self, images: Sequence[Image.Image], question: str) -> Any:
        raise NotImplementedError

    def forward_prepared(self, prepared: Any, layers: Sequence[int], positions: Sequence[str]) -> BatchVectors:
        raise NotImplementedError

    def forward(
        self,
        images: Sequence[Image.Image],
        question: str,
        layers: Sequence[int],
        positions: Sequence[str],
    ) -> BatchVectors:
        return self.forward_prepared(self.prepare(images, question), layers, positions)
