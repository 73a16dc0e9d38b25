"""The architecture coverage matrix: every family of the table, rerun and held to docs/coverage.json
and the README support table (regenerate both with `python -m stagelens.coverage`)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from stagelens import coverage
from stagelens.adapters import architectures
from stagelens.adapters.architectures import ARCHITECTURES, module_at
from stagelens.adapters.qwen_processor import torchvision_available

ROOT = Path(__file__).resolve().parents[1]
RECORDED = json.loads((ROOT / coverage.RESULTS_PATH).read_text(encoding="utf-8"))
# The families issue 12 lists; at least 12 must pass every column here (no torchvision).
LISTED = ("qwen2_5_vl", "qwen3_vl", "gemma3", "llava_onevision", "internvl", "idefics3", "smolvlm", "mistral3",
          "mllama", "llama4", "paligemma", "aya_vision", "glm4v", "lfm2_vl")


def _same_environment() -> bool:
    import transformers

    return RECORDED["transformers"] == transformers.__version__ and RECORDED["torchvision"] == torchvision_available()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("coverage")


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_family_matches_recorded_results(model_type, workdir):
    if not _same_environment():
        pytest.skip("docs/coverage.json was recorded with another transformers / torchvision")
    assert coverage.check(model_type, workdir) == RECORDED["rows"][model_type]


def test_results_cover_the_whole_table():
    assert set(RECORDED["rows"]) == set(ARCHITECTURES)
    assert set(LISTED) <= set(ARCHITECTURES)


def test_readme_table_is_generated_from_the_results():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert coverage.readme_table(readme) == coverage.render_table(RECORDED)


def test_listed_families_pass_and_failures_say_why():
    passing = [m for m in LISTED if coverage.passes(RECORDED["rows"][m])]
    assert len(passing) >= 12, passing
    for model_type, row in RECORDED["rows"].items():
        if not coverage.passes(row):
            assert row["loads"].startswith("fail: ") and len(row["loads"]) > 20, (model_type, row)
    assert RECORDED["rows"]["mllama"]["image_mean"].startswith("n/a")


def test_wrong_table_entry_fails_its_column(workdir, monkeypatch):
    """The checks can fail: a final norm pointing at a block's input norm breaks `parts`, and layer L
    (read independently as the final norm's input) no longer matches."""
    wrong = dataclasses.replace(ARCHITECTURES["llava"], final_norm="model.language_model.layers.0.input_layernorm")
    monkeypatch.setitem(ARCHITECTURES, "llava", wrong)
    row = coverage.check("llava", workdir)
    assert row["parts"].startswith("fail:") and not coverage.passes(row)
    assert row["last"].startswith("fail: AssertionError: last layer 2")
    assert row["template"] == "published" and row["image_tokens"].startswith("pass")


def test_wrong_image_token_fails_image_columns(workdir, monkeypatch):
    """Telling image_mean to average the wrong tokens is caught against the independent read."""
    from stagelens.adapters import hf

    load = hf.load_hf_adapter

    def wrong_token(*args, **kwargs):
        adapter = load(*args, **kwargs)
        adapter.image_token_id = adapter.processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
        return adapter

    monkeypatch.setattr(hf, "load_hf_adapter", wrong_token)
    row = coverage.check("qwen2_vl", workdir)
    assert row["image_tokens"].startswith("fail:") and row["image_mean"].startswith("fail:")


def test_wrong_vision_entry_fails_the_vision_column(workdir, monkeypatch):
    """The vision column can fail: InternVL's CLS read from the first crop instead of the thumbnail
    (the whole image), and Pixtral's packed patches split with the images' counts rotated."""
    from stagelens.adapters import load_adapter, vision
    from stagelens.builders.tiny_matrix import build
    from stagelens.spec import ModelSpec

    def loaded(model_type):
        path = build(model_type, workdir / f"vision-{model_type}")
        return load_adapter(ModelSpec(name=model_type, checkpoint=str(path), dtype="float32", device="cpu"))

    internvl = loaded("internvl")
    internvl.vision = dataclasses.replace(
        internvl.vision, facts=dataclasses.replace(internvl.vision.facts, whole_image_tile="first"))
    with pytest.raises(AssertionError, match="CLS, image"):
        coverage._check_vision(internvl, coverage.images())
    counts = vision._counts
    monkeypatch.setattr(vision, "_counts", lambda *args: (lambda c: c[1:] + c[:1])(counts(*args)))
    with pytest.raises(AssertionError, match="patch mean, image"):
        coverage._check_vision(loaded("mistral3"), coverage.images())


def test_unreadable_family_fails_at_load_with_its_reason(tmp_path, monkeypatch):
    from stagelens.adapters import load_adapter
    from stagelens.spec import ModelSpec

    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    monkeypatch.setitem(ARCHITECTURES, "gemma3", dataclasses.replace(ARCHITECTURES["gemma3"], unsupported="a reason"))
    with pytest.raises(ValueError, match="not supported: a reason"):
        load_adapter(ModelSpec(name="stub", checkpoint=str(stub), device="cpu"))
    if not torchvision_available():
        (stub / "config.json").write_text(json.dumps({"model_type": "llama4"}))
        with pytest.raises(ValueError, match="needs torchvision"):
            load_adapter(ModelSpec(name="stub", checkpoint=str(stub), device="cpu"))


def test_pil_twin_imports_the_processor_and_leaves_no_alias():
    """Mistral 3's PixtralProcessor without torchvision: the real class, its resize helper the PIL
    module's, and the torchvision-only module name not left bound to the PIL module."""
    import sys

    from transformers.processing_utils import ProcessorMixin

    from stagelens.adapters.qwen_processor import transformers_processor

    facts = ARCHITECTURES["mistral3"]
    cls = transformers_processor(facts.processor_class, facts.pil_twin)
    assert issubclass(cls, ProcessorMixin) and cls.__name__ == "PixtralProcessor"
    if not torchvision_available():
        helper = sys.modules[cls.__module__].get_resize_output_image_size
        assert helper.__module__ == "transformers.models." + facts.pil_twin[2]
        assert "transformers.models." + facts.pil_twin[1] not in sys.modules
        with pytest.raises(ImportError, match="requires the Torchvision library"):
            transformers_processor(facts.processor_class)()  # without the twin: transformers' placeholder


def test_module_at_names_the_missing_step():
    from torch import nn

    model = nn.Sequential()
    model.inner = nn.Linear(2, 2)
    assert module_at(model, "inner") is model.inner
    with pytest.raises(AttributeError, match="missing 'norm'"):
        module_at(model, "inner.norm")


def test_every_template_file_exists():
    from importlib import resources

    folder = resources.files("stagelens.builders").joinpath("chat_templates")
    for facts in architectures.ARCHITECTURES.values():
        assert folder.joinpath(facts.chat_template).is_file(), facts.model_type
        assert facts.template_is_stand_in == facts.chat_template.startswith("stand-in-")


FOUR = {
    "tiny-gemma3": {"recipe": "tiny-gemma3"},
    "tiny-qwen2-5-vl": {"recipe": "tiny-qwen2-5-vl"},
    "tiny-idefics3": {"recipe": "tiny-idefics3"},
    # Cross-attention: no image positions, so only the last token is probed.
    "tiny-mllama": {"recipe": "tiny-mllama", "positions": ["last"]},
}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("STAGELENS_MATRIX_WORKFLOW") != "1",
                    reason="opt-in (STAGELENS_MATRIX_WORKFLOW=1): four full tiny runs exceed make test's budget")
def test_four_architectures_side_by_side_in_the_workflow(tmp_path):
    """Snakemake builds four matrix families, probes them and draws them on one depth panel."""
    import polars as pl
    from test_workflow import CLASSES, snakemake, synthetic_image, tiny_config, write_config

    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for kind in CLASSES:
        (root / kind).mkdir(parents=True)
        for i in range(7):
            synthetic_image(kind, rng).save(root / kind / f"{kind}_{i}.png")
    models = {name: {**m, "num_layers": 2, "device": "cpu", "batch_size": 4} for name, m in FOUR.items()}
    cfg = tiny_config(root, models=models)
    result = snakemake(tmp_path, write_config(tmp_path, cfg), "--cores", "2")
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    res = tmp_path / "results"
    panel = (res / "figures" / "depth_panel.vl.json").read_text(encoding="utf-8")
    for name, model in FOUR.items():
        metrics = pl.read_parquet(res / name / "metrics.parquet")
        assert sorted(metrics["layer"].unique().to_list()) == [0, 1, 2]
        assert set(metrics["position"].unique().to_list()) == set(model.get("positions", ["last", "image_mean"]))
        assert f"{name} (L = 2, position last)" in panel  # its row of the depth panel
        built = json.loads((res / "models" / name / "config.json").read_text())
        assert built["model_type"] == name.removeprefix("tiny-").replace("-", "_")


def test_workflow_recipes_name_every_matrix_family():
    import yaml

    from stagelens.builders.tiny_matrix import RECIPES
    from stagelens.builders import TINY_RECIPES

    assert set(TINY_RECIPES) == {"tiny-" + model_type.replace("_", "-") for model_type in RECIPES}
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text(encoding="utf-8"))
    recipe = schema["$defs"]["model"]["properties"]["recipe"]
    assert set(recipe["enum"]) == {*TINY_RECIPES, "embedded"}


def test_cross_attention_family_refuses_image_mean_at_load(tmp_path):
    from stagelens.adapters import load_adapter
    from stagelens.builders.tiny import build
    from stagelens.spec import ModelSpec

    path = build("tiny-mllama", tmp_path / "mllama", num_layers=2)
    with pytest.raises(ValueError, match="image_mean' is unavailable .* positions: \\[last\\]"):
        load_adapter(ModelSpec(name="m", checkpoint=str(path), device="cpu"))
    assert load_adapter(ModelSpec(name="m", checkpoint=str(path), device="cpu", positions=("last",))).info.num_layers == 2
