"""Run a workflow script (`script:` directive) outside Snakemake, in a fresh Python process.

A stand-in for the `snakemake` object with the attributes the scripts read (input, output,
params, log, wildcards, threads, rule), so tests and benchmarks exercise the real script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

REPO = Path(__file__).resolve().parents[1]
_THREAD_VARS = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")

_STUB = """
import json, runpy, sys
spec = json.loads(sys.argv[1])

class NamedList(list):
    # Snakemake's Namedlist: a list whose items are also attributes.
    def __init__(self, named):
        super().__init__(named.values())
        self.__dict__.update(named)

class Job:
    pass

job = Job()
for key in ("input", "output", "params", "wildcards"):
    setattr(job, key, NamedList(spec[key]))
job.log = NamedList({"log": spec["log"]})
job.threads = spec["threads"]
job.rule = spec["rule"]
runpy.run_path(spec["script"], init_globals={"snakemake": job}, run_name="__main__")
if spec["modules_out"]:
    with open(spec["modules_out"], "w") as fh:
        json.dump(sorted(sys.modules), fh)
"""


def run_script(
    script: str,
    *,
    input: Mapping[str, Any],
    output: Mapping[str, Any],
    log: str | Path,
    params: Mapping[str, Any] | None = None,
    wildcards: Mapping[str, Any] | None = None,
    rule: str = "job",
    threads: int = 1,
    modules_out: str | Path | None = None,
) -> subprocess.CompletedProcess:
    """Run scripts/<script> with a stub `snakemake` object; raises with the job's log on failure."""
    spec = {
        "script": str(REPO / "scripts" / script),
        "input": {k: _plain(v) for k, v in input.items()},
        "output": {k: _plain(v) for k, v in output.items()},
        "params": dict(params or {}),
        "wildcards": dict(wildcards or {}),
        "log": str(log),
        "threads": threads,
        "rule": rule,
        "modules_out": str(modules_out) if modules_out else None,
    }
    # Snakemake sets these for every script job (snakemake/shell.py); do the same.
    env = {**os.environ, **{var: str(threads) for var in _THREAD_VARS}}
    done = subprocess.run([sys.executable, "-c", _STUB, json.dumps(spec)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        log_text = Path(log).read_text() if Path(log).exists() else ""
        raise RuntimeError(f"{script} failed ({done.returncode}):\n{done.stderr}\n--- log ---\n{log_text}")
    return done


def _plain(value: Any) -> Any:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value)
