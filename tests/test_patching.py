"""Activation patching: hooks, the shared-prefix engine, restored fractions and causal onsets.

The embedded model's tests use its real tokenizer and chat template with a random 2-block LM
(fixtures of test_embedded); the restored fraction is checked against an independent numpy
re-implementation on a hand-made two-layer model.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image
from torch import nn

from stagelens.adapters.base import ANSWER_WORDS
from stagelens.adapters.residual_patch import Continuation, overwrite_residuals, record_residuals
from stagelens.causal import curve, onset_index, patching_tables, restored
from stagelens.extract import Sample
from stagelens.patching import (
    PatchRequest,
    answer_pair,
    answer_scores,
    patch_batch,
    patch_subset,
    run_patching,
    shared_prefix_length,
)
from stagelens.builders.embedded import assemble
from test_embedded import N_BLOCKS, adapter_for, images, tiny_lm, tokenizer_dir, tokenizer_template, vision_state  # noqa: F401 (fixtures)

ANCHOR = "Does this image show a piece of clothing? The answer must be always yes or no."
NEGATION = "Does this image show an animal? The answer must be always yes or no."
FORMAT = "Does this image show a piece of clothing? The answer must be always 1 or 0."
LAYERS = list(range(N_BLOCKS + 1))


@pytest.fixture(scope="module")
def model(vision_state, tokenizer_dir):
    """test_embedded's tiny model, built once for this module (no test here changes it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return assemble(tiny_lm(len(tokenizer)), tokenizer, vision_state, projector_hidden_size=32, seed=0)


@pytest.fixture(scope="module")
def adapter(model):
    return adapter_for(model)


TINY = ("tiny-llava", "tiny-llava-next", "tiny-qwen2-vl")


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_dirs):
    from stagelens.adapters import load_adapter
    from stagelens.spec import ModelSpec

    return {recipe: load_adapter(ModelSpec("tiny", str(path), device="cpu")) for recipe, path in tiny_model_dirs.items()}


@pytest.fixture(scope="module")
def tiny_images(image_rows):
    return [Image.open(path).convert("RGB") for _, _, path in image_rows[:3]]


@pytest.mark.parametrize("recipe", TINY)
def test_hf_cached_prefix_gives_the_full_forwards_answers(tiny_adapters, tiny_images, recipe):
    """Padding, image tokens and (M-)RoPE positions of the continuation are those of the full prompt."""
    adapter = tiny_adapters[recipe]
    with torch.inference_mode():
        run = adapter.prefix_pass(tiny_images, [ANCHOR, NEGATION])
        for question, ids in zip((ANCHOR, NEGATION), run.suffix_ids):
            cached = run.continue_with(ids, 2).answer_log_probs.exp()[::2]
            full = adapter.forward(tiny_images, question, [0], ["last"]).answer_probs
            torch.testing.assert_close(cached, torch.from_numpy(full), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("recipe", TINY)
@torch.inference_mode()
def test_hf_self_patch_is_exact_and_last_layer_patch_gives_the_source_logits(tiny_adapters, tiny_images, recipe):
    adapter = tiny_adapters[recipe]
    layers = list(range(adapter.info.num_layers + 1))
    run, (clean, _) = _repeated_run(adapter, tiny_images, [ANCHOR, ANCHOR], layers, "last")
    torch.testing.assert_close(_patched(adapter, run, clean, clean, layers), clean[3], rtol=0, atol=0)
    top = [adapter.info.num_layers]
    run, (anchor, variant) = _repeated_run(adapter, tiny_images, [ANCHOR, NEGATION], top, "last")
    assert not torch.allclose(anchor[3], variant[3])
    torch.testing.assert_close(_patched(adapter, run, anchor, variant, top), anchor[3], rtol=0, atol=0)


def _repeated_run(adapter, images, questions, layers, position):
    """Prefix pass, then each question's suffix with one copy per layer (n * k rows, the engine's
    patched-call shape), recording the residuals at `position`'s columns at every layer."""
    run = adapter.prefix_pass(images, questions)
    k, out = len(layers), []
    for ids in run.suffix_ids:
        cols = torch.arange(ids.shape[1]) if position == "suffix" else torch.tensor([ids.shape[1] - 1])
        with record_residuals(adapter.blocks, layers, cols) as kept:
            logits = run.continue_with(ids, k).logits
        out.append((ids, cols, dict(kept), logits))
    return run, out


def _patched(adapter, run, source, target, layers):
    """Target's suffix, copy j patched at layers[j] with the source's same row (same batch shape)."""
    k = len(layers)
    n = source[3].shape[0] // k
    writes = {}
    for j, layer in enumerate(layers):
        rows = torch.arange(n) * k + j
        writes[layer] = (rows, source[2][layer][rows])
    with overwrite_residuals(adapter.blocks, writes, target[1]):
        return run.continue_with(target[0], k).logits


@torch.inference_mode()
def test_patching_a_prompt_into_itself_changes_nothing_exactly(adapter, images):
    for position in ("last", "suffix"):
        run, (clean, _) = _repeated_run(adapter, images, [ANCHOR, ANCHOR], LAYERS, position)
        torch.testing.assert_close(_patched(adapter, run, clean, clean, LAYERS), clean[3], rtol=0, atol=0)


@torch.inference_mode()
def test_patching_every_position_at_layer_0_gives_the_source_answer_exactly(adapter, model, images):
    variant = ANCHOR.replace("image", "photo")
    lengths = [len(model.tokenizer(adapter.render_prompt(q))["input_ids"]) for q in (ANCHOR, variant)]
    assert lengths[0] == lengths[1]  # the premise: same number of tokens
    run, (anchor, other) = _repeated_run(adapter, images, [ANCHOR, variant], [0], "suffix")
    assert not torch.allclose(anchor[3], other[3])  # the prompts do lead to different logits
    torch.testing.assert_close(_patched(adapter, run, anchor, other, [0]), anchor[3], rtol=0, atol=0)


def test_engine_self_patch_and_full_suffix_patch_within_float32_rounding(adapter, images):
    """The engine's clean passes run n rows, its patched passes n x layers rows: equal up to the
    float32 rounding that a different batch shape gives the same matmuls."""
    scores = patch_batch(adapter, images, ANCHOR, ANCHOR, LAYERS, "last", ("yes", "no"))
    for direction in ("anchor_to_variant", "variant_to_anchor"):
        np.testing.assert_allclose(scores[direction], np.repeat(scores["anchor"][:, None], len(LAYERS), 1), rtol=0, atol=1e-5)
    variant = ANCHOR.replace("image", "photo")
    scores = patch_batch(adapter, images, ANCHOR, variant, LAYERS, "suffix", ("yes", "no"))
    assert np.abs(scores["anchor"] - scores["variant"]).max() > 1e-3
    np.testing.assert_allclose(scores["anchor_to_variant"], np.repeat(scores["anchor"][:, None], len(LAYERS), 1), rtol=0, atol=1e-5)
    np.testing.assert_allclose(scores["variant_to_anchor"], np.repeat(scores["variant"][:, None], len(LAYERS), 1), rtol=0, atol=1e-5)


def _prompt_length(adapter, images, question: str) -> int:
    """Tokens of the full prompt (left-padded to the longest row for the Hugging Face adapters)."""
    prepared = adapter.prepare(images, question)
    ids = prepared.inputs["input_ids"] if hasattr(prepared, "inputs") else prepared.input_ids
    return int(ids.shape[1])


def _full_forward_sweep(adapter, images, source: str, target: str, layers, pair) -> np.ndarray:
    """(images, layers) answer scores of `target` run whole, no cache, with the last token's residual
    at one layer per forward replaced by `source`'s (recorded from its own whole forward)."""
    with torch.inference_mode():
        with record_residuals(adapter.blocks, layers, torch.tensor([_prompt_length(adapter, images, source) - 1])) as kept:
            adapter.forward(images, source, [0], ["last"])
        rows, last = torch.arange(len(images)), torch.tensor([_prompt_length(adapter, images, target) - 1])
        scores = []
        for layer in layers:
            with overwrite_residuals(adapter.blocks, {layer: (rows, kept[layer])}, last):
                probs = adapter.forward(images, target, [0], ["last"]).answer_probs
            scores.append(answer_scores(torch.log(torch.from_numpy(probs)), pair).numpy())
    return np.stack(scores, axis=1)


def test_last_token_engine_equals_whole_prompt_forwards_patched_at_each_layer(adapter, images):
    """The engine recomputes the last token alone from each prompt's cache; an independent sweep runs
    every patched prompt whole. Prompts of different lengths (the negation's differ mid-question)."""
    scores = patch_batch(adapter, images, ANCHOR, NEGATION, LAYERS, "last", ("yes", "no"))
    for direction, (source, target) in {"anchor_to_variant": (ANCHOR, NEGATION),
                                        "variant_to_anchor": (NEGATION, ANCHOR)}.items():
        expected = _full_forward_sweep(adapter, images, source, target, LAYERS, ("yes", "no"))
        clean = scores["variant" if target == NEGATION else "anchor"]
        assert np.abs(expected - clean[:, None]).max() > 1e-3  # the patch does move the answer
        np.testing.assert_allclose(scores[direction], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("recipe", TINY)
def test_hf_last_token_engine_equals_whole_prompt_forwards(tiny_adapters, tiny_images, recipe):
    """As above on the Hugging Face adapters: left padding, image tokens per row, (M-)RoPE positions."""
    adapter = tiny_adapters[recipe]
    layers = list(range(adapter.info.num_layers + 1))
    scores = patch_batch(adapter, tiny_images, ANCHOR, NEGATION, layers, "last", ("yes", "no"))
    expected = _full_forward_sweep(adapter, tiny_images, ANCHOR, NEGATION, layers, ("yes", "no"))
    assert np.abs(expected - scores["variant"][:, None]).max() > 1e-4
    np.testing.assert_allclose(scores["anchor_to_variant"], expected, rtol=0, atol=1e-4)


def test_suffix_position_refuses_prompts_of_different_length(adapter, images):
    with pytest.raises(ValueError, match="equal length"):
        patch_batch(adapter, images, ANCHOR, NEGATION, LAYERS, "suffix", ("yes", "no"))


def test_last_layer_last_token_patch_reproduces_the_source_logits(adapter, images):
    with torch.inference_mode():
        run = adapter.prefix_pass(images, [ANCHOR, NEGATION])
        anchor_ids, variant_ids = run.suffix_ids
        last = torch.tensor([anchor_ids.shape[1] - 1])
        with record_residuals(adapter.blocks, [N_BLOCKS], last) as kept:
            anchor_logits = run.continue_with(anchor_ids, 1).logits
        variant_logits = run.continue_with(variant_ids, 1).logits
        rows = torch.arange(len(images))
        with overwrite_residuals(adapter.blocks, {N_BLOCKS: (rows, kept[N_BLOCKS])}, torch.tensor([variant_ids.shape[1] - 1])):
            patched = run.continue_with(variant_ids, 1).logits
    assert not torch.allclose(variant_logits, anchor_logits)
    torch.testing.assert_close(patched, anchor_logits, rtol=0, atol=0)


def test_shared_prefix_cache_gives_the_full_forwards_answers(adapter, images):
    """The cached-prefix continuation scores what the extraction forward scores (same answers)."""
    scores = patch_batch(adapter, images, ANCHOR, FORMAT, [N_BLOCKS], "last", ("1", "0"))
    full = adapter.forward(images, FORMAT, [N_BLOCKS], ["last"]).answer_probs
    expected = np.log(full[:, ANSWER_WORDS.index("1")]) - np.log(full[:, ANSWER_WORDS.index("0")])
    np.testing.assert_allclose(scores["variant"], expected, rtol=0, atol=1e-4)


def test_prefix_pass_shares_the_image_and_keeps_each_last_token(adapter, model, images):
    run = adapter.prefix_pass(images[:1], [ANCHOR, NEGATION])
    ids = [model.tokenizer(adapter.render_prompt(q), add_special_tokens=False)["input_ids"] for q in (ANCHOR, NEGATION)]
    assert run.prefix_length == shared_prefix_length(ids)
    image_id = model.config.image_token_id
    assert ids[0].index(image_id) < run.prefix_length and image_id not in run.suffix_ids[0].tolist()[0]
    for full, suffix in zip(ids, run.suffix_ids):
        assert full[run.prefix_length :] == suffix[0].tolist()
    same = adapter.prefix_pass(images[:1], [ANCHOR, ANCHOR])
    assert [s.shape[1] for s in same.suffix_ids] == [1, 1]


def test_answer_scores_sum_spellings_and_pick_the_pair():
    probs = torch.tensor([[0.2, 0.1, 0.3, 0.1, 0.25, 0.05]])  # yes Yes no No 1 0
    log_probs = probs.log()
    assert answer_scores(log_probs, ("yes", "no")).item() == pytest.approx(np.log(0.3 / 0.4))
    assert answer_scores(log_probs, ("1", "0")).item() == pytest.approx(np.log(0.25 / 0.05))
    assert answer_pair("1") == ("1", "0") and answer_pair("0") == ("1", "0") and answer_pair("no") == ("yes", "no")


# --- a hand-made two-layer model and an independent re-implementation -----------------------

D, VOCAB = 8, 16


class ToyBlock(nn.Module):
    """h_t <- h_t + tanh(W * mean_{s <= t} h_s): causal mixing, so late tokens see early ones."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.past: torch.Tensor | None = None  # this block's inputs over the prefix (the "cache")

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        full = hidden if self.past is None else torch.cat([self.past, hidden], dim=1)
        counts = torch.arange(1, full.shape[1] + 1, dtype=full.dtype).view(1, -1, 1)
        mixed = (full.cumsum(dim=1) / counts)[:, -hidden.shape[1] :]
        return hidden + torch.tanh(mixed @ self.weight)


class ToyRun:
    def __init__(self, toy: "ToyAdapter", past: list[torch.Tensor], prefix_length: int, suffix_ids):
        self.toy, self.past, self.prefix_length, self.suffix_ids = toy, past, prefix_length, suffix_ids

    def continue_with(self, suffix_ids: torch.Tensor, repeat: int) -> torch.Tensor:
        for block, past in zip(self.toy.blocks, self.past):
            block.past = past.repeat_interleave(repeat, dim=0)
        try:
            hidden = self.toy.embed[suffix_ids.repeat_interleave(repeat, dim=0)]
            for block in self.toy.blocks:
                hidden = block(hidden)
        finally:
            for block in self.toy.blocks:
                block.past = None
        logits = hidden[:, -1] @ self.toy.unembed
        return Continuation(logits, logits.log_softmax(dim=-1)[:, : len(ANSWER_WORDS)])


class ToyAdapter:
    """Prompts are strings of token ids ("3 5 7"); an image adds one token whose embedding is
    its mean pixel value times a fixed vector, at the start."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(VOCAB, D, generator=g)
        self.image_direction = torch.randn(D, generator=g)
        self.blocks = nn.ModuleList(ToyBlock(torch.randn(D, D, generator=g) / D**0.5) for _ in range(2))
        self.unembed = torch.randn(D, VOCAB, generator=g)

    def tokens(self, question: str) -> list[int]:
        return [int(t) for t in question.split()]

    def image_vector(self, image: Image.Image) -> torch.Tensor:
        return float(np.asarray(image, dtype=np.float64).mean() / 255.0) * self.image_direction

    def prefix_pass(self, images, questions):
        ids = [self.tokens(q) for q in questions]
        shared = min(shared_prefix_length(ids), min(len(x) for x in ids) - 1)
        prefix = torch.tensor(ids[0][:shared]).repeat(len(images), 1)
        hidden = torch.cat([torch.stack([self.image_vector(im) for im in images]).unsqueeze(1), self.embed[prefix]], dim=1)
        past = []
        for block in self.blocks:
            past.append(hidden)
            hidden = block(hidden)
        suffixes = [torch.tensor(x[shared:]).repeat(len(images), 1) for x in ids]
        return ToyRun(self, past, shared + 1, suffixes)


def numpy_forward(toy: ToyAdapter, image: Image.Image, ids: list[int], patch=None) -> tuple[list[np.ndarray], float]:
    """Full-sequence forward in float64 with no cache and no hooks; patch = (layer, vector) writes
    the last token's residual at that layer. Returns the last token's residual per layer and the
    yes - no score."""
    embed = toy.embed.double().numpy()
    hidden = np.vstack([toy.image_vector(image).double().numpy()[None], embed[ids]])
    states = []
    for layer in range(3):
        if patch is not None and patch[0] == layer:
            hidden = hidden.copy()
            hidden[-1] = patch[1]
        states.append(hidden[-1].copy())
        if layer == 2:
            break
        weight = toy.blocks[layer].weight.detach().double().numpy()
        means = np.cumsum(hidden, axis=0) / np.arange(1, len(hidden) + 1)[:, None]
        hidden = hidden + np.tanh(means @ weight)
    logits = hidden[-1] @ toy.unembed.double().numpy()
    log_probs = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    yes = np.logaddexp(log_probs[0], log_probs[1])
    no = np.logaddexp(log_probs[2], log_probs[3])
    return states, float(yes - no)


def test_restored_fraction_matches_an_independent_reimplementation():
    toy = ToyAdapter()
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)) for _ in range(5)]
    anchor, variant = "9 10 11 12 13", "9 10 14 15"
    scores = patch_batch(toy, pictures, anchor, variant, [0, 1, 2], "last", ("yes", "no"))
    lib = restored(scores["variant"], scores["anchor"], scores["variant_to_anchor"])  # source variant, target anchor
    lib_forward = restored(scores["anchor"], scores["variant"], scores["anchor_to_variant"])

    ids_a, ids_v = toy.tokens(anchor), toy.tokens(variant)
    source, target, patched = [], [], []
    for image in pictures:
        states_a, score_a = numpy_forward(toy, image, ids_a)
        states_v, score_v = numpy_forward(toy, image, ids_v)
        source.append(score_a)
        target.append(score_v)
        patched.append([numpy_forward(toy, image, ids_v, (layer, states_a[layer]))[1] for layer in range(3)])
    source, target, patched = map(np.asarray, (source, target, patched))
    gap = sum(source[i] - target[i] for i in range(5)) / 5
    expected = [sum(patched[i][layer] - target[i] for i in range(5)) / 5 / gap for layer in range(3)]
    np.testing.assert_allclose(scores["anchor"], source, rtol=0, atol=1e-4)
    np.testing.assert_allclose(lib_forward, expected, rtol=0, atol=1e-4)
    assert expected[2] == pytest.approx(1.0)
    assert min(abs(expected[0] - 1), abs(expected[1] - 1), abs(expected[0] - expected[1])) > 0.05  # not trivial
    assert lib[2] == pytest.approx(1.0, abs=1e-5)


def test_onset_is_the_first_layer_from_which_the_threshold_holds():
    assert onset_index(np.array([0.1, 0.6, 0.4, 0.7, 1.0])) == 3
    assert onset_index(np.array([0.6, 0.6, 0.9])) == 0
    assert onset_index(np.array([0.1, 0.2, 0.3])) == -1
    np.testing.assert_array_equal(onset_index(np.array([[0.1, 0.6, 1.0], [0.6, 0.1, 0.2]])), [1, -1])


def test_curve_ci_brackets_the_point_and_no_gap_has_no_onset():
    rng = np.random.default_rng(1)
    n, layers = 40, [0, 1, 2, 3]
    source = rng.normal(3.0, 0.5, n)
    target = rng.normal(-1.0, 0.5, n)
    share = np.array([0.0, 0.3, 0.8, 1.0])
    patched = target[:, None] + share * (source - target)[:, None] + rng.normal(0, 0.1, (n, 4))
    rows, onset = curve(source, target, patched, layers, n_bootstrap=500, ci=0.95, seed=0)
    for row in rows:
        assert row["restored_ci_low"] <= row["restored"] <= row["restored_ci_high"]
    assert [round(r["restored"], 1) for r in rows] == [0.0, 0.3, 0.8, 1.0]
    assert onset["onset_layer"] == 2 and onset["has_gap"] and onset["onset_ci_low"] <= 2 <= onset["onset_ci_high"]
    _, none = curve(target + rng.normal(0, 0.1, n), target, patched, layers, n_bootstrap=200, ci=0.95, seed=0)
    assert not none["has_gap"] and none["onset_layer"] is None


def test_subset_is_seeded_balanced_and_in_order():
    samples = [Sample(f"c{i % 3}/{i}", i % 3, f"/x/{i}.png") for i in range(30)]
    chosen = patch_subset(samples, 4, seed=7)
    assert [s.label for s in chosen].count(0) == 4 and len(chosen) == 12
    assert chosen == patch_subset(samples, 4, seed=7) and chosen != patch_subset(samples, 4, seed=8)
    assert chosen == [s for s in samples if s in chosen]
    assert len(patch_subset(samples, 50, seed=0)) == 30


def test_run_patching_writes_a_table_the_curve_reads(adapter, images, tmp_path):
    paths = []
    for i, image in enumerate(images):
        path = tmp_path / f"{i}.png"
        image.convert("RGB").save(path)
        paths.append(Sample(f"s{i}", i % 2, str(path)))
    request = PatchRequest({"id": "anchor", "text": ANCHOR, "family": "anchor", "expected": "yes"},
                           {"id": "neg", "text": NEGATION, "family": "negation", "expected": "no"},
                           layers=tuple(LAYERS), batch_size=2)
    out = tmp_path / "patch.parquet"
    summary = run_patching(adapter, paths, request, str(out), progress=False)
    table = pl.read_parquet(out)
    assert len(table) == len(images) * 2 * len(LAYERS)
    # 2 batches x (2 prompt runs up to the last token + 2 clean + 2 patched) model calls, against
    # 3 x 2 x (1 + 3) full forwards; every clean or patched row recomputes the last token alone.
    assert summary["model_calls"] == 12 and summary["naive_forwards"] == len(images) * (2 + 2 * len(LAYERS))
    lengths = [_prompt_length(adapter, images[:1], q) for q in (ANCHOR, NEGATION)]
    assert summary["tokens"] == len(images) * (sum(lengths) - 2 + 2 + 2 * len(LAYERS))
    curves, onsets = patching_tables(table, {"id": "neg", "family": "negation", "expected": "no"}, N_BLOCKS,
                                     n_bootstrap=50, ci=0.9, seed=0)
    last = curves.filter(pl.col("layer") == N_BLOCKS)["restored"].to_list()
    assert last == pytest.approx([1.0, 1.0], abs=1e-4)
    assert set(onsets["direction"]) == {"anchor_to_variant", "variant_to_anchor"}


def synthetic_scores(share: list[float], n: int = 30, seed: int = 0) -> pl.DataFrame:
    """A patching file's rows where patching layer j restores share[j] of each image's gap (plus noise)."""
    rng = np.random.default_rng(seed)
    anchor, variant = rng.normal(2.0, 0.3, n), rng.normal(-1.0, 0.3, n)
    rows = []
    for direction, (source, target) in {"anchor_to_variant": (anchor, variant), "variant_to_anchor": (variant, anchor)}.items():
        for i in range(n):
            for layer, s in enumerate(share):
                rows.append({"sample_id": f"s{i:02d}", "label": i % 3, "position": "last", "direction": direction,
                             "layer": layer, "source_score": source[i], "target_score": target[i],
                             "patched_score": target[i] + s * (source[i] - target[i]) + rng.normal(0, 0.05)})
    return pl.DataFrame(rows)


def test_patching_summary_sets_causal_onsets_beside_the_probing_stages():
    from stagelens.aggregate import patching_summary, stages_table
    from test_figures import _metrics

    stages = stages_table(_metrics("m", 4), 4, 0.05, 0.05)  # negation reacts from layer 3: semantic reasoning 3-4
    negation = {"id": "neg", "family": "negation", "expected": "no"}
    fmt = {"id": "fmt", "family": "format", "expected": "1"}
    curves, onsets = patching_summary(
        [(synthetic_scores([0.0, 0.1, 0.2, 0.9, 1.0]), 4), (synthetic_scores([0.0, 0.7, 0.2, 0.6, 1.0], seed=1), 4)],
        [negation, fmt], stages, "m", n_bootstrap=200, ci=0.95, seed=0,
    )
    assert len(curves) == 2 * 2 * 5 and set(curves["model"]) == {"m"}
    neg = onsets.filter((pl.col("prompt") == "neg") & (pl.col("direction") == "anchor_to_variant")).row(0, named=True)
    assert neg["onset_layer"] == 3 and neg["onset_depth"] == 0.75
    assert neg["probing_stage"] == "semantic_reasoning" and neg["probing_onset_layer"] == 3 and neg["readings_agree"]
    fmt_row = onsets.filter((pl.col("prompt") == "fmt") & (pl.col("direction") == "anchor_to_variant")).row(0, named=True)
    assert fmt_row["onset_layer"] == 3  # layer 1 reaches 0.7 but layer 2 falls back: not "from there on"
    assert fmt_row["probing_stage"] == "answer_decoding" and fmt_row["probing_onset_layer"] is None
    assert fmt_row["readings_agree"] is None
