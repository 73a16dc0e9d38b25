"""Linear class probes: apply and store (numpy + safetensors); fitting is in stagelens.probe_training.

A probe is standardisation followed by a multinomial linear map. Applying it needs only numpy,
so evaluation jobs load the safetensors file and never import torch or scikit-learn.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stagelens.atomic import atomic_path


@dataclass(frozen=True)
class Probe:
    """A frozen linear probe: logits = ((x - mean) / scale) @ weight.T + bias."""

    weight: np.ndarray  # (n_classes, D) float32
    bias: np.ndarray  # (n_classes,) float32
    mean: np.ndarray  # (D,) float32, standardisation mean of the training features
    scale: np.ndarray  # (D,) float32, standardisation scale (1 where a feature is constant)
    classes: np.ndarray  # (n_classes,) int64, the label each logit row stands for

    def folded(self) -> tuple[np.ndarray, np.ndarray]:
        """(w, b) with the standardisation folded in: logits = x @ w.T + b (no (n, D) temporary)."""
        w = self.weight / self.scale
        return w, self.bias - w @ self.mean

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Class scores for features x of shape (n, D)."""
        if x.ndim != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"probe expects features of shape (n, {self.weight.shape[1]}), got {x.shape}"
            )
        w, b = self.folded()
        return x.astype(np.float32, copy=False) @ w.T + b

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted labels for features x of shape (n, D)."""
        return self.classes[np.argmax(self.logits(x), axis=1)]


def shuffled_labels(y: np.ndarray, seed: int) -> np.ndarray:
    """Labels permuted with the seed: the control task of a selectivity estimate."""
    return np.random.default_rng(seed).permutation(y)


def save_probes(probes: dict[str, Probe], path: str | os.PathLike, sidecar: dict[str, Any]) -> None:
    """Write one probe per token position into one safetensors file (keys `<position>.<name>`)."""
    from safetensors.numpy import save_file

    path = Path(path)
    # safetensors writes the raw buffer: a strided array (sklearn's coef_ is one) would be scrambled.
    tensors = {
        f"{pos}.{name}": np.ascontiguousarray(getattr(probe, name))
        for pos, probe in probes.items()
        for name in ("weight", "bias", "mean", "scale", "classes")
    }
    # One metadata entry: safetensors writes the metadata map in hash order, so two entries
    # came out in either order and the same probes gave different bytes from run to run.
    metadata = {"stagelens": json.dumps({"format": "stagelens-probe", "positions": list(probes)}, sort_keys=True)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    write_json(path.with_suffix(".json"), sidecar)


def load_probes(path: str | os.PathLike) -> dict[str, Probe]:
    """Read the probes of every position from a safetensors file written by `save_probes`."""
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a readable safetensors probe file ({err})") from err
    positions = sorted({key.rsplit(".", 1)[0] for key in tensors})
    probes = {}
    for pos in positions:
        try:
            probes[pos] = Probe(**{n: tensors[f"{pos}.{n}"] for n in ("weight", "bias", "mean", "scale", "classes")})
        except KeyError as err:
            raise ValueError(f"{path}: probe for position {pos!r} lacks tensor {err}") from err
    return probes


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write JSON atomically (tmp file + os.replace)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
