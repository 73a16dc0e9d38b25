# Probing: one probe-training job per model x layer (anchor prompt, train split), one
# evaluation job per model x layer x prompt (test split). Evaluation jobs are light (numpy +
# pyarrow, ~0.2 s): a paper run has about a thousand of them.


def probe_uses_gpu():
    """train_probe asks for a GPU only when the torch solver will run on one (probe.device)."""
    return config["probe"]["solver"] == "torch" and config["probe"]["device"] != "cpu"


def probe_mem_mb():
    """Host memory: the features, one standardised copy per CV fold and the L-BFGS history
    (a width of 4,096 assumed: the paper's models), with room for the runtime."""
    rows = max(n_classes(), 2) * config["dataset"]["train_per_class"]
    copies = config["probe"]["cv_folds"] + 3
    history = 2 * 10 * config["probe"]["cv_folds"] * max(n_classes(), 2)
    return 2048 + math.ceil(4096 * 4 * (rows * copies + history) / 2**20)


rule train_probe:
    """Standardised multinomial logistic regression (C by CV) and its shuffled-label control."""
    input:
        embeddings=embedding_path("{model}", "train", ANCHOR, "{layer}"),
    output:
        probe=probe_path("{model}", "{layer}"),
        probe_json=probe_path("{model}", "{layer}", "json"),
        control=control_probe_path("{model}", "{layer}"),
        control_json=control_probe_path("{model}", "{layer}", "json"),
    params:
        probe=config["probe"],
        seed=config["seed"],
    log:
        log_path("train_probe", "{model}", "layer{layer}"),
    benchmark:
        benchmark_path("train_probe", "{model}", "layer{layer}")
    # On the CPU the DAG's many probe jobs are the parallelism (sklearn: more threads run CV
    # fits in parallel processes; torch: BLAS threads); on a GPU two threads feed it.
    threads: 2 if probe_uses_gpu() else 1
    resources:
        gpu=1 if probe_uses_gpu() else 0,
        mem_mb=probe_mem_mb(),
        # Minutes: train images x classes x positions x C grid (+1: the control probe, fitted at the chosen C).
        # A retry (profiles: retries) gets twice the time.
        runtime=lambda wildcards, attempt: attempt
        * (
            10
            + math.ceil(
                max(n_classes(), 2) ** 2
                * config["dataset"]["train_per_class"]
                * len(MODELS[wildcards.model]["positions"])
                * (len(config["probe"]["Cs"]) + 1)
                / 100_000
            )
        ),
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/train_probe.py"


rule evaluate:
    """Frozen probe on one prompt's test features: accuracy, CI, paired drop, shift correction."""
    input:
        probe=probe_path("{model}", "{layer}"),
        control=control_probe_path("{model}", "{layer}"),
        variant=embedding_path("{model}", "test", "{prompt}", "{layer}"),
        anchor=embedding_path("{model}", "test", ANCHOR, "{layer}"),
    output:
        metrics=metrics_path("{model}", "{prompt}", "{layer}"),
    params:
        model_name=lambda wildcards: wildcards.model,
        prompt=lambda wildcards: PROMPTS[wildcards.prompt],
        evaluate=config["evaluate"],
        seed=config["seed"],
    log:
        log_path("evaluate", "{model}", "{prompt}", "layer{layer}"),
    threads: 1
    resources:
        mem_mb=2048,
        runtime=5,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/evaluate.py"
