# Probing: one probe-training job per model x layer (anchor prompt, train split), one
# evaluation job per model x layer x prompt (test split); the image positions have their own
# probe per model x layer (image pass, train split) and one evaluation per model x layer (image
# pass, test split): no prompt without text before the image can move them. A prompt with text
# before the image (before_image) has its image tokens read by its own extraction and scored by
# the frozen image probes (evaluate_prompt_image), paired with the image pass's. The vision
# encoder's layers, where read (models.<m>.vision_num_layers), have their probes and evaluations per
# vision layer too (train_vision_probe, evaluate_vision). Evaluation jobs are light (numpy + pyarrow,
# ~0.2 s): a paper run has about a thousand of them.


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
    threads: estimate.probe_threads(config["probe"])
    resources:
        gpu=1 if estimate.probe_uses_gpu(config["probe"]) else 0,
        mem_mb=estimate.probe_mem_mb(config["probe"], n_classes(), config["dataset"]["train_per_class"]),
        # A retry (profiles: retries) gets twice the time.
        runtime=lambda wildcards, attempt: attempt
        * estimate.probe_runtime(config["probe"], n_classes(), config["dataset"]["train_per_class"],
                                 len(prompt_positions(wildcards.model))),
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
        readout="prompt",
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


rule train_image_probe:
    """The probes of the image positions (image pass, train split); same method as train_probe."""
    input:
        embeddings=image_embedding_path("{model}", "train", "{layer}"),
    output:
        probe=image_probe_path("{model}", "{layer}"),
        probe_json=image_probe_path("{model}", "{layer}", "json"),
        control=image_control_probe_path("{model}", "{layer}"),
        control_json=image_control_probe_path("{model}", "{layer}", "json"),
    params:
        probe=config["probe"],
        seed=config["seed"],
    log:
        log_path("train_image_probe", "{model}", "layer{layer}"),
    benchmark:
        benchmark_path("train_image_probe", "{model}", "layer{layer}")
    threads: estimate.probe_threads(config["probe"])
    resources:
        gpu=1 if estimate.probe_uses_gpu(config["probe"]) else 0,
        mem_mb=estimate.probe_mem_mb(config["probe"], n_classes(), config["dataset"]["train_per_class"]),
        # A retry (profiles: retries) gets twice the time.
        runtime=lambda wildcards, attempt: attempt
        * estimate.probe_runtime(config["probe"], n_classes(), config["dataset"]["train_per_class"], len(IMAGE_POSITIONS)),
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/train_probe.py"


rule evaluate_image:
    """The image-token readout: frozen image probes on the image pass's test features (no drop:
    no prompt without text before the image can change them)."""
    input:
        probe=image_probe_path("{model}", "{layer}"),
        control=image_control_probe_path("{model}", "{layer}"),
        variant=image_embedding_path("{model}", "test", "{layer}"),
        anchor=image_embedding_path("{model}", "test", "{layer}"),
    output:
        metrics=image_metrics_path("{model}", "{layer}"),
    params:
        model_name=lambda wildcards: wildcards.model,
        prompt=IMAGE_READOUT,
        readout="image",
        evaluate=config["evaluate"],
        seed=config["seed"],
    log:
        log_path("evaluate_image", "{model}", "layer{layer}"),
    threads: 1
    resources:
        mem_mb=2048,
        runtime=5,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/evaluate.py"


rule evaluate_prompt_image:
    """The image-token readout of a prompt with text before the image: frozen image probes on its
    own image tokens, paired drop against the image pass's (the anchor's image tokens)."""
    input:
        probe=image_probe_path("{model}", "{layer}"),
        control=image_control_probe_path("{model}", "{layer}"),
        variant=embedding_path("{model}", "test", "{prompt}", "{layer}"),
        anchor=image_embedding_path("{model}", "test", "{layer}"),
    output:
        metrics=prompt_image_metrics_path("{model}", "{prompt}", "{layer}"),
    wildcard_constraints:
        prompt=alternation(BEFORE_IMAGE),
    params:
        model_name=lambda wildcards: wildcards.model,
        prompt=lambda wildcards: PROMPTS[wildcards.prompt],
        readout="image",
        evaluate=config["evaluate"],
        seed=config["seed"],
    log:
        log_path("evaluate_prompt_image", "{model}", "{prompt}", "layer{layer}"),
    threads: 1
    resources:
        mem_mb=2048,
        runtime=5,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/evaluate.py"


rule train_vision_probe:
    """The probes of one vision-encoder layer (image pass, train split); same method as train_probe."""
    input:
        embeddings=vision_embedding_path("{model}", "train", "{layer}"),
    output:
        probe=vision_probe_path("{model}", "{layer}"),
        probe_json=vision_probe_path("{model}", "{layer}", "json"),
        control=vision_control_probe_path("{model}", "{layer}"),
        control_json=vision_control_probe_path("{model}", "{layer}", "json"),
    params:
        probe=config["probe"],
        seed=config["seed"],
    log:
        log_path("train_vision_probe", "{model}", "layer{layer}"),
    benchmark:
        benchmark_path("train_vision_probe", "{model}", "layer{layer}")
    threads: estimate.probe_threads(config["probe"])
    resources:
        gpu=1 if estimate.probe_uses_gpu(config["probe"]) else 0,
        mem_mb=estimate.probe_mem_mb(config["probe"], n_classes(), config["dataset"]["train_per_class"]),
        # A retry (profiles: retries) gets twice the time; two positions at most (patch mean, CLS).
        runtime=lambda wildcards, attempt: attempt
        * estimate.probe_runtime(config["probe"], n_classes(), config["dataset"]["train_per_class"], 2),
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/train_probe.py"


rule evaluate_vision:
    """The vision-tower readout: frozen probes of one vision layer on the image pass's test features
    (no drop: no prompt reaches the vision encoder)."""
    input:
        probe=vision_probe_path("{model}", "{layer}"),
        control=vision_control_probe_path("{model}", "{layer}"),
        variant=vision_embedding_path("{model}", "test", "{layer}"),
        anchor=vision_embedding_path("{model}", "test", "{layer}"),
    output:
        metrics=vision_metrics_path("{model}", "{layer}"),
    params:
        model_name=lambda wildcards: wildcards.model,
        prompt=VISION_READOUT,
        readout="vision",
        evaluate=config["evaluate"],
        seed=config["seed"],
    log:
        log_path("evaluate_vision", "{model}", "layer{layer}"),
    threads: 1
    resources:
        mem_mb=2048,
        runtime=5,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/evaluate.py"
