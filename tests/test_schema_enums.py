"""Each enum of the config schema equals the one constant the library holds for it."""

from __future__ import annotations

from pathlib import Path

from stagelens.adapters.base import POSITIONS
from stagelens.aggregate import ANSWER_CLASSES
from stagelens.builders import RECIPES
from stagelens.config import read_schema
from stagelens.spec import DTYPES, VECTOR_DTYPES

SCHEMA = read_schema(Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml")
MODEL = SCHEMA["$defs"]["model"]["properties"]


def test_model_enums():
    assert tuple(MODEL["recipe"]["enum"]) == RECIPES
    assert tuple(MODEL["dtype"]["enum"]) == DTYPES
    assert tuple(MODEL["vector_dtype"]["enum"]) == VECTOR_DTYPES
    assert tuple(MODEL["positions"]["items"]["enum"]) == POSITIONS
    assert tuple(MODEL["positions"]["default"]) == ("last", "image_mean")  # the paper's positions


def test_expected_answers_are_the_answer_classes():
    assert tuple(SCHEMA["$defs"]["prompt"]["properties"]["expected"]["enum"]) == ANSWER_CLASSES


def test_tiny_builders_cover_the_tiny_recipes():
    from stagelens.builders import PIPELINE_TINY_RECIPES
    from stagelens.builders.tiny import _BUILDERS

    assert tuple(_BUILDERS) == PIPELINE_TINY_RECIPES


def test_workflow_figure_formats_are_the_libraries():
    """common.smk cannot import stagelens.figures (altair costs seconds at every DAG parse), so its
    copy of the formats is held to the library's here."""
    import ast
    import re

    from stagelens.figures import FORMATS

    common = (Path(__file__).resolve().parents[1] / "workflow" / "rules" / "common.smk").read_text()
    literal = re.search(r"^FIGURE_FORMATS = (.+)$", common, flags=re.M).group(1)
    assert ast.literal_eval(literal) == FORMATS


def test_builtin_families_are_the_stage_rules_and_the_figures():
    from stagelens.config import BUILTIN_FAMILIES
    from stagelens.figures import FAMILY_COLORS
    from stagelens.stages import CONTROL_FAMILY, FAMILIES

    assert set(BUILTIN_FAMILIES) == {"anchor", *FAMILIES, CONTROL_FAMILY} == set(FAMILY_COLORS)


def test_patching_positions_are_the_libraries():
    from stagelens.patching import PATCH_POSITIONS

    positions = SCHEMA["properties"]["patching"]["properties"]["positions"]
    assert tuple(positions["items"]["enum"]) == PATCH_POSITIONS
