"""The shared preamble of every workflow script (scripts/*.py): the job's stderr goes to its log,
and the model jobs' loading of their model.

`start` is called before any heavy import, so an import error lands in the log too.
"""

from __future__ import annotations

import sys
from typing import Any


def start(snakemake: Any) -> Any:
    """Send stderr (warnings, progress bars, tracebacks) to the rule's log; returns the job object."""
    sys.stderr = open(snakemake.log[0], "w", buffering=1)
    return snakemake


def load_model(snakemake: Any) -> tuple[Any, Any]:
    """The job's ModelSpec and its loaded adapter, torch's threads set to the job's (model jobs only)."""
    import torch

    from stagelens.adapters import load_adapter
    from stagelens.spec import ModelSpec

    params = snakemake.params
    spec = ModelSpec.from_config(params.model_name, params.model, str(params.model_path))
    torch.set_num_threads(max(1, int(snakemake.threads)))
    adapter = load_adapter(spec)
    print(f"loaded {adapter.info}", file=sys.stderr)
    return spec, adapter
