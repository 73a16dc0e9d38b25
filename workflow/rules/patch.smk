# Activation patching (config `patching`, off by default): one job per model x patched variant
# (every layer, both directions, in one job), then per model the restored-fraction curves with the
# causal onsets beside the probing stages, and a figure.


rule patch:
    """Anchor -> variant and variant -> anchor, residual stream at every layer, on a seeded subset."""
    input:
        unpack(lambda wildcards: extract_inputs(wildcards.model)),
    output:
        scores=patching_path("{model}", "{prompt}"),
    params:
        model_name=lambda wildcards: wildcards.model,
        model=lambda wildcards: MODELS[wildcards.model],
        model_path=lambda wildcards, input: input.model if is_recipe_model(wildcards.model) else MODELS[wildcards.model]["path"],
        anchor=PROMPTS[ANCHOR],
        variant=lambda wildcards: PROMPTS[wildcards.prompt],
        patching=config["patching"],
    log:
        log_path("patch", "{model}", "{prompt}"),
    benchmark:
        benchmark_path("patch", "{model}", "{prompt}")
    threads: lambda wildcards: estimate.extract_threads(MODELS[wildcards.model])
    resources:
        # A retry (profiles: retries) gets twice the memory and time.
        mem_mb=lambda wildcards, attempt: estimate.patch_mem_mb(MODELS[wildcards.model]) * attempt,
        runtime=lambda wildcards, attempt: patch_runtime(wildcards.model) * attempt,
        gpu=lambda wildcards: estimate.extract_gpu(MODELS[wildcards.model]),
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/patch.py"


rule aggregate_patching:
    """Restored fraction per layer (bootstrap CI) and causal onsets beside the probing stages."""
    input:
        scores=lambda wildcards: [patching_path(wildcards.model, prompt) for prompt in PATCHED],
        stages=aggregate_path("{model}", "stages"),
    output:
        curves=aggregate_path("{model}", "patching"),
        onsets=aggregate_path("{model}", "causal_onsets"),
    params:
        model_name=lambda wildcards: wildcards.model,
        prompts=[PROMPTS[prompt] for prompt in PATCHED],
        evaluate=config["evaluate"],
        seed=config["patching"]["seed"],
    log:
        log_path("aggregate_patching", "{model}"),
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/aggregate_patching.py"


rule patching_figure:
    """Restored fraction by layer per variant and direction, with CI bands and causal onsets."""
    input:
        curves=aggregate_path("{model}", "patching"),
        onsets=aggregate_path("{model}", "causal_onsets"),
    output:
        svg=report(
            model_figure_path("{model}", "patching", "svg"),
            caption="../report/patching.rst",
            category="Per model",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "activation patching"},
        ),
        png=model_figure_path("{model}", "patching", "png"),
        json=model_figure_path("{model}", "patching", "vl.json"),
    params:
        model=lambda wildcards: MODELS[wildcards.model],
        patching=config["patching"],
        evaluate=config["evaluate"],
        anchor=PROMPTS[ANCHOR],
    log:
        log_path("patching_figure", "{model}"),
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/patching_figure.py"
