# One rule per model: each model has its own layer count, and one job (one forward pass per
# batch) writes every layer's file. Wildcards: {split} and {prompt}; the model is fixed per rule.
# extract_<model> keeps the prompt-dependent positions of one prompt, the model's answers and the
# answer readout per layer (its final norm and unembedding on each layer's last-token state);
# image_pass_<model> keeps the image positions of one split once: the tokens up to the last
# image token, which every prompt shares (each prompt's job checks that from its token ids), and,
# where models.<m>.vision_num_layers is set, the vision encoder's layers of the same forward.
# With models.<m>.share_prefix, shared_extract_<model> writes every test-split prompt's files in one
# job (the shared tokens once per batch), and extract_<model> serves the train split alone; both
# then write their split's image-pass files too, from the forwards they run anyway (the anchor's
# pass, the shared prefix), and no image_pass_<model> job runs (folds_image_pass).

for _model in MODELS:
    _split, _prompt = extract_job(_model)

    rule:
        name:
            extract_rule_name(_model)
        wildcard_constraints:
            split="train" if shares_prefix(_model) else "train|test",
        input:
            **extract_inputs(_model),
        output:
            embeddings=[embedding_path(_model, _split, _prompt, layer) for layer in layers_of(_model)],
            answers=answers_path(_model, _split, _prompt),
            answer_readout=answer_readout_path(_model, _split, _prompt),
            **folded_image_outputs(_model, "train"),
        params:
            model_name=_model,
            model=MODELS[_model],
            model_path=lambda wildcards, input, m=_model: input.model if is_recipe_model(m) else MODELS[m]["path"],
            prompt=lambda wildcards: PROMPTS[wildcards.get("prompt", ANCHOR)],
            split=lambda wildcards: wildcards.get("split", "train"),
        log:
            log_path(f"extract_{_model}", _split, _prompt),
        benchmark:
            benchmark_path(f"extract_{_model}", _split, _prompt)
        threads: estimate.extract_threads(MODELS[_model])
        resources:
            # A retry (profiles: retries) gets twice the memory and time.
            mem_mb=lambda wildcards, attempt, m=_model: estimate.extract_mem_mb(MODELS[m]) * attempt,
            runtime=lambda wildcards, attempt, m=_model: extract_runtime(m, wildcards.get("split", "train")) * attempt,
            gpu=estimate.extract_gpu(MODELS[_model]),
        conda:
            STAGELENS_ENV
        script:
            "../../scripts/extract.py"


for _model in [m for m in MODELS if shares_prefix(m)]:

    rule:
        name:
            shared_extract_rule_name(_model)
        input:
            **extract_inputs(_model),
        output:
            embeddings=[embedding_path(_model, "test", p, layer) for p in PROMPTS for layer in layers_of(_model)],
            answers=[answers_path(_model, "test", p) for p in PROMPTS],
            answer_readout=[answer_readout_path(_model, "test", p) for p in PROMPTS],
            **folded_image_outputs(_model, "test"),
        params:
            model_name=_model,
            model=MODELS[_model],
            model_path=lambda wildcards, input, m=_model: input.model if is_recipe_model(m) else MODELS[m]["path"],
            prompts=list(PROMPTS.values()),
            split="test",
        log:
            log_path(f"extract_{_model}", "test", "prompts"),
        benchmark:
            benchmark_path(f"extract_{_model}", "test", "prompts")
        threads: estimate.extract_threads(MODELS[_model])
        resources:
            mem_mb=lambda wildcards, attempt, m=_model: estimate.extract_mem_mb(MODELS[m]) * attempt,
            # An upper bound: every prompt's own job, summed.
            runtime=lambda wildcards, attempt, m=_model: extract_runtime(m, "test") * len(PROMPTS) * attempt,
            gpu=estimate.extract_gpu(MODELS[_model]),
        conda:
            STAGELENS_ENV
        script:
            "../../scripts/extract.py"


for _model in [m for m in MODELS if has_image_pass(m) and not folds_image_pass(m)]:

    rule:
        name:
            image_pass_rule_name(_model)
        input:
            **extract_inputs(_model),
        output:
            **image_pass_outputs(_model),
        params:
            model_name=_model,
            model=MODELS[_model],
            model_path=lambda wildcards, input, m=_model: input.model if is_recipe_model(m) else MODELS[m]["path"],
            split=lambda wildcards: wildcards.split,
        log:
            log_path(f"image_pass_{_model}", "{split}"),
        benchmark:
            benchmark_path(f"image_pass_{_model}", "{split}")
        threads: estimate.extract_threads(MODELS[_model])
        resources:
            # As extract_<model> (an upper bound: the image pass skips the question tokens).
            mem_mb=lambda wildcards, attempt, m=_model: estimate.extract_mem_mb(MODELS[m]) * attempt,
            runtime=lambda wildcards, attempt, m=_model: extract_runtime(m, wildcards.split) * attempt,
            gpu=estimate.extract_gpu(MODELS[_model]),
        conda:
            STAGELENS_ENV
        script:
            "../../scripts/extract.py"
