"""Property tests of config validation: configs generated from the JSON schema, then broken.

Valid configs come from a strategy that reads workflow/schemas/config.schema.yaml (types, enums,
bounds, patterns, required and optional keys), nudged past the cross-field rules. Each is then
broken by one schema-driven mutation (wrong type, value outside an enum or bound, pattern
mismatch, empty or duplicated list, missing required key, unknown key) or one cross-field
mutation; the error must name the broken key. A few mutants go through `snakemake --dry-run`
to show the same check stops the workflow before any job.
Hypothesis runs derandomized with modest example counts, so the suite stays cheap and repeatable.
"""

from __future__ import annotations

import copy
import os
import string
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stagelens.config import BUILTIN_FAMILIES, ConfigError, key_path, load_config, read_schema, rule_suffix, validate_config
from stagelens.positions import IMAGE_PASS, IMAGE_POSITIONS, PROMPT_POSITIONS, VISION_PASS

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO / "workflow" / "schemas" / "config.schema.yaml"
SCHEMA = read_schema(SCHEMA_PATH)
PROPERTY = settings(max_examples=30, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def load(cfg: dict) -> dict:
    """load_config's validation, with the schema read once (reading it is 90% of a call's cost)."""
    return validate_config(cfg, SCHEMA)

Path_ = tuple[str | int, ...]  # a key path into a config


# --- generating instances from the schema -----------------------------------------------------


def resolve(node: dict) -> dict:
    """A subschema with $ref followed and allOf merged (the forms this schema uses)."""
    node = dict(node)
    if "$ref" in node:
        node = {**resolve(SCHEMA["$defs"][node.pop("$ref").rsplit("/", 1)[-1]]), **node}
    for part in node.pop("allOf", []):
        part = resolve(part)
        merged = {**node.get("properties", {})}
        for name, sub in part.get("properties", {}).items():
            merged[name] = {**merged.get(name, {}), **sub}
        required = sorted(set(node.get("required", [])) | set(part.get("required", [])))
        node = {**node, **part, "properties": merged, "required": required}
    return node


def types_of(node: dict) -> list[str]:
    kind = node.get("type")
    if kind is None:
        return ["object"] if "properties" in node else []
    return [kind] if isinstance(kind, str) else list(kind)


NAME = st.text("abcxyzAB019_-", min_size=1, max_size=6)
# An explicit alphabet spares Hypothesis building its Unicode tables (~20 s on a busy 2-core machine).
ASCII = string.ascii_letters + string.digits + string.punctuation + " "


def instances(node: dict) -> st.SearchStrategy[Any]:
    """Values that the (resolved) subschema accepts."""
    node = resolve(node)
    if "enum" in node:
        return st.sampled_from(node["enum"])
    options = [instance_of_type(node, kind) for kind in types_of(node)]
    return st.one_of(options)


def instance_of_type(node: dict, kind: str) -> st.SearchStrategy[Any]:
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(min_value=node.get("minimum", -3), max_value=node.get("minimum", 0) + 40)
    if kind == "number":
        low = node.get("minimum", node.get("exclusiveMinimum", -5.0))
        high = node.get("exclusiveMaximum", low + 20.0)
        return st.floats(low, high, exclude_min="exclusiveMinimum" in node, exclude_max="exclusiveMaximum" in node,
                         allow_nan=False)
    if kind == "string":
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True, alphabet=ASCII)
        return st.text("abc/. ", min_size=max(1, node.get("minLength", 0)), max_size=8)
    if kind == "array":
        items = instances(node.get("items", {}))
        return st.lists(items, min_size=node.get("minItems", 0), max_size=4, unique_by=repr if node.get("uniqueItems") else None)
    if kind == "object":
        return objects(node)
    raise AssertionError(f"schema type {kind!r} not covered by the generator")


def objects(node: dict) -> st.SearchStrategy[dict]:
    """Required keys always, optional ones sometimes; free-form maps (models) get 1-3 names."""
    props = node.get("properties", {})
    required = set(node.get("required", []))
    if not props and isinstance(node.get("additionalProperties"), dict):
        return st.dictionaries(NAME, instances(node["additionalProperties"]), min_size=max(1, node.get("minProperties", 0)), max_size=3)

    @st.composite
    def build(draw):
        out = {}
        for name, sub in props.items():
            if name in required or draw(st.booleans()):
                out[name] = draw(instances(sub))
        return out

    return build()


@st.composite
def valid_configs(draw) -> dict:
    """A config from the schema, then made to pass the cross-field rules (which the schema cannot say)."""
    cfg = draw(instances(SCHEMA))
    if cfg["dataset"].get("format") == "imagenet_val" and not cfg["dataset"].get("labels"):
        cfg["dataset"]["labels"] = "LOC_val_solution.csv"  # the schema's if/then: that layout needs its label file
    declared = cfg["prompts"].get("families", [])
    families = st.sampled_from([*BUILTIN_FAMILIES, *declared])
    cfg["prompts"]["anchor"]["family"] = draw(families) if "family" in cfg["prompts"]["anchor"] else "anchor"
    cfg["prompts"]["anchor"].pop("before_image", None)  # the anchor's image tokens are the image pass's
    if cfg["prompts"]["anchor"]["id"].casefold() in (IMAGE_PASS, VISION_PASS):
        cfg["prompts"]["anchor"]["id"] += "_0"  # reserved: the image pass writes under those names
    ids = {cfg["prompts"]["anchor"]["id"].casefold(), IMAGE_PASS, VISION_PASS}
    for i, variant in enumerate(cfg["prompts"].get("variants", [])):
        variant["family"] = draw(families)
        while variant["id"].casefold() in ids:
            variant["id"] += f"_{i}"
        ids.add(variant["id"].casefold())
    if cfg.get("patching", {}).get("variants"):
        # patching shares the image tokens with the anchor's: no variant with text before the image
        known = [v["id"] for v in cfg["prompts"].get("variants", []) if not v.get("before_image")]
        cfg["patching"]["variants"] = known[: len(cfg["patching"]["variants"])] or None
    models, seen = {}, set()
    for name, model in cfg["models"].items():
        if rule_suffix(name).casefold() in seen:
            continue
        seen.add(rule_suffix(name).casefold())
        if (model.get("recipe") is None) == (model.get("path") is None):
            model.pop("path", None)
            model["recipe"] = draw(st.sampled_from(resolve(SCHEMA["$defs"]["model"])["properties"]["recipe"]["enum"]))
        if model.get("layers"):
            model["layers"] = sorted({min(layer, model["num_layers"]) for layer in model["layers"]})
        if model.get("dtype", "float32") == "float32":
            model.pop("vector_dtype", None)
        if model.get("positions") and not set(model["positions"]) & set(PROMPT_POSITIONS):
            model["positions"].append(PROMPT_POSITIONS[0])  # image positions alone leave nothing per prompt
        if model.get("vision_num_layers") is None:
            model.pop("vision_layers", None)  # vision layers need the encoder's block count
        else:
            if model.get("vision_layers"):
                model["vision_layers"] = sorted({min(v, model["vision_num_layers"]) for v in model["vision_layers"]})
            if model.get("positions") and "image_mean" not in model["positions"]:
                model["positions"].append("image_mean")  # the vision tower is read by the image pass
        models[name] = model
    next(iter(models.values()))["enabled"] = True
    cfg["models"] = models
    return cfg


# --- breaking them ----------------------------------------------------------------------------


def nodes(value: Any, schema: dict, path: Path_ = ()) -> list[tuple[Path_, Any, dict]]:
    """Every (path, value, resolved subschema) of a config, depth first."""
    schema = resolve(schema)
    out = [(path, value, schema)]
    if isinstance(value, dict):
        for name, sub in value.items():
            child = schema.get("properties", {}).get(name)
            if child is None and isinstance(schema.get("additionalProperties"), dict):
                child = schema["additionalProperties"]
            if child is not None:
                out += nodes(sub, child, (*path, name))
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += nodes(item, schema["items"], (*path, i))
    return out


# A value of another JSON type for whatever a key allows (bool is not an integer in JSON Schema).
WRONG_TYPES = (12, "7", ["x"], {"x": 1})


def violations(value: Any, node: dict) -> list[tuple[str, Any, str]]:
    """(what, broken value, text the error must contain besides the path) for one node."""
    out = []
    allowed = types_of(node)
    wrong = [v for v in WRONG_TYPES if allowed and not any(isinstance(v, PY_TYPES[t]) for t in allowed)]
    if wrong:
        out.append(("type", wrong[0], "is not of type"))
    if "enum" in node:
        out.append(("enum", f"{node['enum'][0]}x", "is not one of"))
    if "minimum" in node:
        out.append(("minimum", node["minimum"] - 1, "less than the minimum"))
    if "exclusiveMinimum" in node:
        out.append(("exclusiveMinimum", node["exclusiveMinimum"], "less than or equal to the minimum"))
    if "exclusiveMaximum" in node:
        out.append(("exclusiveMaximum", node["exclusiveMaximum"], "greater than or equal to the maximum"))
    if "pattern" in node and isinstance(value, str):
        out.append(("pattern", value + "/ x", "does not match"))
    if node.get("minLength") and isinstance(value, str):
        out.append(("minLength", "", "should be non-empty"))
    if node.get("minItems") and isinstance(value, list):
        out.append(("minItems", [], "should be non-empty"))
    if node.get("uniqueItems") and isinstance(value, list) and value:
        out.append(("uniqueItems", [*value, value[0]], "non-unique elements"))
    return out


PY_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
            "object": dict, "null": type(None)}


def set_at(cfg: dict, path: Path_, value: Any) -> None:
    target = cfg
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value


def schema_breaks(cfg: dict) -> list[tuple[dict, str, str]]:
    """Every single-key break of a (defaults-filled) config: (broken config, key path the error
    must name, text the error must contain)."""
    out = []
    for path, value, node in nodes(cfg, SCHEMA):
        for _, bad, text in violations(value, node) if path else []:
            broken = copy.deepcopy(cfg)
            set_at(broken, path, bad)
            out.append((broken, key_path(list(path)), text))
        if not isinstance(value, dict):
            continue
        if node.get("additionalProperties") is False:
            broken = copy.deepcopy(cfg)
            set_at(broken, (*path, "bogus_key"), 1) if path else broken.update(bogus_key=1)
            out.append((broken, key_path(list(path)), "'bogus_key' was unexpected"))
        for name in node.get("required", []):
            broken = copy.deepcopy(cfg)
            parent = broken
            for part in path:
                parent = parent[part]
            del parent[name]
            out.append((broken, key_path(list(path)), f"'{name}' is a required property"))
    return out


def cross_field_break(cfg: dict, which: str) -> tuple[dict, str, str]:
    """One of the rules the schema cannot express, broken on a valid config."""
    cfg = copy.deepcopy(cfg)
    name, model = next(iter(cfg["models"].items()))
    prompts = cfg["prompts"]
    variants = prompts.setdefault("variants", [])
    if which == "unknown family":
        variants.append({"id": "zz_new", "family": "negaton", "text": "q", "expected": "no"})
        return cfg, f"prompts.variants[{len(variants) - 1}].family", "unknown family 'negaton'"
    if which == "case collision":
        variants.append({"id": prompts["anchor"]["id"].swapcase(), "family": "control", "text": "q", "expected": "no"})
        if variants[-1]["id"] == prompts["anchor"]["id"]:  # no letters to swap
            variants[-1]["id"] = prompts["anchor"]["id"]
            return cfg, f"prompts.variants[{len(variants) - 1}].id", "is the anchor's id"
        return cfg, f"prompts.variants[{len(variants) - 1}].id", "only in case"
    if which == "recipe and path":
        model.update(recipe="tiny-llava", path="some/model")
        return cfg, f"models.{name}", "found both"
    if which == "layer too deep":
        model["layers"] = [model["num_layers"] + 1]
        return cfg, f"models.{name}.layers[0]", "is outside"
    if which == "half vectors of a float32 model":
        model.update(dtype="float32", vector_dtype="float16")
        return cfg, f"models.{name}.vector_dtype", "need a 16-bit model dtype"
    if which == "image positions only":
        model["positions"] = list(IMAGE_POSITIONS)
        return cfg, f"models.{name}.positions", "needs at least one prompt-dependent position"
    if which == "vision layer too deep":
        model.update(vision_num_layers=2, vision_layers=[3], positions=["last", "image_mean"])
        return cfg, f"models.{name}.vision_layers[0]", "is outside 0..2"
    if which == "vision layers without image_mean":
        model.update(vision_num_layers=2, vision_layers=None, positions=["last"])
        return cfg, f"models.{name}.vision_num_layers", "add image_mean"
    if which == "vision layers without their count":
        model.update(vision_num_layers=None, vision_layers=[0])
        return cfg, f"models.{name}.vision_layers", "needs vision_num_layers"
    if which == "reserved prompt id":
        variants.append({"id": IMAGE_PASS, "family": "control", "text": "q", "expected": "no"})
        return cfg, f"prompts.variants[{len(variants) - 1}].id", "is reserved"
    if which == "unknown patching variant":
        cfg.setdefault("patching", {})["variants"] = [prompts["anchor"]["id"]]
        return cfg, "patching.variants[0]", "is not a variant id"
    if which == "text before the anchor's image":
        prompts["anchor"]["before_image"] = "Look. "
        return cfg, "prompts.anchor.before_image", "the anchor's image tokens are the image pass's"
    if which == "patching a variant with text before the image":
        variants.append({"id": "zz_look_first", "family": "control", "text": "q", "expected": "no", "before_image": "Look. "})
        cfg.setdefault("patching", {})["variants"] = ["zz_look_first"]
        return cfg, "patching.variants[0]", "has text before the image"
    raise AssertionError(which)


CROSS_FIELD = ("unknown family", "case collision", "recipe and path", "layer too deep", "half vectors of a float32 model",
               "image positions only", "reserved prompt id", "unknown patching variant", "text before the anchor's image",
               "patching a variant with text before the image", "vision layer too deep", "vision layers without image_mean",
               "vision layers without their count")


def assert_names_key(cfg: dict, key: str, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(cfg)
    message = str(info.value)
    lines = [line for line in message.splitlines() if line.startswith(f"config error at {key}: ")]
    assert any(text in line for line in lines), f"expected an error at {key} containing {text!r}; got:\n{message}"
    return message


# --- properties ---------------------------------------------------------------------------------


@PROPERTY
@given(valid_configs())
def test_generated_valid_configs_load_and_defaults_are_a_fixed_point(cfg):
    loaded = load(cfg)
    assert load(loaded) == loaded
    for name, model in loaded["models"].items():
        assert set(resolve(SCHEMA["$defs"]["model"])["properties"]) - {"recipe", "path"} <= set(model), name


@PROPERTY
@given(valid_configs(), st.data())
def test_every_schema_mutation_fails_with_the_key_named(cfg, data):
    breaks = schema_breaks(load(cfg))  # defaults filled: every key can be broken
    assert_names_key(*data.draw(st.sampled_from(breaks)))


@pytest.mark.parametrize("name", ["config.yaml", "paper.yaml"])
def test_every_key_of_a_shipped_config_broken_in_turn_is_named(name):
    """Exhaustive over one realistic config: each key, each way the schema allows it to be wrong."""
    breaks = schema_breaks(load_config(REPO / "config" / name, SCHEMA_PATH))
    broken_keys = {key.split("[")[0] for _, key, _ in breaks}
    assert {"seed", "dataset.on_broken_image", "prompts.families", "probe.Cs", "stages.alpha"} <= broken_keys
    for cfg, key, text in breaks:
        assert_names_key(cfg, key, text)


@PROPERTY
@given(valid_configs(), st.sampled_from(CROSS_FIELD))
def test_every_cross_field_mutation_fails_with_the_key_named(cfg, which):
    assert_names_key(*cross_field_break(load(cfg), which))


# --- at workflow start -------------------------------------------------------------------------


def dry_run(workdir: Path, cfg: dict) -> subprocess.CompletedProcess:
    configfile = workdir / "config.yaml"
    configfile.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), "--workflow-profile", "none", "--dry-run"]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


BASE = {
    "dataset": {"root": "images", "train_per_class": 2, "test_per_class": 1},
    "models": {"tiny-llava": {"recipe": "tiny-llava", "num_layers": 2, "device": "cpu"}},
    "prompts": {
        "anchor": {"id": "anchor", "text": "Does this image show an animal?", "expected": "yes"},
        "variants": [{"id": "neg", "family": "negation", "text": "Does this image show a plane?", "expected": "no"}],
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["unknown family", "schema"])
def test_the_workflow_stops_before_any_job(which, tmp_path):
    (tmp_path / "images" / "a").mkdir(parents=True)
    if which == "schema":
        cfg, key, text = copy.deepcopy(BASE), "probe.max_iter", "less than the minimum"
        cfg["probe"] = {"max_iter": -3}
    else:
        cfg, key, text = cross_field_break(BASE, which)
    result = dry_run(tmp_path, cfg)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"config error at {key}: " in output and text in output, output[-3000:]
    assert "Building DAG" not in output and "Job stats" not in output and "Traceback" not in output
    assert not (tmp_path / "results").exists() and not (tmp_path / "logs").exists()
