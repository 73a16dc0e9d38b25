# Per-model tables (aggregate), figures per model and across models, and the report entries.


rule aggregate:
    """Tidy metrics, the model's own answers per prompt, the detected stages and the answer readout
    per prompt x layer of one model."""
    input:
        metrics=lambda wildcards: metrics_inputs(wildcards.model),
        answers=lambda wildcards: [answers_path(wildcards.model, "test", prompt) for prompt in PROMPTS],
        answer_readout=lambda wildcards: [answer_readout_path(wildcards.model, "test", prompt) for prompt in PROMPTS],
        # The probes' fit records: whether each fit converged goes into the metrics table.
        probe_fits=lambda wildcards: probe_fit_inputs(wildcards.model, probe_path, image_probe_path),
        control_fits=lambda wildcards: probe_fit_inputs(wildcards.model, control_probe_path, image_control_probe_path),
    output:
        metrics=aggregate_path("{model}", "metrics"),
        stages=aggregate_path("{model}", "stages"),
        behaviour=aggregate_path("{model}", "behaviour"),
        answer_readout=aggregate_path("{model}", "answer_readout"),
    params:
        model_name=lambda wildcards: wildcards.model,
        prompts=list(PROMPTS.values()),
        anchor=ANCHOR,
        stages=config["stages"],
    log:
        log_path("aggregate", "{model}"),
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/aggregate.py"


rule figures:
    """Accuracy by layer, drop heatmap, answer shares and the answer readout by layer of one model
    (PNG, SVG, Vega-Lite)."""
    input:
        metrics=aggregate_path("{model}", "metrics"),
        behaviour=aggregate_path("{model}", "behaviour"),
        answer_readout=aggregate_path("{model}", "answer_readout"),
    output:
        accuracy=report(
            model_figure_path("{model}", "accuracy", "svg"),
            caption="../report/accuracy.rst",
            category="Per model",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "accuracy by layer"},
        ),
        accuracy_png=model_figure_path("{model}", "accuracy", "png"),
        accuracy_json=model_figure_path("{model}", "accuracy", "vl.json"),
        drop_heatmap=report(
            model_figure_path("{model}", "drop_heatmap", "svg"),
            caption="../report/drop_heatmap.rst",
            category="Per model",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "drop against the anchor"},
        ),
        drop_heatmap_png=model_figure_path("{model}", "drop_heatmap", "png"),
        drop_heatmap_json=model_figure_path("{model}", "drop_heatmap", "vl.json"),
        answers=report(
            model_figure_path("{model}", "answers", "svg"),
            caption="../report/answers.rst",
            category="Per model",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "the model's own answers"},
        ),
        answers_png=model_figure_path("{model}", "answers", "png"),
        answers_json=model_figure_path("{model}", "answers", "vl.json"),
        answer_readout=report(
            model_figure_path("{model}", "answer_readout", "svg"),
            caption="../report/answer_readout.rst",
            category="Per model",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "the answer readout by layer"},
        ),
        answer_readout_png=model_figure_path("{model}", "answer_readout", "png"),
        answer_readout_json=model_figure_path("{model}", "answer_readout", "vl.json"),
    params:
        model=lambda wildcards: MODELS[wildcards.model],
        probe=config["probe"],
        evaluate=config["evaluate"],
        stages=config["stages"],
        seed=config["seed"],
    log:
        log_path("figures", "{model}"),
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/figures.py"


rule aggregate_vision:
    """The vision-encoder probe metrics of one model, a row per position x vision layer."""
    input:
        metrics=lambda wildcards: [vision_metrics_path(wildcards.model, layer) for layer in vision_layers_of(wildcards.model)],
        probe_fits=lambda wildcards: [vision_probe_path(wildcards.model, layer, "json") for layer in vision_layers_of(wildcards.model)],
        control_fits=lambda wildcards: [
            vision_control_probe_path(wildcards.model, layer, "json") for layer in vision_layers_of(wildcards.model)
        ],
    output:
        vision_metrics=aggregate_path("{model}", "vision_metrics"),
    params:
        model_name=lambda wildcards: wildcards.model,
    log:
        log_path("aggregate_vision", "{model}"),
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/aggregate_vision.py"


rule pixels_to_answer:
    """From pixels to answer for one model: class-probe accuracy along the vision encoder's layers,
    the projector and the LM's layers, above the answer readout by layer."""
    input:
        metrics=aggregate_path("{model}", "metrics"),
        vision_metrics=aggregate_path("{model}", "vision_metrics"),
        answer_readout=aggregate_path("{model}", "answer_readout"),
    output:
        svg=report(
            model_figure_path("{model}", "pixels_to_answer", "svg"),
            caption="../report/pixels_to_answer.rst",
            category="Per model",
            subcategory="{model}",
            labels={"model": "{model}", "figure": "from pixels to answer"},
        ),
        png=model_figure_path("{model}", "pixels_to_answer", "png"),
        json=model_figure_path("{model}", "pixels_to_answer", "vl.json"),
    params:
        model=lambda wildcards: MODELS[wildcards.model],
        probe=config["probe"],
        evaluate=config["evaluate"],
        seed=config["seed"],
    log:
        log_path("pixels_to_answer", "{model}"),
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/pixels_to_answer.py"


rule depth_panel:
    """Drop against the anchor on normalised depth for every model, detected stages shaded, causal
    onsets marked where patching is enabled."""
    input:
        metrics=[aggregate_path(model, "metrics") for model in MODELS],
        stages=[aggregate_path(model, "stages") for model in MODELS],
        # Causal onsets from activation patching, where enabled.
        onsets=[aggregate_path(model, "causal_onsets") for model in MODELS] if PATCHED else [],
    output:
        svg=report(
            depth_panel_path("svg"),
            caption="../report/depth_panel.rst",
            category="Across models",
            labels={"figure": "stages on normalised depth"},
        ),
        png=depth_panel_path("png"),
        json=depth_panel_path("vl.json"),
    params:
        models=MODELS,
        patching=config["patching"],
        probe=config["probe"],
        evaluate=config["evaluate"],
        stages=config["stages"],
        seed=config["seed"],
    log:
        log_path("depth_panel"),
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    conda:
        STAGELENS_ENV
    script:
        "../../scripts/depth_panel.py"
