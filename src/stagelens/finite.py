"""Refuse hidden states that are not finite numbers before they reach a file.

A float16/bfloat16 forward pass of a 7B model can overflow to Inf (and then NaN) in some layers;
a probe fitted on such vectors is silently wrong, so extraction stops and names where.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

SHOWN = 10  # problems listed in the message; the rest are counted


class NonFiniteError(ValueError):
    """A kept hidden-state vector holds NaN or Inf (or a value its storage type cannot hold)."""


def nonfinite_vectors(
    vectors: Mapping[str, np.ndarray], layers: Sequence[int], sample_ids: Sequence[str], vector_dtype: str = "float32"
) -> list[tuple[int, str, str, str]]:
    """(layer, position, sample id, what) for every kept vector that is not finite as stored.

    vectors[position] has shape (n_layers, batch, D), layers and sample_ids index its first two
    axes (as in adapters.base.BatchVectors). With float16 storage a value beyond its largest
    finite number (65504) would become Inf in the file, so it counts too.
    """
    limit = float(np.finfo(np.float16).max) if vector_dtype == "float16" else np.inf
    found = []
    for position, stack in vectors.items():
        stack = np.asarray(stack)
        nan = np.isnan(stack).any(axis=-1)
        inf = np.isinf(stack).any(axis=-1)
        over = (np.abs(np.where(np.isfinite(stack), stack, 0)) > limit).any(axis=-1)
        for i, j in zip(*np.nonzero(nan | inf | over)):
            what = "NaN" if nan[i, j] else "Inf" if inf[i, j] else f"beyond float16's range ({limit:g})"
            found.append((int(layers[i]), position, str(sample_ids[j]), what))
    return sorted(found)


def check_finite(
    vectors: Mapping[str, np.ndarray], layers: Sequence[int], sample_ids: Sequence[str], vector_dtype: str = "float32"
) -> None:
    """Raise NonFiniteError naming layer, position and sample of every non-finite kept vector."""
    found = nonfinite_vectors(vectors, layers, sample_ids, vector_dtype)
    if not found:
        return
    lines = [f"layer {layer}, position {position}, sample {sample}: {what}" for layer, position, sample, what in found]
    more = f"\n(+{len(lines) - SHOWN} more)" if len(lines) > SHOWN else ""
    raise NonFiniteError(
        f"{len(found)} kept hidden-state vector(s) are not finite:\n" + "\n".join(lines[:SHOWN]) + more
        + "\nNothing was written. A float16 model may overflow: try dtype bfloat16 or float32"
        + (", or vector_dtype float32" if vector_dtype == "float16" else "") + "."
    )
