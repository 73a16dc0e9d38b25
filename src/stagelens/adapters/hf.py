"""Adapters for Hugging Face MLLMs: every family of the architecture table, and generic image-text-to-text.

One forward pass per batch under torch.inference_mode: the processor's own chat template
renders the prompt, every key the processor returns goes to the model, decoder-block hooks
keep the requested positions, and the last position's softmax gives the answer-word
probabilities (logits_to_keep=1: no full-vocabulary logits per token). The KV cache is kept
only where an answer word starts with a whitespace-only token (Llama-2 digits), for one
cached decode step per such token.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from stagelens.adapters.architectures import ArchitectureFacts, module_at, vision_facts_for
from stagelens.adapters.base import (
    ANSWER_WORDS,
    BatchVectors,
    ModelInfo,
    PreparingAdapter,
    check_positions,
    image_pass_vectors,
)
from stagelens.adapters.layers import LayerCapture, find_decoder_layers, last_token_index, text_num_layers
from stagelens.adapters.readout import READOUT_RULE, AnswerReadout, causal_lm_parts, logit_softcap
from stagelens.adapters.residual_patch import Continuation
from stagelens.adapters.qwen_processor import load_processor, torchvision_available
from stagelens.adapters.vision import check_vision_request, load_vision_tower
from stagelens.positions import IMAGE_POSITIONS
from stagelens.prompt_layout import PromptLayout, expanded_layout
from stagelens.prompts import answer_token_paths, build_inputs, render_prompt
from stagelens.spec import ModelSpec, resolve_device, torch_dtype

# Checkpoints outside the architecture table: text models with plain 1-D RoPE get
# position_ids = cumsum(mask) - 1 under left padding (what generate() does).
_POSITION_IDS_TEXT_TYPES = ("llama", "mistral")

# The image a prompt's layout is computed with (any image gives the same counts from the end).
LAYOUT_IMAGE = Image.new("RGB", (64, 64), (128, 128, 128))

# Per-token processor outputs (batch, T): what the image pass cuts after the last image token.
_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class Prepared:
    """Processor outputs of one batch and where its question ends (tokens from the end)."""

    inputs: object  # BatchFeature
    question_last_from_end: int | None  # None: the image pass (no question tokens fed)


class HFAdapter(PreparingAdapter):
    """ModelAdapter over a transformers image-text-to-text model and its processor."""

    def __init__(
        self,
        model: nn.Module,
        processor,
        info: ModelInfo,
        image_token_id: int,
        position_ids: bool,
        processor_kwargs: dict | None = None,
        facts: ArchitectureFacts | None = None,
    ):
        self.model = model
        self.facts = facts
        # Cross-attention families (mllama) never put image features in the LM sequence.
        self.image_positions = facts.image_tokens_in_sequence if facts is not None else True
        self.nested_images = facts is not None and facts.nested_images
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._layouts: dict[str, PromptLayout] = {}
        self.info = info
        self.image_token_id = int(image_token_id)
        self.position_ids = position_ids
        self.processor_kwargs = dict(processor_kwargs or {})
        self.blocks = find_decoder_layers(model)
        # The text decoder: its position_ids input (1-D or M-RoPE) places a cached decode step.
        self.decoder = model.get_decoder()
        self.answer_paths = answer_token_paths(processor.tokenizer)
        self.answer_ids = {w: list(dict.fromkeys(p[-1] for p in ps)) for w, ps in self.answer_paths.items()}
        # Whitespace tokens that start a two-token answer path: each costs one cached decode step.
        self._prefixes = sorted({p[0] for ps in self.answer_paths.values() for p in ps if len(p) == 2})
        self._device = next(model.parameters()).device
        self._dtype = next(model.parameters()).dtype
        if facts is not None:
            norm, head = module_at(model, facts.final_norm), module_at(model, facts.unembedding)
        else:
            norm, head = causal_lm_parts(model)
        self.readout = AnswerReadout(norm, head, [self.answer_ids[w] for w in ANSWER_WORDS], logit_softcap(model))
        # The vision encoder's blocks, where its family is in architectures.VISION_TOWERS.
        vision_facts = vision_facts_for(facts.model_type) if facts is not None else None
        self.vision = load_vision_tower(model, vision_facts, model.config)

    @property
    def extra_metadata(self) -> dict[str, object]:
        """Choices recorded next to ModelInfo in every output file."""
        image_processor = getattr(self.processor, "image_processor", None)
        return {
            "processor_class": type(self.processor).__name__,
            "image_processor_class": type(image_processor).__name__,
            "image_token_id": self.image_token_id,
            "position_ids": "cumsum(attention_mask)-1" if self.position_ids else "model default",
            "answer_token_paths": {w: [list(p) for p in ps] for w, ps in self.answer_paths.items()},
            "answer_rule": "max over the token paths starting 'word' and ' word' of the next-token "
            "probability (p(ws) * p(token | ws) for a whitespace-then-token path)",
            "readout_rule": READOUT_RULE,
            **({"max_pixels": self.processor_kwargs["max_pixels"]} if "max_pixels" in self.processor_kwargs else {}),
        }

    def render_prompt(self, question: str, before_image: str = "") -> str:
        return render_prompt(self.processor, question, before_image)

    def layout(self, question: str, before_image: str = "") -> PromptLayout:
        """The layout of the processor's ids for one (grey) image: positions counted from the
        end hold for any image, and the tokens before the image run do not depend on it."""
        rendered = self.render_prompt(question, before_image)  # the key: the template may change under the adapter
        if rendered not in self._layouts:
            ids = build_inputs(self.processor, [LAYOUT_IMAGE], question, nested=self.nested_images,
                               before_image=before_image)["input_ids"][0]
            self._layouts[rendered] = expanded_layout(self.processor.tokenizer, rendered, question, ids.tolist(), self.image_token_id)
        return self._layouts[rendered]

    def build_inputs(self, images: Sequence[Image.Image], question: str):
        """Processor outputs for a batch, on the model's device, floats in the model's dtype."""
        return build_inputs(self.processor, images, question, nested=self.nested_images).to(self._device).to(self._dtype)

    def model_kwargs(self, inputs) -> dict:
        """Forward kwargs: every processor key but training labels, plus positions for 1-D RoPE LMs."""
        kwargs = {k: v for k, v in inputs.items() if k != "labels"}
        if self.position_ids:
            kwargs["position_ids"] = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        return kwargs

    def _next_probs(self, kwargs: dict, past, prompt_positions: torch.Tensor | None, token: int) -> torch.Tensor:
        """Next-token distribution after appending `token` to every prompt (one cached step).

        The step's position is the prompt's last position + 1 on every axis (1-D RoPE or
        Qwen2-VL's 3-D M-RoPE: the last prompt token is text). The cache is cropped back
        afterwards so further steps start from the prompt again.
        """
        mask = kwargs["attention_mask"]
        n = mask.shape[0]
        step = {
            "input_ids": torch.full((n, 1), token, dtype=kwargs["input_ids"].dtype, device=mask.device),
            "attention_mask": torch.cat([mask, mask.new_ones(n, 1)], dim=1),
            "past_key_values": past,
            "use_cache": True,
            "logits_to_keep": 1,
        }
        if prompt_positions is not None:
            step["position_ids"] = prompt_positions[..., -1:] + 1
        if "mm_token_type_ids" in kwargs:
            step["mm_token_type_ids"] = kwargs["mm_token_type_ids"].new_zeros(n, 1)
        logits = self.model(**step).logits[:, -1, :]
        past.crop(-1)  # drop the appended token again
        return logits.float().softmax(dim=-1)

    def _answer_probs(self, logits: torch.Tensor, kwargs: dict, past, positions: torch.Tensor | None) -> torch.Tensor:
        """(batch, len(ANSWER_WORDS)): per word the max over its token paths; a whitespace-then-token
        path costs one cached decode step (see `_next_probs`)."""
        probs = {(): logits.float().softmax(dim=-1)}
        for prefix in self._prefixes:
            step = self._next_probs(kwargs, past, positions, prefix)
            probs[(prefix,)] = probs[()][:, prefix : prefix + 1] * step
        return torch.stack(
            [
                torch.stack([probs[path[:-1]][:, path[-1]] for path in self.answer_paths[w]], dim=1).max(dim=1).values
                for w in ANSWER_WORDS
            ],
            dim=1,
        )

    def prefix_pass(self, images: Sequence[Image.Image], questions: Sequence[str],
                    keep: Sequence[int] | None = None, image_layers: Sequence[int] = (),
                    vision_layers: Sequence[int] = ()) -> "HFPrefixRun":
        """Run the columns every question's (left-padded) prompt shares, the image among them, once
        with a KV cache. Left padding pads a row by the same amount under every question (the
        image tokens differ per row, the text per question), so the prompts' columns line up.
        keep[q]: the columns at the end of question q's prompt that must run after the prefix (default 1).
        image_layers / vision_layers: also keep the image positions and the vision layers of this
        forward, as the image pass does (`HFPrefixRun.image`)."""
        from stagelens.patching import shared_prefix_length

        inputs = [self.prepare(images, q).inputs.to(self._device).to(self._dtype) for q in questions]
        ids = [x["input_ids"] for x in inputs]
        columns = [[tuple(col) for col in t.T.tolist()] for t in ids]
        shared = shared_prefix_length(columns)
        image_cols = (ids[0] == self.image_token_id).any(dim=0).nonzero()
        image_end = int(image_cols.max()) + 1 if len(image_cols) else 0
        shared = min(shared, *(t.shape[1] - k for t, k in zip(ids, keep or [1] * len(ids))))
        if shared < image_end:
            raise ValueError(f"the prompts differ before the end of the image tokens (column {shared} < {image_end})")
        prefix = {
            key: value[:, :shared] if key in ("input_ids", "attention_mask", "mm_token_type_ids") else value
            for key, value in inputs[0].items()
        }
        kwargs = self.model_kwargs(prefix)
        seen: dict[str, torch.Tensor | None] = {}

        def keep_positions(_module, _args, module_kwargs):
            seen["positions"] = module_kwargs.get("position_ids")

        if image_layers and not self.image_positions:
            raise ValueError(f"the image positions of {self.info.architecture} cannot be read: its image enters the "
                             "language model through cross-attention")
        image_mask = prefix["input_ids"] == self.image_token_id if self.image_positions else None
        check_vision_request(self.vision, vision_layers, self.info.architecture)
        capture = LayerCapture(self.blocks, image_layers, IMAGE_POSITIONS) if image_layers else None
        if capture is not None:
            capture.set_batch(last_token_index(prefix["attention_mask"]), image_mask)
        vision = self.vision.capture(vision_layers, len(images), prefix, self.model.config) if vision_layers else None
        handle = self.decoder.register_forward_pre_hook(keep_positions, with_kwargs=True)
        try:
            with torch.no_grad(), capture.attached() if capture else nullcontext(), \
                    vision.attached() if vision else nullcontext():
                out = self.model(**kwargs, use_cache=True, logits_to_keep=1)
        finally:
            handle.remove()
        positions = seen.get("positions")
        if positions is None:
            positions = (prefix["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
        if image_mask is None:  # cross-attention: no image token in the sequence
            image_mask = torch.zeros_like(prefix["input_ids"], dtype=torch.bool)
        image_tokens = image_mask.sum(dim=1).cpu()
        image = None
        if capture is not None or vision is not None:
            image = image_pass_vectors(capture.vectors() if capture is not None else {}, image_mask, vision)
        return HFPrefixRun(self, out.past_key_values, prefix["attention_mask"], positions[..., -1:],
                           "mm_token_type_ids" in prefix, shared, [t[:, shared:] for t in ids], image_tokens, image)

    def prepare(self, images: Sequence[Image.Image], question: str, image_only: bool = False,
                before_image: str = "") -> Prepared:
        """The CPU part of a forward (chat template, tokenizer, image processor); thread-safe,
        so extraction can prepare the next batch while the model runs this one. image_only:
        every per-token input is cut after the last image token (left padding puts it at the
        same column in every row: the text after it is the same for all)."""
        inputs = build_inputs(self.processor, images, question, nested=self.nested_images, before_image=before_image)
        layout = self.layout(question, before_image)
        if not image_only:
            return Prepared(inputs, layout.from_end(layout.question_last))
        keep = inputs["input_ids"].shape[1] - layout.from_end(layout.image_last)
        for key in _TOKEN_KEYS:
            if key in inputs:
                inputs[key] = inputs[key][:, :keep]
        if bool((inputs["input_ids"][:, -1] != self.image_token_id).any()):
            raise RuntimeError("the image pass must end at the last image token of every row")
        return Prepared(inputs, None)

    def forward_prepared(
        self, prepared: Prepared, layers: Sequence[int], positions: Sequence[str], vision_layers: Sequence[int] = ()
    ) -> BatchVectors:
        """`forward` on the output of `prepare`, keeping the vision encoder's `vision_layers` too;
        no answer probabilities for the image pass."""
        image_only = prepared.question_last_from_end is None
        check_positions(positions, image_only)
        check_vision_request(self.vision, vision_layers, self.info.architecture)
        inputs = prepared.inputs.to(self._device).to(self._dtype)
        mask = inputs["attention_mask"]
        last = last_token_index(mask)
        if bool((last != mask.shape[1] - 1).any()):
            raise RuntimeError("prompts are not left-padded: the last token must be at index T-1")
        if not self.image_positions and "image_mean" in positions:
            raise ValueError(
                f"position 'image_mean' is unavailable for {self.info.architecture}: its image features enter "
                "the language model through cross-attention, so no token of the LM sequence holds the image; "
                "use position 'last'"
            )
        if self.image_positions:
            image_mask = inputs["input_ids"] == self.image_token_id
        else:
            image_mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
        # The prompt pass always keeps `last` at every layer: the answer readout reads it.
        kept = positions if image_only or "last" in positions else [*positions, "last"]
        capture = LayerCapture(self.blocks, layers, kept)
        capture.set_batch(last, image_mask, None if image_only else last - prepared.question_last_from_end)
        kwargs = self.model_kwargs(inputs)
        vision = self.vision.capture(vision_layers, mask.shape[0], inputs, self.model.config) if vision_layers else None
        if image_only:
            with torch.inference_mode(), capture.attached(), vision.attached() if vision else nullcontext():
                self.model(**kwargs, logits_to_keep=1, use_cache=False)
            return image_pass_vectors(capture.vectors(), image_mask, vision)
        seen: dict[str, torch.Tensor | None] = {}

        def keep_positions(_module, _args, module_kwargs):
            seen["positions"] = module_kwargs.get("position_ids")

        with torch.inference_mode():
            with capture.attached(), vision.attached() if vision else nullcontext():
                handle = self.decoder.register_forward_pre_hook(keep_positions, with_kwargs=True) if self._prefixes else None
                try:
                    out = self.model(**kwargs, logits_to_keep=1, use_cache=bool(self._prefixes))
                finally:
                    if handle is not None:
                        handle.remove()
            answer = self._answer_probs(out.logits[:, -1, :], kwargs, out.past_key_values, seen.get("positions"))
            readout = self.readout.log_probs(capture.states("last"))
        return BatchVectors(
            vectors=capture.vectors(positions),
            answer_probs=answer.cpu().numpy().astype(np.float32),
            n_image_tokens=image_mask.sum(dim=1).cpu().numpy().astype(np.int32),
            readout=readout.cpu().numpy(),
            vision=vision.vectors() if vision else None,
        )


@dataclass
class HFPrefixRun:
    """The KV cache after the shared prefix; continues any suffix from it (see stagelens.patching).

    A suffix token's position is the prefix's last position + its offset on every axis (1-D RoPE,
    or M-RoPE whose prompt ends in text), as in `HFAdapter._next_probs`.
    """

    adapter: HFAdapter
    cache: object
    mask: torch.Tensor  # (batch, prefix) attention mask of the prefix
    last_position: torch.Tensor  # (..., batch, 1) position of the prefix's last column
    token_types: bool  # the model takes mm_token_type_ids
    prefix_length: int
    suffix_ids: list[torch.Tensor]
    image_tokens: torch.Tensor  # (batch,) image tokens in each row's prefix
    image: BatchVectors | None = None  # the image positions and vision layers, where asked for

    @torch.no_grad()
    def continue_with(self, suffix_ids: torch.Tensor, repeat: int) -> Continuation:
        cache = copy.deepcopy(self.cache)  # the forward appends to its cache; the prefix is reused
        if repeat > 1:
            cache.batch_repeat_interleave(repeat)
        ids = suffix_ids.repeat_interleave(repeat, dim=0).to(self.mask.device)
        rows, length = ids.shape
        mask = torch.cat([self.mask.repeat_interleave(repeat, dim=0), self.mask.new_ones(rows, length)], dim=1)
        offsets = torch.arange(1, length + 1, device=ids.device)
        positions = self.last_position.repeat_interleave(repeat, dim=-2) + offsets
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if self.token_types:
            kwargs["mm_token_type_ids"] = ids.new_zeros(rows, length)
        out = self.adapter.model(**kwargs, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]
        probs = self.adapter._answer_probs(logits, kwargs, out.past_key_values, positions)
        return Continuation(logits, probs.log())


def resolve_revision(model_path: str, revision: str | None) -> str:
    """The commit hash the files came from where the hub cache tells it, else the requested revision.

    Hub files resolve to `.../snapshots/<commit>/config.json`; a plain local directory does not.
    """
    from transformers.utils import cached_file

    resolved = Path(cached_file(model_path, "config.json", revision=revision))
    if "snapshots" in resolved.parts[:-1]:
        return resolved.parts[resolved.parts.index("snapshots") + 1]
    return str(revision or "main")


def _load_processor(facts: ArchitectureFacts | None, spec: ModelSpec):
    return load_processor(
        spec.checkpoint,
        facts.processor_class if facts is not None else None,
        image_only=facts is not None and facts.image_only_processor,
        revision=spec.revision,
        max_pixels=spec.max_pixels,
        trust_remote_code=spec.trust_remote_code,
        pil_twin=facts.pil_twin if facts is not None else (),
    )


def check_supported(facts: ArchitectureFacts | None, model_path: str) -> None:
    """Raise, before any weight is read, for a family stagelens cannot read here."""
    if facts is None:
        return
    if facts.unsupported:
        raise ValueError(f"{model_path}: model_type {facts.model_type!r} is not supported: {facts.unsupported}")
    if facts.needs_torchvision and not torchvision_available():
        raise ValueError(
            f"{model_path}: model_type {facts.model_type!r} needs torchvision ({facts.needs_torchvision}) and "
            "torchvision is not importable here; install the torchvision build matching torch"
        )


def load_hf_adapter(spec: ModelSpec, facts: ArchitectureFacts | None = None) -> HFAdapter:
    """Load model + processor of a family of the architecture table (None: a checkpoint outside
    it, through AutoModelForImageTextToText) and wrap them.

    Fails on missing weights: transformers would silently random-initialise them.
    """
    model_path, revision = spec.checkpoint, spec.revision
    dtype = torch_dtype(spec.dtype)
    device = resolve_device(spec.device)
    max_pixels = spec.max_pixels
    check_supported(facts, model_path)
    if facts is not None and not facts.image_tokens_in_sequence and "image_mean" in spec.positions:
        raise ValueError(
            f"{spec.name}: position 'image_mean' is unavailable for model_type {facts.model_type!r}: its image "
            "features enter the language model through cross-attention, so no token of the LM sequence holds "
            "the image; set positions: [last]"
        )
    if max_pixels is not None and facts is not None and not facts.max_pixels:
        raise ValueError(f"max_pixels is set for {model_path!r}, but only Qwen2-VL-style processors use it")

    import transformers

    model_class = getattr(transformers, facts.model_class if facts is not None else "AutoModelForImageTextToText")
    model, loading = model_class.from_pretrained(
        model_path,
        revision=revision,
        dtype=dtype,
        trust_remote_code=spec.trust_remote_code,
        output_loading_info=True,
        device_map=device,
    )
    if loading.get("missing_keys"):
        missing = sorted(loading["missing_keys"])
        raise ValueError(
            f"{model_path}: {len(missing)} weights missing from the checkpoint (they would be random): "
            f"{missing[:10]}{' ...' if len(missing) > 10 else ''}"
        )
    model.eval()
    processor = _load_processor(facts, spec)

    text_config = model.config.get_text_config()
    if facts is not None:
        position_ids = facts.position_ids
    else:
        position_ids = text_config.model_type in _POSITION_IDS_TEXT_TYPES
    image_token_id = getattr(model.config, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(model.config, "image_token_index", None)
    if image_token_id is None:
        raise ValueError(f"{model_path}: config has no image_token_id / image_token_index")
    num_layers = text_num_layers(model)
    info = ModelInfo(
        model_id=str(model_path),
        revision=resolve_revision(model_path, revision),
        architecture=type(model).__name__,
        dtype=str(model.dtype).removeprefix("torch."),
        device=device,
        num_layers=int(num_layers if num_layers is not None else len(find_decoder_layers(model))),
        hidden_size=int(text_config.hidden_size),
    )
    processor_kwargs = {} if max_pixels is None else {"max_pixels": int(max_pixels)}
    return HFAdapter(model, processor, info, image_token_id, position_ids, processor_kwargs, facts)
