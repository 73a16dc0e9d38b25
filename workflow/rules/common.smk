"""Config validation, wildcard constraints, path helpers, resources and the target lists."""

import math
import os
import re
import sys

from snakemake.exceptions import WorkflowError

# stagelens comes from this checkout whether or not it is pip-installed: here, and through
# PYTHONPATH in every job's script (also inside --sdm conda environments and on cluster nodes).
_STAGELENS_SRC = os.path.join(workflow.basedir, "src")
sys.path.insert(0, _STAGELENS_SRC)
os.environ.update(PYTHONPATH=os.pathsep.join(p for p in (_STAGELENS_SRC, os.environ.get("PYTHONPATH")) if p))
# The software of every rule, for `--sdm conda` (make's .venv is the tested route).
STAGELENS_ENV = "../../envs/stagelens.yaml"

from stagelens.config import (
    TINY_RECIPES,
    ConfigError,
    all_prompts,
    enabled_models,
    load_config,
    rule_suffix,
)
from stagelens.spec import model_layers

# The same validation (and defaults) as the library's, so a config means the same everywhere.
try:
    config.update(load_config(config, workflow.source_path("../schemas/config.schema.yaml")))
except ConfigError as exc:
    raise WorkflowError(f"invalid config:\n{exc}") from None

RESULTS = config["results"]
MODELS = enabled_models(config)
PROMPTS = {prompt["id"]: prompt for prompt in all_prompts(config)}
ANCHOR = config["prompts"]["anchor"]["id"]
FIGURE_FORMATS = ("png", "svg", "vl.json")
MODEL_FIGURES = ("accuracy", "drop_heatmap", "answers")


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


def answers_path(model, split, prompt):
    return f"{RESULTS}/{model}/answers/{split}/{prompt}.parquet"


def probe_path(model, layer, ext="safetensors"):
    return f"{RESULTS}/{model}/probes/layer{layer}.{ext}"


def control_probe_path(model, layer, ext="safetensors"):
    return f"{RESULTS}/{model}/probes/control/layer{layer}.{ext}"


def metrics_path(model, prompt, layer):
    return f"{RESULTS}/{model}/metrics/{prompt}/layer{layer}.parquet"


def aggregate_path(model, table):
    """table: metrics | stages | behaviour."""
    return f"{RESULTS}/{model}/{table}.parquet"


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


def dataset_inputs(wildcards):
    """The image tree is an input (Snakemake checks it exists); so is the class list if set."""
    inputs = {"root": config["dataset"]["root"]}
    if config["dataset"]["class_list"]:
        inputs["class_list"] = config["dataset"]["class_list"]
    return inputs


# --- resources (estimates; override per rule with --set-resources, e.g. in a profile) ----------


def n_classes():
    """Classes in the dataset: the class list's rows, else the root's sub-folders (0 if unreadable)."""
    class_list = config["dataset"]["class_list"]
    try:
        if class_list:
            with open(class_list, encoding="utf-8") as fh:
                return max(sum(1 for line in fh if line.strip()) - 1, 0)
        root = config["dataset"]["root"]
        return sum(1 for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return 0


def prepare_dataset_runtime():
    """Minutes to scan and verify the images: generous per class (paper: 120 classes x 80 images)."""
    return 10 + math.ceil(n_classes() / 20)


def build_model_resources():
    """A tiny model is built in seconds in well under a GB."""
    return {"mem_mb": 2048, "runtime": 15}


def weights_mb(model):
    """Rough in-memory size of a model's weights in MB at its configured dtype."""
    cfg = MODELS[model]
    bytes_per_param = 4 if cfg["dtype"] == "float32" else 2
    if cfg.get("recipe") in TINY_RECIPES:
        return 50
    if cfg.get("recipe") == "embedded":
        return 200 * bytes_per_param  # ~150M parameters (SmolLM2-135M + EfficientNet-Lite0)
    path = cfg["path"]
    if os.path.isdir(path):
        size = sum(
            os.path.getsize(os.path.join(path, f))
            for f in os.listdir(path)
            if f.endswith((".safetensors", ".bin"))
        )
        # Checkpoints are usually stored in 16 bits; float32 loading doubles them.
        return int(size / 2**20 * (2 if bytes_per_param == 4 else 1))
    # Hub ids usually carry the parameter count ("llava-1.5-7b-hf", "Qwen2-VL-7B-Instruct").
    match = re.search(r"(\d+(?:\.\d+)?)[bB](?![a-zA-Z])", path)
    billions = float(match.group(1)) if match else 8.0
    return int(billions * 1000 * bytes_per_param)


def uses_gpu(model):
    return MODELS[model]["device"] != "cpu"


def extract_threads(model):
    return 2 if uses_gpu(model) else 4


def extract_mem_mb(model):
    """Weights (loaded through host memory even for GPU runs) + batch activations + runtime."""
    return 2048 + int(1.2 * weights_mb(model)) + 256 * MODELS[model]["batch_size"]


def extract_runtime(model, split):
    """Minutes for one extraction job: images x a per-image cost that scales with model size."""
    per_class = config["dataset"][f"{split}_per_class"]
    images = max(n_classes(), 1) * per_class
    seconds_per_gb = 0.03 if uses_gpu(model) else 0.6
    seconds = images * (0.05 + seconds_per_gb * weights_mb(model) / 1000)
    return 10 + math.ceil(seconds / 60)


def extract_gpu(model):
    return 1 if uses_gpu(model) else 0


# --- targets --------------------------------------------------------------------------------


def extraction_jobs():
    """(split, prompt) pairs extracted for every model: the anchor on train, every prompt on test."""
    return [("train", ANCHOR)] + [("test", prompt) for prompt in PROMPTS]


def extraction_targets():
    targets = [manifest_path()]
    for model in MODELS:
        for split, prompt in extraction_jobs():
            targets += [embedding_path(model, split, prompt, layer) for layer in layers_of(model)]
            targets.append(answers_path(model, split, prompt))
    return targets


def analysis_targets():
    targets = []
    for model in MODELS:
        targets += [aggregate_path(model, table) for table in ("metrics", "stages", "behaviour")]
        targets += [
            model_figure_path(model, figure, fmt) for figure in MODEL_FIGURES for fmt in FIGURE_FORMATS
        ]
    targets += [depth_panel_path(fmt) for fmt in FIGURE_FORMATS]
    return targets


def all_targets():
    """Everything `snakemake` builds by default."""
    return extraction_targets() + analysis_targets()


def embedded_models():
    """Models built by the embedded recipe (rules in embedded.smk)."""
    return [name for name, m in MODELS.items() if m.get("recipe") == "embedded"]
