"""Finished runs in a notebook: the per-model tables of one or several result folders as polars
DataFrames, each row tagged with its run and model, the provenance of every run, and lazy scans
of the embeddings (nothing is read until `.collect()`).

    from stagelens.results import load_results
    res = load_results("results", "other-machine/results")
    res.metrics.filter(pl.col("prompt") == "neg_animal")
    res.embeddings(model="effnet-smollm2", split="test", prompt="anchor", layers=[9]).collect()
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

METADATA_KEY = b"stagelens"
MODEL_TABLES = ("metrics", "stages", "behaviour", "answer_readout")
# What a run's embedding/answers metadata says about how it was made, in the order a reader wants it.
PROVENANCE_KEYS = (
    "model_id", "revision", "architecture", "dtype", "device", "num_layers", "hidden_size",
    "layer_convention", "stagelens_version", "transformers_version", "torch_version",
)  # fmt: skip


class ResultsError(ValueError):
    """A folder that holds no finished stagelens run, or a table no run has."""


def _metadata(path: Path) -> dict:
    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def run_models(root: str | os.PathLike) -> list[str]:
    """Models with a finished aggregate (`<model>/metrics.parquet`) under a result folder, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ResultsError(f"{root} is not a directory")
    models = sorted(p.parent.name for p in root.glob("*/metrics.parquet"))
    if not models:
        raise ResultsError(f"{root} holds no finished model (no <model>/metrics.parquet); has the run finished?")
    return models


def provenance_row(root: Path, model: str) -> dict[str, object]:
    """How one model's results were made: its answers' metadata, the split's, the probe method."""
    row: dict[str, object] = {"results": str(root), "model": model}
    answers = sorted((root / model / "answers" / "test").glob("*.parquet"))
    meta = _metadata(answers[0]) if answers else {}
    row.update({key: meta.get(key) for key in PROVENANCE_KEYS})
    manifest = root / "data" / "manifest.parquet"
    data = _metadata(manifest) if manifest.is_file() else {}
    row.update(
        dataset_root=data.get("root"),
        dataset_format=data.get("format", "imagefolder" if data else None),
        seed=data.get("seed"),
        train_per_class=data.get("train_per_class"),
        test_per_class=data.get("test_per_class"),
        n_classes=len(data["classes"]) if "classes" in data else None,
    )
    records = sorted((root / model / "probes").glob("layer*.json"))
    probe = json.loads(records[0].read_text()) if records else {}
    row["probe_method"] = probe.get("solver") or probe.get("method")
    return row


@dataclass(frozen=True)
class Results:
    """The tables of one or several runs; `run` names the result folder a row came from."""

    runs: dict[str, Path]  # run name -> result folder
    models: dict[str, list[str]]  # run name -> its models

    def table(self, name: str) -> pl.DataFrame:
        """`<model>/<name>.parquet` of every run and model, stacked, with `run` in front.

        Columns a run lacks are null (runs of different stagelens versions still stack).
        """
        frames = [
            pl.read_parquet(path).select(pl.lit(run).alias("run"), pl.all())
            for run, root in self.runs.items()
            for model in self.models[run]
            if (path := root / model / f"{name}.parquet").is_file()
        ]
        if not frames:
            raise ResultsError(f"no run has a {name!r} table ({', '.join(str(r) for r in self.runs.values())})")
        return pl.concat(frames, how="diagonal_relaxed")

    @property
    def metrics(self) -> pl.DataFrame:
        """Accuracy, drop, CIs, selectivity... per run x model x position x layer x prompt."""
        return self.table("metrics")

    @property
    def stages(self) -> pl.DataFrame:
        """Detected stages per run x model x position."""
        return self.table("stages")

    @property
    def behaviour(self) -> pl.DataFrame:
        """The model's own answer shares per run x model x prompt."""
        return self.table("behaviour")

    @property
    def provenance(self) -> pl.DataFrame:
        """One row per run x model: model id, revision, dtype, layer convention, versions, dataset, split seed, probe method."""
        rows = [
            {"run": run, **provenance_row(root, model)} for run, root in self.runs.items() for model in self.models[run]
        ]
        return pl.DataFrame(rows, infer_schema_length=None)

    def embedding_files(
        self, model: str, split: str, prompt: str, layers: Sequence[int] | None = None, run: str | None = None
    ) -> list[tuple[str, int, Path]]:
        """(run, layer, file) of one model x split x prompt, by run then layer."""
        found = []
        for name in [run] if run is not None else list(self.runs):
            folder = self.runs[name] / model / "embeddings" / split / prompt
            for path in folder.glob("layer*.parquet"):
                layer = int(path.stem.removeprefix("layer"))
                if layers is None or layer in layers:
                    found.append((name, layer, path))
        if not found:
            raise ResultsError(f"no embeddings of model {model!r}, split {split!r}, prompt {prompt!r}, layers {layers}")
        return sorted(found, key=lambda item: (list(self.runs).index(item[0]), item[1]))

    def embeddings(
        self, model: str, split: str = "test", prompt: str = "anchor", layers: Sequence[int] | None = None,
        run: str | None = None,
    ) -> pl.LazyFrame:  # fmt: skip
        """A lazy scan of the embedding files (run, layer, sample_id, label, one vector column per position).

        Filters and column choices are pushed into the Parquet reads: selecting one position of
        one layer reads only that.
        """
        scans = [
            pl.scan_parquet(path).select(pl.lit(name).alias("run"), pl.lit(layer, pl.Int32).alias("layer"), pl.all())
            for name, layer, path in self.embedding_files(model, split, prompt, layers, run)
        ]
        return pl.concat(scans, how="vertical")


def load_results(*roots: str | os.PathLike, names: Sequence[str] | None = None) -> Results:
    """Open finished result folders (the config's `results:`); runs are named by `names`, else by the folder."""
    if not roots:
        raise ResultsError("give at least one result folder")
    paths = [Path(root) for root in roots]
    labels = list(names) if names is not None else [str(p) for p in paths]
    if len(labels) != len(paths) or len(set(labels)) != len(labels):
        raise ResultsError(f"need one distinct name per result folder; got {labels} for {len(paths)} folders")
    runs = dict(zip(labels, paths))
    return Results(runs=runs, models={name: run_models(path) for name, path in runs.items()})
