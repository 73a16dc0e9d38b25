"""Config validation, wildcard constraints, path helpers and the target lists."""

import glob
import os
import re

from snakemake.exceptions import WorkflowError

# The software of every rule, for `--sdm conda` (make's .venv is the tested route).
STAGELENS_ENV = "../../envs/stagelens.yaml"

from stagelens import resources as estimate
from stagelens.builders import EMBEDDED_RECIPE, TINY_RECIPES
from stagelens.config import (
    ConfigError,
    all_prompts,
    enabled_models,
    load_config,
    patched_variants,
    rule_suffix,
)
from stagelens.positions import IMAGE_PASS, IMAGE_POSITIONS, VISION_PASS, has_text_before_image
from stagelens.spec import model_layers, model_vision_layers

# The same validation (and defaults) as the library's, so a config means the same everywhere.
try:
    config.update(load_config(config, workflow.source_path("../schemas/config.schema.yaml")))
except ConfigError as exc:
    raise WorkflowError(f"invalid config:\n{exc}") from None


def workflow_path(path):
    """A config path as given when it exists from the working directory, else the checkout's file
    of that name (so a project including the workflow as a module can name the shipped resources/)."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    shipped = os.path.join(STAGELENS_ROOT, path)
    return shipped if os.path.exists(shipped) else path


for _key in ("root", "class_list", "class_names", "labels"):
    config["dataset"][_key] = workflow_path(config["dataset"][_key])

RESULTS = config["results"]
MODELS = enabled_models(config)
PROMPTS = {prompt["id"]: prompt for prompt in all_prompts(config)}
ANCHOR = config["prompts"]["anchor"]["id"]
# Prompts with text before the image: their image tokens see it, so each one's extraction reads
# them and evaluate_prompt_image scores them (the others share the image pass's).
BEFORE_IMAGE = [pid for pid, prompt in PROMPTS.items() if has_text_before_image(prompt)]
PATCHED = [variant["id"] for variant in patched_variants(config)]  # empty unless patching.enabled
# The image pass's rows in the metrics tables: `prompt` and `family` name it (no prompt may).
IMAGE_READOUT = {"id": IMAGE_PASS, "family": IMAGE_PASS, "expected": None}
# The vision encoder's layers (read by the image pass too): their rows in the vision_metrics table.
VISION_READOUT = {"id": VISION_PASS, "family": VISION_PASS, "expected": None}
# stagelens.figures.FORMATS (not imported: altair would cost seconds per parse; a test holds them equal)
FIGURE_FORMATS = ("png", "svg", "vl.json")
MODEL_FIGURES = ("accuracy", "drop_heatmap", "answers", "answer_readout")


def alternation(names):
    """A regex matching exactly the given names (never-matching when there are none)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


wildcard_constraints:
    model=alternation(MODELS),
    prompt=alternation(PROMPTS),
    split="train|test",
    layer=r"\d+",


# --- paths (pass "{wildcard}" strings to get rule patterns) ---------------------------------


def manifest_path():
    return f"{RESULTS}/data/manifest.parquet"


def model_dir(model):
    """Checkpoint directory a build rule writes (recipe models only)."""
    return f"{RESULTS}/models/{model}"


def embedding_path(model, split, prompt, layer):
    return f"{RESULTS}/{model}/embeddings/{split}/{prompt}/layer{layer}.parquet"


def image_embedding_path(model, split, layer):
    """The image pass's file: image positions, read once per image (no prompt)."""
    return f"{RESULTS}/{model}/embeddings/{split}/{IMAGE_PASS}/layer{layer}.parquet"


def vision_embedding_path(model, split, layer):
    """A vision-encoder layer's file, written by the image pass (patch mean, and CLS where there is one)."""
    return f"{RESULTS}/{model}/embeddings/{split}/{VISION_PASS}/layer{layer}.parquet"


def answers_path(model, split, prompt):
    return f"{RESULTS}/{model}/answers/{split}/{prompt}.parquet"


def answer_readout_path(model, split, prompt):
    """The answer readout per image x layer of one prompt (written by its extraction job)."""
    return f"{RESULTS}/{model}/answer_readout/{split}/{prompt}.parquet"


def probe_path(model, layer, ext="safetensors"):
    return f"{RESULTS}/{model}/probes/layer{layer}.{ext}"


def control_probe_path(model, layer, ext="safetensors"):
    return f"{RESULTS}/{model}/probes/control/layer{layer}.{ext}"


def image_probe_path(model, layer, ext="safetensors"):
    return f"{RESULTS}/{model}/probes/{IMAGE_PASS}/layer{layer}.{ext}"


def image_control_probe_path(model, layer, ext="safetensors"):
    return f"{RESULTS}/{model}/probes/{IMAGE_PASS}/control/layer{layer}.{ext}"


def vision_probe_path(model, layer, ext="safetensors"):
    return f"{RESULTS}/{model}/probes/{VISION_PASS}/layer{layer}.{ext}"


def vision_control_probe_path(model, layer, ext="safetensors"):
    return f"{RESULTS}/{model}/probes/{VISION_PASS}/control/layer{layer}.{ext}"


def vision_metrics_path(model, layer):
    return f"{RESULTS}/{model}/metrics/{VISION_PASS}/layer{layer}.parquet"


def metrics_path(model, prompt, layer):
    return f"{RESULTS}/{model}/metrics/{prompt}/layer{layer}.parquet"


def image_metrics_path(model, layer):
    return f"{RESULTS}/{model}/metrics/{IMAGE_PASS}/layer{layer}.parquet"


def prompt_image_metrics_path(model, prompt, layer):
    """The image-token readout of a prompt with text before the image (its own image tokens)."""
    return f"{RESULTS}/{model}/metrics/{prompt}/{IMAGE_PASS}_layer{layer}.parquet"


def aggregate_path(model, table):
    """table: metrics | stages | behaviour | answer_readout | vision_metrics | patching | causal_onsets."""
    return f"{RESULTS}/{model}/{table}.parquet"


def patching_path(model, prompt):
    """Per-image answer scores of one model x variant patching job."""
    return f"{RESULTS}/{model}/patching/{prompt}.parquet"


def model_figure_path(model, figure, fmt):
    return f"{RESULTS}/figures/{model}/{figure}.{fmt}"


def depth_panel_path(fmt):
    return f"{RESULTS}/figures/depth_panel.{fmt}"


def log_path(rule, *parts):
    """logs/<rule>/<wildcards>.log (logs/<rule>.log without wildcards)."""
    return os.path.join("logs", rule, *parts) + ".log"


def benchmark_path(rule, *parts):
    """benchmarks/<rule>/<wildcards>.tsv, mirroring log_path."""
    return os.path.join("benchmarks", rule, *parts) + ".tsv"


# --- per-model facts ------------------------------------------------------------------------


def layers_of(model):
    """Layers of an enabled model: its explicit list, else 0..num_layers."""
    return model_layers(MODELS[model])


def vision_layers_of(model):
    """Vision-encoder layers of an enabled model ([] unless its vision_num_layers is set)."""
    return model_vision_layers(MODELS[model])


def vision_models():
    """The models whose vision encoder is read and probed."""
    return [model for model in MODELS if vision_layers_of(model)]


def image_pass_outputs(model, split="{split}"):
    """Outputs of image_pass_<model>: the image positions per LM layer, and the vision layers' files."""
    outputs = {"embeddings": [image_embedding_path(model, split, layer) for layer in layers_of(model)]}
    if vision_layers_of(model):
        outputs["vision"] = [vision_embedding_path(model, split, layer) for layer in vision_layers_of(model)]
    return outputs


def folds_image_pass(model):
    """With share_prefix the prompt jobs write the image pass's files from forwards they run anyway
    (the anchor's pass on the train split, the shared prefix on the test split): no image_pass job."""
    return shares_prefix(model) and has_image_pass(model) and ANCHOR not in BEFORE_IMAGE


def folded_image_outputs(model, split):
    """The image pass's outputs of `split` where a prompt job writes them (else none), under the
    names scripts/extract.py reads."""
    if not folds_image_pass(model):
        return {}
    outputs = image_pass_outputs(model, split)
    return {"image_embeddings": outputs["embeddings"], **({"vision": outputs["vision"]} if "vision" in outputs else {})}


def extract_job(model):
    """(split, prompt) of extract_<model>'s outputs: wildcards, or the train split's anchor alone
    where that job also writes the image pass's files (its outputs then carry no wildcard)."""
    return ("train", ANCHOR) if folds_image_pass(model) else ("{split}", "{prompt}")


def prompt_positions(model):
    """The positions a model's prompt files hold (the image positions are the image pass's)."""
    return [p for p in MODELS[model]["positions"] if p not in IMAGE_POSITIONS]


def has_image_pass(model):
    """Whether a model keeps image positions (read by its image pass, once per split)."""
    return any(p in IMAGE_POSITIONS for p in MODELS[model]["positions"])


def is_recipe_model(model):
    return MODELS[model].get("recipe") is not None


def tiny_recipe_models():
    return [name for name, m in MODELS.items() if m.get("recipe") in TINY_RECIPES]


def extract_inputs(model):
    """Inputs of extract_<model>: the manifest, plus the built checkpoint for recipe models."""
    inputs = {"manifest": manifest_path()}
    if is_recipe_model(model):
        inputs["model"] = model_dir(model)
    return inputs


def extract_rule_name(model):
    return f"extract_{rule_suffix(model)}"


def image_pass_rule_name(model):
    return f"image_pass_{rule_suffix(model)}"


def shares_prefix(model):
    """Whether one job extracts every test-split prompt of a model (models.<m>.share_prefix)."""
    return MODELS[model]["share_prefix"]


def shared_extract_rule_name(model):
    # Not extract_<suffix>_...: no model name may turn it into another model's rule name.
    return f"shared_extract_{rule_suffix(model)}"


def dataset_inputs(wildcards):
    """The image folder or Parquet/Arrow files are inputs (Snakemake checks they exist); so are
    the class list, class names and label file if set."""
    dataset = config["dataset"]
    if dataset["format"] == "parquet" and not os.path.exists(dataset["root"]):
        inputs = {"root": sorted(glob.glob(dataset["root"], recursive=True)) or [dataset["root"]]}
    else:
        inputs = {"root": dataset["root"]}
    for key in ("class_list", "class_names", "labels"):
        if dataset[key]:
            inputs[key] = dataset[key]
    return inputs


# --- resources (estimates in stagelens.resources; override per rule with --set-resources) -----


def n_classes():
    return estimate.n_classes(config["dataset"])


def extract_runtime(model, split):
    """Minutes for one extraction job over the split's images."""
    images = max(n_classes(), 1) * config["dataset"][f"{split}_per_class"]
    return estimate.extract_runtime(MODELS[model], images)


def patch_runtime(model):
    """Minutes for one patching job over the patched images of every position."""
    images = max(n_classes(), 1) * config["patching"]["images"] * len(config["patching"]["positions"])
    return estimate.patch_runtime(MODELS[model], images, len(layers_of(model)))


# --- targets --------------------------------------------------------------------------------


def extraction_jobs():
    """(split, prompt) pairs extracted for every model: the anchor on train, every prompt on test."""
    return [("train", ANCHOR)] + [("test", prompt) for prompt in PROMPTS]


def extraction_targets():
    targets = [manifest_path()]
    for model in MODELS:
        for split, prompt in extraction_jobs():
            targets += [embedding_path(model, split, prompt, layer) for layer in layers_of(model)]
            targets += [answers_path(model, split, prompt), answer_readout_path(model, split, prompt)]
        if has_image_pass(model):
            targets += [image_embedding_path(model, split, layer) for split in ("train", "test") for layer in layers_of(model)]
        targets += [vision_embedding_path(model, split, layer) for split in ("train", "test") for layer in vision_layers_of(model)]
    return targets


def probe_fit_inputs(model, path, image_path):
    """The JSON sidecars of one model's probes (or controls): per layer, and the image pass's."""
    paths = [path(model, layer, "json") for layer in layers_of(model)]
    if has_image_pass(model):
        paths += [image_path(model, layer, "json") for layer in layers_of(model)]
    return paths


def metrics_inputs(model):
    """Every metrics file of one model: per prompt x layer, the image pass's per layer, and the
    image-token readout per layer of each prompt with text before the image."""
    paths = [metrics_path(model, prompt, layer) for prompt in PROMPTS for layer in layers_of(model)]
    if has_image_pass(model):
        paths += [image_metrics_path(model, layer) for layer in layers_of(model)]
        paths += [prompt_image_metrics_path(model, prompt, layer) for prompt in BEFORE_IMAGE for layer in layers_of(model)]
    return paths


def analysis_targets():
    targets = []
    for model in MODELS:
        targets += [aggregate_path(model, table) for table in ("metrics", "stages", "behaviour", "answer_readout")]
        targets += [
            model_figure_path(model, figure, fmt) for figure in MODEL_FIGURES for fmt in FIGURE_FORMATS
        ]
    for model in vision_models():
        targets.append(aggregate_path(model, "vision_metrics"))
        targets += [model_figure_path(model, "pixels_to_answer", fmt) for fmt in FIGURE_FORMATS]
    for model in embedded_models():
        targets += [model_figure_path(model, "projector_loss", fmt) for fmt in FIGURE_FORMATS]
    targets += [depth_panel_path(fmt) for fmt in FIGURE_FORMATS]
    return targets


def patching_targets():
    """Patching outputs per model (none unless patching.enabled): scores, curves, onsets, figure."""
    if not PATCHED:
        return []
    targets = []
    for model in MODELS:
        targets += [patching_path(model, prompt) for prompt in PATCHED]
        targets += [aggregate_path(model, table) for table in ("patching", "causal_onsets")]
        targets += [model_figure_path(model, "patching", fmt) for fmt in FIGURE_FORMATS]
    return targets


def all_targets():
    """Everything `snakemake` builds by default."""
    return extraction_targets() + analysis_targets() + patching_targets()


def embedded_models():
    """Models built by the embedded recipe (rules in embedded.smk)."""
    return [name for name, m in MODELS.items() if m.get("recipe") == EMBEDDED_RECIPE]


# The projector's weights and training record: shipped in resources/embedded/ (`make projector`
# puts them there) or trained by rule train_projector under the results' cache.
PROJECTOR_FILES = {"projector": "projector.safetensors", "training": "projector_training.json"}


def trained_projector_path(model, kind="projector"):
    return f"{RESULTS}/cache/embedded/{model}/{PROJECTOR_FILES[kind]}"


def projector_path(model, kind="projector"):
    """The projector a build uses (kind: projector | training), as the model's `projector:` says."""
    if MODELS[model]["projector"] == "shipped":
        return os.path.join(STAGELENS_ROOT, "resources", "embedded", PROJECTOR_FILES[kind])
    return trained_projector_path(model, kind)
