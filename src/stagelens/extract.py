"""Stream one split of the manifest through a model once and write every layer's embedding file.

Two passes per model x split: `extract` runs one prompt and keeps the prompt-dependent
positions (and the model's answers); `extract_image` runs the tokens up to the last image token
once and keeps the image positions, which no prompt without text before the image can change
(every such prompt renders to the same ids up to the last image token: checked per prompt,
`image_prefix_problem`). A prompt that declares text before the image (`before_image`) changes
its image tokens: its own pass keeps the image positions too.
One forward pass per batch yields all layers; each layer's vectors go to their own Parquet
writer, the model's answer-word probabilities to the answers file, and (prompt pass) the answer
readout per layer (the model's final norm and unembedding on each layer's last-token state,
stagelens.adapters.readout) to the readout file. Outputs appear only after
the last batch (temporary files + os.replace); any exception removes the temporary files.
Memory stays flat in the number of images: images are opened per batch and the writers flush
bounded row groups.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from stagelens import __version__
from stagelens.adapters.base import (
    ANSWER_WORDS,
    IMAGE_POSITIONS,
    OPPOSITE,
    WORD_SPELLINGS,
    POSITIONS,
    PROMPT_POSITIONS,
    BatchVectors,
    LayerConvention,
    ModelAdapter,
    PreparingAdapter,
)
from stagelens.image_sources import ImageRef, describe, read_image_source
from stagelens.finite import check_finite
from stagelens.positions import has_text_before_image
from stagelens.prompt_layout import IMAGE_PASS_QUESTION, shared_image_prefix_problem
from stagelens.images import ImageDecodeError, open_rgb
from stagelens.spec import ModelSpec, vector_dtype_problem
from stagelens.store import METADATA_KEY, EmbeddingWriter, ParquetStreamWriter, answer_readout_schema, answers_schema

MARGIN_RULE = ("log P(expected) - log P(opposite) (yes/no, 1/0), each the sum of its spellings' probabilities "
               "(case variants), from the layer's readout")


@dataclass(frozen=True)
class Sample:
    """One manifest row as extraction needs it."""

    sample_id: str
    label: int
    path: str  # the image file, or the Parquet/Arrow file holding it at `row`
    row: int | None = None
    column: str | None = None

    @property
    def image(self) -> ImageRef:
        return ImageRef(self.path, self.row, self.column)


def read_split(manifest_path: str | os.PathLike, split: str, image_root: str | os.PathLike | None = None) -> list[Sample]:
    """The manifest rows of one split, in manifest order; relative paths resolved against image_root."""
    file = pq.ParquetFile(manifest_path)
    columns = ["sample_id", "split", "label", "path"] + (["row"] if "row" in file.schema_arrow.names else [])
    rows = [r for r in file.read(columns=columns).to_pylist() if r["split"] == split]
    if not rows:
        raise ValueError(f"{manifest_path}: no rows with split == {split!r}")
    column = json.loads((file.schema_arrow.metadata or {}).get(METADATA_KEY, b"{}")).get("image_column")
    root = Path(image_root) if image_root is not None else None
    return [
        Sample(
            r["sample_id"],
            int(r["label"]),
            str(root / r["path"]) if root and not os.path.isabs(r["path"]) else r["path"],
            r.get("row"),
            column if r.get("row") is not None else None,
        )
        for r in rows
    ]


def load_image(ref: ImageRef | str) -> Image.Image:
    """The image as the model sees it (stagelens.images.open_rgb), from a file or a Parquet/Arrow
    row; errors name the file (and row)."""
    ref = ImageRef(ref) if isinstance(ref, str) else ref
    try:
        return open_rgb(read_image_source(ref))
    except ImageDecodeError as err:
        raise ImageDecodeError(f"cannot read image {describe(ref)}: {err}") from err


def batches(samples: Sequence[Sample], batch_size: int) -> Iterator[Sequence[Sample]]:
    for start in range(0, len(samples), batch_size):
        yield samples[start : start + batch_size]


def _run_batches(
    adapter: ModelAdapter,
    samples: Sequence[Sample],
    batch_size: int,
    prompt: Mapping[str, str] | None,
    layers,
    positions,
    vision_layers: Sequence[int] = (),
) -> Iterator[tuple[Sequence[Sample], BatchVectors]]:
    """(batch, forward output) per batch; prompt None: the image pass (with `vision_layers`).

    A `PreparingAdapter` gets the next batch's images read and processed in a worker thread
    while the model runs the current one (one batch ahead, so memory stays bounded); other
    adapters are called through `forward` / `forward_image`.
    """
    chunks = list(batches(samples, batch_size))
    before = prompt.get("before_image", "") if prompt is not None else ""
    if not isinstance(adapter, PreparingAdapter):
        for batch in chunks:
            images = [load_image(s.image) for s in batch]
            if prompt is None:
                yield batch, adapter.forward_image(images, layers, vision_layers)
            else:
                yield batch, adapter.forward(images, prompt["text"], layers, positions, before_image=before)
        return

    def prepare(batch: Sequence[Sample]):
        images = [load_image(s.image) for s in batch]
        if prompt is None:
            return adapter.prepare(images, IMAGE_PASS_QUESTION, image_only=True)
        return adapter.prepare(images, prompt["text"], before_image=before)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stagelens-prepare") as pool:
        pending = pool.submit(prepare, chunks[0])
        try:
            for i, batch in enumerate(chunks):
                prepared = pending.result()
                if i + 1 < len(chunks):
                    pending = pool.submit(prepare, chunks[i + 1])
                yield batch, adapter.forward_prepared(prepared, layers, positions, vision_layers)
        finally:
            pending.cancel()


def versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "stagelens_version": __version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
    }


def run_metadata(
    adapter: ModelAdapter, model_name: str, prompt: Mapping[str, str] | None, split: str, positions: Sequence[str]
) -> dict[str, object]:
    """Metadata shared by every file of one extraction (the layer is added per file); prompt
    None: the image pass, which records the tokens it fed instead."""
    info = adapter.info
    return {
        "model_id": info.model_id,
        "model_name": model_name,
        "revision": info.revision,
        "architecture": info.architecture,
        "dtype": info.dtype,
        "device": info.device,
        "num_layers": info.num_layers,
        "hidden_size": info.hidden_size,
        "layer_convention": LayerConvention().description,
        **(_prompt_metadata(adapter, prompt) if prompt is not None else _image_pass_metadata(adapter)),
        "split": split,
        "positions": list(positions),
        "answer_words": list(ANSWER_WORDS),
        "adapter": dict(getattr(adapter, "extra_metadata", {}) or {}),
        **versions(),
    }


def _prompt_metadata(adapter: ModelAdapter, prompt: Mapping[str, str]) -> dict[str, object]:
    layout = adapter.layout(prompt["text"], prompt.get("before_image", ""))
    return {
        "pass": "prompt",
        "prompt_id": prompt["id"],
        "prompt_family": prompt.get("family"),
        "prompt_text": prompt["text"],
        "prompt_before_image": prompt.get("before_image", ""),
        "prompt_expected": prompt.get("expected"),
        "rendered_prompt": layout.text,
        "question_last_from_end": layout.from_end(layout.question_last),
    }


def _image_pass_metadata(adapter: ModelAdapter) -> dict[str, object]:
    layout = adapter.layout(IMAGE_PASS_QUESTION)
    return {
        "pass": "image",
        "prompt_id": None,
        "image_prefix_ids": list(layout.image_prefix),
        "rendered_prompt": layout.text,
        "image_pass_rule": "tokens up to and including the last image token of the rendered prompt; "
        "every prompt renders to the same ids there (checked by each prompt's extraction)",
    }


def image_prefix_problem(adapter: ModelAdapter, prompt: Mapping[str, str]) -> str | None:
    """Why `prompt`'s image tokens would differ from the image pass's (None: they cannot)."""
    return shared_image_prefix_problem(
        adapter.layout(prompt["text"], prompt.get("before_image", "")), adapter.layout(IMAGE_PASS_QUESTION),
        getattr(adapter, "tokenizer", None),
    )


def check_request(adapter: ModelAdapter, spec: ModelSpec, layers: Sequence[int], embedding_paths: Sequence[str | os.PathLike]) -> None:
    """Clear errors for a config that does not fit the model, before any work is done."""
    actual = adapter.info.num_layers
    if spec.num_layers is not None and spec.num_layers != actual:
        raise ValueError(
            f"models.{spec.name}.num_layers is {spec.num_layers} in the config, but {adapter.info.model_id} "
            f"has {actual} decoder blocks: set num_layers: {actual}"
        )
    bad = [layer for layer in layers if not 0 <= int(layer) <= actual]
    if bad:
        raise ValueError(f"models.{spec.name}.layers {bad} out of range 0..{actual}")
    unknown = [p for p in spec.positions if p not in POSITIONS]
    if unknown:
        raise ValueError(f"models.{spec.name}.positions: unknown {unknown}; known: {list(POSITIONS)}")
    if not any(p in PROMPT_POSITIONS for p in spec.positions):
        raise ValueError(f"models.{spec.name}.positions: at least one of {list(PROMPT_POSITIONS)} is needed (got {list(spec.positions)})")
    problem = vector_dtype_problem(spec.vector_dtype, adapter.info.dtype)
    if problem:
        raise ValueError(f"models.{spec.name}.vector_dtype: {problem} ({adapter.info.model_id})")
    if len(embedding_paths) != len(layers):
        raise ValueError(f"{len(embedding_paths)} embedding paths for {len(layers)} layers")


def prompt_positions(spec: ModelSpec, prompt: Mapping[str, str] | None = None) -> list[str]:
    """The positions a prompt's files hold: the configured prompt-dependent ones, and the image
    positions too for a prompt with text before the image (its image tokens are its own)."""
    own_image = prompt is not None and has_text_before_image(prompt)
    return [p for p in spec.positions if p in PROMPT_POSITIONS or own_image]


def image_positions(spec: ModelSpec) -> list[str]:
    """The positions the image pass's files hold: the configured image positions."""
    return [p for p in spec.positions if p in IMAGE_POSITIONS]


def extract(
    adapter: ModelAdapter,
    spec: ModelSpec,
    samples: Sequence[Sample],
    prompt: Mapping[str, str],
    embedding_paths: Sequence[str | os.PathLike],
    answers_path: str | os.PathLike,
    *,
    split: str,
    readout_path: str | os.PathLike | None = None,
    progress: bool = True,
    image_paths: Sequence[str | os.PathLike] = (),
    vision_paths: Sequence[str | os.PathLike] = (),
) -> dict[str, object]:
    """Write embedding_paths[i] (layer i of `spec`'s layers; the prompt-dependent positions),
    answers_path and (where given) readout_path, the answer readout per image x layer, for
    `samples` under `prompt`; with image_paths (and vision_paths), also the image pass's files
    (`extract_image`) from the same forward, whose tokens up to the last image token are the
    image pass's (models.<m>.share_prefix: no separate image pass).

    prompt: {"id", "text", "family", "expected"} and optionally "before_image" (text put before
    the image: the image positions are then read here too, from this prompt's own forward pass).
    A prompt without it whose tokens before the last image token differ from the image pass's is
    refused (its image tokens would depend on it, so the shared image readout would not be its
    own). Returns a small summary (rows, seconds).
    """
    layers = spec.layers_of(adapter.info.num_layers)
    check_request(adapter, spec, layers, embedding_paths)
    _check_image_prefix(adapter, spec, prompt)
    vision = _folded_image_request(adapter, spec, prompt, layers, image_paths, vision_paths)
    return _write_pass(adapter, spec, samples, prompt, prompt_positions(spec, prompt), layers, embedding_paths,
                       answers_path, readout_path, split, progress, vision, image_paths)


def _folded_image_request(adapter: ModelAdapter, spec: ModelSpec, prompt: Mapping[str, str], layers: Sequence[int],
                          image_paths: Sequence[str | os.PathLike], vision_paths: Sequence[str | os.PathLike]) -> VisionRequest | None:
    """Clear errors for image-pass files asked of a prompt pass; returns the vision request (None: none)."""
    if not image_paths:
        if vision_paths:
            raise ValueError("vision layers are written with the image positions' files: pass image_paths too")
        return None
    if has_text_before_image(prompt):
        raise ValueError(f"prompt {prompt['id']!r} puts text before the image: its image tokens are its own, "
                         "not the image pass's")
    if not image_positions(spec):
        raise ValueError(f"models.{spec.name}.positions has no image position ({list(IMAGE_POSITIONS)}): "
                         "no image-pass files to write")
    check_request(adapter, spec, layers, image_paths)
    return VisionRequest.of(adapter, spec, vision_paths)


def _check_image_prefix(adapter: ModelAdapter, spec: ModelSpec, prompt: Mapping[str, str]) -> None:
    """Refuse a prompt whose image tokens would differ from the image pass's (see `extract`)."""
    if image_positions(spec) and not has_text_before_image(prompt):
        problem = image_prefix_problem(adapter, prompt)
        if problem:
            raise ValueError(
                f"prompt {prompt['id']!r} under model {spec.name!r}: {problem}. stagelens reads the image "
                f"positions {image_positions(spec)} once per image, before any question, for every prompt "
                "without text before the image. If this prompt puts text before the image, declare it with "
                "the prompt's `before_image` key (its image tokens are then read per prompt); if the "
                "differing text is the chat template's own, prompt-dependent text, drop "
                f"{image_positions(spec)} from models.{spec.name}.positions"
            )


def extract_image(
    adapter: ModelAdapter,
    spec: ModelSpec,
    samples: Sequence[Sample],
    embedding_paths: Sequence[str | os.PathLike],
    *,
    split: str,
    vision_paths: Sequence[str | os.PathLike] = (),
    progress: bool = True,
) -> dict[str, object]:
    """The image pass: write embedding_paths[i] (layer i of `spec`'s layers; the image positions)
    from the tokens up to the last image token, which every prompt shares, and vision_paths[j]
    (vision layer j of `spec`'s vision layers: the vision encoder's patch mean and CLS per image)."""
    layers = spec.layers_of(adapter.info.num_layers)
    check_request(adapter, spec, layers, embedding_paths)
    positions = image_positions(spec)
    if not positions:
        raise ValueError(f"models.{spec.name}.positions has no image position ({list(IMAGE_POSITIONS)}): no image pass to run")
    vision = VisionRequest.of(adapter, spec, vision_paths)
    return _write_pass(adapter, spec, samples, None, positions, layers, embedding_paths, None, None, split, progress,
                       vision)


@dataclass(frozen=True)
class VisionRequest:
    """The vision layers an image pass keeps and the files they go to."""

    layers: list[int]
    paths: list[str | os.PathLike]
    positions: tuple[str, ...]
    metadata: dict[str, object]

    @classmethod
    def of(cls, adapter: ModelAdapter, spec: ModelSpec, paths: Sequence[str | os.PathLike]) -> "VisionRequest | None":
        """The request `spec` makes of the adapter's vision tower (None: none), with clear errors."""
        layers = spec.vision_layers_of()
        if len(paths) != len(layers):
            raise ValueError(f"{len(paths)} vision embedding paths for {len(layers)} vision layers")
        if not layers:
            return None
        tower = getattr(adapter, "vision", None)
        if tower is None:
            raise ValueError(f"models.{spec.name}.vision_num_layers is set, but the vision layers of "
                             f"{adapter.info.architecture} cannot be read here (no entry in "
                             "stagelens.adapters.architectures.VISION_TOWERS): set vision_num_layers: null")
        if spec.vision_num_layers != tower.num_layers:
            raise ValueError(f"models.{spec.name}.vision_num_layers is {spec.vision_num_layers} in the config, but "
                             f"{adapter.info.model_id}'s vision encoder has {tower.num_layers} blocks: set "
                             f"vision_num_layers: {tower.num_layers}")
        return cls(layers, list(paths), tower.positions, {**tower.metadata(), "num_layers": tower.num_layers})


class _PassFiles:
    """The files of one pass (a prompt's, or the image pass's) and how a batch's output enters them:
    embeddings per layer, and for a prompt its answers and readout; for an image pass with vision
    layers, their files, each created at the first batch, which gives the layer's width."""

    def __init__(self, adapter: ModelAdapter, spec: ModelSpec, prompt: Mapping[str, str] | None,
                 positions: list[str], layers: list[int], embedding_paths: Sequence[str | os.PathLike],
                 answers_path: str | os.PathLike | None, readout_path: str | os.PathLike | None, split: str,
                 vision: VisionRequest | None = None, extra_metadata: Mapping[str, object] | None = None):
        self.prompt, self.positions, self.layers, self.vision = prompt, positions, layers, vision
        self.vector_dtype = spec.vector_dtype
        self.meta = {**run_metadata(adapter, spec.name, prompt, split, positions), "vector_dtype": self.vector_dtype,
                     **(extra_metadata or {})}
        self.writers: list[ParquetStreamWriter] = []
        self.embeddings: list[EmbeddingWriter] = []
        self.answers = self.readout = None
        self.vision_files: list[EmbeddingWriter] = []
        try:
            for layer, path in zip(layers, embedding_paths):
                self.embeddings.append(self._opened(EmbeddingWriter(
                    path, adapter.info.hidden_size, positions, {**self.meta, "layer": layer}, self.vector_dtype)))
            if answers_path is not None:
                self.answers = self._opened(ParquetStreamWriter(answers_path, answers_schema(ANSWER_WORDS, self.meta)))
            if readout_path is not None:
                readout_meta = {**self.meta, "readout_layers": layers, "margin_rule": MARGIN_RULE}
                self.readout = self._opened(ParquetStreamWriter(readout_path, answer_readout_schema(ANSWER_WORDS, readout_meta)))
        except BaseException:
            self.abort()
            raise

    def _opened(self, writer):
        self.writers.append(writer)  # aborted with the others should a later one fail
        return writer

    def write(self, batch: Sequence[Sample], out: BatchVectors) -> None:
        ids = [s.sample_id for s in batch]
        check_finite(out.vectors, self.layers, ids, self.vector_dtype)
        labels = np.asarray([s.label for s in batch], dtype=np.int32)
        for i, writer in enumerate(self.embeddings):
            writer.append(ids, labels, {pos: out.vectors[pos][i] for pos in self.positions})
        if self.vision is not None:
            if not self.vision_files:
                for writer in _vision_writers(self.vision, out.vision, self.meta, self.vector_dtype):
                    self.vision_files.append(self._opened(writer))
            for j, writer in enumerate(self.vision_files):
                kept = {pos: out.vision[pos][j] for pos in self.vision.positions}
                check_finite({f"vision {p}": v[None] for p, v in kept.items()}, [self.vision.layers[j]], ids,
                             self.vector_dtype)
                writer.append(ids, labels, kept)
        if self.answers is not None:
            probs = np.asarray(out.answer_probs, dtype=np.float32)
            self.answers.write(
                {
                    "sample_id": ids,
                    "label": labels,
                    **{f"p_{w}": probs[:, j] for j, w in enumerate(ANSWER_WORDS)},
                    "answer": [ANSWER_WORDS[j] for j in probs.argmax(axis=1)],
                    "n_image_tokens": np.asarray(out.n_image_tokens, dtype=np.int32),
                }
            )
        if self.readout is not None:
            self.readout.write(readout_rows(ids, labels, self.layers, out.readout, self.prompt["expected"]))

    def abort(self) -> None:
        for writer in self.writers:
            writer.abort()

    def commit(self) -> None:
        for writer in self.writers:
            writer.commit()


def _write_passes(files: Sequence[_PassFiles], outputs: Iterator[tuple[Sequence[Sample], list[BatchVectors]]],
                  n_samples: int, desc: str, progress: bool) -> float:
    """Write every batch's outputs (one per file set) and commit all files at the end, or none:
    any exception aborts every file. Returns the seconds taken."""
    start = time.perf_counter()
    try:
        with tqdm(total=n_samples, unit="img", file=sys.stderr, disable=not progress, desc=desc) as bar:
            for batch, outs in outputs:
                for pass_files, out in zip(files, outs, strict=True):
                    pass_files.write(batch, out)
                bar.update(len(batch))
    except BaseException:
        for pass_files in files:
            pass_files.abort()
        raise
    for pass_files in files:
        pass_files.commit()
    return time.perf_counter() - start


def _write_pass(
    adapter: ModelAdapter,
    spec: ModelSpec,
    samples: Sequence[Sample],
    prompt: Mapping[str, str] | None,
    positions: list[str],
    layers: list[int],
    embedding_paths: Sequence[str | os.PathLike],
    answers_path: str | os.PathLike | None,
    readout_path: str | os.PathLike | None,
    split: str,
    progress: bool,
    vision: VisionRequest | None = None,
    image_paths: Sequence[str | os.PathLike] = (),
) -> dict[str, object]:
    """Run every batch and write the files of one pass (prompt None: the image pass, no answers
    and no readout); a prompt pass given image_paths also writes the image pass's files (and
    `vision`'s) from the same forward."""
    _check_batching(spec, samples)
    vision_layers = vision.layers if vision is not None else []
    if vision_layers and prompt is not None and not isinstance(adapter, PreparingAdapter):
        raise ValueError(f"the {adapter.info.architecture} adapter reads vision layers in its image pass only")
    files: list[_PassFiles] = []
    forward_positions = list(positions)
    try:
        if prompt is None:
            files.append(_PassFiles(adapter, spec, None, positions, layers, embedding_paths, None, None, split, vision))
        else:
            files.append(_PassFiles(adapter, spec, prompt, positions, layers, embedding_paths, answers_path,
                                    readout_path, split))
            if image_paths:
                files.append(_folded_image_files(adapter, spec, layers, image_paths, split, vision,
                                                 f"the prompt pass of {prompt['id']!r}"))
                forward_positions += image_positions(spec)
    except BaseException:
        for pass_files in files:
            pass_files.abort()
        raise
    outputs = ((batch, [out] * len(files)) for batch, out in _run_batches(
        adapter, samples, spec.batch_size, prompt, layers, forward_positions, vision_layers))
    desc = f"extract {split}/{prompt['id'] if prompt is not None else 'image'}"
    seconds = _write_passes(files, outputs, len(samples), desc, progress)
    return {"rows": len(samples), "seconds": seconds, "layers": layers, "vision_layers": vision_layers}


def _folded_image_files(adapter: ModelAdapter, spec: ModelSpec, layers: list[int],
                        image_paths: Sequence[str | os.PathLike], split: str, vision: VisionRequest | None,
                        read_from: str) -> _PassFiles:
    """The image pass's files, written from a prompt pass (their metadata says which)."""
    return _PassFiles(adapter, spec, None, image_positions(spec), layers, image_paths, None, None, split, vision,
                      {"read_from": f"{read_from}: its tokens up to the last image token are the image pass's"})


def _check_batching(spec: ModelSpec, samples: Sequence[Sample]) -> None:
    if spec.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {spec.batch_size}")
    if not samples:
        raise ValueError("no samples to extract")


def extract_prompts(
    adapter: ModelAdapter,
    spec: ModelSpec,
    samples: Sequence[Sample],
    prompts: Sequence[Mapping[str, str]],
    embedding_paths: Sequence[str | os.PathLike],
    answers_paths: Sequence[str | os.PathLike],
    readout_paths: Sequence[str | os.PathLike],
    *,
    split: str,
    progress: bool = True,
    image_paths: Sequence[str | os.PathLike] = (),
    vision_paths: Sequence[str | os.PathLike] = (),
) -> dict[str, object]:
    """`extract` for several prompts of one split in one job (models.<m>.share_prefix): per batch,
    the tokens the prompts share (template head and image) run once with a KV cache and each
    prompt's tail continues from it (stagelens.shared_prefix). embedding_paths is prompt-major
    (prompt i's layers, then prompt i+1's); prompts[i]'s other files are answers_paths[i] and
    readout_paths[i]. A prompt with text
    before the image has its own image tokens: it runs its own full pass here. The files are those
    `extract` writes, up to float rounding, with `shared_prefix` in their metadata. image_paths
    (and vision_paths): the image pass's files, read from the shared prefix (or, where one prompt
    alone has no text before the image, from its pass)."""
    if not prompts or len(embedding_paths) % len(prompts) or not len(prompts) == len(answers_paths) == len(readout_paths):
        raise ValueError(f"{len(prompts)} prompts need as many answers and readout paths and a multiple of it embedding "
                         f"paths (got {len(answers_paths)}, {len(readout_paths)}, {len(embedding_paths)})")
    per = len(embedding_paths) // len(prompts)
    embedding_paths = [embedding_paths[i : i + per] for i in range(0, len(embedding_paths), per)]
    if len({p["id"] for p in prompts}) != len(prompts):
        raise ValueError(f"prompt ids repeat: {[p['id'] for p in prompts]}")
    if not hasattr(adapter, "prefix_pass"):
        raise ValueError(f"share_prefix: the {adapter.info.architecture} adapter runs no cached prefix (prefix_pass); "
                         f"set models.{spec.name}.share_prefix: false")
    jobs = list(zip(prompts, embedding_paths, answers_paths, readout_paths))
    shared = [job for job in jobs if not has_text_before_image(job[0])]
    if image_paths and not shared:
        raise ValueError("every prompt puts text before the image: none runs the image pass's tokens")
    lone = len(shared) == 1
    # A lone prompt without text before the image runs its own pass here: the image files come from it.
    folded = {"image_paths": image_paths, "vision_paths": vision_paths} if lone else {}
    summaries = [extract(adapter, spec, samples, prompt, emb, ans, split=split, readout_path=readout, progress=progress,
                         **({} if has_text_before_image(prompt) else folded))
                 for prompt, emb, ans, readout in jobs if has_text_before_image(prompt) or lone]
    if len(shared) < 2:
        return {"rows": len(samples), "seconds": sum(s["seconds"] for s in summaries), "layers": summaries[0]["layers"],
                "vision_layers": [v for s in summaries for v in s["vision_layers"]]}
    _check_batching(spec, samples)
    layers = spec.layers_of(adapter.info.num_layers)
    for _, emb, _, _ in shared:
        check_request(adapter, spec, layers, emb)
    group = [prompt for prompt, *_ in shared]
    for prompt in group:
        _check_image_prefix(adapter, spec, prompt)
    vision = _folded_image_request(adapter, spec, group[0], layers, image_paths, vision_paths)
    from stagelens.shared_prefix import forward_prompts, tail_lengths

    tails = tail_lengths(adapter, group)
    positions = prompt_positions(spec, group[0])  # the same for every prompt without text before the image
    meta = {"shared_prefix": {"prompts": [p["id"] for p in group],
                              "rule": "the tokens every prompt of the group shares up to each one's question "
                                      "end run once per batch with a KV cache; each prompt's tail continues from it"}}
    files = []
    try:
        for prompt, emb, ans, readout in shared:
            files.append(_PassFiles(adapter, spec, prompt, positions, layers, emb, ans, readout, split, None, meta))
        if image_paths:
            files.append(_folded_image_files(adapter, spec, layers, image_paths, split, vision,
                                             f"the shared prefix of {[p['id'] for p in group]}"))
    except BaseException:
        for pass_files in files:
            pass_files.abort()
        raise
    image_layers = layers if image_paths else []
    vision_layers = vision.layers if vision is not None else []

    def forward(images):
        outs, image = forward_prompts(adapter, images, group, layers, positions, tails, image_layers, vision_layers)
        return [*outs, image] if image_paths else outs

    outputs = ((batch, forward(images)) for batch, images in _images_ahead(samples, spec.batch_size))
    seconds = _write_passes(files, outputs, len(samples), f"extract {split}/{len(group)} prompts", progress)
    return {"rows": len(samples) * len(jobs), "seconds": seconds + sum(s["seconds"] for s in summaries),
            "layers": layers, "vision_layers": vision_layers}


def _images_ahead(samples: Sequence[Sample], batch_size: int) -> Iterator[tuple[Sequence[Sample], list[Image.Image]]]:
    """(batch, its images) per batch, the next batch's images read in a worker thread meanwhile."""
    chunks = list(batches(samples, batch_size))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stagelens-read") as pool:
        pending = pool.submit(lambda b: [load_image(s.image) for s in b], chunks[0])
        try:
            for i, batch in enumerate(chunks):
                images = pending.result()
                if i + 1 < len(chunks):
                    pending = pool.submit(lambda b: [load_image(s.image) for s in b], chunks[i + 1])
                yield batch, images
        finally:
            pending.cancel()


def _vision_writers(
    vision: VisionRequest, first: Mapping[str, list[np.ndarray]] | None, meta: Mapping[str, object], vector_dtype: str
) -> Iterator[EmbeddingWriter]:
    """One writer per kept vision layer, its width read from the first batch's vectors. Each file's
    metadata is the image pass's, with num_layers the vision encoder's (lm_num_layers the LM's)."""
    if first is None:
        raise ValueError("the adapter returned no vision vectors for the image pass")
    for j, (layer, path) in enumerate(zip(vision.layers, vision.paths)):
        dim = first[vision.positions[0]][j].shape[1]
        yield EmbeddingWriter(path, dim, vision.positions, {
            **meta, **vision.metadata, "tower": "vision", "lm_num_layers": meta["num_layers"], "hidden_size": dim,
            "layer": layer, "positions": list(vision.positions)}, vector_dtype)


def answer_margin(log_probs: np.ndarray, expected: str) -> np.ndarray:
    """(..., len(ANSWER_WORDS)) log-probabilities -> (...) log P(expected) - log P(opposite),
    each answer's spellings' probabilities summed (MARGIN_RULE; the patching score, signed so
    that > 0 favours the prompt's expected answer)."""
    def word(w: str) -> np.ndarray:
        return np.logaddexp.reduce(log_probs[..., [ANSWER_WORDS.index(s) for s in WORD_SPELLINGS[w]]], axis=-1)

    return word(expected) - word(OPPOSITE[expected])


def readout_rows(
    ids: Sequence[str], labels: np.ndarray, layers: Sequence[int], log_probs: np.ndarray | None, expected: str
) -> dict[str, object]:
    """The readout file's columns for one batch, image-major (each image's layers in order);
    log_probs: (layers, batch, len(ANSWER_WORDS)) from `BatchVectors.readout`."""
    if log_probs is None:
        raise ValueError("the adapter returned no answer readout for the prompt pass")
    n_layers, n = len(layers), len(ids)
    if log_probs.shape != (n_layers, n, len(ANSWER_WORDS)):
        raise ValueError(f"readout of shape {log_probs.shape}, expected {(n_layers, n, len(ANSWER_WORDS))}")
    per_image = np.asarray(log_probs, dtype=np.float32).transpose(1, 0, 2).reshape(n * n_layers, -1)
    return {
        "sample_id": [i for i in ids for _ in layers],
        "label": np.repeat(labels, n_layers),
        "layer": np.tile(np.asarray(layers, dtype=np.int32), n),
        **{f"p_{w}": np.exp(per_image[:, j]) for j, w in enumerate(ANSWER_WORDS)},
        "margin": answer_margin(per_image, expected).astype(np.float32),
    }
