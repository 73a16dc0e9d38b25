"""Snakemake job: metrics of the frozen probes of one model x layer on one prompt (test split).

numpy + pyarrow only (no torch, no scikit-learn, no polars): a paper run has ~1,000 of these.
"""

import sys

sys.stderr = open(snakemake.log[0], "w")  # noqa: F821 (snakemake is injected by the script directive)


import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stagelens.atomic import atomic_path
from stagelens.metrics import EvalSettings, align_to, evaluate_probe
from stagelens.probe import load_probes
from stagelens.store import read_metadata, read_vectors

inp, out, params = snakemake.input, snakemake.output, snakemake.params
probes, controls = load_probes(inp.probe), load_probes(inp.control)
meta = read_metadata(inp.variant)
settings = EvalSettings(n_bootstrap=int(params.evaluate["n_bootstrap"]), ci=float(params.evaluate["ci"]),
                        seed=int(params.seed))
prompt = params.prompt

rows = []
for position, probe in probes.items():
    if position not in controls:
        raise KeyError(f"{inp.control}: no control probe for position {position!r}")
    ids, labels, variant = read_vectors(inp.variant, position)
    if inp.anchor == inp.variant:
        anchor = variant  # the anchor job: same array, so its logits are computed once
    else:
        anchor_ids, anchor_labels, anchor = read_vectors(inp.anchor, position)
        order = align_to(ids, anchor_ids)  # pair by sample_id, in the anchor's order
        labels, variant = labels[order], variant[order]
        if not np.array_equal(labels, anchor_labels):
            raise ValueError(f"{inp.variant} and {inp.anchor} disagree on labels of the same sample ids")
    metrics = evaluate_probe(probe, controls[position], labels, variant, anchor, settings)
    rows.append({
        "model": params.model_name, "model_id": meta.get("model_id"), "revision": meta.get("revision"),
        "layer": int(meta["layer"]), "num_layers": int(meta["num_layers"]), "position": position,
        "prompt": prompt["id"], "family": prompt["family"], "expected": prompt["expected"],
        **metrics,
        "n_bootstrap": settings.n_bootstrap, "ci": settings.ci, "seed": settings.seed,
    })

table = pa.Table.from_pylist(rows)
with atomic_path(out.metrics) as tmp:
    pq.write_table(table, tmp, compression="zstd")
