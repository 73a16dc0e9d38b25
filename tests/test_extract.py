"""Extraction end to end on tiny models: files, metadata, equality with direct forwards, atomicity."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from script_job import run_script
from stagelens.extract import Sample, extract, extract_image, extract_prompts, read_split
from stagelens.adapters import load_adapter
from stagelens.builders import PIPELINE_TINY_RECIPES
from stagelens.spec import ModelSpec
from stagelens.adapters.base import ANSWER_WORDS
from stagelens.store import read_metadata, read_vectors
from stagelens.adapters.layers import find_decoder_layers
from stagelens.prompts import build_inputs

CFG = {"dtype": "float32", "device": "cpu", "revision": "main"}


def spec_of(path, **keys) -> ModelSpec:
    return ModelSpec(name="tiny", checkpoint=str(path), **{**CFG, **keys})
PROMPT = {"id": "anchor", "family": "anchor", "text": "Does this image show an animal? The answer must be always yes or no.",
          "expected": "yes"}
RECIPES = PIPELINE_TINY_RECIPES
META_KEYS = {"model_id", "model_name", "revision", "architecture", "dtype", "device", "layer", "num_layers",
             "layer_convention", "prompt_id", "prompt_family", "prompt_text", "rendered_prompt", "split",
             "positions", "stagelens_version", "transformers_version", "torch_version"}


@pytest.fixture(scope="module")
def adapters(tiny_model_dirs):
    return {recipe: load_adapter(spec_of(path)) for recipe, path in tiny_model_dirs.items()}


@pytest.fixture(scope="module")
def samples(image_rows):
    return [Sample(sid, label, path) for sid, label, path in image_rows]


def outputs(root: Path, layers):
    return [root / "emb" / f"layer{layer}.parquet" for layer in layers], root / "answers.parquet"


POSITIONS = ("last", "question_last", "image_mean")


def run(adapter, samples, root, layers=None, batch_size=3, prompt=PROMPT, **kw):
    """Extract one prompt; the answer readout goes to root / "readout.parquet"."""
    spec = spec_of(adapter.info.model_id, layers=None if layers is None else tuple(layers), batch_size=batch_size,
                   positions=POSITIONS, **kw)
    emb, ans = outputs(root, spec.layers_of(adapter.info.num_layers))
    extract(adapter, spec, samples, prompt, emb, ans, split="test", readout_path=root / "readout.parquet", progress=False)
    return emb, ans


def run_image(adapter, samples, root, batch_size=3, **kw):
    spec = spec_of(adapter.info.model_id, batch_size=batch_size, positions=POSITIONS, **kw)
    emb = [root / "image" / f"layer{layer}.parquet" for layer in spec.layers_of(adapter.info.num_layers)]
    extract_image(adapter, spec, samples, emb, split="test", progress=False)
    return emb


@pytest.mark.parametrize("recipe", RECIPES)
def test_extract_end_to_end(adapters, samples, tmp_path, recipe):
    """Prompt files (last, question_last) and the image pass (image_mean) equal full per-prompt
    forwards of one image at a time, fp32, to 1e-5."""
    adapter = adapters[recipe]
    emb, ans = run(adapter, samples, tmp_path, num_layers=4)
    image_emb = run_image(adapter, samples, tmp_path, batch_size=4, num_layers=4)
    images = [Image.open(s.path).convert("RGB") for s in samples]
    direct = [adapter.forward([im], PROMPT["text"], list(range(5)), list(POSITIONS)) for im in images]
    for layer, (path, image_path) in enumerate(zip(emb, image_emb)):
        meta, image_meta = read_metadata(path), read_metadata(image_path)
        assert META_KEYS <= set(meta)
        assert meta["layer"] == layer and meta["num_layers"] == 4 and meta["split"] == "test"
        assert meta["rendered_prompt"] == adapter.render_prompt(PROMPT["text"])
        assert meta["architecture"] == adapter.info.architecture and meta["positions"] == ["last", "question_last"]
        assert image_meta["pass"] == "image" and image_meta["positions"] == ["image_mean"]
        assert image_meta["prompt_id"] is None and image_meta["layer"] == layer
        assert pq.read_schema(path).names == ["sample_id", "label", "last", "question_last"]
        assert pq.read_schema(image_path).names == ["sample_id", "label", "image_mean"]
        for pos in POSITIONS:
            ids, labels, vectors = read_vectors(image_path if pos == "image_mean" else path, pos)
            assert ids.tolist() == [s.sample_id for s in samples]
            assert labels.tolist() == [s.label for s in samples]
            expected = np.stack([d.vectors[pos][layer, 0] for d in direct])
            np.testing.assert_allclose(vectors, expected, atol=1e-5, rtol=1e-5)
    answers = pq.read_table(ans).to_pydict()
    assert answers["sample_id"] == [s.sample_id for s in samples]
    probs = np.array([answers[f"p_{w}"] for w in ANSWER_WORDS]).T
    np.testing.assert_allclose(probs, np.concatenate([d.answer_probs for d in direct]), atol=1e-6, rtol=1e-4)
    assert answers["answer"] == [ANSWER_WORDS[j] for j in probs.argmax(1)]
    assert answers["n_image_tokens"] == [int(d.n_image_tokens[0]) for d in direct]
    assert "layer" not in read_metadata(ans) and read_metadata(ans)["prompt_id"] == "anchor"
    assert sorted(os.listdir(tmp_path / "emb")) == sorted(p.name for p in emb)
    check_readout(adapter, tmp_path / "readout.parquet", emb, answers, probs)


def check_readout(adapter, path, emb, answers, probs):
    """The readout file: image x layer rows; at the last layer the model's own answer probabilities
    (1e-5); at every layer the model's final norm and unembedding (read from the model, not the
    architecture table) applied to the stored `last` vectors; margin = log P(yes) - log P(no)."""
    readout = pq.read_table(path).to_pydict()
    n, layers = len(answers["sample_id"]), list(range(len(emb)))
    assert readout["sample_id"] == [i for i in answers["sample_id"] for _ in layers]
    assert readout["layer"] == layers * n and readout["label"] == [y for y in answers["label"] for _ in layers]
    meta = read_metadata(path)
    assert meta["readout_layers"] == layers and meta["prompt_id"] == "anchor" and "margin_rule" in meta
    assert "readout_rule" in meta["adapter"]
    got = np.array([readout[f"p_{w}"] for w in ANSWER_WORDS]).T.reshape(n, len(layers), len(ANSWER_WORDS))
    # One-token answer paths only (the tiny tokenizers): the readout at the last layer is the model's answer.
    assert all(len(p) == 1 for paths in adapter.answer_paths.values() for p in paths)
    np.testing.assert_allclose(got[:, -1], probs, atol=1e-5, rtol=1e-5)
    norm, head = adapter.model.model.language_model.norm, adapter.model.get_output_embeddings()
    for layer, path_ in enumerate(emb):
        _, _, last = read_vectors(path_, "last")
        with torch.no_grad():
            full = head(norm(torch.from_numpy(last))).double().softmax(-1).numpy()
        expected = np.stack([full[:, adapter.answer_ids[w]].max(1) for w in ANSWER_WORDS], axis=1)
        np.testing.assert_allclose(got[:, layer], expected, atol=1e-6, rtol=1e-4)
    margin = np.log(got[..., 0] + got[..., 1]) - np.log(got[..., 2] + got[..., 3])
    np.testing.assert_allclose(np.array(readout["margin"]).reshape(n, len(layers)), margin, atol=1e-4)


def test_outputs_read_as_is_by_polars_pandas_duckdb(adapters, samples, tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl

    emb, ans = run(adapters["tiny-qwen2-vl"], samples, tmp_path, layers=[2])
    _, _, vectors = read_vectors(emb[0], "last")
    frame = pl.read_parquet(emb[0])
    np.testing.assert_array_equal(frame["last"].to_numpy(), vectors)
    assert pd.read_parquet(emb[0]).shape == (len(samples), 4)
    count, width = duckdb.connect().execute(
        f"SELECT count(*), max(len(question_last)) FROM read_parquet('{emb[0]}')").fetchone()
    assert (count, width) == (len(samples), 64)
    assert pl.read_parquet(ans).height == pd.read_parquet(ans).shape[0] == len(samples)


class _FailingAdapter:
    """Delegates to a real adapter, then fails on the n-th batch."""

    def __init__(self, adapter, fail_at: int):
        self.adapter, self.fail_at, self.calls = adapter, fail_at, 0
        self.info = adapter.info

    def render_prompt(self, *args):
        return self.adapter.render_prompt(*args)

    def layout(self, *args):
        return self.adapter.layout(*args)

    def forward(self, *args, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated failure mid-way")
        return self.adapter.forward(*args, **kw)


def test_failure_mid_way_leaves_no_output(adapters, samples, tmp_path):
    failing = _FailingAdapter(adapters["tiny-llava"], fail_at=2)
    with pytest.raises(RuntimeError, match="mid-way"):
        run(failing, samples, tmp_path, batch_size=2)
    assert failing.calls == 2
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


def test_unreadable_image_is_a_clear_error_and_leaves_no_output(adapters, samples, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        run(adapters["tiny-llava"], [*samples[:2], Sample("x/broken", 0, str(bad))], tmp_path / "out")
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_num_layers_mismatch_is_a_clear_error(adapters, samples, tmp_path):
    with pytest.raises(ValueError, match=r"num_layers is 32 .* has 4 decoder blocks"):
        run(adapters["tiny-llava"], samples, tmp_path, num_layers=32)
    assert not (tmp_path / "emb").exists()


def test_read_split_filters_and_resolves_relative_paths(tmp_path):
    table = pa.table({"sample_id": ["a/1", "a/2", "b/3"], "split": ["train", "test", "test"],
                      "label": pa.array([0, 0, 1], pa.int32()), "class_name": ["A", "A", "B"],
                      "path": ["imgs/a/1.png", "/abs/a/2.png", "imgs/b/3.png"]})
    pq.write_table(table, tmp_path / "manifest.parquet")
    rows = read_split(tmp_path / "manifest.parquet", "test", image_root=tmp_path)
    assert rows == [Sample("a/2", 0, "/abs/a/2.png"), Sample("b/3", 1, str(tmp_path / "imgs/b/3.png"))]
    with pytest.raises(ValueError, match="validation"):
        read_split(tmp_path / "manifest.parquet", "validation")


def test_job_scripts_build_and_extract(tmp_path, image_rows):
    model_dir = tmp_path / "models" / "tiny-llava"
    run_script("build_model.py", input={}, output={"model": model_dir}, log=tmp_path / "build.log",
               params={"recipe": "tiny-llava", "seed": 0, "num_layers": 3})
    assert (model_dir / "config.json").exists() and not list(model_dir.parent.glob(".*tmp"))
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({
        "sample_id": [r[0] for r in image_rows], "split": ["test"] * len(image_rows),
        "label": pa.array([r[1] for r in image_rows], pa.int32()), "class_name": ["c"] * len(image_rows),
        "path": [r[2] for r in image_rows]}), manifest)
    layers = [0, 3]
    emb = [tmp_path / "emb" / f"layer{layer}.parquet" for layer in layers]
    model_cfg = {**CFG, "batch_size": 4, "num_layers": 3, "layers": layers, "positions": ["last"],
                 "vector_dtype": "float32", "trust_remote_code": False, "max_pixels": None}
    run_script("extract.py", input={"manifest": manifest, "model": model_dir},
               output={"embeddings": emb, "answers": tmp_path / "answers.parquet", "answer_readout": tmp_path / "readout.parquet"},
               log=tmp_path / "extract.log",
               params={"model_name": "tiny-llava", "model": model_cfg, "model_path": str(model_dir),
                       "prompt": PROMPT, "split": "test"})
    ids, _, vectors = read_vectors(emb[1], "last")
    assert ids.tolist() == [r[0] for r in image_rows] and vectors.shape == (len(image_rows), 64)
    assert read_metadata(emb[1])["layer"] == 3 and read_metadata(emb[1])["model_name"] == "tiny-llava"
    assert "wrote 7 rows x 2 layers" in (tmp_path / "extract.log").read_text()
    assert pq.read_table(tmp_path / "readout.parquet").column("layer").to_pylist() == layers * len(image_rows)
    image = [tmp_path / "image" / f"layer{layer}.parquet" for layer in layers]
    run_script("extract.py", input={"manifest": manifest, "model": model_dir}, output={"embeddings": image},
               log=tmp_path / "image.log", params={"model_name": "tiny-llava", "model_path": str(model_dir),
                                                   "model": {**model_cfg, "positions": ["last", "image_mean"]},
                                                   "split": "test"})
    assert pq.read_schema(image[1]).names == ["sample_id", "label", "image_mean"]
    assert read_metadata(image[1])["pass"] == "image" and read_vectors(image[1], "image_mean")[2].shape == (7, 64)


def test_float16_vectors_only_for_half_precision_models(adapters, samples, tiny_model_dirs, tmp_path):
    with pytest.raises(ValueError, match="float16 vectors"):
        run(adapters["tiny-llava"], samples, tmp_path / "a", layers=[0], vector_dtype="float16")
    bf16 = load_adapter(spec_of(tiny_model_dirs["tiny-llava"], dtype="bfloat16"))
    emb, _ = run(bf16, samples[:3], tmp_path / "b", layers=[4], vector_dtype="float16")
    assert pq.read_schema(emb[0]).field("last").type.value_type == pa.float16()
    assert read_metadata(emb[0])["dtype"] == "bfloat16"
    assert read_vectors(emb[0])[2].dtype == np.float32


class _ForwardOnly:
    """An adapter with only the protocol's `forward` (no prepare/forward_prepared look-ahead)."""

    def __init__(self, adapter):
        self.adapter, self.info = adapter, adapter.info

    def render_prompt(self, *args):
        return self.adapter.render_prompt(*args)

    def layout(self, *args):
        return self.adapter.layout(*args)

    def forward(self, *args, **kw):
        return self.adapter.forward(*args, **kw)

    def forward_image(self, *args):
        return self.adapter.forward_image(*args)


def test_look_ahead_and_plain_forward_paths_write_the_same(adapters, samples, tmp_path):
    adapter = adapters["tiny-llava-next"]
    emb_a, ans_a = run(adapter, samples, tmp_path / "a", layers=[0, 4], batch_size=2)
    emb_b, ans_b = run(_ForwardOnly(adapter), samples, tmp_path / "b", layers=[0, 4], batch_size=2)
    for a, b in zip(emb_a, emb_b):
        assert pq.read_table(a).equals(pq.read_table(b))
    assert pq.read_table(ans_a).equals(pq.read_table(ans_b))
    image_a = run_image(adapter, samples, tmp_path / "a", layers=(0, 4), batch_size=2)
    image_b = run_image(_ForwardOnly(adapter), samples, tmp_path / "b", layers=(0, 4), batch_size=2)
    for a, b in zip(image_a, image_b):
        assert pq.read_table(a).equals(pq.read_table(b))


@pytest.mark.parametrize("recipe", RECIPES)
def test_prompt_with_text_before_the_image_is_refused(adapters, samples, tmp_path, recipe):
    """A template that puts the question before the image too makes the image tokens depend on
    the prompt: the prompt's extraction fails, naming it, and writes nothing."""
    adapter = adapters[recipe]
    template = adapter.processor.chat_template
    adapter.processor.chat_template = "{{ messages[0]['content'][1]['text'] }}\n" + template
    try:
        with pytest.raises(ValueError, match=r"prompt 'anchor' under model 'tiny'.*differ from the image pass's.*"
                           r"declare it with the prompt's `before_image` key"):
            run(adapter, samples, tmp_path, layers=[0])
    finally:
        adapter.processor.chat_template = template
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def hidden_image_means(adapter, image, question: str, before_image: str = "") -> np.ndarray:
    """(L + 1, width) mean over the image tokens per layer from one plain forward with
    output_hidden_states (the last block's pre-norm output by a hook of its own), in float64."""
    inputs = adapter.build_inputs([image], question) if not before_image else (
        build_inputs(adapter.processor, [image], question, before_image=before_image).to(torch.float32))
    kept = {}
    handle = find_decoder_layers(adapter.model)[-1].register_forward_hook(
        lambda _m, _a, out: kept.setdefault("h", (out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        with torch.no_grad():
            out = adapter.model(**adapter.model_kwargs(inputs), output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    mask = inputs["input_ids"][0] == adapter.image_token_id
    states = [*out.hidden_states[:-1], kept["h"]]
    return np.stack([h[0][mask].double().mean(0).numpy() for h in states])


BEFORE = {**PROMPT, "id": "look_first", "family": "lexical", "before_image": "Look at this photo. "}


@pytest.mark.parametrize("recipe", RECIPES)
def test_prompt_with_text_before_the_image_reads_its_own_image_tokens(adapters, samples, tmp_path, recipe):
    """A prompt with before_image keeps image_mean in its own files, equal to an independent full
    forward of that prompt (fp32, 1e-5) and unlike the image pass's past layer 0 (the image tokens
    see the text); a prompt without it matches the image pass."""
    adapter = adapters[recipe]
    emb, _ = run(adapter, samples, tmp_path / "before", prompt=BEFORE, num_layers=4, batch_size=4)
    image_emb = run_image(adapter, samples, tmp_path, batch_size=4, num_layers=4)
    rendered = adapter.render_prompt(BEFORE["text"], BEFORE["before_image"])
    assert rendered.index("Look at this photo. ") < rendered.index("<image>" if "llava" in recipe else "<|vision_start|>")
    meta = read_metadata(emb[0])
    assert meta["positions"] == ["last", "question_last", "image_mean"] and meta["rendered_prompt"] == rendered
    assert meta["prompt_before_image"] == BEFORE["before_image"]
    images = [Image.open(s.path).convert("RGB") for s in samples[:3]]
    own = np.stack([hidden_image_means(adapter, im, BEFORE["text"], BEFORE["before_image"]) for im in images], axis=1)
    plain = np.stack([hidden_image_means(adapter, im, PROMPT["text"]) for im in images], axis=1)
    for layer, (path, image_path) in enumerate(zip(emb, image_emb)):
        got, shared = read_vectors(path, "image_mean")[2][:3], read_vectors(image_path, "image_mean")[2][:3]
        np.testing.assert_allclose(got, own[layer], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(shared, plain[layer], atol=1e-5, rtol=1e-5)
        if layer == 0:  # input embeddings: no attention yet, so the text before cannot show
            np.testing.assert_allclose(got, shared, atol=1e-5, rtol=1e-5)
        else:
            assert np.abs(got - shared).max() > 1e-3, layer


def test_image_pass_writes_the_vision_layers(adapters, samples, tmp_path):
    """The vision files hold what the adapter's image pass keeps (batches of 3 over 7 images, in
    manifest order), with the tower's metadata; a wrong vision_num_layers is named before any work."""
    adapter = adapters["tiny-llava-next"]
    spec = spec_of(adapter.info.model_id, batch_size=3, positions=POSITIONS, vision_num_layers=2, vision_layers=(0, 2))
    emb = [tmp_path / "image" / f"layer{layer}.parquet" for layer in spec.layers_of(adapter.info.num_layers)]
    vision = [tmp_path / "vision" / f"layer{v}.parquet" for v in (0, 2)]
    summary = extract_image(adapter, spec, samples, emb, split="test", vision_paths=vision, progress=False)
    assert summary["vision_layers"] == [0, 2]
    direct = adapter.forward_image([Image.open(s.path).convert("RGB") for s in samples], [0], [0, 2])
    for j, path in enumerate(vision):
        for position in ("patch_mean", "cls"):
            ids, _, got = read_vectors(path, position)
            assert list(ids) == [s.sample_id for s in samples]
            np.testing.assert_allclose(got, direct.vision[position][j], atol=1e-5, rtol=1e-5)
        meta = read_metadata(path)
        assert meta["tower"] == "vision" and meta["layer"] == (0, 2)[j] and meta["num_layers"] == 2
        assert meta["lm_num_layers"] == adapter.info.num_layers and meta["hidden_size"] == 32
        assert meta["vision_layout"] == "tiles" and meta["positions"] == ["patch_mean", "cls"]
        assert meta["vision_counts"] == "anyres" and meta["whole_image_tile"] == "first"
        assert meta["projector_input"]["vision_feature_layer"] == -2 and meta["projector_input"]["drops_cls"] is True
    wrong = spec_of(adapter.info.model_id, positions=POSITIONS, vision_num_layers=3)
    with pytest.raises(ValueError, match="vision_num_layers is 3 in the config, but .* has 2 blocks"):
        extract_image(adapter, wrong, samples, emb, split="test", vision_paths=[tmp_path / f"v{v}" for v in range(4)],
                      progress=False)


# The anchor, a lexical edit (its tokens part early) and a suffix edit (it shares the anchor's whole
# question: the shared prefix must stop before the anchor's question end to read question_last).
GROUP = [PROMPT, {**PROMPT, "id": "lex", "family": "lexical", "text": PROMPT["text"].replace("image", "picture")},
         {**PROMPT, "id": "suffix", "family": "control", "text": PROMPT["text"] + " Thank you."}]


def run_prompts(adapter, samples, root, prompts, layers=(0, 2, 4), batch_size=3):
    spec = spec_of(adapter.info.model_id, layers=tuple(layers), batch_size=batch_size, positions=POSITIONS)
    emb = [[root / p["id"] / f"layer{layer}.parquet" for layer in layers] for p in prompts]
    answers = [root / p["id"] / "answers.parquet" for p in prompts]
    readouts = [root / p["id"] / "readout.parquet" for p in prompts]
    extract_prompts(adapter, spec, samples, prompts, [path for paths in emb for path in paths], answers, readouts,
                    split="test", progress=False)
    return emb, answers, readouts


@pytest.mark.parametrize("recipe", RECIPES)
def test_shared_prefix_extraction_equals_each_prompts_own_pass(adapters, samples, tmp_path, recipe):
    """One job over three prompts (image and template head run once, each tail from the cache)
    writes what three per-prompt extractions write: the same rows, vectors within float32
    rounding of the cached continuation (1e-4), answers and readout (1e-4), and its metadata
    says it shared the prefix; a prompt with text before the image runs its own pass in it."""
    adapter = adapters[recipe]
    prompts = [*GROUP, BEFORE]
    emb, answers, readouts = run_prompts(adapter, samples, tmp_path / "shared", prompts)
    for prompt, paths, ans, readout in zip(prompts, emb, answers, readouts):
        own_emb, own_ans = run(adapter, samples, tmp_path / prompt["id"], layers=[0, 2, 4], prompt=prompt)
        own_readout = tmp_path / prompt["id"] / "readout.parquet"
        for path, own in zip(paths, own_emb):
            meta = read_metadata(path)
            assert ("shared_prefix" in meta) == (prompt is not BEFORE)
            assert meta["positions"] == read_metadata(own)["positions"]
            for pos in read_metadata(own)["positions"]:
                ids, labels, got = read_vectors(path, pos)
                own_ids, own_labels, expected = read_vectors(own, pos)
                assert ids.tolist() == own_ids.tolist() and labels.tolist() == own_labels.tolist()
                np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
        got, expected = pq.read_table(ans).to_pydict(), pq.read_table(own_ans).to_pydict()
        assert got["sample_id"] == expected["sample_id"] and got["n_image_tokens"] == expected["n_image_tokens"]
        for w in ANSWER_WORDS:
            np.testing.assert_allclose(got[f"p_{w}"], expected[f"p_{w}"], atol=1e-5, rtol=1e-4)
        got, expected = pq.read_table(readout).to_pydict(), pq.read_table(own_readout).to_pydict()
        assert got["sample_id"] == expected["sample_id"] and got["layer"] == expected["layer"]
        np.testing.assert_allclose(got["margin"], expected["margin"], atol=1e-4, rtol=1e-4)


class _FailingPrefixAdapter:
    """Delegates to a real adapter; its n-th prefix pass fails."""

    def __init__(self, adapter, fail_at: int):
        self.adapter, self.fail_at, self.calls = adapter, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.adapter, name)

    def prefix_pass(self, *args, **kw):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated failure mid-way")
        return self.adapter.prefix_pass(*args, **kw)


def test_shared_prefix_extraction_failure_leaves_no_output(adapters, samples, tmp_path):
    failing = _FailingPrefixAdapter(adapters["tiny-llava"], fail_at=2)
    with pytest.raises(RuntimeError, match="mid-way"):
        run_prompts(failing, samples, tmp_path, GROUP, batch_size=2)
    assert failing.calls == 2
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def _assert_same_image_files(got_paths, expected_paths, tolerance):
    """Same rows, vectors within `tolerance`, same metadata except `read_from` (which says where from)."""
    assert len(got_paths) == len(expected_paths)
    for got_path, expected_path in zip(got_paths, expected_paths):
        got_meta, expected_meta = read_metadata(got_path), read_metadata(expected_path)
        assert "read_from" in got_meta and "read_from" not in expected_meta
        assert {k: v for k, v in got_meta.items() if k != "read_from"} == expected_meta
        for position in expected_meta["positions"]:
            ids, labels, got = read_vectors(got_path, position)
            expected_ids, expected_labels, expected = read_vectors(expected_path, position)
            assert ids.tolist() == expected_ids.tolist() and labels.tolist() == expected_labels.tolist()
            np.testing.assert_allclose(got, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("recipe", RECIPES)
def test_prompt_jobs_write_the_image_pass_files_from_their_own_forward(adapters, samples, tmp_path, recipe):
    """share_prefix: the anchor's pass (train split) and the shared prefix (test split) write the image
    pass's files, image positions and vision layers, from the forward they run anyway: what
    extract_image writes, to float32 rounding (1e-5; 1e-4 from the cached prefix)."""
    adapter = adapters[recipe]
    tower = {"vision_num_layers": adapter.vision.num_layers, "vision_layers": (0, adapter.vision.num_layers)} \
        if adapter.vision is not None else {}
    layers = (0, 2, 4)
    spec = spec_of(adapter.info.model_id, layers=layers, batch_size=3, positions=POSITIONS, **tower)

    def files(root):
        return ([root / "image" / f"layer{layer}.parquet" for layer in layers],
                [root / "vision" / f"layer{v}.parquet" for v in spec.vision_layers_of()])

    image, vision = files(tmp_path / "image_pass")
    extract_image(adapter, spec, samples, image, split="test", vision_paths=vision, progress=False)
    one_image, one_vision = files(tmp_path / "anchor")
    emb, ans = outputs(tmp_path / "anchor", layers)
    summary = extract(adapter, spec, samples, PROMPT, emb, ans, split="test", progress=False,
                      image_paths=one_image, vision_paths=one_vision)
    assert summary["vision_layers"] == list(spec.vision_layers_of())
    _assert_same_image_files(one_image + one_vision, image + vision, 1e-5)
    assert "the prompt pass of 'anchor'" in read_metadata(one_image[0])["read_from"]
    shared_image, shared_vision = files(tmp_path / "shared")
    root = tmp_path / "shared"
    extract_prompts(adapter, spec, samples, GROUP, [root / p["id"] / f"layer{layer}.parquet" for p in GROUP for layer in layers],
                    [root / p["id"] / "answers.parquet" for p in GROUP], [root / p["id"] / "readout.parquet" for p in GROUP],
                    split="test", progress=False, image_paths=shared_image, vision_paths=shared_vision)
    _assert_same_image_files(shared_image + shared_vision, image + vision, 1e-4)
    assert "the shared prefix of ['anchor', 'lex', 'suffix']" in read_metadata(shared_image[0])["read_from"]


def test_a_prompt_with_text_before_the_image_cannot_write_the_image_pass_files(adapters, samples, tmp_path):
    adapter = adapters["tiny-llava"]
    spec = spec_of(adapter.info.model_id, layers=(0,), batch_size=3, positions=POSITIONS)
    emb, ans = outputs(tmp_path, [0])
    with pytest.raises(ValueError, match="puts text before the image"):
        extract(adapter, spec, samples, BEFORE, emb, ans, split="test", progress=False, image_paths=[tmp_path / "i.parquet"])
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
