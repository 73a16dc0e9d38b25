"""What builds checkpoints: tiny test models (tiny), the embedded model's assembly (embedded),
projector training and the SmolLM2 export. Every job writes through `stagelens.atomic.atomic_path`.

This module holds only the recipe names, so the config and the workflow can read them without
importing torch.
"""

# Seeded tiny models of real MLLM architectures (builders/tiny.py), built by rule build_model.
TINY_RECIPES = ("tiny-llava", "tiny-llava-next", "tiny-qwen2-vl")
# The embedded default model, built by the rules in workflow/rules/embedded.smk.
EMBEDDED_RECIPE = "embedded"
# Every value of a model's `recipe` key (the schema's enum).
RECIPES = (*TINY_RECIPES, EMBEDDED_RECIPE)
