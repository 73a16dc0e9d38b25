"""Run the tiny workflow from two source trees and compare their result tables value for value.

    python tests/parity_check.py REF [AGAINST] [--workdir DIR] [--embedded] [--cores N]

REF is a git revision of this repository (e.g. the commit before a refactor); its tree is
exported with `git archive` and run with this checkout's interpreter, as is AGAINST (another
revision, exported the same way) or, without it, the working tree.
The config is the tiny one below, or with `--embedded` the `make run` default (REF's own
config/config.yaml: the embedded model with its projector trained or shipped as REF's config
says, every prompt, patching where REF has it), shrunk to fewer images per class and a few layers
so that both runs take minutes, not the better part of an hour each.
Each tree's Snakefile puts its own src/ first on the path, so each run uses its own library.
Exit status 0 when metrics, stages and behaviour tables are identical (same rows, same values,
same order); otherwise the first differences are printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
import yaml

REPO = Path(__file__).resolve().parents[1]
TABLES = ("metrics", "stages", "behaviour")
MODELS = {
    "tiny-llava": {"recipe": "tiny-llava", "num_layers": 2, "device": "cpu", "batch_size": 8,
                   "positions": ["last", "image_mean"]},
    "tiny-qwen2-vl": {"recipe": "tiny-qwen2-vl", "num_layers": 2, "device": "cpu", "batch_size": 8},
}


def tiny_config() -> dict:
    """The default config's prompts and dataset, shrunk to tiny models and a few images per class."""
    cfg = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
    cfg["dataset"].update(root=str(REPO / cfg["dataset"]["root"]), class_list=str(REPO / cfg["dataset"]["class_list"]),
                          train_per_class=6, test_per_class=4)
    cfg["models"] = MODELS
    cfg["probe"] = {"cv_folds": 2, "Cs": [0.1, 1.0], "max_iter": 200}
    cfg["evaluate"] = {"n_bootstrap": 50}
    return cfg


def embedded_config(tree: Path, train_per_class: int, test_per_class: int, layers: list[int]) -> dict:
    """`tree`'s own default config (what `make run` runs), with fewer images and layers."""
    cfg = yaml.safe_load((tree / "config" / "config.yaml").read_text(encoding="utf-8"))
    cfg["dataset"].update(root=str(tree / cfg["dataset"]["root"]), class_list=str(tree / cfg["dataset"]["class_list"]),
                          train_per_class=train_per_class, test_per_class=test_per_class)
    for model in cfg["models"].values():
        model["layers"] = layers
    return cfg


def run_workflow(tree: Path, workdir: Path, cfg: dict, cores: int = 2) -> Path:
    """Run `tree`'s Snakefile to its default targets in `workdir`; returns the results folder."""
    workdir.mkdir(parents=True, exist_ok=True)
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    # workflow/Snakefile since the workflow became deployable as a module; older trees have it at the root.
    snakefile = tree / "workflow" / "Snakefile" if (tree / "workflow" / "Snakefile").is_file() else tree / "Snakefile"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--directory", str(workdir),
           "--configfile", str(configfile), "--replace-workflow-config", "--workflow-profile", "none",
           "--cores", str(cores), "--quiet", "rules"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"workflow of {tree} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return workdir / cfg["results"]


def export(revision: str, tree: Path) -> Path:
    """The files of `revision` (git archive) under `tree`."""
    tree.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


def differences(before: Path, after: Path, models: list[str]) -> list[str]:
    """Every table of every model, compared exactly (columns, dtypes, row order, values)."""
    found = []
    for model in models:
        for table in TABLES:
            a = pl.read_parquet(before / model / f"{table}.parquet")
            b = pl.read_parquet(after / model / f"{table}.parquet")
            if a.schema != b.schema:
                found.append(f"{model}/{table}: schema {a.schema} != {b.schema}")
            elif a.height != b.height:
                found.append(f"{model}/{table}: {a.height} rows != {b.height}")
            elif not a.equals(b, null_equal=True):
                cols = [c for c in a.columns if not a[c].equals(b[c], check_names=True, null_equal=True)]
                found.append(f"{model}/{table}: values differ in columns {cols}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="git revision to compare against")
    parser.add_argument("against", nargs="?", help="git revision to compare (default: the working tree)")
    parser.add_argument("--workdir", type=Path, help="keep both runs here (default: a temporary folder)")
    parser.add_argument("--embedded", action="store_true", help="the make-run default, shrunk, instead of tiny models")
    parser.add_argument("--per-class", type=int, nargs=2, default=(10, 6), metavar=("TRAIN", "TEST"),
                        help="images per class with --embedded")
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 30], help="layers with --embedded")
    parser.add_argument("--cores", type=int, default=2, help="Snakemake's --cores for each run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stagelens-parity-") as tmp:
        work = args.workdir or Path(tmp)
        ref_tree = export(args.ref, work / "ref-tree")
        cfg = embedded_config(ref_tree, *args.per_class, args.layers) if args.embedded else tiny_config()
        models = [name for name, model in cfg["models"].items() if model.get("enabled", True)]
        before = run_workflow(ref_tree, work / "ref-run", cfg, args.cores)
        tree = export(args.against, work / "against-tree") if args.against else REPO
        after = run_workflow(tree, work / "against-run", cfg, args.cores)
        found = differences(before, after, models)
        rows = sum(pl.read_parquet(after / model / "metrics.parquet").height for model in models)
    for line in found:
        print(line)
    verdict = "DIFFERENT" if found else "identical"
    print(f"{verdict}: {', '.join(TABLES)} of {', '.join(models)} ({rows} metrics rows), "
          f"{args.against or 'working tree'} against {args.ref}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
