"""The workflow as a Snakemake module of another project, deployed as snakedeploy does it (no network):
the project's workflow/Snakefile declares this checkout's workflow/Snakefile as a module with the
project's config; scripts, schemas and the shipped resources/ come from the checkout, config,
results and logs stay in the project."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# What `snakedeploy deploy-workflow <repo> <project>` writes (its use_module template), with the
# local checkout as the module's source.
PROJECT_SNAKEFILE = """\
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


module stagelens:
    snakefile:
        "{snakefile}"
    config:
        config


use rule * from stagelens
"""


def tiny_config() -> dict:
    """The shipped Fashion-MNIST images named by their path inside the checkout, a tiny model."""
    return {
        "seed": 0,
        "results": "out",
        "dataset": {
            "root": "resources/fashion_mnist",
            "class_list": "resources/fashion_mnist/classes.tsv",
            "train_per_class": 2,
            "test_per_class": 1,
        },
        "models": {"tiny-llava": {"recipe": "tiny-llava", "num_layers": 2, "device": "cpu", "batch_size": 8}},
        "prompts": {
            "anchor": {"id": "anchor", "text": "Does this image show clothing? Answer yes or no.", "expected": "yes"},
            "variants": [{"id": "neg", "family": "negation", "text": "Does this image show an animal? Answer yes or no.", "expected": "no"}],
        },
        "probe": {"cv_folds": 2, "Cs": [1.0], "max_iter": 100},
        "evaluate": {"n_bootstrap": 20},
    }


@pytest.mark.slow
def test_deployed_module_runs_the_tiny_config(tmp_path):
    project = tmp_path / "my-project"
    (project / "workflow").mkdir(parents=True)
    (project / "config").mkdir()
    (project / "workflow" / "Snakefile").write_text(PROJECT_SNAKEFILE.format(snakefile=REPO / "workflow" / "Snakefile"))
    (project / "config" / "config.yaml").write_text(yaml.safe_dump(tiny_config(), sort_keys=False))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--workflow-profile", "none", "--show-failed-logs"]
    result = subprocess.run(cmd, cwd=project, capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    out = project / "out"
    metrics = pl.read_parquet(out / "tiny-llava" / "metrics.parquet")
    assert sorted(metrics["layer"].unique().to_list()) == [0, 1, 2]
    manifest = pl.read_parquet(out / "data" / "manifest.parquet")
    assert manifest.height == 10 * 3
    prompts = metrics.filter(pl.col("readout") == "prompt")["prompt"].unique().sort().to_list()
    assert prompts == ["anchor", "neg"] and metrics.filter(pl.col("readout") == "image")["position"].unique().to_list() == ["image_mean"]
    # The images came from the checkout's resources/, the outputs and logs went to the project.
    assert all(Path(p).is_relative_to(REPO / "resources" / "fashion_mnist") for p in manifest["path"])
    assert (project / "logs" / "prepare_dataset.log").is_file()
    assert (out / "figures" / "depth_panel.svg").is_file()
