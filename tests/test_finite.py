"""Numerical faults: a NaN or Inf in any kept hidden state stops extraction, names layer, position
and sample, and leaves no file behind."""

from __future__ import annotations

import numpy as np
import pytest

from stagelens.adapters import load_adapter
from stagelens.adapters.layers import find_decoder_layers
from stagelens.extract import Sample, extract, extract_image
from stagelens.finite import NonFiniteError, check_finite, nonfinite_vectors
from stagelens.spec import ModelSpec

PROMPT = {"id": "anchor", "family": "anchor", "text": "Does this image show an animal?", "expected": "yes"}


def test_every_planted_fault_is_found_and_nothing_else():
    rng = np.random.default_rng(0)
    layers, ids = [0, 3, 7], ["a/1", "a/2", "b/1", "b/2"]
    vectors = {pos: rng.normal(size=(3, 4, 8)).astype(np.float32) for pos in ("last", "image_mean")}
    vectors["last"][1, 2, 5] = np.nan
    vectors["image_mean"][2, 0, 0] = -np.inf
    vectors["image_mean"][0, 3, 7] = 7e4  # finite in float32, Inf once stored as float16
    assert nonfinite_vectors(vectors, layers, ids) == [(3, "last", "b/1", "NaN"), (7, "image_mean", "a/1", "Inf")]
    assert nonfinite_vectors(vectors, layers, ids, "float16") == [
        (0, "image_mean", "b/2", "beyond float16's range (65504)"),
        (3, "last", "b/1", "NaN"),
        (7, "image_mean", "a/1", "Inf"),
    ]
    with pytest.raises(NonFiniteError, match=r"2 kept hidden-state vector\(s\)(.|\n)*layer 3, position last, sample b/1: NaN"):
        check_finite(vectors, layers, ids)
    check_finite({"last": np.zeros((3, 4, 8), np.float32)}, layers, ids)


def test_many_faults_are_counted_past_the_first_ten():
    vectors = {"last": np.full((2, 30, 4), np.nan, np.float32)}
    with pytest.raises(NonFiniteError, match=r"^60 kept(.|\n)*\(\+50 more\)"):
        check_finite(vectors, [0, 1], [f"s{i:02d}" for i in range(30)])


@pytest.mark.parametrize("image_pass", [False, True], ids=["prompt", "image_pass"])
def test_extraction_stops_on_a_nan_hidden_state_and_writes_nothing(tiny_model_dirs, image_rows, tmp_path, image_pass):
    """A real tiny model with NaN injected after decoder block 1 for one image of the second batch,
    in a prompt's extraction (last) and in the image pass (image_mean)."""
    spec = ModelSpec(name="tiny", checkpoint=str(tiny_model_dirs["tiny-llava"]), dtype="float32", device="cpu",
                     revision="main", batch_size=2, positions=("last", "image_mean"))
    adapter = load_adapter(spec)
    samples = [Sample(sid, label, path) for sid, label, path in image_rows[:4]]
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        hidden = output[0] if isinstance(output, tuple) else output
        if calls["n"] == 2:  # second batch: its second image
            hidden[1] = float("nan")
        return output

    handle = find_decoder_layers(adapter.model)[1].register_forward_hook(poison)
    out = tmp_path / "out"
    layers = spec.layers_of(adapter.info.num_layers)
    try:
        with pytest.raises(NonFiniteError) as info:
            paths = [out / f"layer{layer}.parquet" for layer in layers]
            if image_pass:
                extract_image(adapter, spec, samples, paths, split="test", progress=False)
            else:
                extract(adapter, spec, samples, PROMPT, paths, out / "answers.parquet", split="test", progress=False)
    finally:
        handle.remove()
    message = str(info.value)
    # Block 1's output is layer 2 (layer 0 = embeddings); the NaN runs on through the later layers.
    position = "image_mean" if image_pass else "last"  # the image pass keeps the image positions only
    for layer in layers[2:]:
        assert f"layer {layer}, position {position}, sample {samples[3].sample_id}: NaN" in message
    assert "layer 1," not in message and samples[2].sample_id not in message
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
