"""The evaluate job as a function: frozen probes of one model x layer on one prompt's test vectors,
paired with the anchor's by sample id, one metrics row per token position.

numpy + pyarrow only (no torch, no scikit-learn, no polars): a paper run has ~1,000 of these jobs.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stagelens.atomic import atomic_path
from stagelens.metrics import PAIRED_METRICS, EvalSettings, align_to, evaluate_probe
from stagelens.probe import load_probes
from stagelens.store import read_metadata, read_vectors

PathLike = str | os.PathLike
READOUTS = ("prompt", "image", "vision")


def paired_vectors(variant_path: PathLike, anchor_path: PathLike, position: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, variant vectors, anchor vectors), the variant's rows put into the anchor's sample order.

    The anchor job passes the same file twice and gets the same array back twice, so its logits
    are computed once.
    """
    ids, labels, variant = read_vectors(variant_path, position)
    if os.fspath(anchor_path) == os.fspath(variant_path):
        return labels, variant, variant
    anchor_ids, anchor_labels, anchor = read_vectors(anchor_path, position)
    order = align_to(ids, anchor_ids)
    labels, variant = labels[order], variant[order]
    if not np.array_equal(labels, anchor_labels):
        raise ValueError(f"{variant_path} and {anchor_path} disagree on labels of the same sample ids")
    return labels, variant, anchor


def evaluate_layer(
    probe_path: PathLike,
    control_path: PathLike,
    variant_path: PathLike,
    anchor_path: PathLike,
    prompt: Mapping[str, Any],
    model_name: str,
    settings: EvalSettings,
    readout: str = "prompt",
) -> list[dict[str, Any]]:
    """Metrics rows (one per position the probe file holds) with the provenance of the variant file.

    readout "image": the image-token readout. The image pass is evaluated against itself and its
    paired metrics are left empty (a drop of 0 where no prompt can move the vectors would look like
    a finding); a prompt with text before the image is paired with the image pass (anchor_path),
    whose image tokens are the anchor's, and keeps its drop. readout "vision": the image pass's
    vision-encoder layers (layer and num_layers are then the vision encoder's), evaluated against
    themselves, paired metrics left empty.
    """
    if readout not in READOUTS:
        raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
    probes, controls = load_probes(probe_path), load_probes(control_path)
    meta = read_metadata(variant_path)
    rows = []
    for position, probe in probes.items():
        if position not in controls:
            raise KeyError(f"{control_path}: no control probe for position {position!r}")
        labels, variant, anchor = paired_vectors(variant_path, anchor_path, position)
        metrics = evaluate_probe(probe, controls[position], labels, variant, anchor, settings)
        if readout != "prompt" and os.fspath(anchor_path) == os.fspath(variant_path):
            metrics.update(dict.fromkeys(PAIRED_METRICS))
        rows.append({
            "model": model_name, "model_id": meta.get("model_id"), "revision": meta.get("revision"),
            "layer": int(meta["layer"]), "num_layers": int(meta["num_layers"]), "position": position,
            "readout": readout, "prompt": prompt["id"], "family": prompt["family"], "expected": prompt["expected"],
            **metrics,
            "n_bootstrap": settings.n_bootstrap, "ci": settings.ci, "seed": settings.seed,
        })
    return rows


def write_rows(rows: list[dict[str, Any]], path: PathLike) -> None:
    """One Parquet table of rows, written whole or not at all."""
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp, compression="zstd")
