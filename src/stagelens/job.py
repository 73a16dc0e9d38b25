"""The shared preamble of every workflow script (scripts/*.py): the job's stderr goes to its log.

Called before any heavy import, so an import error lands in the log too.
"""

from __future__ import annotations

import sys
from typing import Any


def start(snakemake: Any) -> Any:
    """Send stderr (warnings, progress bars, tracebacks) to the rule's log; returns the job object."""
    sys.stderr = open(snakemake.log[0], "w", buffering=1)
    return snakemake
