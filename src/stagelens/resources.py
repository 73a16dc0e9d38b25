"""Resource estimates of the heavy jobs (memory in MB, runtime in minutes, threads, GPUs), from the
validated config: what a cluster scheduler is asked for. Rough by design; a profile can override
any of them per rule with --set-resources.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping

from stagelens.builders import EMBEDDED_RECIPE, TINY_RECIPES

# A tiny model is built in seconds in well under a GB.
BUILD_MODEL = {"mem_mb": 2048, "runtime": 15}
# Parameters of a hub model whose id names no size ("7b", "0.5B"): assume an 8B model.
DEFAULT_BILLIONS = 8.0


def n_classes(dataset: Mapping[str, Any]) -> int:
    """Classes in the dataset: the class list's rows, else the class names, else the root's
    sub-folders (0 if unreadable)."""
    class_list, class_names = dataset.get("class_list"), dataset.get("class_names")
    try:
        if class_list:
            with open(class_list, encoding="utf-8") as fh:
                return max(sum(1 for line in fh if line.strip()) - 1, 0)
        if class_names:
            with open(class_names, encoding="utf-8") as fh:
                return sum(1 for line in fh if line.strip())
        return sum(1 for e in os.scandir(dataset["root"]) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return 0


def prepare_dataset_runtime(classes: int) -> int:
    """Minutes to scan and verify the images: generous per class (paper: 120 classes x 80 images)."""
    return 10 + math.ceil(classes / 20)


def billions_in_name(model_id: str) -> float | None:
    """The parameter count a hub id carries, in billions ("llava-1.5-7b-hf" -> 7.0), else None."""
    match = re.search(r"(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", model_id)
    return float(match.group(1)) if match else None


def weights_mb(model: Mapping[str, Any]) -> int:
    """Rough in-memory size of a model's weights in MB at its configured dtype."""
    bytes_per_param = 4 if model["dtype"] == "float32" else 2
    if model.get("recipe") in TINY_RECIPES:
        return 50
    if model.get("recipe") == EMBEDDED_RECIPE:
        return 200 * bytes_per_param  # ~150M parameters (SmolLM2-135M + EfficientNet-Lite0)
    path = model["path"]
    if os.path.isdir(path):
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith((".safetensors", ".bin")))
        # Checkpoints are usually stored in 16 bits; float32 loading doubles them.
        return int(size / 2**20 * (2 if bytes_per_param == 4 else 1))
    billions = billions_in_name(path)
    return int((billions if billions is not None else DEFAULT_BILLIONS) * 1000 * bytes_per_param)


def uses_gpu(model: Mapping[str, Any]) -> bool:
    return model["device"] != "cpu"


def extract_threads(model: Mapping[str, Any]) -> int:
    """CPU threads of an extraction job: the image preparation on GPU runs, the forward on CPU runs."""
    return 2 if uses_gpu(model) else 4


def extract_mem_mb(model: Mapping[str, Any]) -> int:
    """Weights (loaded through host memory even for GPU runs) + batch activations + runtime."""
    return 2048 + int(1.2 * weights_mb(model)) + 256 * model["batch_size"]


def extract_runtime(model: Mapping[str, Any], images: int) -> int:
    """Minutes for one extraction job over `images` images; the per-image cost scales with model size."""
    seconds_per_gb = 0.03 if uses_gpu(model) else 0.6
    seconds = images * (0.05 + seconds_per_gb * weights_mb(model) / 1000)
    return 10 + math.ceil(seconds / 60)


def extract_gpu(model: Mapping[str, Any]) -> int:
    return 1 if uses_gpu(model) else 0


def probe_uses_gpu(probe: Mapping[str, Any]) -> bool:
    """train_probe asks for a GPU only when the torch solver will run on one (probe.device)."""
    return probe["solver"] == "torch" and probe["device"] != "cpu"


def probe_threads(probe: Mapping[str, Any]) -> int:
    """On the CPU the DAG's many probe jobs are the parallelism; beside a GPU two threads feed it."""
    return 2 if probe_uses_gpu(probe) else 1


def probe_mem_mb(probe: Mapping[str, Any], classes: int, train_per_class: int, width: int = 4096) -> int:
    """Host memory of a probe job: the features, a standardised copy per CV fold (+ the refit and
    the control), the principal basis and the L-BFGS history, at `width` (the paper's models)."""
    rows = max(classes, 2) * train_per_class
    floats = width * (rows * (probe["cv_folds"] + 3) + 3 * width + 20 * probe["cv_folds"] * max(classes, 2))
    return 2048 + math.ceil(4 * floats / 2**20)


def probe_runtime(probe: Mapping[str, Any], classes: int, train_per_class: int, positions: int) -> int:
    """Minutes for one probe job: train images x classes x positions x C grid (+1: the refit and control)."""
    work = max(classes, 2) ** 2 * train_per_class * positions * (len(probe["Cs"]) + 1)
    return 10 + math.ceil(work / 100_000)


def patch_runtime(model: Mapping[str, Any], images: int, layers: int) -> int:
    """Minutes for one patching job: per image about layers x half an extraction pass (two
    directions of suffix-only passes, the shared prefix run once)."""
    return extract_runtime(model, math.ceil(images * layers / 2))


def patch_mem_mb(model: Mapping[str, Any]) -> int:
    """Extraction's memory twice over: every layer's patched copy holds its own prefix KV cache."""
    return 2 * extract_mem_mb(model)
