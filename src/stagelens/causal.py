"""From patching scores to restored fractions and causal onsets, with bootstrap CIs over images.

numpy + polars only (the aggregate job imports this; torch stays in the patching job).

Restored fraction at layer l = mean over images of (patched - target) / mean of (source - target):
the share of the source-target gap in the answer score that patching layer l brings back. A ratio
of means, not a mean of per-image ratios (images whose own gap is near zero would dominate that).
1 at the last layer for last-token patching (the final norm and unembedding see the source's
vector), about 0 where the target's other tokens still carry the difference.

Causal onset = the first layer from which on (at it and at every later layer) the restored
fraction is at least `threshold` (0.5: half the gap). Its CI: the onset recomputed on every
bootstrap resample of the images, percentile interval on the layer axis.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import polars as pl

from stagelens.metrics import bootstrap_indices

ONSET_THRESHOLD = 0.5


def restored(source: np.ndarray, target: np.ndarray, patched: np.ndarray) -> np.ndarray:
    """(layers,) restored fraction; source, target (images,), patched (images, layers)."""
    gap = float(np.mean(source - target))
    return np.mean(patched - target[:, None], axis=0) / gap


def onset_index(fractions: np.ndarray, threshold: float = ONSET_THRESHOLD) -> np.ndarray:
    """Index of the first layer from which every fraction is >= threshold, along the last axis;
    -1 where there is none."""
    ok = fractions >= threshold
    # tail_ok[..., j]: every layer from j on reaches the threshold.
    tail_ok = np.flip(np.cumprod(np.flip(ok, axis=-1), axis=-1), axis=-1).astype(bool)
    first = np.argmax(tail_ok, axis=-1)
    return np.where(tail_ok.any(axis=-1), first, -1)


def _quantile_ci(values: np.ndarray, ci: float) -> tuple[float, float]:
    tail = (1.0 - ci) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return float(low), float(high)


def curve(
    source: np.ndarray,
    target: np.ndarray,
    patched: np.ndarray,
    layers: Sequence[int],
    *,
    n_bootstrap: int,
    ci: float,
    seed: int,
    threshold: float = ONSET_THRESHOLD,
) -> tuple[list[dict], dict]:
    """Per-layer rows (restored fraction and CI) and one onset row (gap and onset with CIs)."""
    source, target, patched = (np.asarray(a, dtype=np.float64) for a in (source, target, patched))
    n = len(source)
    if patched.shape != (n, len(layers)):
        raise ValueError(f"patched scores {patched.shape} do not fit {n} images x {len(layers)} layers")
    idx = bootstrap_indices(n, n_bootstrap, seed)
    diff = source - target
    gap = float(diff.mean())
    gaps = diff[idx].mean(axis=1)  # (n_bootstrap,)
    gap_low, gap_high = _quantile_ci(gaps, ci)
    point = restored(source, target, patched)
    shifts = (patched - target[:, None])[idx].mean(axis=1)  # (n_bootstrap, layers)
    with np.errstate(divide="ignore", invalid="ignore"):
        boot = shifts / gaps[:, None]
    rows = []
    for j, layer in enumerate(layers):
        low, high = _quantile_ci(boot[:, j], ci) if np.isfinite(boot[:, j]).all() else (None, None)
        rows.append({"layer": int(layer), "restored": float(point[j]), "restored_ci_low": low,
                     "restored_ci_high": high, "mean_shift": float(np.mean(patched[:, j] - target))})
    # An onset needs a gap: a variant that does not move the answer has nothing to restore.
    has_gap = gap_low > 0 or gap_high < 0
    onset = {"n": n, "gap": gap, "gap_ci_low": gap_low, "gap_ci_high": gap_high, "has_gap": has_gap,
             "threshold": threshold, "onset_layer": None, "onset_ci_low": None, "onset_ci_high": None,
             "onset_found_share": None}
    if has_gap:
        first = int(onset_index(point, threshold))
        boot_first = onset_index(boot, threshold)
        found = boot_first >= 0
        layer_axis = np.asarray(layers, dtype=np.float64)
        # A resample without an onset counts as "after the last layer" (+inf) in the interval.
        boot_layers = np.where(found, layer_axis[np.maximum(boot_first, 0)], np.inf)
        tail = (1.0 - ci) / 2.0
        low, high = np.quantile(boot_layers, [tail, 1.0 - tail], method="inverted_cdf")
        onset.update(
            onset_layer=int(layers[first]) if first >= 0 else None,
            onset_ci_low=float(low) if np.isfinite(low) else None,
            onset_ci_high=float(high) if np.isfinite(high) else None,
            onset_found_share=float(found.mean()),
        )
    return rows, onset


def patching_tables(
    scores: pl.DataFrame, prompt: dict, num_layers: int, *, n_bootstrap: int, ci: float, seed: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(per-layer curve, onsets) of one variant's patching file, per position and direction."""
    curves, onsets = [], []
    for (position, direction), part in scores.group_by("position", "direction", maintain_order=True):
        wide = part.pivot(on="layer", index="sample_id", values="patched_score", sort_columns=True)
        per_image = part.group_by("sample_id").agg(pl.col("source_score").first(), pl.col("target_score").first())
        wide = wide.join(per_image, on="sample_id").sort("sample_id")
        layers = sorted(int(c) for c in wide.columns if c.isdigit())
        patched = wide.select([str(layer) for layer in layers]).to_numpy()
        rows, onset = curve(wide["source_score"].to_numpy(), wide["target_score"].to_numpy(), patched, layers,
                            n_bootstrap=n_bootstrap, ci=ci, seed=seed)
        keys = {"prompt": prompt["id"], "family": prompt["family"], "expected": prompt["expected"],
                "position": position, "direction": direction, "num_layers": num_layers}
        curves += [{**keys, **row, "depth": row["layer"] / num_layers, "n": onset["n"]} for row in rows]
        depth = onset["onset_layer"] / num_layers if onset["onset_layer"] is not None else None
        onsets.append({**keys, **onset, "onset_depth": depth})
    return pl.DataFrame(curves, infer_schema_length=None), pl.DataFrame(onsets, infer_schema_length=None)
