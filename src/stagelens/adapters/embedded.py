"""The embedded default MLLM: EfficientNet-Lite0 patches -> MLP projector -> SmolLM2-135M-Instruct.

LLaVA-style: the 49 patch vectors of a 224x224 image are projected into the LM's embedding space
and replace 49 `<image>` placeholder tokens at the start of the user turn of SmolLM2's own chat
template. Checkpoint directory (model_type "stagelens-embedded"):

    config.json              this model's config: preprocessing, image token, provenance, training
    lm/                      SmolLM2 LlamaForCausalLM, safetensors (fp32, dequantised from Q4_1)
    tokenizer/               SmolLM2 tokenizer + chat template, with `<image>` added
    vision.safetensors       EfficientNet-Lite0 ImageNet weights
    projector.safetensors    the projector, trained by stagelens (scripts/train_projector.py)
"""

from __future__ import annotations

import copy
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from stagelens.adapters import EMBEDDED_MODEL_TYPE as MODEL_TYPE
from stagelens.adapters.architectures import vision_facts_for
from stagelens.adapters.base import (
    ANSWER_WORDS,
    BatchVectors,
    ModelInfo,
    PreparingAdapter,
    check_positions,
    image_pass_vectors,
)
from stagelens.adapters.efficientnet_vision import (
    FEATURE_DIM,
    GRID,
    IMAGE_MEAN,
    IMAGE_SIZE,
    IMAGE_STD,
    PatchEncoder,
    preprocess,
)
from stagelens.adapters.layers import LayerCapture, find_decoder_layers, last_token_index
from stagelens.adapters.readout import READOUT_RULE, AnswerReadout, causal_lm_parts, logit_softcap
from stagelens.adapters.residual_patch import Continuation
from stagelens.adapters.vision import check_vision_request, load_vision_tower
from stagelens.positions import IMAGE_POSITIONS
from stagelens.prompt_layout import PromptLayout, prompt_layout
from stagelens.prompts import answer_token_ids
from stagelens.spec import ModelSpec, resolve_device, torch_dtype

ARCHITECTURE = "StagelensEmbeddedForCausalLM"
IMAGE_TOKEN = "<image>"
CONFIG_FILE = "config.json"
LM_DIR = "lm"
TOKENIZER_DIR = "tokenizer"
VISION_FILE = "vision.safetensors"
PROJECTOR_FILE = "projector.safetensors"


@dataclass
class EmbeddedConfig:
    """Everything needed to rebuild the model around its weight files, plus provenance."""

    lm_hidden_size: int
    num_layers: int
    image_token_id: int
    projector_hidden_size: int = 1024
    vision_feature_dim: int = FEATURE_DIM
    n_image_tokens: int = GRID * GRID
    image_size: int = IMAGE_SIZE
    image_mean: tuple[float, ...] = IMAGE_MEAN
    image_std: tuple[float, ...] = IMAGE_STD
    image_token: str = IMAGE_TOKEN
    model_type: str = MODEL_TYPE
    architecture: str = ARCHITECTURE
    provenance: dict[str, object] = field(default_factory=dict)
    training: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_json(cls, path: Path) -> "EmbeddedConfig":
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{path}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown keys {unknown}")
        for key in ("image_mean", "image_std"):
            raw[key] = tuple(raw[key])
        return cls(**raw)


class Projector(nn.Module):
    """Two-layer MLP from vision features to LM input embeddings (LLaVA-1.5's projector shape)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(features)))


def user_content(question: str, n_image_tokens: int, before_image: str = "") -> str:
    """User message: the image placeholders (after `before_image`, verbatim), then the question
    on its own line."""
    return before_image + IMAGE_TOKEN * n_image_tokens + "\n" + question


class EmbeddedMLLM(nn.Module):
    """Vision encoder + projector + causal LM; the LM sees projected patches at `<image>` positions."""

    def __init__(self, config: EmbeddedConfig, vision: PatchEncoder, projector: Projector, lm, tokenizer) -> None:
        super().__init__()
        self.config = config
        self.vision = vision
        self.projector = projector
        self.lm = lm
        self.tokenizer = tokenizer

    def render_prompt(self, question: str, before_image: str = "") -> str:
        messages = [{"role": "user", "content": user_content(question, self.config.n_image_tokens, before_image)}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        cfg = self.config
        return preprocess(images, cfg.image_size, cfg.image_mean, cfg.image_std)

    def image_embeddings(self, vision_features: torch.Tensor) -> torch.Tensor:
        """(B, 49, 1280) patch features -> (B, 49, D) LM input vectors."""
        return self.projector(vision_features)

    def merge(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings with every `<image>` position replaced by the image's projected patches."""
        is_image = input_ids == self.config.image_token_id
        counts = is_image.sum(dim=1)
        if not bool((counts == image_embeds.shape[1]).all()):
            raise ValueError(
                f"each sequence needs {image_embeds.shape[1]} {IMAGE_TOKEN} tokens, got {counts.tolist()}"
            )
        embed = self.lm.get_input_embeddings()
        safe_ids = input_ids.masked_fill(is_image, 0)  # the placeholder id is outside the LM vocab
        embeds = embed(safe_ids)
        return embeds.masked_scatter(is_image.unsqueeze(-1), image_embeds.to(embeds.dtype))

    def inputs_embeds(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """LM input vectors for token ids + preprocessed images (see `pixel_values`)."""
        pixels = pixel_values.to(device=input_ids.device, dtype=self.projector.fc1.weight.dtype)
        return self.merge(input_ids, self.image_embeddings(self.vision(pixels)))

    def save_pretrained(self, out_dir: Path) -> None:
        """Write the checkpoint directory (layout in the module docstring); the build job writes it
        under `atomic_path`, so a failed write leaves no half checkpoint."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(out_dir / LM_DIR, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
        save_file(_contiguous(self.vision.net.state_dict()), out_dir / VISION_FILE)
        save_file(_contiguous(self.projector.state_dict()), out_dir / PROJECTOR_FILE)
        (out_dir / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, path: Path, dtype: torch.dtype = torch.float32) -> "EmbeddedMLLM":
        """Load a checkpoint directory written by `save_pretrained`; fails on any missing weight."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        config = EmbeddedConfig.from_json(path / CONFIG_FILE)
        tokenizer = AutoTokenizer.from_pretrained(path / TOKENIZER_DIR)
        image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if image_token_id != config.image_token_id:
            raise ValueError(f"{path / TOKENIZER_DIR}: {IMAGE_TOKEN} is id {image_token_id}, config says {config.image_token_id}")
        lm, info = AutoModelForCausalLM.from_pretrained(path / LM_DIR, dtype=dtype, output_loading_info=True)
        if info["missing_keys"]:
            raise ValueError(f"{path / LM_DIR}: missing weights {sorted(info['missing_keys'])}")
        vision = PatchEncoder()
        vision.net.load_state_dict(load_file(path / VISION_FILE), strict=True)
        projector = Projector(config.vision_feature_dim, config.projector_hidden_size, config.lm_hidden_size)
        projector.load_state_dict(load_file(path / PROJECTOR_FILE), strict=True)
        model = cls(config, vision, projector, lm, tokenizer).to(dtype)
        return model.eval()


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


@dataclass(frozen=True)
class PreparedBatch:
    """Token ids (batch, T) and normalised pixels (batch, 3, 224, 224) of one batch."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    question_last_from_end: int | None  # None: the image pass (cut after the last image token)


class EmbeddedAdapter(PreparingAdapter):
    """`ModelAdapter` for the embedded model: one forward pass, per-layer vectors kept by hooks."""

    def __init__(self, model: EmbeddedMLLM, info: ModelInfo) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.info = info
        answer_ids = answer_token_ids(model.tokenizer)
        self._answer_ids = [answer_ids[word] for word in ANSWER_WORDS]
        self.blocks = find_decoder_layers(model.lm)
        self.readout = AnswerReadout(*causal_lm_parts(model.lm), self._answer_ids, logit_softcap(model.lm))
        self.extra_metadata = {"readout_rule": READOUT_RULE}
        self.vision = load_vision_tower(model, vision_facts_for(MODEL_TYPE))

    def render_prompt(self, question: str, before_image: str = "") -> str:
        return self.model.render_prompt(question, before_image)

    def layout(self, question: str, before_image: str = "") -> PromptLayout:
        return prompt_layout(self.model.tokenizer, self.render_prompt(question, before_image), question,
                             self.model.config.image_token_id)

    def prepare(self, images: Sequence[Image.Image], question: str, image_only: bool = False,
                before_image: str = "") -> PreparedBatch:
        """The CPU part of a forward (template, tokenizer, image resize); thread-safe, so
        extraction can prepare the next batch while the model runs this one."""
        layout = self.layout(question, before_image)
        # Same question and a fixed number of image tokens for every sample: no padding.
        ids = torch.tensor([layout.ids], dtype=torch.long)
        if image_only:
            ids = ids[:, : layout.image_last + 1]
        return PreparedBatch(
            ids.repeat(len(images), 1),
            self.model.pixel_values(images),
            None if image_only else layout.from_end(layout.question_last),
        )

    @torch.no_grad()
    def forward_prepared(
        self, prepared: PreparedBatch, layers: Sequence[int], positions: Sequence[str], vision_layers: Sequence[int] = ()
    ) -> BatchVectors:
        """`forward` on the output of `prepare`, keeping the EfficientNet stages `vision_layers` too;
        no answer probabilities for the image pass."""
        image_only = prepared.question_last_from_end is None
        check_positions(positions, image_only)
        check_vision_request(self.vision, vision_layers, self.info.architecture)
        model = self.model
        device = next(model.parameters()).device
        # The prompt pass always keeps `last` at every layer: the answer readout reads it.
        kept = positions if image_only or "last" in positions else [*positions, "last"]
        capture = LayerCapture(self.blocks, layers, kept)
        input_ids = prepared.input_ids.to(device)
        attention_mask = torch.ones_like(input_ids)
        image_mask = input_ids == model.config.image_token_id
        last = last_token_index(attention_mask)
        capture.set_batch(last, image_mask, None if image_only else last - prepared.question_last_from_end)
        vision = self.vision.capture(vision_layers, input_ids.shape[0], {}, None) if vision_layers else None
        with capture.attached(), vision.attached() if vision else nullcontext():
            inputs_embeds = model.inputs_embeds(input_ids, prepared.pixel_values)
            out = model.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        if image_only:
            return image_pass_vectors(capture.vectors(), image_mask, vision)
        probs = out.logits[:, -1, :].float().softmax(dim=-1).cpu()
        # Same scoring as the HF adapters: a word's probability is the max over its spellings.
        answer_probs = torch.stack([probs[:, ids].max(dim=1).values for ids in self._answer_ids], dim=1)
        return BatchVectors(
            vectors=capture.vectors(positions),
            answer_probs=answer_probs.numpy().astype(np.float32),
            n_image_tokens=image_mask.sum(dim=1).cpu().numpy().astype(np.int32),
            readout=self.readout.log_probs(capture.states("last")).cpu().numpy(),
            vision=vision.vectors() if vision else None,
        )

    def prefix_pass(self, images: Sequence[Image.Image], questions: Sequence[str],
                    keep: Sequence[int] | None = None, image_layers: Sequence[int] = (),
                    vision_layers: Sequence[int] = ()) -> "EmbeddedPrefixRun":
        """Run the tokens every question's prompt shares (the image among them) once, with a KV cache;
        keep[q]: the tokens at the end of question q's prompt that must run after the prefix (default 1).
        image_layers / vision_layers: also keep the image positions and the vision layers of this
        forward, as the image pass does (`EmbeddedPrefixRun.image`)."""
        from stagelens.patching import shared_prefix_length

        model = self.model
        device = next(model.parameters()).device
        ids = [model.tokenizer(self.render_prompt(q), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
               for q in questions]
        shared = shared_prefix_length([x.tolist() for x in ids])
        image_end = int((ids[0] == model.config.image_token_id).nonzero().max()) + 1
        shared = min(shared, *(len(x) - k for x, k in zip(ids, keep or [1] * len(ids))))
        if shared < image_end:
            raise ValueError(f"the prompts differ before the end of the image tokens (token {shared} < {image_end})")
        n = len(images)
        prefix = ids[0][:shared].unsqueeze(0).repeat(n, 1).to(device)
        image_mask = prefix == model.config.image_token_id
        check_vision_request(self.vision, vision_layers, self.info.architecture)
        capture = LayerCapture(self.blocks, image_layers, IMAGE_POSITIONS) if image_layers else None
        if capture is not None:
            capture.set_batch(torch.full((n,), shared - 1, dtype=torch.long, device=device), image_mask)
        vision = self.vision.capture(vision_layers, n, {}, None) if vision_layers else None
        with torch.no_grad(), capture.attached() if capture else nullcontext(), vision.attached() if vision else nullcontext():
            embeds = model.inputs_embeds(prefix, model.pixel_values(images))
            out = model.lm(inputs_embeds=embeds, attention_mask=torch.ones_like(prefix), use_cache=True, logits_to_keep=1)
        suffixes = [x[shared:].unsqueeze(0).repeat(n, 1) for x in ids]
        image_tokens = image_mask.sum(dim=1).cpu()
        image = None
        if capture is not None or vision is not None:
            image = image_pass_vectors(capture.vectors() if capture is not None else {}, image_mask, vision)
        return EmbeddedPrefixRun(model.lm, out.past_key_values, shared, suffixes, self._answer_ids, image_tokens, image)


@dataclass
class EmbeddedPrefixRun:
    """The LM's KV cache after the shared prefix; continues any suffix from it (see stagelens.patching)."""

    lm: nn.Module
    cache: object
    prefix_length: int
    suffix_ids: list[torch.Tensor]
    answer_ids: list[list[int]]  # per ANSWER_WORDS entry, its spellings' token ids
    image_tokens: torch.Tensor  # (batch,) image tokens in each row's prefix
    image: BatchVectors | None = None  # the image positions and vision layers, where asked for

    @torch.no_grad()
    def continue_with(self, suffix_ids: torch.Tensor, repeat: int) -> Continuation:
        cache = copy.deepcopy(self.cache)  # the forward appends to its cache; the prefix is reused
        if repeat > 1:
            cache.batch_repeat_interleave(repeat)
        device = next(self.lm.parameters()).device
        ids = suffix_ids.repeat_interleave(repeat, dim=0).to(device)
        mask = torch.ones(ids.shape[0], self.prefix_length + ids.shape[1], dtype=torch.long, device=device)
        logits = self.lm(input_ids=ids, past_key_values=cache, attention_mask=mask, use_cache=True, logits_to_keep=1).logits[:, -1, :]
        # The same scoring as `forward`: a word's probability is the max over its spellings.
        log_probs = logits.float().log_softmax(dim=-1)
        return Continuation(logits, torch.stack([log_probs[:, ids].max(dim=1).values for ids in self.answer_ids], dim=1))


def load_embedded_adapter(spec: ModelSpec) -> EmbeddedAdapter:
    """Loader of model_type "stagelens-embedded" checkpoints."""
    device = resolve_device(spec.device)
    model = EmbeddedMLLM.from_pretrained(Path(spec.checkpoint), dtype=torch_dtype(spec.dtype)).to(device)
    info = ModelInfo(
        model_id=spec.checkpoint,
        revision=spec.revision or "local",
        architecture=ARCHITECTURE,
        dtype=spec.dtype,
        device=device,
        num_layers=model.config.num_layers,
        hidden_size=model.config.lm_hidden_size,
    )
    return EmbeddedAdapter(model, info)
