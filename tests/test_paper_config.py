"""config/paper.yaml and resources/imagenet_dogs.tsv: the paper's runs as shipped.

Checks the class list (the 120 Stanford Dogs synsets), the prompts against the paper's wording,
and the jobs a dry run of the paper config schedules, counted by hand.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stagelens.config import load_config

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "config" / "paper.yaml"
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
DOGS = REPO / "resources" / "imagenet_dogs.tsv"

ANCHOR = "Does this image show an animal? The answer must be always yes or no."


def read_dogs() -> list[dict]:
    with open(DOGS, encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def test_class_list_is_the_120_stanford_dogs_synsets():
    rows = read_dogs()
    ids = [r["folder"] for r in rows]
    assert len(ids) == 120 and len(set(ids)) == 120
    assert all(re.fullmatch(r"n\d{8}", i) for i in ids)
    assert ids == sorted(ids), "WordNet-id order"
    assert all(r["name"].strip() == r["name"] and r["name"] for r in rows)
    assert (rows[0]["folder"], rows[0]["name"]) == ("n02085620", "Chihuahua")
    assert (rows[-1]["folder"], rows[-1]["name"]) == ("n02116738", "African hunting dog")
    # ImageNet-1k's dogs (n02085620..n02113978) minus the dalmatian, plus three wild dogs.
    assert "n02110341" not in ids
    assert ids[-4:] == ["n02113978", "n02115641", "n02115913", "n02116738"]


def test_paper_config_validates_and_names_the_paper_models():
    cfg = load_config(PAPER, SCHEMA)
    enabled = {name: m for name, m in cfg["models"].items() if m["enabled"]}
    assert {name: (m["path"], m["num_layers"]) for name, m in enabled.items()} == {
        "llava-1.5-7b": ("llava-hf/llava-1.5-7b-hf", 32),
        "llava-next-llama3-8b": ("llava-hf/llama3-llava-next-8b-hf", 32),
        "qwen2-vl-7b": ("Qwen/Qwen2-VL-7B-Instruct", 28),
    }
    for m in cfg["models"].values():
        assert m["dtype"] == "bfloat16" and m["positions"] == ["last", "image_mean"]
        assert re.fullmatch(r"[0-9a-f]{40}", m["revision"]), "pinned commit hash"
    assert enabled["qwen2-vl-7b"]["max_pixels"] == 448 * 448
    assert cfg["dataset"]["class_list"] == "resources/imagenet_dogs.tsv"
    assert (cfg["dataset"]["train_per_class"], cfg["dataset"]["test_per_class"]) == (50, 20)


def test_prompts_follow_the_paper():
    prompts = yaml.safe_load(PAPER.read_text())["prompts"]
    assert prompts["anchor"] == {"id": "anchor", "family": "anchor", "text": ANCHOR, "expected": "yes"}
    by_id = {p["id"]: p for p in prompts["variants"]}
    assert {i: (p["family"], p["expected"]) for i, p in by_id.items()} == {
        "lex_picture": ("lexical", "yes"),
        "lex_feature": ("lexical", "yes"),
        "neg_plane": ("negation", "no"),
        "fmt_10": ("format", "1"),
        "ctl_suffix": ("control", "yes"),
        "ctl_reword": ("control", "yes"),
    }
    # Each variant is the anchor with exactly the paper's edit.
    assert by_id["lex_picture"]["text"] == ANCHOR.replace("image", "picture")
    assert by_id["lex_feature"]["text"] == ANCHOR.replace("show", "feature")
    assert by_id["neg_plane"]["text"] == ANCHOR.replace("an animal", "a plane")
    assert by_id["fmt_10"]["text"] == ANCHOR.replace("yes or no", "1 or 0")
    assert by_id["ctl_suffix"]["text"].startswith(ANCHOR + " ")
    assert by_id["ctl_reword"]["text"].startswith(ANCHOR.split("?")[0] + "?")
    assert "yes or no" in by_id["ctl_reword"]["text"]


def dry_run(tmp_path: Path, cfg: dict) -> dict[str, int]:
    """Snakemake's per-rule job counts for a dry run of `cfg` (a fresh working directory)."""
    configfile = tmp_path / "paper.yaml"
    configfile.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [
        sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"),
        "--directory", str(tmp_path), "--configfile", str(configfile), "--replace-workflow-config",
        "--workflow-profile", "none", "--dry-run", "--quiet", "rules",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    counts = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", text.split("Job stats:", 1)[1], flags=re.M))
    counts = {rule: int(n) for rule, n in counts.items()}
    assert counts.pop("total") == sum(counts.values())
    return counts


@pytest.fixture
def paper_cfg(tmp_path) -> dict:
    """config/paper.yaml with its dataset root replaced by 120 empty synset folders."""
    root = tmp_path / "imagenet-train"
    for row in read_dogs():
        (root / row["folder"]).mkdir(parents=True)
    cfg = yaml.safe_load(PAPER.read_text())
    cfg["dataset"]["root"] = str(root)
    cfg["dataset"]["class_list"] = str(DOGS)
    return cfg


@pytest.mark.slow
def test_paper_dry_run_job_counts(paper_cfg, tmp_path):
    """3 models x (1 train + 7 test extractions + 2 image passes); probes per layer 0..L
    (33 + 33 + 29 = 95) and image probes per layer; evaluations per layer x prompt (95 x 7) and
    image evaluations per layer (95); vision probes and evaluations per vision layer 0..V
    (25 + 25 + 33 = 83); one aggregate and figure set per model, a vision aggregate and
    pixels-to-answer figure each."""
    assert dry_run(tmp_path, paper_cfg) == {
        "all": 1,
        "prepare_dataset": 1,
        "extract_llava_1_5_7b": 8,
        "extract_llava_next_llama3_8b": 8,
        "extract_qwen2_vl_7b": 8,
        "image_pass_llava_1_5_7b": 2,
        "image_pass_llava_next_llama3_8b": 2,
        "image_pass_qwen2_vl_7b": 2,
        "train_probe": 95,
        "train_image_probe": 95,
        "evaluate": 665,
        "evaluate_image": 95,
        "train_vision_probe": 83,
        "evaluate_vision": 83,
        "aggregate": 3,
        "aggregate_vision": 3,
        "figures": 3,
        "pixels_to_answer": 3,
        "depth_panel": 1,
    }


@pytest.mark.slow
def test_enabling_the_control_model_adds_only_its_jobs(paper_cfg, tmp_path):
    paper_cfg["models"]["llava-next-vicuna-7b"]["enabled"] = True
    counts = dry_run(tmp_path, paper_cfg)
    assert (counts["extract_llava_next_vicuna_7b"], counts["image_pass_llava_next_vicuna_7b"]) == (8, 2)
    assert (counts["train_probe"], counts["evaluate"]) == (95 + 33, 665 + 33 * 7)
    assert (counts["train_image_probe"], counts["evaluate_image"]) == (95 + 33, 95 + 33)
    assert (counts["aggregate"], counts["figures"], counts["depth_panel"]) == (4, 4, 1)
    assert (counts["train_vision_probe"], counts["evaluate_vision"], counts["pixels_to_answer"]) == (83 + 25, 83 + 25, 4)
