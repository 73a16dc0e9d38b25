"""Load and validate a stagelens config: JSON schema (defaults filled in) plus cross-field rules.

The workflow (workflow/rules/common.smk) and notebooks call the same `load_config`, so a config
that Snakemake accepts is exactly one the library accepts, with the same defaults.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from stagelens.positions import IMAGE_PASS, PROMPT_POSITIONS, VISION_PASS, has_text_before_image
from stagelens.spec import vector_dtype_problem

# Families the stage rule reads (stagelens.stages) plus the anchor's; others must be declared
# under prompts.families, so a misspelt family cannot drop a variant out of stage detection.
BUILTIN_FAMILIES = ("anchor", "lexical", "negation", "format", "control")


class ConfigError(ValueError):
    """A config that does not validate; the message names every offending key path."""


def _with_defaults(validator_class: type) -> type:
    """A validator class that fills `default` values into the instance while validating.

    This is the recipe of the jsonschema FAQ that snakemake.utils.validate(set_default=True)
    also uses, so defaults behave identically inside and outside Snakemake.
    """
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # type: ignore[no-untyped-def]
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    instance.setdefault(name, copy.deepcopy(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


_DefaultingValidator = _with_defaults(Draft202012Validator)


def key_path(parts: Sequence[str | int]) -> str:
    """Render a path into the config as `models.tiny-llava.layers[2]`."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<top level>"


def _schema_messages(errors: Iterator[ValidationError]) -> list[str]:
    messages = []
    for error in sorted(errors, key=lambda e: [str(p) for p in e.absolute_path]):
        messages.append(f"config error at {key_path(list(error.absolute_path))}: {error.message}")
    return messages


def read_schema(schema_path: str | os.PathLike) -> dict:
    """Read a JSON schema written in YAML (the snakemake-workflows convention)."""
    with open(schema_path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def enabled_models(config: Mapping[str, Any]) -> dict[str, dict]:
    """The models the workflow runs, by name, in config order."""
    return {name: model for name, model in config["models"].items() if model.get("enabled", True)}


def all_prompts(config: Mapping[str, Any]) -> list[dict]:
    """The anchor followed by every variant."""
    prompts = config["prompts"]
    return [prompts["anchor"], *prompts.get("variants", [])]


def patched_variants(config: Mapping[str, Any]) -> list[dict]:
    """The variants patched against the anchor: none unless patching is enabled; by default every
    variant without text before the image (patching shares the image tokens with the anchor's)."""
    patching = config.get("patching", {})
    if not patching.get("enabled"):
        return []
    chosen = patching.get("variants")
    variants = config["prompts"].get("variants", [])
    if chosen is None:
        return [v for v in variants if not has_text_before_image(v)]
    return [v for v in variants if v["id"] in chosen]


def rule_suffix(model_name: str) -> str:
    """A model name made into a Python identifier, for per-model rule names (extract_<suffix>)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", model_name)


def path_key(name: str) -> str:
    """The form under which two names denote the same output folder on a case-insensitive file
    system (macOS, Windows): names equal after case folding collide."""
    return name.casefold()


def _family_messages(config: Mapping[str, Any]) -> list[str]:
    """Every prompt's family must be built in or declared in prompts.families."""
    prompts = config["prompts"]
    known = [*BUILTIN_FAMILIES, *prompts.get("families", [])]
    located = [(["prompts", "anchor", "family"], prompts["anchor"].get("family", "anchor"))]
    located += [(["prompts", "variants", i, "family"], v["family"]) for i, v in enumerate(prompts.get("variants", []))]
    messages = []
    for parts, family in located:
        if family not in known:
            close = difflib.get_close_matches(family, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            messages.append(
                f"config error at {key_path(parts)}: unknown family {family!r}{hint}; built in: "
                f"{', '.join(BUILTIN_FAMILIES)}; declare a family of your own under prompts.families"
            )
    return messages


def _cross_field_messages(config: Mapping[str, Any]) -> list[str]:
    """Rules a JSON schema cannot express."""
    messages: list[str] = []

    def err(parts: Sequence[str | int], text: str) -> None:
        messages.append(f"config error at {key_path(parts)}: {text}")

    suffixes: dict[str, str] = {}
    folders: dict[str, str] = {}
    for name, model in config["models"].items():
        has = [key for key in ("recipe", "path") if model.get(key) is not None]
        if len(has) != 1:
            found = "both" if len(has) == 2 else "neither"
            err(["models", name], f"exactly one of 'recipe' or 'path' must be set (found {found})")
        problem = vector_dtype_problem(model["vector_dtype"], model["dtype"])
        if problem:
            err(["models", name, "vector_dtype"], problem)
        top = int(model["num_layers"])
        for i, layer in enumerate(model.get("layers") or []):
            if layer > top:
                err(["models", name, "layers", i], f"layer {layer} is outside 0..{top} (num_layers={top})")
        vision_top = model.get("vision_num_layers")
        if vision_top is None and model.get("vision_layers"):
            err(["models", name, "vision_layers"], "needs vision_num_layers (the vision encoder's block count)")
        for i, layer in enumerate(model.get("vision_layers") or []):
            if vision_top is not None and layer > vision_top:
                err(["models", name, "vision_layers", i],
                    f"vision layer {layer} is outside 0..{vision_top} (vision_num_layers={vision_top})")
        if vision_top is not None and "image_mean" not in model["positions"]:
            err(["models", name, "vision_num_layers"], "vision layers are read by the image pass: add image_mean to "
                f"positions (got {model['positions']}) or set vision_num_layers: null")
        if not any(p in PROMPT_POSITIONS for p in model["positions"]):
            err(["models", name, "positions"], f"needs at least one prompt-dependent position {list(PROMPT_POSITIONS)} "
                f"(got {model['positions']}); image positions are read once per image, not per prompt")
        suffix = rule_suffix(name)
        if suffix in suffixes:
            err(["models", name], f"name collides with model {suffixes[suffix]!r} in rule name 'extract_{suffix}'")
        elif path_key(name) in folders:
            err(["models", name], f"name differs from model {folders[path_key(name)]!r} only in case: "
                "both would write results/<model>/ on a case-insensitive file system")
        suffixes[suffix] = name
        folders.setdefault(path_key(name), name)
    if not enabled_models(config):
        err(["models"], "no model has enabled: true; there is nothing to run")

    anchor_id = config["prompts"]["anchor"]["id"]
    # The image pass writes embeddings/<split>/image/ and metrics/image/, where a prompt would write.
    for parts, pid in [(["prompts", "anchor", "id"], anchor_id)] + [
        (["prompts", "variants", i, "id"], p["id"]) for i, p in enumerate(config["prompts"].get("variants", []))
    ]:
        if path_key(pid) in (IMAGE_PASS, VISION_PASS):
            err(parts, f"prompt id {pid!r} is reserved: the image pass writes its outputs under '{IMAGE_PASS}' "
                f"and '{VISION_PASS}'")
    # Prompt ids name output folders: ids equal after case folding would share one.
    seen: dict[str, tuple[str, str]] = {path_key(anchor_id): ("prompts.anchor", anchor_id)}
    for i, prompt in enumerate(config["prompts"].get("variants", [])):
        pid = prompt["id"]
        if pid == anchor_id:
            err(["prompts", "variants", i, "id"], f"{pid!r} is the anchor's id; variant ids must differ from it")
        elif path_key(pid) in seen:
            where, other = seen[path_key(pid)]
            if other == pid:
                err(["prompts", "variants", i, "id"], f"duplicate prompt id {pid!r} (also {where})")
            else:
                err(["prompts", "variants", i, "id"], f"prompt id {pid!r} differs from {other!r} ({where}) only in case: "
                    "both would name one output folder on a case-insensitive file system")
        else:
            seen[path_key(pid)] = (f"prompts.variants[{i}]", pid)
    if has_text_before_image(config["prompts"]["anchor"]):
        err(["prompts", "anchor", "before_image"], "the anchor's image tokens are the image pass's (read once per "
            "image, the image-token probes are trained on them): put text before the image in variants only")
    variants = {v["id"]: v for v in config["prompts"].get("variants", [])}
    for i, pid in enumerate(config.get("patching", {}).get("variants") or []):
        if pid not in variants:
            err(["patching", "variants", i], f"{pid!r} is not a variant id; variants: {', '.join(variants) or 'none'}")
        elif has_text_before_image(variants[pid]):
            err(["patching", "variants", i], f"{pid!r} has text before the image: patching runs the image tokens the "
                "variant shares with the anchor once, and this variant shares none; patch variants without before_image")
    return messages + _family_messages(config)


def validate_config(config: Mapping[str, Any], schema: Mapping[str, Any]) -> dict:
    """Return a deep copy of `config` with defaults filled in, or raise ConfigError listing every problem."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"config error at <top level>: expected a mapping, got {type(config).__name__}")
    filled = copy.deepcopy(dict(config))
    messages = _schema_messages(_DefaultingValidator(schema).iter_errors(filled))
    if messages:
        # Cross-field rules assume a schema-valid shape; report the schema errors first.
        raise ConfigError("\n".join(messages))
    messages = _cross_field_messages(filled)
    if messages:
        raise ConfigError("\n".join(messages))
    return filled


def load_config(source: str | os.PathLike | Mapping[str, Any], schema_path: str | os.PathLike) -> dict:
    """Load a config (YAML file or mapping), validate it against the schema and fill defaults."""
    schema = read_schema(schema_path)
    if isinstance(source, Mapping):
        return validate_config(source, schema)
    with open(source, encoding="utf-8") as fh:
        raw = yaml.safe_load(fh)
    try:
        return validate_config(raw, schema)
    except ConfigError as exc:
        raise ConfigError(f"{exc}\n(config file: {Path(source)})") from None
