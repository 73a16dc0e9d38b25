# The embedded default model (recipe: embedded): SmolLM2-135M-Instruct dequantised from its Q4 GGUF,
# an EfficientNet-Lite0 patch encoder, and a projector trained here on the training split.
#   export_lm -> train_projector -> build_embedded_model -> <results>/models/{model}/
# The {model} wildcard is constrained to the embedded models of the config, so these rules never
# compete with build_model (tiny recipes) for the same output.
import re

from stagelens.config import enabled_models

_EMB_RESULTS = config.get("results", "results")
_EMB_MODELS = [name for name, m in enabled_models(config).items() if m.get("recipe") == "embedded"]
# The projector recipe: ~4 minutes on 2 CPU cores. Changing a value retrains the projector.
_EMB_TRAIN = dict(steps=100, batch_size=8, learning_rate=1e-3, weight_decay=0.0, warmup_steps=10,
                  seed=int(config.get("seed", 0)))


rule export_lm:
    output:
        directory(f"{_EMB_RESULTS}/cache/smollm2-135m-instruct-fp32"),
    log:
        "logs/export_lm/export_lm.log",
    benchmark:
        "benchmarks/export_lm/export_lm.tsv"
    threads: 2
    resources:
        mem_mb=4000,
    script:
        "../../scripts/export_lm.py"


if _EMB_MODELS:
    _EMB_PATTERN = "|".join(re.escape(name) for name in _EMB_MODELS)

    rule train_projector:
        input:
            lm=rules.export_lm.output[0],
            manifest=f"{_EMB_RESULTS}/data/manifest.parquet",
        output:
            projector=f"{_EMB_RESULTS}/cache/embedded/{{model}}/projector.safetensors",
            training=f"{_EMB_RESULTS}/cache/embedded/{{model}}/projector_training.json",
            figure_png=report(
                f"{_EMB_RESULTS}/figures/{{model}}/projector_loss.png",
                category="Embedded model",
                labels={"model": "{model}", "figure": "projector loss"},
            ),
            figure_svg=f"{_EMB_RESULTS}/figures/{{model}}/projector_loss.svg",
        params:
            settings=_EMB_TRAIN,
        wildcard_constraints:
            model=_EMB_PATTERN,
        log:
            "logs/train_projector/{model}.log",
        benchmark:
            "benchmarks/train_projector/{model}.tsv"
        threads: 2
        resources:
            mem_mb=6000,
        script:
            "../../scripts/train_projector.py"

    rule build_embedded_model:
        input:
            lm=rules.export_lm.output[0],
            projector=rules.train_projector.output.projector,
            training=rules.train_projector.output.training,
        output:
            directory(f"{_EMB_RESULTS}/models/{{model}}"),
        wildcard_constraints:
            model=_EMB_PATTERN,
        log:
            "logs/build_embedded_model/{model}.log",
        benchmark:
            "benchmarks/build_embedded_model/{model}.tsv"
        threads: 1
        resources:
            mem_mb=4000,
        script:
            "../../scripts/build_embedded.py"
