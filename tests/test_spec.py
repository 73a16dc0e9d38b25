"""The typed model spec: built from a validated config entry, defaults held to the schema's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from stagelens.config import load_config, read_schema
from stagelens.spec import ModelSpec, resolve_device, torch_dtype, vector_dtype_problem

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"


def model_schema() -> dict:
    return read_schema(SCHEMA)["$defs"]["model"]["properties"]


def test_field_defaults_are_the_schemas():
    """Where the schema has a default, the spec's field default is the same value."""
    props = model_schema()
    checked = 0
    for field in dataclasses.fields(ModelSpec):
        if field.name in props and "default" in props[field.name]:
            expected = props[field.name]["default"]
            expected = tuple(expected) if isinstance(expected, list) else expected
            if field.name == "revision":  # None: the hub's default branch, which the schema names "main"
                assert expected == "main" and field.default is None
                continue
            assert field.default == expected, field.name
            checked += 1
    assert checked >= 7


def test_from_config_carries_every_validated_key(tmp_path):
    cfg = load_config({
        "dataset": {"root": str(tmp_path)},
        "models": {
            "hub": {"path": "org/model-7b", "num_layers": 4, "layers": [4, 0], "dtype": "bfloat16",
                    "vector_dtype": "float16", "batch_size": 2, "positions": ["last"], "max_pixels": 3136},
            "built": {"recipe": "tiny-llava", "num_layers": 2},
        },
        "prompts": {"anchor": {"id": "a", "text": "q?", "expected": "yes"}},
    }, SCHEMA)
    hub = ModelSpec.from_config("hub", cfg["models"]["hub"])
    assert hub == ModelSpec(name="hub", checkpoint="org/model-7b", num_layers=4, layers=(0, 4), positions=("last",),
                            dtype="bfloat16", vector_dtype="float16", device="auto", batch_size=2, revision="main",
                            max_pixels=3136, trust_remote_code=False)
    built = ModelSpec.from_config("built", cfg["models"]["built"], "results/models/built")
    assert built.checkpoint == "results/models/built" and built.layers == (0, 1, 2)
    with pytest.raises(ValueError, match="models.built"):
        ModelSpec.from_config("built", cfg["models"]["built"])


def test_layers_default_to_the_checkpoints():
    assert ModelSpec("m", "x").layers_of(3) == [0, 1, 2, 3]
    assert ModelSpec("m", "x", layers=(1, 3)).layers_of(30) == [1, 3]


def test_vector_dtype_rule():
    assert vector_dtype_problem("float16", "float32") is not None
    assert vector_dtype_problem("float16", "bfloat16") is None
    assert vector_dtype_problem("float32", "float32") is None


def test_devices_and_dtypes():
    import torch

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")
    assert torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        torch_dtype("float64")
