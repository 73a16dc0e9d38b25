"""Activation patching between the anchor and one variant: is a layer's change carried into the answer?

For each image, both prompts run; then the variant runs again with the anchor's residual stream
written in at layer l (direction `anchor_to_variant`), and the anchor with the variant's
(`variant_to_anchor`), for every layer l. The answer score is a log-odds: log P(yes) - log P(no)
(case variants summed), or log P(1) - log P(0) when the variant expects 1 or 0, with the
adapter's own answer-word scoring. `stagelens.causal` turns the scores into restored fractions.

Cost: every layer's patched copy runs in one batch, from a KV cache. At position `last` each
prompt runs once up to its last token (the image among them) and a patched copy recomputes the
last token alone: patching it changes no other token's keys and values, so the copy's cache is
the clean prompt's. At position `suffix` the two prompts share every token up to the question,
which runs once, and each copy recomputes its prompt's whole suffix. Per batch: 2 prefix passes
(`last`) or 1 (`suffix`) + 2 clean + 2 patched model calls.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from stagelens.adapters.base import ANSWER_WORDS, WORD_SPELLINGS, LayerConvention, ModelInfo
from stagelens.adapters.residual_patch import Continuation, overwrite_residuals, record_residuals
from stagelens.atomic import atomic_path
from stagelens.extract import Sample, batches, load_image, versions

DIRECTIONS = ("anchor_to_variant", "variant_to_anchor")
# `last`: the last token only; `suffix`: every token after the shared prefix (the question and
# the template's tail), only where both prompts have the same number of tokens.
PATCH_POSITIONS = ("last", "suffix")


class PrefixRun(Protocol):
    """A batch of images after the shared prompt prefix ran once with a KV cache."""

    prefix_length: int  # tokens of the shared prefix (the image among them)
    suffix_ids: list[torch.Tensor]  # per question: (batch, S_q) token ids after the shared prefix
    image_tokens: torch.Tensor  # (batch,) image tokens in each row's prefix

    def continue_with(self, suffix_ids: torch.Tensor, repeat: int) -> Continuation:
        """batch * repeat rows (row i * repeat + k continues image i): the next-token logits and
        the answer words' log-probabilities by the adapter's own scoring."""
        ...


class PatchableAdapter(Protocol):
    """What patching needs of an adapter (the embedded and the Hugging Face adapters implement it)."""

    info: ModelInfo
    blocks: nn.ModuleList

    def prefix_pass(self, images: Sequence[Image.Image], questions: Sequence[str],
                    keep: Sequence[int] | None = None) -> PrefixRun: ...


def shared_prefix_length(sequences: Sequence[Sequence]) -> int:
    """Number of leading items (token ids, or columns of a batch as tuples) every sequence shares."""
    shortest = min(len(s) for s in sequences)
    for i in range(shortest):
        if any(s[i] != sequences[0][i] for s in sequences[1:]):
            return i
    return shortest


def answer_pair(expected: str) -> tuple[str, str]:
    """The (positive, negative) answer words scored for a variant expecting `expected`."""
    return ("1", "0") if expected in ("1", "0") else ("yes", "no")


def answer_scores(log_probs: torch.Tensor, pair: tuple[str, str]) -> torch.Tensor:
    """(rows,) log P(positive) - log P(negative), each word's spellings' probabilities summed."""
    def word(w: str) -> torch.Tensor:
        return torch.logsumexp(log_probs[:, [ANSWER_WORDS.index(s) for s in WORD_SPELLINGS[w]]], dim=1)

    return word(pair[0]) - word(pair[1])


@dataclass
class PatchCounts:
    """Work done, for the job's log: model calls, sequences (rows) and tokens through the model."""

    model_calls: int = 0
    sequences: int = 0
    tokens: int = 0
    # What the same sweep costs without prefix reuse and batching: one full-prompt forward per
    # image x (2 clean + 2 x layers patched).
    naive_forwards: int = 0
    naive_tokens: int = 0

    def add(self, rows: int, tokens_per_row: int) -> None:
        self.model_calls += 1
        self.sequences += rows
        self.tokens += rows * tokens_per_row


def _columns(length: int, position: str) -> torch.Tensor:
    return torch.arange(length) if position == "suffix" else torch.tensor([length - 1])


def patch_batch(
    adapter: PatchableAdapter,
    images: Sequence[Image.Image],
    anchor: str,
    variant: str,
    layers: Sequence[int],
    position: str,
    pair: tuple[str, str],
    counts: PatchCounts | None = None,
    max_rows: int = 256,
) -> dict[str, np.ndarray]:
    """Answer scores of one batch: clean anchor and variant (batch,), and per direction the
    patched target (batch, len(layers)), keys `<direction>` (patched), `anchor`, `variant`.
    At most `max_rows` patched copies go through one forward (the layer sweep is chunked)."""
    if position not in PATCH_POSITIONS:
        raise ValueError(f"unknown patching position {position!r}; known: {list(PATCH_POSITIONS)}")
    layers = [int(layer) for layer in layers]
    counts = counts if counts is not None else PatchCounts()
    n, k = len(images), len(layers)
    with torch.inference_mode():
        runs, ids = _prompt_runs(adapter, images, anchor, variant, position, counts)
        if position == "suffix" and ids["anchor"].shape[1] != ids["variant"].shape[1]:
            raise ValueError(
                f"position 'suffix' needs prompts of equal length after the shared prefix; got "
                f"{ids['anchor'].shape[1]} and {ids['variant'].shape[1]} tokens"
            )
        cols = {name: _columns(t.shape[1], position) for name, t in ids.items()}
        scores: dict[str, np.ndarray] = {}
        vectors: dict[str, dict[int, torch.Tensor]] = {}
        for name in ("anchor", "variant"):
            with record_residuals(adapter.blocks, layers, cols[name]) as kept:
                out = runs[name].continue_with(ids[name], 1)
            counts.add(n, ids[name].shape[1])
            vectors[name] = kept
            scores[name] = answer_scores(out.answer_log_probs, pair).float().cpu().numpy()
        # Layers per call: every patched copy holds its own copy of the prefix's KV cache.
        step = max(1, max_rows // n)
        for direction in DIRECTIONS:
            source, target = direction.split("_to_")
            parts = []
            for lo in range(0, k, step):
                chunk = layers[lo : lo + step]
                # Row i * len(chunk) + j is image i patched at chunk[j].
                writes = {
                    layer: (torch.arange(n) * len(chunk) + j, vectors[source][layer]) for j, layer in enumerate(chunk)
                }
                with overwrite_residuals(adapter.blocks, writes, cols[target]):
                    out = runs[target].continue_with(ids[target], len(chunk))
                counts.add(n * len(chunk), ids[target].shape[1])
                parts.append(answer_scores(out.answer_log_probs, pair).float().cpu().numpy().reshape(n, len(chunk)))
            scores[direction] = np.concatenate(parts, axis=1)
        full = {name: runs[name].prefix_length + t.shape[1] for name, t in ids.items()}
        counts.naive_forwards += n * (2 + 2 * k)
        counts.naive_tokens += n * (1 + k) * (full["anchor"] + full["variant"])
    return scores


def _prompt_runs(adapter: PatchableAdapter, images: Sequence[Image.Image], anchor: str, variant: str, position: str,
                 counts: PatchCounts) -> tuple[dict[str, PrefixRun], dict[str, torch.Tensor]]:
    """Per prompt, the cached run its copies continue and the token ids they continue with. `last`:
    each prompt's own run up to its last token, which alone is recomputed; `suffix`: one run of
    the tokens both prompts share, each prompt's suffix recomputed."""
    names = ("anchor", "variant")
    if position == "last":
        runs = {name: adapter.prefix_pass(images, [text]) for name, text in zip(names, (anchor, variant))}
        for run in runs.values():
            counts.add(len(images), int(run.prefix_length))
        return runs, {name: run.suffix_ids[0] for name, run in runs.items()}
    run = adapter.prefix_pass(images, [anchor, variant])
    counts.add(len(images), int(run.prefix_length))
    return dict.fromkeys(names, run), dict(zip(names, run.suffix_ids))


def patch_subset(samples: Sequence[Sample], per_class: int, seed: int) -> list[Sample]:
    """Up to `per_class` samples of every label, drawn with `seed`, in the input order."""
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for label in sorted({s.label for s in samples}):
        ids = sorted(s.sample_id for s in samples if s.label == label)
        take = rng.permutation(len(ids))[: min(per_class, len(ids))]
        chosen.update(ids[i] for i in take)
    return [s for s in samples if s.sample_id in chosen]


@dataclass(frozen=True)
class PatchRequest:
    """One patching job: the anchor and one variant prompt ({"id", "text", "family", "expected"})."""

    anchor: Mapping[str, str]
    variant: Mapping[str, str]
    layers: tuple[int, ...]
    positions: tuple[str, ...] = ("last",)
    batch_size: int = 4
    max_rows: int = 256  # patched copies per forward (each holds a copy of the prefix's KV cache)


def run_patching(
    adapter: PatchableAdapter,
    samples: Sequence[Sample],
    request: PatchRequest,
    out_path: str,
    *,
    extra_metadata: Mapping[str, object] | None = None,
    progress: bool = True,
) -> dict[str, object]:
    """Patch every layer in both directions for `samples`; write one tidy Parquet file.

    Rows: sample_id, label, position, direction, layer, source_score, target_score,
    patched_score. Returns the summary written into the file's metadata (counts, seconds).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not samples:
        raise ValueError("no samples to patch")
    if request.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {request.batch_size}")
    unknown = [p for p in request.positions if p not in PATCH_POSITIONS]
    if unknown:
        raise ValueError(f"unknown patching positions {unknown}; known: {list(PATCH_POSITIONS)}")
    layers = [int(layer) for layer in request.layers]
    pair = answer_pair(request.variant["expected"])
    counts = PatchCounts()
    columns: dict[str, list] = {c: [] for c in ("sample_id", "label", "position", "direction", "layer",
                                                "source_score", "target_score", "patched_score")}
    start = time.perf_counter()
    total = len(samples) * len(request.positions)
    with tqdm(total=total, unit="img", file=sys.stderr, disable=not progress,
              desc=f"patch {request.anchor['id']}<->{request.variant['id']}") as bar:
        for position in request.positions:
            for batch in batches(samples, request.batch_size):
                images = [load_image(s.path) for s in batch]
                scores = patch_batch(adapter, images, request.anchor["text"], request.variant["text"],
                                     layers, position, pair, counts, request.max_rows)
                for direction in DIRECTIONS:
                    source, target = direction.split("_to_")
                    for i, sample in enumerate(batch):
                        for j, layer in enumerate(layers):
                            columns["sample_id"].append(sample.sample_id)
                            columns["label"].append(sample.label)
                            columns["position"].append(position)
                            columns["direction"].append(direction)
                            columns["layer"].append(layer)
                            columns["source_score"].append(float(scores[source][i]))
                            columns["target_score"].append(float(scores[target][i]))
                            columns["patched_score"].append(float(scores[direction][i, j]))
                bar.update(len(batch))
    seconds = time.perf_counter() - start
    summary = {
        "images": len(samples),
        "seconds": seconds,
        "images_per_second": len(samples) * len(request.positions) / seconds if seconds > 0 else None,
        **asdict(counts),
    }
    info = adapter.info
    meta = {
        "model_id": info.model_id,
        "revision": info.revision,
        "architecture": info.architecture,
        "dtype": info.dtype,
        "device": info.device,
        "num_layers": info.num_layers,
        "layer_convention": LayerConvention().description,
        "anchor": dict(request.anchor),
        "variant": dict(request.variant),
        "layers": layers,
        "positions": list(request.positions),
        "answer_pair": list(pair),
        "score": f"log P({pair[0]}) - log P({pair[1]}), spellings summed ({WORD_SPELLINGS[pair[0]]} vs "
        f"{WORD_SPELLINGS[pair[1]]}), next token after the prompt",
        "patch": "residual stream at the layer, at the patched positions, replaced by the source prompt's "
        "for the same image; the tokens before the patched ones run once with a KV cache",
        **dict(extra_metadata or {}),
        **summary,
        **versions(),
    }
    table = pa.table(
        {
            "sample_id": pa.array(columns["sample_id"], pa.string()),
            "label": pa.array(columns["label"], pa.int32()),
            "position": pa.array(columns["position"], pa.string()),
            "direction": pa.array(columns["direction"], pa.string()),
            "layer": pa.array(columns["layer"], pa.int32()),
            "source_score": pa.array(columns["source_score"], pa.float64()),
            "target_score": pa.array(columns["target_score"], pa.float64()),
            "patched_score": pa.array(columns["patched_score"], pa.float64()),
        }
    ).replace_schema_metadata({b"stagelens": json.dumps(meta, sort_keys=True)})
    with atomic_path(out_path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return summary
