"""Snakemake itself on tiny configs: the jobs a config schedules, clear config errors, a real run.

Every run happens in a temporary working directory (--directory) with its own config file
(--configfile --replace-workflow-config); nothing is written into the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

CLASSES = ("circle", "square", "stripes")
ANCHOR = {"id": "anchor", "text": "Does this image show an animal? The answer must be always yes or no.", "expected": "yes"}
LEXICAL = {"id": "lex_picture", "family": "lexical", "text": "Does this picture show an animal? The answer must be always yes or no.", "expected": "yes"}
NEGATION = {"id": "neg_plane", "family": "negation", "text": "Does this image show a plane? The answer must be always yes or no.", "expected": "no"}
# Text before the image: its image tokens see it, so they are read and evaluated per prompt.
LOOK = {**ANCHOR, "id": "look_first", "family": "control", "before_image": "Look at this photo. "}


def synthetic_image(kind: str, rng: np.random.Generator) -> Image.Image:
    """32x32 images whose class is visible: a disc, a square or stripes on noise."""
    img = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:32, :32]
    if kind == "circle":
        mask = (yy - 16) ** 2 + (xx - 16) ** 2 < 100
    elif kind == "square":
        mask = (abs(yy - 16) < 9) & (abs(xx - 16) < 9)
    else:
        mask = (xx // 4) % 2 == 0
    img[mask] = rng.integers(180, 256, 3, dtype=np.uint8)
    return Image.fromarray(img)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for kind in CLASSES:
        (root / kind).mkdir()
        for i in range(8):
            synthetic_image(kind, rng).save(root / kind / f"{kind}_{i}.png")
    return root


def tiny_config(images: Path, *, variants=(LEXICAL,), models=None) -> dict:
    return {
        "seed": 0,
        "results": "results",
        "dataset": {"root": str(images), "train_per_class": 4, "test_per_class": 3},
        # Its CLIP tower's 2 blocks are read too (vision layers 0..2).
        "models": models or {"tiny-llava": {"recipe": "tiny-llava", "num_layers": 2, "device": "cpu", "batch_size": 4,
                                            "vision_num_layers": 2}},
        "prompts": {"anchor": dict(ANCHOR), "variants": [dict(v) for v in variants]},
        "probe": {"cv_folds": 2, "Cs": [0.1, 1.0], "max_iter": 200},
        "evaluate": {"n_bootstrap": 50},
    }


def write_config(workdir: Path, cfg: dict, name: str = "config.yaml") -> Path:
    path = workdir / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def snakemake(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "workflow" / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(configfile),
        "--replace-workflow-config",
        "--workflow-profile", "none",
        *args,
    ]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env, timeout=1800)


def job_counts(result: subprocess.CompletedProcess) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table ({} when there is nothing to do)."""
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    table = text.split("Job stats:", 1)[1]
    counts = {}
    for line in table.splitlines()[3:]:
        match = re.match(r"^(\S+)\s+(\d+)\s*$", line)
        if not match:
            break
        counts[match.group(1)] = int(match.group(2))
    assert counts.pop("total") == sum(counts.values())
    return counts


def dry_run(workdir: Path, cfg: dict, name: str = "config.yaml") -> dict[str, int]:
    return job_counts(snakemake(workdir, write_config(workdir, cfg, name), "--dry-run", "--quiet", "rules"))


def planned_jobs(workdir: Path, cfg: dict, name: str = "config.yaml", *targets: str) -> list[tuple[str, dict[str, str]]]:
    """(rule, wildcards) of every job a dry run plans (for `targets`, default all), from Snakemake's job listing."""
    result = snakemake(workdir, write_config(workdir, cfg, name), "--dry-run", *targets)
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = []
    for line in (result.stdout + result.stderr).splitlines():
        if match := re.match(r"^(?:local)?rule (\S+):$", line):
            jobs.append((match.group(1), {}))
        elif (match := re.match(r"^\s+wildcards: (.*)$", line)) and jobs:
            jobs[-1][1].update(part.split("=", 1) for part in match.group(1).split(", "))
    return jobs


def expected_analysis(layers_by_model: dict[str, int], n_prompts: int, n_before_image: int = 0,
                      vision_by_model: dict[str, int] | None = None) -> dict[str, int]:
    """Jobs of the analysis rules for models new to a run (the cross-model panel is always redone);
    every model here keeps image_mean (the default), probed and evaluated once per layer, once per
    layer for each prompt with text before the image, and the models of vision_by_model (name ->
    vision layers read) once per vision layer."""
    n_layers = sum(layers_by_model.values())
    vision = {name: n for name, n in (vision_by_model or {}).items() if n}
    jobs = {
        "train_probe": n_layers,
        "evaluate": n_layers * n_prompts,
        "train_image_probe": n_layers,
        "evaluate_image": n_layers,
        "evaluate_prompt_image": n_layers * n_before_image,
        "train_vision_probe": sum(vision.values()),
        "evaluate_vision": sum(vision.values()),
        "aggregate": len(layers_by_model),
        "aggregate_vision": len(vision),
        "figures": len(layers_by_model),
        "pixels_to_answer": len(vision),
        "depth_panel": 1,
    }
    return {rule: n for rule, n in jobs.items() if n}  # as Snakemake's job stats: no rule without jobs


ANALYSIS_RULES = ("train_probe", "evaluate", "train_image_probe", "evaluate_image", "evaluate_prompt_image",
                  "train_vision_probe", "evaluate_vision", "aggregate", "aggregate_vision", "figures", "pixels_to_answer",
                  "depth_panel")


def analysis_part(counts: dict[str, int]) -> dict[str, int]:
    return {rule: counts[rule] for rule in ANALYSIS_RULES if rule in counts}


# --- dry runs ---------------------------------------------------------------------------------


def test_dry_run_schedules_one_pass_per_split_and_prompt(images, tmp_path):
    counts = dry_run(tmp_path, tiny_config(images, variants=(LEXICAL, NEGATION)))
    assert counts["prepare_dataset"] == 1
    assert counts["build_model"] == 1
    # train split for the anchor only, test split for every prompt (anchor + 2 variants)
    assert counts["extract_tiny_llava"] == 1 + 3
    assert counts["image_pass_tiny_llava"] == 2  # the image tokens once per split, for every prompt
    assert counts["all"] == 1
    # The vision tower's layers: read by the image pass (no job of their own), probed once per layer.
    assert analysis_part(counts) == expected_analysis({"tiny-llava": 3}, 3, vision_by_model={"tiny-llava": 3})


def shared(cfg: dict) -> dict:
    """cfg with every model's test-split prompts in one extraction job (share_prefix)."""
    return {**cfg, "models": {name: {**m, "share_prefix": True} for name, m in cfg["models"].items()}}


def test_shared_prefix_schedules_one_test_extraction_for_every_prompt(images, tmp_path):
    """share_prefix: the train split's anchor keeps its job, the test split's prompts share one, and
    the two write the image pass's files (no image_pass job); the analysis is unchanged."""
    jobs = planned_jobs(tmp_path, shared(tiny_config(images, variants=(LEXICAL, NEGATION, LOOK))))
    rules = [rule for rule, _ in jobs]
    assert rules.count("extract_tiny_llava") == 1 and rules.count("shared_extract_tiny_llava") == 1
    assert "image_pass_tiny_llava" not in rules
    counts = {rule: [r for r, _ in jobs].count(rule) for rule, _ in jobs}
    assert analysis_part(counts) == expected_analysis({"tiny-llava": 3}, 4, n_before_image=1, vision_by_model={"tiny-llava": 3})


def test_text_before_the_image_schedules_its_own_image_evaluation(images, tmp_path):
    """A prompt with before_image: its extraction (which keeps its image tokens) and one image-token
    evaluation per layer, its own; the other prompts keep the shared image pass."""
    jobs = planned_jobs(tmp_path, tiny_config(images, variants=(LEXICAL, LOOK)))
    own = sorted(int(w["layer"]) for rule, w in jobs if rule == "evaluate_prompt_image" and w["prompt"] == LOOK["id"])
    assert own == [0, 1, 2] and len([rule for rule, _ in jobs if rule == "evaluate_prompt_image"]) == 3
    assert sorted(w["split"] for rule, w in jobs if rule == "image_pass_tiny_llava") == ["test", "train"]
    extracted = sorted((w["split"], w["prompt"]) for rule, w in jobs if rule == "extract_tiny_llava")
    assert extracted == [("test", "anchor"), ("test", LEXICAL["id"]), ("test", LOOK["id"]), ("train", "anchor")]
    counts = {rule: [r for r, _ in jobs].count(rule) for rule, _ in jobs}
    assert analysis_part(counts) == expected_analysis({"tiny-llava": 3}, 3, n_before_image=1, vision_by_model={"tiny-llava": 3})


def test_configfile_replaces_the_default_config(images, tmp_path):
    """A user's --configfile (without --replace-workflow-config) must not merge in the default's model."""
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config" / "config.yaml")
    (tmp_path / "resources").symlink_to(REPO / "resources")  # the default's images
    configfile = write_config(tmp_path, tiny_config(images, variants=(LEXICAL,)), "mine.yaml")
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(tmp_path),
           "--workflow-profile", "none", "--dry-run", "--quiet", "rules"]
    mine = job_counts(subprocess.run([*cmd, "--configfile", str(configfile)], cwd=tmp_path,
                                     capture_output=True, text=True, timeout=600))
    analysis = set(expected_analysis({"tiny-llava": 3}, 2, vision_by_model={"tiny-llava": 3}))  # no before_image prompt
    assert set(mine) == {"prepare_dataset", "build_model", "extract_tiny_llava", "image_pass_tiny_llava", *analysis, "all"}
    assert mine["train_vision_probe"] == 3
    # Without a --configfile the default is read, and --config edits it.
    default = job_counts(subprocess.run([*cmd, "--config", "seed=3"], cwd=tmp_path,
                                        capture_output=True, text=True, timeout=600))
    assert "export_lm" in default and "build_model" not in default


def test_dry_run_with_two_models_and_a_layer_subset(images, tmp_path):
    models = {
        "tiny-llava": {"recipe": "tiny-llava", "num_layers": 2, "device": "cpu"},
        "tiny-qwen2-vl": {"recipe": "tiny-qwen2-vl", "num_layers": 4, "layers": [0, 2, 4], "device": "cpu"},
        "switched-off": {"recipe": "tiny-llava-next", "num_layers": 2, "enabled": False},
    }
    counts = dry_run(tmp_path, tiny_config(images, models=models))
    assert counts["build_model"] == 2
    assert counts["extract_tiny_llava"] == 1 + 2
    assert counts["extract_tiny_qwen2_vl"] == 1 + 2
    assert not any("next" in rule for rule in counts)
    assert analysis_part(counts) == expected_analysis({"tiny-llava": 3, "tiny-qwen2-vl": 3}, 2)


def test_invalid_config_stops_with_the_key_named(images, tmp_path):
    cfg = tiny_config(images)
    cfg["models"]["tiny-llava"]["dtype"] = "float64"
    cfg["prompts"]["variants"][0]["id"] = "anchor"
    result = snakemake(tmp_path, write_config(tmp_path, cfg), "--dry-run")
    assert result.returncode != 0
    err = result.stdout + result.stderr
    assert "config error at models.tiny-llava.dtype: 'float64' is not one of ['float32', 'bfloat16', 'float16']" in err
    assert "Traceback" not in err


def test_missing_dataset_root_is_reported(images, tmp_path):
    cfg = tiny_config(images)
    cfg["dataset"]["root"] = str(tmp_path / "no-such-folder")
    result = snakemake(tmp_path, write_config(tmp_path, cfg), "--dry-run")
    assert result.returncode != 0
    assert "no-such-folder" in result.stdout + result.stderr
    assert "prepare_dataset" in result.stdout + result.stderr


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml"])
def test_shipped_config_dry_run(name, tmp_path):
    path = REPO / "config" / name
    if not path.exists():
        pytest.skip(f"config/{name} not written yet")
    cfg = yaml.safe_load(path.read_text())
    dataset = cfg["dataset"]
    root = REPO / dataset["root"]
    # The paper's ImageNet tree is not shipped; any existing folder lets the run be planned.
    dataset["root"] = str(root if root.is_dir() else tmp_path)
    if dataset.get("class_list"):
        dataset["class_list"] = str(REPO / dataset["class_list"])
    counts = dry_run(tmp_path, cfg)
    n_prompts = 1 + len(cfg["prompts"].get("variants", []))
    models = {name: m for name, m in cfg["models"].items() if m.get("enabled", True)}
    n_layers = {name: len(m.get("layers") or range(m["num_layers"] + 1)) for name, m in models.items()}
    n_vision = {name: len(m.get("vision_layers") or range(m["vision_num_layers"] + 1)) if m.get("vision_num_layers") else 0
                for name, m in models.items()}
    for model, m in models.items():
        suffix = re.sub(r"[^A-Za-z0-9_]", "_", model)
        assert counts["extract_" + suffix] == (1 if m.get("share_prefix") else 1 + n_prompts)
        assert counts.get("shared_extract_" + suffix, 0) == (1 if m.get("share_prefix") else 0)
        # share_prefix: the prompt jobs write the image pass's files (folds_image_pass)
        assert counts.get("image_pass_" + suffix, 0) == (0 if m.get("share_prefix") else 2)
    assert counts["prepare_dataset"] == 1
    assert analysis_part(counts) == expected_analysis(n_layers, n_prompts, vision_by_model=n_vision)
    patching = cfg.get("patching", {})
    if patching.get("enabled"):
        n_patched = len(patching.get("variants") or cfg["prompts"]["variants"])
        assert counts["patch"] == len(models) * n_patched
        assert counts["aggregate_patching"] == counts["patching_figure"] == len(models)
    else:
        assert "patch" not in counts


# --- a real run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(images, tmp_path_factory):
    """The tiny config run to the end once; later tests plan changes against it."""
    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_config(images, variants=(LEXICAL, LOOK))
    result = snakemake(workdir, write_config(workdir, cfg), "--cores", "2")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return workdir, cfg


@pytest.mark.slow
def test_run_writes_the_documented_files(finished_run):
    workdir, cfg = finished_run
    res = workdir / "results"
    assert (res / "data" / "manifest.parquet").is_file()
    assert (res / "models" / "tiny-llava" / "config.json").is_file()
    for split, prompt in [("train", "anchor"), ("test", "anchor"), ("test", "lex_picture"), ("test", "look_first")]:
        for layer in (0, 1, 2):
            assert (res / "tiny-llava" / "embeddings" / split / prompt / f"layer{layer}.parquet").is_file()
        assert (res / "tiny-llava" / "answers" / split / f"{prompt}.parquet").is_file()
        assert (res / "tiny-llava" / "answer_readout" / split / f"{prompt}.parquet").is_file()
        assert (workdir / "logs" / "extract_tiny-llava" / split / f"{prompt}.log").is_file()
        assert (workdir / "benchmarks" / "extract_tiny-llava" / split / f"{prompt}.tsv").is_file()
    assert not (res / "tiny-llava" / "embeddings" / "train" / "lex_picture").exists()
    for split in ("train", "test"):
        for layer in (0, 1, 2):
            image = res / "tiny-llava" / "embeddings" / split / "image" / f"layer{layer}.parquet"
            assert pq.read_schema(image).names == ["sample_id", "label", "image_mean"]
        assert pq.read_schema(res / "tiny-llava" / "embeddings" / split / "anchor" / "layer0.parquet").names == [
            "sample_id", "label", "last"]
        assert (workdir / "logs" / "image_pass_tiny-llava" / f"{split}.log").is_file()
    # text before the image: that prompt's own files hold its image tokens
    assert pq.read_schema(res / "tiny-llava" / "embeddings" / "test" / "look_first" / "layer0.parquet").names == [
        "sample_id", "label", "last", "image_mean"]
    for log in ("prepare_dataset.log", "build_model/tiny-llava.log"):
        assert (workdir / "logs" / log).is_file()
        assert (workdir / "benchmarks" / log.replace(".log", ".tsv")).is_file()
    for table in ("metrics", "stages", "behaviour"):
        assert (res / "tiny-llava" / f"{table}.parquet").is_file()
    for layer in (0, 1, 2):
        assert (res / "tiny-llava" / "probes" / f"layer{layer}.safetensors").is_file()
        assert (res / "tiny-llava" / "probes" / "control" / f"layer{layer}.safetensors").is_file()
        assert (res / "tiny-llava" / "probes" / "image" / f"layer{layer}.safetensors").is_file()
        assert (res / "tiny-llava" / "probes" / "image" / "control" / f"layer{layer}.safetensors").is_file()
        for prompt in ("anchor", "lex_picture", "look_first", "image"):
            assert (res / "tiny-llava" / "metrics" / prompt / f"layer{layer}.parquet").is_file()
        assert (res / "tiny-llava" / "metrics" / "look_first" / f"image_layer{layer}.parquet").is_file()
    metrics = pq.read_table(res / "tiny-llava" / "metrics.parquet").to_pylist()
    assert {(r["readout"], r["position"]) for r in metrics} == {("prompt", "last"), ("image", "image_mean")}
    image_rows = [r for r in metrics if r["readout"] == "image"]
    # the image pass once per layer (no drop: no prompt moves it), and the prompt with text before
    # the image once per layer, paired with it (a drop of its own)
    assert sorted((r["prompt"], r["layer"]) for r in image_rows) == [(p, layer) for p in ("image", "look_first") for layer in (0, 1, 2)]
    assert all((r["drop"] is None) == (r["prompt"] == "image") for r in image_rows)
    pass_rows = {r["layer"]: r for r in image_rows if r["prompt"] == "image"}
    for row in (r for r in image_rows if r["prompt"] == "look_first"):
        # paired with the image pass: the accuracy moved by the drop (the same test images, the same probe)
        assert row["anchor_accuracy"] == pytest.approx(pass_rows[row["layer"]]["accuracy"])
        assert row["drop"] == pytest.approx(row["anchor_accuracy"] - row["accuracy"])
    stages = pq.read_table(res / "tiny-llava" / "stages.parquet").to_pylist()
    assert {r["position"] for r in stages} == {"last"}
    # The answer readout per prompt x layer; at the last layer it is the model's own answer (the
    # behaviour table reads the answers files, the readout table the readout files).
    readout = pq.read_table(res / "tiny-llava" / "answer_readout.parquet").to_pylist()
    assert sorted((r["prompt"], r["layer"]) for r in readout) == [
        (p, layer) for p in ("anchor", "lex_picture", "look_first") for layer in (0, 1, 2)]
    behaviour = {r["prompt"]: r for r in pq.read_table(res / "tiny-llava" / "behaviour.parquet").to_pylist()}
    for row in (r for r in readout if r["layer"] == 2):
        assert row["mean_p_yes"] == pytest.approx(behaviour[row["prompt"]]["mean_p_yes"], abs=1e-5)
        assert row["mean_p_expected"] == pytest.approx(behaviour[row["prompt"]][f"mean_p_{row['expected']}"], abs=1e-5)
    for fmt in ("png", "svg", "vl.json"):
        for figure in ("accuracy", "drop_heatmap", "answers", "answer_readout", "pixels_to_answer"):
            assert (res / "figures" / "tiny-llava" / f"{figure}.{fmt}").is_file()
        assert (res / "figures" / f"depth_panel.{fmt}").is_file()
    # The vision tower's layers: per split one file per vision layer (patch mean and CLS), their
    # probes and metrics, and the vision metrics table (test accuracy per position x vision layer).
    for split in ("train", "test"):
        for layer in (0, 1, 2):
            vision = res / "tiny-llava" / "embeddings" / split / "vision" / f"layer{layer}.parquet"
            assert pq.read_schema(vision).names == ["sample_id", "label", "patch_mean", "cls"]
            assert (res / "tiny-llava" / "probes" / "vision" / "control" / f"layer{layer}.safetensors").is_file()
            assert (res / "tiny-llava" / "metrics" / "vision" / f"layer{layer}.parquet").is_file()
    meta = json.loads(pq.read_schema(vision).metadata[b"stagelens"])
    assert meta["tower"] == "vision" and meta["num_layers"] == 2 and meta["lm_num_layers"] == 2
    assert meta["projector_input"]["vision_layers"] == [1] and meta["projector_input"]["drops_cls"] is True
    vision_metrics = pq.read_table(res / "tiny-llava" / "vision_metrics.parquet").to_pylist()
    assert sorted((r["position"], r["layer"]) for r in vision_metrics) == [
        (p, layer) for p in ("cls", "patch_mean") for layer in (0, 1, 2)]
    assert all(r["readout"] == "vision" and r["drop"] is None and 0 <= r["accuracy"] <= 1 for r in vision_metrics)
    assert all(r["depth"] == r["layer"] / 2 and r["probe_converged"] is not None for r in vision_metrics)
    spec = json.loads((res / "figures" / "tiny-llava" / "pixels_to_answer.vl.json").read_text())
    steps = next(d for d in spec["datasets"].values() if d and "step" in d[0])
    assert {r["series"] for r in steps} >= {"vision encoder (patch_mean)", "vision encoder (cls)", "LM image tokens (image_mean)"}
    # One point per layer: the image pass's image tokens, not those of the prompt with text before the image.
    assert sorted(r["step"] for r in steps if r["series"] == "LM image tokens (image_mean)") == [3, 4, 5]


@pytest.mark.slow
def test_embeddings_follow_the_manifest(finished_run):
    workdir, cfg = finished_run
    manifest = pq.read_table(workdir / "results" / "data" / "manifest.parquet").to_pylist()
    for split in ("train", "test"):
        expected = {r["sample_id"]: r["label"] for r in manifest if r["split"] == split}
        assert len(expected) == len(CLASSES) * cfg["dataset"][f"{split}_per_class"]
        table = pq.read_table(workdir / "results" / "tiny-llava" / "embeddings" / split / "anchor" / "layer2.parquet")
        got = dict(zip(table.column("sample_id").to_pylist(), table.column("label").to_pylist()))
        assert got == expected


@pytest.mark.slow
def test_second_run_has_nothing_to_do(finished_run):
    workdir, cfg = finished_run
    assert dry_run(workdir, cfg) == {}


@pytest.mark.slow
def test_adding_a_variant_costs_only_its_jobs(finished_run):
    workdir, cfg = finished_run
    grown = {**cfg, "prompts": {**cfg["prompts"], "variants": [*cfg["prompts"]["variants"], dict(NEGATION)]}}
    counts = dry_run(workdir, grown, "grown.yaml")
    # the new prompt on the test split (its answers and answer readout with it: no readout of another prompt)
    assert counts.pop("extract_tiny_llava") == 1
    assert counts.pop("evaluate") == 3  # one per layer, no probe retrained
    # no image pass, image or vision probe, image or vision evaluation: neither the image tokens nor
    # the vision tower see the prompt (the pixels-to-answer figure redraws its answer readout)
    assert counts == {"aggregate": 1, "figures": 1, "pixels_to_answer": 1, "depth_panel": 1, "all": 1}


@pytest.mark.slow
def test_adding_a_variant_with_text_before_the_image_costs_only_its_jobs(finished_run):
    """Its extraction and its evaluations (the prompt's and the image tokens'), nothing of another
    prompt's: no image pass, no probe retrained."""
    workdir, cfg = finished_run
    look_again = {**LOOK, "id": "look_again", "before_image": "Here is a photo:\n"}
    grown = {**cfg, "prompts": {**cfg["prompts"], "variants": [*cfg["prompts"]["variants"], look_again]}}
    jobs = planned_jobs(workdir, grown, "grown-before-image.yaml")
    assert {w["prompt"] for _, w in jobs if "prompt" in w} == {"look_again"}
    assert sorted((rule, w.get("split", w.get("layer"))) for rule, w in jobs if rule not in ("aggregate", "figures", "pixels_to_answer", "depth_panel", "all")) == [
        ("evaluate", "0"), ("evaluate", "1"), ("evaluate", "2"),
        ("evaluate_prompt_image", "0"), ("evaluate_prompt_image", "1"), ("evaluate_prompt_image", "2"),
        ("extract_tiny_llava", "test")]


@pytest.mark.slow
def test_shared_prefix_run_writes_the_per_prompt_runs_files(finished_run, tmp_path):
    """share_prefix on the finished run's dataset and model: one job writes every test prompt's
    files, equal to the per-prompt jobs' up to the cached continuation's float rounding (1e-4),
    with its log and benchmark; adding a variant then reruns that job for every prompt (the
    documented cost)."""
    workdir, cfg = finished_run
    for part in ("data", "models"):
        shutil.copytree(workdir / "results" / part, tmp_path / "results" / part)  # copy2 keeps the mtimes
    res, own = tmp_path / "results" / "tiny-llava", workdir / "results" / "tiny-llava"
    prompts = ["anchor", "lex_picture", "look_first"]
    targets = [f"results/tiny-llava/{kind}/test/{p}.parquet" for p in prompts for kind in ("answers", "answer_readout")]
    result = snakemake(tmp_path, write_config(tmp_path, shared(cfg)), "--cores", "2", *targets)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "shared_extract_tiny_llava" in result.stdout + result.stderr
    assert (tmp_path / "logs" / "extract_tiny-llava" / "test" / "prompts.log").is_file()
    assert (tmp_path / "benchmarks" / "extract_tiny-llava" / "test" / "prompts.tsv").is_file()
    for prompt in prompts:
        for layer in (0, 1, 2):
            got = pq.read_table(res / "embeddings" / "test" / prompt / f"layer{layer}.parquet")
            expected = pq.read_table(own / "embeddings" / "test" / prompt / f"layer{layer}.parquet")
            assert got.column_names == expected.column_names
            assert got.column("sample_id").equals(expected.column("sample_id"))
            for column in got.column_names[2:]:
                np.testing.assert_allclose(np.stack(got.column(column).to_numpy(zero_copy_only=False)),
                                           np.stack(expected.column(column).to_numpy(zero_copy_only=False)), atol=1e-4)
        got, expected = (pq.read_table(d / "answers" / "test" / f"{prompt}.parquet") for d in (res, own))
        np.testing.assert_allclose(got.column("p_yes").to_numpy(), expected.column("p_yes").to_numpy(), atol=1e-5)
    # The shared job wrote the image pass's test files too, from its prefix: the image pass's values.
    folded = sorted((res / "embeddings" / "test").glob("[iv]*/layer*.parquet"))
    assert {p.parent.name for p in folded} == {"image", "vision"}
    for path in folded:
        got, expected = pq.read_table(path), pq.read_table(own / path.relative_to(res))
        assert got.column_names == expected.column_names and got.column("sample_id").equals(expected.column("sample_id"))
        assert "read_from" in json.loads(got.schema.metadata[b"stagelens"])
        for column in got.column_names[2:]:
            np.testing.assert_allclose(np.stack(got.column(column).to_numpy(zero_copy_only=False)),
                                       np.stack(expected.column(column).to_numpy(zero_copy_only=False)), atol=1e-4)
    grown = shared({**cfg, "prompts": {**cfg["prompts"], "variants": [*cfg["prompts"]["variants"], dict(NEGATION)]}})
    jobs = planned_jobs(tmp_path, grown, "grown.yaml", *targets, f"results/tiny-llava/answers/test/{NEGATION['id']}.parquet")
    assert [rule for rule, _ in jobs] == ["shared_extract_tiny_llava"]  # every prompt again, not the new one alone


@pytest.mark.slow
def test_adding_a_model_costs_only_its_jobs(finished_run):
    workdir, cfg = finished_run
    models = {**cfg["models"], "tiny-qwen2-vl": {"recipe": "tiny-qwen2-vl", "num_layers": 2, "device": "cpu"}}
    counts = dry_run(workdir, {**cfg, "models": models}, "two-models.yaml")
    assert counts.pop("build_model") == 1
    assert counts.pop("extract_tiny_qwen2_vl") == 1 + 3
    assert counts.pop("image_pass_tiny_qwen2_vl") == 2
    # Only the new model's probes, evaluations, tables and figures, plus the cross-model panel.
    assert counts == {**expected_analysis({"tiny-qwen2-vl": 3}, 3, n_before_image=1), "all": 1}


@pytest.mark.slow
def test_results_loader_gives_the_run_tables(finished_run, tmp_path):
    import polars as pl
    from polars.testing import assert_frame_equal

    from stagelens.results import load_results
    from stagelens.store import read_metadata, read_vectors

    workdir, cfg = finished_run
    first = workdir / "results"
    second = tmp_path / "results"  # a second run folder: the same files, so the stacking is checkable
    shutil.copytree(first, second, ignore=shutil.ignore_patterns("models", "cache"))
    res = load_results(first, second, names=["a", "b"])
    for name, frame in (("metrics", res.metrics), ("stages", res.stages), ("behaviour", res.behaviour),
                        ("answer_readout", res.table("answer_readout"))):
        expected = pl.from_arrow(pq.read_table(first / "tiny-llava" / f"{name}.parquet"))
        assert frame["run"].to_list() == ["a"] * expected.height + ["b"] * expected.height
        for run in ("a", "b"):
            assert_frame_equal(frame.filter(pl.col("run") == run).drop("run"), expected)

    emb_meta = read_metadata(first / "tiny-llava" / "embeddings" / "test" / "anchor" / "layer1.parquet")
    prov = res.provenance.filter(pl.col("run") == "a").row(0, named=True)
    assert prov["model"] == "tiny-llava" and prov["model_id"] == emb_meta["model_id"]
    assert prov["num_layers"] == 2 and prov["layer_convention"] == emb_meta["layer_convention"]
    assert (prov["seed"], prov["train_per_class"], prov["test_per_class"], prov["n_classes"]) == (0, 4, 3, len(CLASSES))
    assert prov["dataset_format"] == "imagefolder" and prov["probe_method"]

    layer1 = res.embeddings("tiny-llava", "test", "anchor", layers=[1], run="a").collect()
    ids, labels, vectors = read_vectors(first / "tiny-llava" / "embeddings" / "test" / "anchor" / "layer1.parquet", "last")
    assert layer1["sample_id"].to_list() == list(ids) and layer1["label"].to_list() == list(labels)
    np.testing.assert_array_equal(np.stack(layer1["last"].to_numpy()), vectors)
    every = res.embeddings("tiny-llava", "train").select("run", "layer").collect()
    n_train = len(CLASSES) * cfg["dataset"]["train_per_class"]
    assert every.group_by("run", "layer").len().sort("run", "layer")["len"].to_list() == [n_train] * 6


@pytest.mark.slow
def test_summary_names_the_best_layers_and_answers(finished_run):
    import polars as pl

    from stagelens.results import load_results
    from stagelens.summary import summary_text

    workdir, cfg = finished_run
    text = summary_text(load_results(workdir / "results"), "report.html")
    metrics = pl.read_parquet(workdir / "results" / "tiny-llava" / "metrics.parquet").filter(pl.col("prompt").is_in(["anchor", "image"]))
    vision = pl.read_parquet(workdir / "results" / "tiny-llava" / "vision_metrics.parquet")
    for table, position, probe in ((metrics, "last", "anchor"), (metrics, "image_mean", "anchor"),
                                   (vision, "patch_mean", "vision"), (vision, "cls", "vision")):
        part = table.filter(pl.col("position") == position)
        top = part["accuracy"].max()
        layer = part.filter(pl.col("accuracy") == top)["layer"].min()
        assert f"best {probe} probe, {position:<10}: layer {layer:>2}/2  accuracy {top:.3f}" in text
    behaviour = pl.read_parquet(workdir / "results" / "tiny-llava" / "behaviour.parquet")
    for row in behaviour.iter_rows(named=True):
        assert f"{row['prompt']:<14} ({row['expected']:>3})  {row['share_yes']:>4.0%}" in text
    from stagelens.summary import answer_leads_from

    readout = pl.read_parquet(workdir / "results" / "tiny-llava" / "answer_readout.parquet")
    prompts = ("anchor", "lex_picture", "look_first")
    onsets = [answer_leads_from(readout.filter(pl.col("prompt") == p)) for p in prompts]
    assert "expected answer leads the readout from layer: " + ", ".join(
        f"{p} {'-' if o is None else o}/2" for p, o in zip(prompts, onsets)) in text
    assert "stages (last):" in text and text.endswith("Report: report.html")


@pytest.mark.slow
def test_patching_adds_only_its_jobs_and_writes_its_outputs(finished_run, tmp_path):
    workdir, cfg = finished_run
    run = tmp_path / "run"
    shutil.copytree(workdir, run, symlinks=True)
    patched = {**cfg, "patching": {"enabled": True, "images": 1, "seed": 0}}
    configfile = write_config(run, patched, "patching.yaml")
    counts = job_counts(snakemake(run, configfile, "--dry-run", "--quiet", "rules"))
    assert counts == {"patch": 1, "aggregate_patching": 1, "patching_figure": 1, "depth_panel": 1, "all": 1}
    result = snakemake(run, configfile, "--cores", "2")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    res = run / "results" / "tiny-llava"
    scores = pq.read_table(res / "patching" / "lex_picture.parquet")
    assert scores.num_rows == len(CLASSES) * 1 * 2 * 3  # images x directions x layers
    for table in ("patching", "causal_onsets"):
        assert (res / f"{table}.parquet").is_file()
    for fmt in ("png", "svg", "vl.json"):
        assert (run / "results" / "figures" / "tiny-llava" / f"patching.{fmt}").is_file()
    log = (run / "logs" / "patch" / "tiny-llava" / "lex_picture.log").read_text()
    assert "images_per_second=" in log and "model_calls=" in log and "naive_forwards=" in log
    assert (run / "benchmarks" / "patch" / "tiny-llava" / "lex_picture.tsv").is_file()
