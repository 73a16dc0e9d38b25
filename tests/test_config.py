"""Config validation: defaults are filled, and every bad config names the key and what was expected."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from stagelens.config import ConfigError, all_prompts, enabled_models, load_config, patched_variants, read_schema
from stagelens.spec import model_layers

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"

MINIMAL = {
    "dataset": {"root": "images"},
    "models": {"tiny-llava": {"recipe": "tiny-llava", "num_layers": 2}},
    "prompts": {
        "anchor": {"id": "anchor", "text": "Does this image show an animal?", "expected": "yes"},
        "variants": [{"id": "neg", "family": "negation", "text": "Does this image show a plane?", "expected": "no"}],
    },
}


def load(cfg: dict) -> dict:
    return load_config(cfg, SCHEMA)


def mutated(edit) -> dict:
    cfg = copy.deepcopy(MINIMAL)
    edit(cfg)
    return cfg


def test_defaults_are_filled_as_documented():
    cfg = load(MINIMAL)
    assert cfg["seed"] == 0
    assert cfg["results"] == "results"
    assert cfg["dataset"] == {
        "format": "imagefolder",
        "root": "images",
        "class_list": None,
        "image_column": "image",
        "label_column": "label",
        "class_names": None,
        "labels": None,
        "train_per_class": 50,
        "test_per_class": 30,
        "on_broken_image": "error",
    }
    assert cfg["models"]["tiny-llava"] == {
        "recipe": "tiny-llava",
        "num_layers": 2,
        "revision": "main",
        "dtype": "float32",
        "vector_dtype": "float32",
        "device": "auto",
        "batch_size": 4,
        "share_prefix": False,
        "layers": None,
        "positions": ["last", "image_mean"],
        "vision_num_layers": None,
        "vision_layers": None,
        "max_pixels": None,
        "projector": "train",
        "trust_remote_code": False,
        "enabled": True,
    }
    assert cfg["prompts"]["anchor"]["family"] == "anchor"
    assert cfg["prompts"]["anchor"]["before_image"] == cfg["prompts"]["variants"][0]["before_image"] == ""
    assert cfg["probe"] == {"cv_folds": 5, "Cs": [0.001, 0.01, 0.1, 1.0, 10.0], "max_iter": 1000, "tol": 1e-4,
                            "solver": "torch", "device": "cpu"}
    assert cfg["evaluate"] == {"n_bootstrap": 1000, "ci": 0.95}
    assert cfg["stages"] == {"min_drop": 0.05, "alpha": 0.05}


def test_input_is_not_mutated_and_defaults_are_not_shared():
    before = copy.deepcopy(MINIMAL)
    first = load(MINIMAL)
    assert MINIMAL == before
    first["models"]["tiny-llava"]["positions"].append("x")
    assert load(MINIMAL)["models"]["tiny-llava"]["positions"] == ["last", "image_mean"]


def test_given_values_win_over_defaults():
    cfg = load(mutated(lambda c: c["dataset"].update(train_per_class=7, on_broken_image="skip")))
    assert cfg["dataset"]["train_per_class"] == 7
    assert cfg["dataset"]["on_broken_image"] == "skip"


BAD = [
    (
        lambda c: c["models"]["tiny-llava"].update(dtype="float64"),
        "config error at models.tiny-llava.dtype: 'float64' is not one of ['float32', 'bfloat16', 'float16']",
    ),
    (lambda c: c["dataset"].pop("root"), "config error at dataset: 'root' is a required property"),
    (lambda c: c["dataset"].update(train_per_class=0), "config error at dataset.train_per_class: 0 is less than the minimum of 1"),
    (lambda c: c["dataset"].update(on_broken_image="ignore"), "config error at dataset.on_broken_image: 'ignore' is not one of"),
    (lambda c: c["dataset"].update(format="webdataset"), "config error at dataset.format: 'webdataset' is not one of"),
    (lambda c: c["dataset"].update(format="imagenet_val"), "config error at dataset: 'labels' is a required property"),
    (lambda c: c.update(sed=1), "config error at <top level>: Additional properties are not allowed ('sed' was unexpected)"),
    (lambda c: c["models"]["tiny-llava"].update(layer=[1]), "config error at models.tiny-llava: Additional properties are not allowed ('layer'"),
    (lambda c: c["models"]["tiny-llava"].update(layers="all"), "config error at models.tiny-llava.layers: 'all' is not of type 'array', 'null'"),
    (lambda c: c["models"]["tiny-llava"].update(layers=[1, 1]), "config error at models.tiny-llava.layers: [1, 1] has non-unique elements"),
    (lambda c: c["models"]["tiny-llava"].update(positions=["first"]), "config error at models.tiny-llava.positions[0]: 'first' is not one of"),
    (lambda c: c["models"]["tiny-llava"].update(device="gpu"), "config error at models.tiny-llava.device: 'gpu' does not match"),
    (lambda c: c["models"]["tiny-llava"].pop("num_layers"), "config error at models.tiny-llava: 'num_layers' is a required property"),
    (lambda c: c["models"].update({"bad name": c["models"]["tiny-llava"]}), "config error at models: 'bad name' does not match"),
    (lambda c: c["prompts"]["variants"][0].update(id="neg/1"), "config error at prompts.variants[0].id: 'neg/1' does not match"),
    (lambda c: c["prompts"]["variants"][0].pop("family"), "config error at prompts.variants[0]: 'family' is a required property"),
    (lambda c: c["prompts"]["variants"][0].update(expected="No"), "config error at prompts.variants[0].expected: 'No' is not one of"),
    (lambda c: c.update(evaluate={"ci": 1.5}), "config error at evaluate.ci: 1.5 is greater than or equal to the maximum of 1"),
    (lambda c: c.update(probe={"cv_folds": 1}), "config error at probe.cv_folds: 1 is less than the minimum of 2"),
    (lambda c: c.update(probe={"device": "gpu"}), "config error at probe.device: 'gpu' does not match"),
    (lambda c: c.update(probe={"solver": "saga"}), "config error at probe.solver: 'saga' is not one of"),
    # Cross-field rules (not expressible in the schema).
    (
        lambda c: c["models"]["tiny-llava"].update(path="llava-hf/llava-1.5-7b-hf"),
        "config error at models.tiny-llava: exactly one of 'recipe' or 'path' must be set (found both)",
    ),
    (
        lambda c: c["models"]["tiny-llava"].pop("recipe"),
        "config error at models.tiny-llava: exactly one of 'recipe' or 'path' must be set (found neither)",
    ),
    (
        lambda c: c["models"]["tiny-llava"].update(layers=[0, 3]),
        "config error at models.tiny-llava.layers[1]: layer 3 is outside 0..2 (num_layers=2)",
    ),
    (
        lambda c: c["prompts"]["variants"].append(dict(c["prompts"]["variants"][0])),
        "config error at prompts.variants[1].id: duplicate prompt id 'neg' (also prompts.variants[0])",
    ),
    (
        lambda c: c["prompts"]["variants"][0].update(id="anchor"),
        "config error at prompts.variants[0].id: 'anchor' is the anchor's id; variant ids must differ from it",
    ),
    (
        lambda c: c["models"].update({"tiny.llava": {"recipe": "tiny-llava", "num_layers": 2}}),
        "config error at models.tiny.llava: name collides with model 'tiny-llava' in rule name 'extract_tiny_llava'",
    ),
    (
        lambda c: c["models"]["tiny-llava"].update(enabled=False),
        "config error at models: no model has enabled: true",
    ),
    (
        lambda c: c["models"]["tiny-llava"].update(vector_dtype="float16"),
        "config error at models.tiny-llava.vector_dtype: float16 vectors need a 16-bit model dtype",
    ),
    (
        lambda c: c["prompts"]["variants"][0].update(family="negaton"),
        "config error at prompts.variants[0].family: unknown family 'negaton' (did you mean 'negation'?)",
    ),
    (
        lambda c: c["prompts"]["variants"].append({**c["prompts"]["variants"][0], "id": "Neg"}),
        "config error at prompts.variants[1].id: prompt id 'Neg' differs from 'neg' (prompts.variants[0]) only in case",
    ),
    (
        lambda c: c["prompts"]["variants"][0].update(id="ANCHOR"),
        "config error at prompts.variants[0].id: prompt id 'ANCHOR' differs from 'anchor' (prompts.anchor) only in case",
    ),
    (
        lambda c: c["models"].update({"Tiny-Llava": {"recipe": "tiny-llava", "num_layers": 2}}),
        "config error at models.Tiny-Llava: name differs from model 'tiny-llava' only in case",
    ),
    (
        lambda c: c["prompts"].update(families=["negation", "negation"]),
        "config error at prompts.families: ['negation', 'negation'] has non-unique elements",
    ),
]


@pytest.mark.parametrize("edit, message", BAD, ids=[m.split(":")[0].removeprefix("config error at ") + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_config_names_the_key_and_the_expectation(edit, message):
    with pytest.raises(ConfigError) as info:
        load(mutated(edit))
    assert message in str(info.value)


def test_declared_families_are_accepted():
    cfg = load(mutated(lambda c: (c["prompts"].update(families=["syntax"]),
                                  c["prompts"]["variants"][0].update(family="syntax"))))
    assert cfg["prompts"]["variants"][0]["family"] == "syntax"
    assert load(MINIMAL)["prompts"]["families"] == []


def test_every_problem_is_reported_at_once():
    def edit(c):
        c["models"]["tiny-llava"]["dtype"] = "float64"
        c["dataset"]["test_per_class"] = -1

    with pytest.raises(ConfigError) as info:
        load(mutated(edit))
    lines = str(info.value).splitlines()
    assert any(line.startswith("config error at dataset.test_per_class:") for line in lines)
    assert any(line.startswith("config error at models.tiny-llava.dtype:") for line in lines)


def test_yaml_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(mutated(lambda c: c["models"]["tiny-llava"].update(batch_size=0))))
    with pytest.raises(ConfigError, match=r"models\.tiny-llava\.batch_size: 0 is less than the minimum of 1(.|\n)*bad\.yaml"):
        load_config(path, SCHEMA)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path, SCHEMA)


def test_helpers_follow_the_config():
    cfg = load(
        mutated(
            lambda c: c["models"].update(
                {"off": {"path": "x/y", "num_layers": 3, "enabled": False}, "some": {"path": "x/z", "num_layers": 5, "layers": [5, 0, 2]}}
            )
        )
    )
    assert list(enabled_models(cfg)) == ["tiny-llava", "some"]
    assert model_layers(cfg["models"]["tiny-llava"]) == [0, 1, 2]
    assert model_layers(cfg["models"]["some"]) == [0, 2, 5]
    assert [p["id"] for p in all_prompts(cfg)] == ["anchor", "neg"]


def test_patching_skips_variants_with_text_before_the_image():
    """By default every variant is patched but those with before_image (they share no image
    tokens with the anchor, and patching runs those once)."""
    look = {"id": "look", "family": "lexical", "text": "Does this image show an animal?", "expected": "yes",
            "before_image": "Look at this photo. "}
    cfg = load(mutated(lambda c: (c["prompts"]["variants"].append(look), c.update(patching={"enabled": True}))))
    assert [v["id"] for v in patched_variants(cfg)] == ["neg"]


def _schema_keys(schema: dict, defs: dict) -> set[str]:
    """Every property name anywhere in the schema (following $ref), for the README check."""
    keys: set[str] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "$ref" in node:
                stack.append(defs[node["$ref"].rsplit("/", 1)[-1]])
            for name, sub in node.get("properties", {}).items():
                keys.add(name)
                stack.append(sub)
            stack.extend(v for k, v in node.items() if k in ("items", "additionalProperties", "allOf"))
        elif isinstance(node, list):
            stack.extend(node)
    return keys


def test_config_readme_documents_every_key():
    schema = read_schema(SCHEMA)
    readme = (REPO / "config" / "README.md").read_text(encoding="utf-8")
    documented = {part for key in re.findall(r"`([A-Za-z_.<>]+)`", readme) for part in key.split(".")}
    missing = _schema_keys(schema, schema["$defs"]) - documented
    assert not missing, f"config/README.md does not document: {sorted(missing)}"


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml"])
def test_shipped_configs_validate(name):
    path = REPO / "config" / name
    if not path.exists():
        pytest.skip(f"config/{name} not written yet")
    cfg = load_config(path, SCHEMA)
    assert enabled_models(cfg)
