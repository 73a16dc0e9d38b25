# The embedded default model (recipe "embedded") is built by the rules in embedded.smk; this
# rule only answers for the tiny recipes, so the two never compete for results/models/{model}.


rule build_model:
    """A seeded, randomly initialised tiny model of a real MLLM architecture, saved as a checkpoint."""
    output:
        directory(model_dir("{model}")),
    wildcard_constraints:
        model=alternation(tiny_recipe_models()),
    params:
        recipe=lambda wildcards: MODELS[wildcards.model]["recipe"],
        num_layers=lambda wildcards: MODELS[wildcards.model]["num_layers"],
        seed=config["seed"],
    log:
        log_path("build_model", "{model}"),
    benchmark:
        benchmark_path("build_model", "{model}")
    threads: 1
    resources:
        mem_mb=estimate.BUILD_MODEL["mem_mb"],
        runtime=estimate.BUILD_MODEL["runtime"],
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/build_model.py"
