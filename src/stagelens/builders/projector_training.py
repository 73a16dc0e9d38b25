"""Train the embedded model's projector: LM and vision encoder frozen, only the MLP learns.

Each training image gets, at random, either a caption instruction with the target answer
"This is a picture of a <class name>." or a yes/no question about one object ("Is this a
picture of a coat?"), true for half of the questions (the image's own class) and false for the
other half (another class or an unrelated object). Rendered with the LM's chat template; the loss
is next-token cross-entropy on the answer tokens only. The questions teach the LM to answer
yes/no about the image rather than to caption every prompt; none of them asks about
"clothing" or "animals", the words the default config's probing prompts use.
Vision features are computed once, up front.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from stagelens.adapters.efficientnet_vision import pretrained_state_dict
from stagelens.adapters.embedded import EmbeddedMLLM
from stagelens.atomic import atomic_path
from stagelens.builders.embedded import assemble
from stagelens.dataset import manifest_metadata
from stagelens.extract import Sample, load_image, read_split

# Instructions the caption follows; none of them is one of the probing prompts of config.yaml.
CAPTION_INSTRUCTIONS = (
    "What is in this image?",
    "Describe the image in a few words.",
    "What does this picture show?",
    "What kind of object is this?",
)
# Yes/no questions about one object; {object} is e.g. "a coat".
YES_NO_QUESTIONS = (
    "Is this a picture of {object}? Answer yes or no.",
    "Does the image contain {object}? Answer with yes or no.",
)
# False objects besides the other classes, so that "no" is not only about close cousins.
UNRELATED_OBJECTS = ("a car", "a house", "a tree", "a boat", "a chair", "a cup", "a bicycle", "a mountain")


@dataclass(frozen=True)
class TrainSettings:
    """Hyper-parameters of the projector recipe (recorded in the checkpoint)."""

    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    seed: int = 0
    yes_no_share: float = 0.5  # fraction of examples that are yes/no questions


def object_phrase(class_name: str) -> str:
    """A class name as a noun phrase: "Ankle boot" -> "an ankle boot", "T-shirt/top" -> "a T-shirt or top"."""
    name = class_name.replace("/", " or ")
    name = name if "-" in name.split()[0] else name.lower()  # keep "T-shirt"
    article = "an" if name[0].lower() in "aeiou" else "a"
    return f"{article} {name}"


def caption_text(class_name: str) -> str:
    """Target answer for one class, e.g. "This is a picture of an ankle boot."."""
    return f"This is a picture of {object_phrase(class_name)}."


def sample_example(label: int, class_names: Sequence[str], yes_no_share: float, rng: np.random.Generator) -> tuple[str, str]:
    """(instruction, answer) for one image of class `label`: a caption or a yes/no question."""
    if rng.random() >= yes_no_share:
        instruction = CAPTION_INSTRUCTIONS[rng.integers(len(CAPTION_INSTRUCTIONS))]
        return instruction, caption_text(class_names[label])
    template = YES_NO_QUESTIONS[rng.integers(len(YES_NO_QUESTIONS))]
    if rng.random() < 0.5:
        return template.format(object=object_phrase(class_names[label])), "Yes."
    others = [object_phrase(name) for i, name in enumerate(class_names) if i != label and name]
    distractors = others + list(UNRELATED_OBJECTS)
    return template.format(object=distractors[rng.integers(len(distractors))]), "No."


@torch.no_grad()
def vision_features(model: EmbeddedMLLM, images: Sequence[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """Frozen EfficientNet patch features (N, 49, 1280), computed once for the whole training set."""
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="vision features", unit="batch"):
        chunks.append(model.vision(model.pixel_values(images[start : start + batch_size])))
    return torch.cat(chunks)


def encode_example(model: EmbeddedMLLM, instruction: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer + end-of-turn, and where the answer starts."""
    tokenizer = model.tokenizer
    prompt_ids = tokenizer(model.render_prompt(instruction), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, len(prompt_ids)


def batch_tensors(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and a mask of positions whose *next* token is scored."""
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    scored = torch.zeros((len(examples), length), dtype=torch.bool)
    for row, (ids, answer_start) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        scored[row, answer_start - 1 : len(ids) - 1] = True
    return input_ids, attention, scored


def caption_loss(model: EmbeddedMLLM, features: torch.Tensor, input_ids, attention, scored) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens; logits only where scored (the vocab is large)."""
    inputs_embeds = model.merge(input_ids, model.image_embeddings(features))
    hidden = model.lm.model(inputs_embeds=inputs_embeds, attention_mask=attention, use_cache=False).last_hidden_state
    logits = model.lm.lm_head(hidden[scored])
    targets = input_ids[:, 1:][scored[:, :-1]]
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def train_projector(
    model: EmbeddedMLLM,
    features: torch.Tensor,
    class_names: Sequence[str],
    labels: np.ndarray,
    settings: TrainSettings,
    stop_after: int | None = None,
) -> dict[str, object]:
    """Train model.projector in place; returns the loss history and timing.

    `stop_after` runs only the first steps of the same schedule (to check a recipe's start cheaply).
    """
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    for module in (model.lm, model.vision):
        module.requires_grad_(False)
        module.eval()
    model.projector.requires_grad_(True)
    model.projector.train()
    pad_id = model.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = model.tokenizer.eos_token_id
    optimizer = torch.optim.AdamW(
        model.projector.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / settings.warmup_steps)
        * 0.5
        * (1 + np.cos(np.pi * min(step, settings.steps) / settings.steps)),
    )
    losses: list[float] = []
    started = time.perf_counter()
    order = rng.permutation(len(labels))
    cursor = 0
    for _ in tqdm(range(settings.steps if stop_after is None else min(stop_after, settings.steps)), desc="projector", unit="step"):
        if cursor + settings.batch_size > len(order):
            order, cursor = rng.permutation(len(labels)), 0
        index = order[cursor : cursor + settings.batch_size]
        cursor += settings.batch_size
        pairs = [sample_example(int(labels[i]), class_names, settings.yes_no_share, rng) for i in index]
        batch = [encode_example(model, instruction, answer) for instruction, answer in pairs]
        input_ids, attention, scored = batch_tensors(batch, pad_id)
        loss = caption_loss(model, features[torch.from_numpy(index)], input_ids, attention, scored)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    model.projector.eval()
    return {
        "settings": asdict(settings),
        "losses": losses,
        "final_loss": float(np.mean(losses[-10:])),
        "train_seconds": time.perf_counter() - started,
        "n_train_images": int(len(labels)),
        "caption_instructions": list(CAPTION_INSTRUCTIONS),
        "yes_no_questions": list(YES_NO_QUESTIONS),
        "unrelated_objects": list(UNRELATED_OBJECTS),
        "caption_example": caption_text(class_names[0]),
    }


def training_split(manifest_path: str | os.PathLike) -> tuple[list[Sample], list[str]]:
    """(the manifest's train split sorted by sample id, class names indexed by label)."""
    samples = sorted(read_split(manifest_path, "train"), key=lambda s: s.sample_id)
    return samples, [c["name"] for c in manifest_metadata(manifest_path)["classes"]]


def train_from_manifest(
    lm_dir: str | os.PathLike, manifest_path: str | os.PathLike, settings: TrainSettings, stop_after: int | None = None
) -> tuple[EmbeddedMLLM, dict[str, object]]:
    """The train_projector job: a fresh embedded model around the exported LM, its projector
    trained on the manifest's train split (images from files or Parquet/Arrow rows); returns the
    model and the training history, which names the training images by a digest of their ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    samples, names = training_split(manifest_path)
    lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    model = assemble(lm, AutoTokenizer.from_pretrained(lm_dir), pretrained_state_dict(), seed=settings.seed)
    features = vision_features(model, [load_image(s.image) for s in samples])
    history = train_projector(model, features, names, np.array([s.label for s in samples]), settings, stop_after)
    ids = "\n".join(s.sample_id for s in samples).encode("utf-8")
    history.update(manifest=str(manifest_path), class_names=names, train_sample_ids_sha256=hashlib.sha256(ids).hexdigest())
    return model, history


def save_projector(model: EmbeddedMLLM, history: dict[str, object], projector_path: str | os.PathLike,
                   training_path: str | os.PathLike) -> None:
    """The projector weights (safetensors) and the training history (JSON, with the weights file's
    sha256 so that the two stay paired), each written atomically."""
    from safetensors.torch import save

    state = {name: tensor.detach().contiguous() for name, tensor in model.projector.state_dict().items()}
    data = save(state)
    with atomic_path(projector_path) as tmp:
        tmp.write_bytes(data)
    record = {**history, "projector_sha256": hashlib.sha256(data).hexdigest()}
    with atomic_path(training_path) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
