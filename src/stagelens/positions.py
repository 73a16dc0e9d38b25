"""The token positions stagelens keeps per layer, and which of them a prompt can change.

In LLaVA-1.5 ("USER: <image>\\n{question} ASSISTANT:"), LLaVA-NeXT-LLaMA-3 ("...user...\\n\\n<image>\\n
{question}<|eot_id|>...assistant...\\n\\n"), Qwen2-VL ("<|im_start|>user\\n<|vision_start|>
<|image_pad|>...<|vision_end|>{question}<|im_end|>\\n<|im_start|>assistant\\n") and the embedded
model ("<|im_start|>user\\n<image>...\\n{question}<|im_end|>\\n<|im_start|>assistant\\n"):

- `last`: the final template token (":" of "ASSISTANT:", "\\n\\n" of the assistant header, "\\n"
  after "assistant"): the paper's position, where the answer is produced.
- `question_last`: the token holding the question's last character (e.g. "." of "yes or no."),
  before the template's end-of-turn and assistant prefix: the question read, no template after it.
- `image_mean`: the mean over the image placeholder tokens. They come before the question, so
  under causal attention they cannot see it: the image pass reads them once per image. A prompt
  with text before the image (its `before_image` key) changes what they see: its own extraction
  reads them too, and they are evaluated as that prompt's image-token readout.
"""

from typing import Mapping

PROMPT_POSITIONS = ("last", "question_last")
IMAGE_POSITIONS = ("image_mean",)
POSITIONS = PROMPT_POSITIONS + IMAGE_POSITIONS

# The image pass's name in output paths (embeddings/<split>/image/, probes/image/, metrics/image/)
# and in the `prompt` column of its metrics rows; no prompt may take it.
IMAGE_PASS = "image"
# The vision encoder's layers, read by the same image pass (embeddings/<split>/vision/,
# probes/vision/, metrics/vision/; `prompt` of their metrics rows); no prompt may take it.
VISION_PASS = "vision"


def has_text_before_image(prompt: Mapping[str, object]) -> bool:
    """Whether a prompt puts text before the image (its `before_image` key), so that its image
    tokens see it and are read per prompt rather than by the shared image pass."""
    return bool(prompt.get("before_image"))
