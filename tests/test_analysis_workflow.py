"""The analysis half of the DAG (train_probe -> evaluate -> aggregate -> figures -> report) run by
Snakemake on synthetic embedding files, so no model is needed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from stagelens.store import write_embeddings

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    {"id": "anchor", "family": "anchor", "text": "Does this image show an animal?", "expected": "yes"},
    {"id": "lex_picture", "family": "lexical", "text": "Does this picture show an animal?", "expected": "yes"},
    {"id": "neg_plane", "family": "negation", "text": "Does this image show a plane?", "expected": "no"},
    {"id": "ctl_suffix", "family": "control", "text": "Does this image show an animal? Thanks.", "expected": "yes"},
]
NUM_LAYERS, N_CLASSES, DIM = 2, 4, 12
ANSWER_WORDS = ("yes", "Yes", "no", "No", "1", "0")


def _write_inputs(root: Path, images: Path) -> None:
    """Manifest stand-in, then embeddings, answers and answer readouts (newer than the manifest, as
    extraction leaves them)."""
    rng = np.random.default_rng(0)
    (root / "data").mkdir(parents=True)
    (root / "data" / "manifest.parquet").write_bytes(b"")
    centers = rng.normal(size=(N_CLASSES, DIM)) * 1.5
    for split, per_class in (("train", 10), ("test", 8)):
        labels = np.repeat(np.arange(N_CLASSES), per_class).astype(np.int32)
        ids = [f"c{y}/{split}{i}" for i, y in enumerate(labels)]
        base = {layer: centers[labels] + rng.normal(size=(len(labels), DIM)) for layer in range(NUM_LAYERS + 1)}
        for prompt in PROMPTS if split == "test" else PROMPTS[:1]:
            for layer in range(NUM_LAYERS + 1):
                # The negation variant moves the last layer far away: a planted drop.
                shift = 6.0 if prompt["family"] == "negation" and layer == NUM_LAYERS else 0.0
                meta = {"model_name": "synth", "revision": "r1", "layer": layer, "num_layers": NUM_LAYERS,
                        "positions": ["last"], "prompt_id": prompt["id"], "split": split}
                write_embeddings(root / "synth" / "embeddings" / split / prompt["id"] / f"layer{layer}.parquet",
                                 ids, labels, {"last": (base[layer] + shift).astype(np.float32)}, meta)
            probs = rng.dirichlet(np.ones(len(ANSWER_WORDS)), size=len(labels)).astype(np.float32)
            answers = pl.DataFrame({"sample_id": ids, "label": labels,
                                    **{f"p_{w}": probs[:, i] for i, w in enumerate(ANSWER_WORDS)},
                                    "answer": [ANSWER_WORDS[i] for i in probs.argmax(axis=1)],
                                    "n_image_tokens": np.full(len(labels), 4, np.int32)})
            path = root / "synth" / "answers" / split / f"{prompt['id']}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            answers.write_parquet(path)
            layers = NUM_LAYERS + 1
            lens = rng.dirichlet(np.ones(len(ANSWER_WORDS) + 1), size=len(labels) * layers)[:, :-1].astype(np.float32)
            readout = pl.DataFrame({"sample_id": np.repeat(ids, layers), "label": np.repeat(labels, layers),
                                    "layer": np.tile(np.arange(layers, dtype=np.int32), len(labels)),
                                    **{f"p_{w}": lens[:, i] for i, w in enumerate(ANSWER_WORDS)},
                                    "margin": np.log((lens[:, 0] + lens[:, 1]) / (lens[:, 2] + lens[:, 3]))})
            path = root / "synth" / "answer_readout" / split / f"{prompt['id']}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            readout.write_parquet(path)


def _snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), "--replace-workflow-config", "--workflow-profile", "none", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


@pytest.mark.slow
def test_analysis_rules_run_and_build_the_report(tmp_path):
    images = tmp_path / "images"
    for k in range(N_CLASSES):
        (images / f"c{k}").mkdir(parents=True)
    results = tmp_path / "work" / "results"
    config = {
        "seed": 0, "results": "results", "dataset": {"root": str(images)},
        "models": {"synth": {"path": "synthetic/model", "num_layers": NUM_LAYERS, "positions": ["last"]}},
        "prompts": {"anchor": PROMPTS[0], "variants": PROMPTS[1:]},
        "probe": {"cv_folds": 2, "Cs": [0.1, 1.0], "max_iter": 200},
        "evaluate": {"n_bootstrap": 100},
        "stages": {"min_drop": 0.1, "alpha": 0.05},
    }
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config, sort_keys=False))
    _write_inputs(results, images)
    targets = [f"results/synth/{t}.parquet" for t in ("metrics", "stages", "behaviour", "answer_readout")] + [
        f"results/figures/synth/{f}.{x}" for f in ("accuracy", "drop_heatmap", "answers", "answer_readout") for x in ("png", "svg", "vl.json")
    ] + [f"results/figures/depth_panel.{x}" for x in ("png", "svg", "vl.json")]
    dry = _snakemake(tmp_path / "work", configfile, *targets, "--dry-run", "--quiet", "rules")
    scheduled = set(re.findall(r"^(\w+)\s+\d+$", dry.stdout, flags=re.M)) - {"total"}
    assert scheduled == {"train_probe", "evaluate", "aggregate", "figures", "depth_panel"}  # no extraction
    _snakemake(tmp_path / "work", configfile, "--cores", "2", *targets)

    metrics = pl.read_parquet(results / "synth" / "metrics.parquet")
    assert metrics.height == len(PROMPTS) * (NUM_LAYERS + 1)
    assert {"model", "layer", "depth", "prompt", "family", "accuracy", "drop", "drop_p",
            "shift_corrected_accuracy", "control_accuracy", "selectivity"} <= set(metrics.columns)
    for row in metrics.select("position", "layer", "probe_converged", "control_converged").unique().iter_rows(named=True):
        for kind, folder in (("probe", ""), ("control", "control/")):
            fit = json.loads((results / "synth" / "probes" / f"{folder}layer{row['layer']}.json").read_text())["fit"]
            assert row[f"{kind}_converged"] == fit[row["position"]]["converged"]
    neg_last = metrics.filter((pl.col("prompt") == "neg_plane") & (pl.col("layer") == NUM_LAYERS)).row(0, named=True)
    assert neg_last["drop"] > 0.3 and neg_last["shift_corrected_drop"] < neg_last["drop"]
    stages = pl.read_parquet(results / "synth" / "stages.parquet").filter(pl.col("detected"))
    assert dict(zip(stages["stage"], zip(stages["start_layer"], stages["end_layer"]))) == {
        "visual_grounding": (0, NUM_LAYERS - 1), "semantic_reasoning": (NUM_LAYERS, NUM_LAYERS)}
    behaviour = pl.read_parquet(results / "synth" / "behaviour.parquet")
    assert behaviour["prompt"].to_list() == [p["id"] for p in PROMPTS]
    readout = pl.read_parquet(results / "synth" / "answer_readout.parquet")
    assert readout.select("prompt", "layer").rows() == [(p["id"], layer) for p in PROMPTS for layer in range(NUM_LAYERS + 1)]
    assert (tmp_path / "work" / "logs" / "evaluate" / "synth" / "neg_plane" / "layer2.log").exists()
    assert (tmp_path / "work" / "benchmarks" / "train_probe" / "synth" / "layer0.tsv").exists()

    _snakemake(tmp_path / "work", configfile, "--report", "results/report.html", *targets)
    html = (results / "report.html").read_text()
    assert html.count("data:image/svg+xml;charset=utf8;filename=") >= 4  # the four figures, inlined
    assert '<script src="http' not in html  # self-contained
    assert "synthetic/model" in html and "stratified" in html  # captions rendered with config and params
