"""What builds checkpoints: tiny test models (tiny), the embedded model's assembly (embedded),
projector training and the SmolLM2 export. Every job writes through `stagelens.atomic.atomic_path`.

This module holds only the recipe names, so the config and the workflow can read them without
importing torch.
"""

# The architecture coverage matrix's tiny models (builders/tiny_matrix.py): "tiny-" + model_type
# with "-" for "_".
MATRIX_RECIPES = (
    "tiny-qwen2-5-vl",
    "tiny-qwen3-vl",
    "tiny-qwen3-vl-moe",
    "tiny-gemma3",
    "tiny-paligemma",
    "tiny-llava-onevision",
    "tiny-internvl",
    "tiny-idefics3",
    "tiny-smolvlm",
    "tiny-mistral3",
    "tiny-mllama",
    "tiny-aya-vision",
    "tiny-glm4v",
    "tiny-glm4v-moe",
    "tiny-glm46v",
)
# The pipeline's own tiny models of the paper's three architectures (builders/tiny.py).
PIPELINE_TINY_RECIPES = ("tiny-llava", "tiny-llava-next", "tiny-qwen2-vl")
# Every seeded tiny model of a real MLLM architecture, built by rule build_model.
TINY_RECIPES = (*PIPELINE_TINY_RECIPES, *MATRIX_RECIPES)
# The embedded default model, built by the rules in workflow/rules/embedded.smk.
EMBEDDED_RECIPE = "embedded"
# Every value of a model's `recipe` key (the schema's enum).
RECIPES = (*TINY_RECIPES, EMBEDDED_RECIPE)
