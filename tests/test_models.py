"""Adapters on tiny models of the real architectures, checked against plain transformers calls."""

from __future__ import annotations

import copy
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from stagelens.adapters import hf, load_adapter, loader_for
from stagelens.adapters.base import ANSWER_WORDS
from stagelens.adapters.layers import LayerCapture, find_decoder_layers, last_token_index
from stagelens.prompts import answer_token_ids, build_inputs, render_prompt
from stagelens.builders import PIPELINE_TINY_RECIPES
from stagelens.spec import ModelSpec

CFG = {"dtype": "float32", "device": "cpu", "revision": "main"}


def spec_of(path, **keys) -> ModelSpec:
    return ModelSpec(name="tiny", checkpoint=str(path), **{**CFG, **keys})
QUESTION = "Does this image show an animal? The answer must be always yes or no."
RECIPES = PIPELINE_TINY_RECIPES


@pytest.fixture(scope="module")
def adapters(tiny_model_dirs):
    return {recipe: load_adapter(spec_of(path)) for recipe, path in tiny_model_dirs.items()}


def load_images(rows, n):
    return [Image.open(path).convert("RGB") for _, _, path in rows[:n]]


def reference_states(adapter, images):
    """Plain forward with output_hidden_states=True plus an independent full-output hook on the last block."""
    model = adapter.model
    inputs = adapter.build_inputs(images, QUESTION)
    kwargs = adapter.model_kwargs(inputs)
    last_block_out = {}

    def keep(_module, _args, output):
        last_block_out["h"] = (output[0] if isinstance(output, tuple) else output).detach().clone()

    handle = model.model.language_model.layers[-1].register_forward_hook(keep)
    try:
        with torch.no_grad():
            out = model(**kwargs, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    return inputs, out, last_block_out["h"]


def at_positions(hidden: torch.Tensor, image_mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(last token, mean over image tokens) per row, computed in float64 with plain indexing."""
    h = hidden.double()
    last = h[:, -1, :]
    means = torch.stack([h[b][image_mask[b]].mean(0) for b in range(h.shape[0])])
    return last.numpy(), means.numpy()


@pytest.mark.parametrize("recipe", RECIPES)
def test_vectors_equal_output_hidden_states(adapters, image_rows, recipe):
    adapter = adapters[recipe]
    images = load_images(image_rows, 4)
    L = adapter.info.num_layers
    got = adapter.forward(images, QUESTION, list(range(L + 1)), ["last", "image_mean"])
    inputs, out, last_block = reference_states(adapter, images)
    image_mask = inputs["input_ids"] == adapter.model.config.image_token_id
    assert len(out.hidden_states) == L + 1
    for layer in range(L):
        last, mean = at_positions(out.hidden_states[layer], image_mask)
        np.testing.assert_allclose(got.vectors["last"][layer], last, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got.vectors["image_mean"][layer], mean, atol=1e-5, rtol=1e-5)
    # Layer L is the pre-norm output of the last block, not hidden_states[-1] (post final norm).
    last, mean = at_positions(last_block, image_mask)
    np.testing.assert_allclose(got.vectors["last"][L], last, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got.vectors["image_mean"][L], mean, atol=1e-5, rtol=1e-5)
    post_norm_last, _ = at_positions(out.hidden_states[-1], image_mask)
    assert not np.allclose(got.vectors["last"][L], post_norm_last, atol=1e-3)
    norm = adapter.model.model.language_model.norm
    with torch.no_grad():
        renormed = norm(torch.from_numpy(got.vectors["last"][L])).numpy()
    np.testing.assert_allclose(renormed, post_norm_last, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(got.n_image_tokens, image_mask.sum(1).numpy())


@pytest.mark.parametrize("recipe", RECIPES)
def test_answer_probs_are_softmax_of_last_logits(adapters, image_rows, recipe):
    adapter = adapters[recipe]
    images = load_images(image_rows, 3)
    got = adapter.forward(images, QUESTION, [0], ["last"])
    inputs, out, _ = reference_states(adapter, images)
    probs = torch.softmax(out.logits[:, -1, :].double(), dim=-1).numpy()
    tok = adapter.processor.tokenizer
    for j, word in enumerate(ANSWER_WORDS):
        ids = adapter.answer_ids[word]
        assert {tok.decode([i]).strip() for i in ids} <= {word, word[:1]}
        np.testing.assert_allclose(got.answer_probs[:, j], probs[:, ids].max(axis=1), rtol=1e-5, atol=1e-7)
    assert got.answer_probs.shape == (3, len(ANSWER_WORDS))
    assert (got.answer_probs.sum(axis=1) <= 1 + 1e-6).all() and (got.answer_probs >= 0).all()


@pytest.mark.parametrize("recipe", RECIPES)
def test_batch_of_one_equals_batch_of_four(adapters, image_rows, recipe):
    adapter = adapters[recipe]
    images = load_images(image_rows, 4)
    layers = list(range(adapter.info.num_layers + 1))
    batched = adapter.forward(images, QUESTION, layers, ["last", "image_mean"])
    for i, image in enumerate(images):
        single = adapter.forward([image], QUESTION, layers, ["last", "image_mean"])
        for pos in ("last", "image_mean"):
            np.testing.assert_allclose(batched.vectors[pos][:, i], single.vectors[pos][:, 0], atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(batched.answer_probs[i], single.answer_probs[0], atol=1e-6, rtol=1e-4)


def test_layer_subset_keeps_requested_order(adapters, image_rows):
    adapter = adapters["tiny-llava"]
    images = load_images(image_rows, 2)
    full = adapter.forward(images, QUESTION, [0, 1, 2, 3, 4], ["last"])
    subset = adapter.forward(images, QUESTION, [4, 0, 2], ["image_mean", "last"])
    np.testing.assert_allclose(subset.vectors["last"], full.vectors["last"][[4, 0, 2]], atol=1e-6)
    np.testing.assert_allclose(subset.readout, full.readout[[4, 0, 2]], atol=1e-6)  # the readout follows `layers`
    with pytest.raises(ValueError, match="out of range"):
        adapter.forward(images, QUESTION, [5], ["last"])


def test_decoder_layers_found_in_each_architecture(adapters):
    for adapter in adapters.values():
        assert adapter.blocks is adapter.model.model.language_model.layers
        assert len(adapter.blocks) == adapter.info.num_layers == 4


class _Wrapper(nn.Module):
    """A custom MLLM-like module: a vision block list of the same length and a wrapped causal LM."""

    def __init__(self, with_config: bool):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                          num_attention_heads=2, num_key_value_heads=1)
        self.vision_blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        self.lm = LlamaForCausalLM(cfg)
        if with_config:
            self.config = cfg


@pytest.mark.parametrize("with_config", [True, False])
def test_decoder_layers_found_in_custom_wrapper(with_config):
    wrapper = _Wrapper(with_config)
    assert find_decoder_layers(wrapper) is wrapper.lm.model.layers
    assert find_decoder_layers(wrapper.lm) is wrapper.lm.model.layers


def test_capture_on_plain_causal_lm_matches_hidden_states():
    wrapper = _Wrapper(with_config=False)
    lm = wrapper.lm.eval()
    ids = torch.tensor([[1, 5, 7, 9, 3], [2, 4, 6, 8, 10]])
    mask = torch.ones_like(ids)
    image_mask = torch.zeros_like(ids, dtype=torch.bool)
    image_mask[:, 1:3] = True
    capture = LayerCapture(find_decoder_layers(lm), [0, 1, 2], ["last", "image_mean"])
    capture.set_batch(last_token_index(mask), image_mask)
    with torch.no_grad(), capture.attached():
        out = lm(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    vec = capture.vectors()
    for layer in range(3):
        np.testing.assert_allclose(vec["last"][layer], out.hidden_states[layer][:, -1].numpy(), atol=1e-6)
        np.testing.assert_allclose(vec["image_mean"][layer], out.hidden_states[layer][:, 1:3].mean(1).numpy(), atol=1e-6)
    # The hooks are gone after the block: a further forward captures nothing.
    capture.set_batch(last_token_index(mask), image_mask)
    with torch.no_grad():
        lm(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="no hidden state captured"):
        capture.vectors()


def test_last_token_index_handles_both_padding_sides():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [3, 2, 3]


def test_prompt_uses_the_real_chat_templates(adapters):
    q = "Is it?"
    assert adapters["tiny-llava"].render_prompt(q) == "USER: <image>\nIs it? ASSISTANT:"
    assert adapters["tiny-llava-next"].render_prompt(q) == (
        "<|start_header_id|>user<|end_header_id|>\n\n<image>\nIs it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert adapters["tiny-qwen2-vl"].render_prompt(q) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    # Text before the image goes verbatim right before the image's rendering, also where the
    # template renders every image before every text of a [text, image, text] content list.
    assert adapters["tiny-llava"].render_prompt(q, "Look. ") == "USER: Look. <image>\nIs it? ASSISTANT:"
    assert adapters["tiny-llava-next"].render_prompt(q, "Look.") == (
        "<|start_header_id|>user<|end_header_id|>\n\nLook.<image>\nIs it?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    qwen = adapters["tiny-qwen2-vl"]
    assert qwen.render_prompt(q, "Look.") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Look.<|vision_start|><|image_pad|><|vision_end|>Is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    # Qwen2-VL's template keeps the content order: the same text as its own [text, image, text] render.
    ordered = [{"role": "user", "content": [{"type": "text", "text": "Look."}, {"type": "image"}, {"type": "text", "text": q}]}]
    assert qwen.render_prompt(q, "Look.") == qwen.processor.apply_chat_template(ordered, add_generation_prompt=True, tokenize=False)


class _TemplateWithoutImage:
    """A processor whose template renders no image (PaliGemma's processor adds the image itself)."""

    chat_template = "stand-in"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "".join(c["text"] for c in messages[0]["content"] if c["type"] == "text") + "\n"


def test_text_before_an_image_the_template_does_not_render_is_a_clear_error():
    assert render_prompt(_TemplateWithoutImage(), "Is it?") == "Is it?\n"
    with pytest.raises(ValueError, match="cannot find where the image is rendered.*before_image is undefined"):
        render_prompt(_TemplateWithoutImage(), "Is it?", "Look. ")


def test_inputs_left_padded_with_one_bos(adapters, image_rows):
    adapter = adapters["tiny-llava-next"]  # image-token count varies with aspect: padding needed
    images = load_images(image_rows, 3)
    inputs = build_inputs(adapter.processor, images, QUESTION)
    tok = adapter.processor.tokenizer
    mask = inputs["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask[:, 0] == 0).any()
    for row, m in zip(inputs["input_ids"], mask):
        real = row[m.bool()].tolist()
        assert real[0] == tok.bos_token_id and real.count(tok.bos_token_id) == 1
    assert "image_sizes" in inputs


def test_qwen2_vl_keeps_every_processor_key(adapters, image_rows):
    inputs = adapters["tiny-qwen2-vl"].build_inputs(load_images(image_rows, 2), QUESTION)
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids"} <= set(inputs)
    np.testing.assert_array_equal(
        inputs["mm_token_type_ids"].bool().numpy(), (inputs["input_ids"] == adapters["tiny-qwen2-vl"].image_token_id).numpy()
    )


def test_qwen2_vl_max_pixels_changes_image_token_count(tiny_model_dirs):
    path = str(tiny_model_dirs["tiny-qwen2-vl"])
    image = [Image.fromarray(np.full((112, 224, 3), 128, dtype=np.uint8))]
    default = load_adapter(spec_of(path))
    capped = load_adapter(spec_of(path, max_pixels=4 * 28 * 28))
    n_default = int(default.forward(image, QUESTION, [0], ["last"]).n_image_tokens[0])
    n_capped = int(capped.forward(image, QUESTION, [0], ["last"]).n_image_tokens[0])
    assert n_capped < n_default
    assert n_capped <= 4
    assert capped.extra_metadata["max_pixels"] == 4 * 28 * 28


def test_max_pixels_rejected_for_llava(tiny_model_dirs):
    with pytest.raises(ValueError, match="max_pixels"):
        load_adapter(spec_of(str(tiny_model_dirs["tiny-llava"]), max_pixels=1000))


def test_qwen2_vl_processor_without_torchvision(adapters):
    from stagelens.adapters.qwen_processor import Qwen2VLImageOnlyProcessor, torchvision_available

    processor = adapters["tiny-qwen2-vl"].processor
    if torchvision_available():
        pytest.skip("torchvision installed: the regular processor is used")
    assert isinstance(processor, Qwen2VLImageOnlyProcessor)
    assert type(processor.image_processor).__name__.endswith("Pil")


def test_missing_weights_fail_loudly(tiny_model_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dirs["tiny-llava"], broken)
    weights = load_file(broken / "model.safetensors")
    dropped = next(k for k in weights if "language_model" in k and "layers.1." in k)
    del weights[dropped]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        load_adapter(spec_of(broken))


def test_dtype_and_info(tiny_model_dirs):
    adapter = load_adapter(spec_of(str(tiny_model_dirs["tiny-llava"]), dtype="bfloat16"))
    assert adapter.info.dtype == "bfloat16" and adapter.info.device == "cpu"
    assert adapter.info.architecture == "LlavaForConditionalGeneration"
    with pytest.raises(ValueError, match="dtype"):
        load_adapter(spec_of(str(tiny_model_dirs["tiny-llava"]), dtype="float64"))


def test_lookup_dispatches_on_model_type():
    """Families of the architecture table get their facts; any other type the generic AutoModel path."""
    from stagelens.adapters.architectures import ARCHITECTURES

    for model_type in ("llava", "llava_next", "qwen2_vl", "idefics3"):
        assert loader_for(model_type).keywords["facts"] is ARCHITECTURES[model_type]
    assert loader_for("some_future_vlm").keywords["facts"] is None
    assert loader_for("llava").func is hf.load_hf_adapter


def test_answer_token_ids_rejects_shared_first_token():
    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [ord(text.strip()[0].lower())]

        def decode(self, ids):
            return chr(ids[0])

        def convert_ids_to_tokens(self, ids):
            return [chr(i) for i in ids]

    with pytest.raises(ValueError, match="share first token"):
        answer_token_ids(Tok(), ["yes", "Yes"])


def test_render_prompt_without_template_is_an_error(adapters):
    processor = adapters["tiny-llava"].processor
    template, processor.chat_template = processor.chat_template, None
    try:
        with pytest.raises(ValueError, match="chat template"):
            render_prompt(processor, "hi")
    finally:
        processor.chat_template = template


def test_generic_path_equals_specific_adapter(adapters, tiny_model_dirs, image_rows):
    from stagelens.adapters.hf import load_hf_adapter

    generic = load_hf_adapter(spec_of(tiny_model_dirs["tiny-llava"]), None)
    assert generic.position_ids  # Llama text model: positions from the attention mask
    images = load_images(image_rows, 3)
    a = generic.forward(images, QUESTION, [0, 4], ["last", "image_mean"])
    b = adapters["tiny-llava"].forward(images, QUESTION, [0, 4], ["last", "image_mean"])
    np.testing.assert_allclose(a.vectors["last"], b.vectors["last"], atol=1e-6)
    np.testing.assert_allclose(a.answer_probs, b.answer_probs, atol=1e-7)
    np.testing.assert_allclose(a.readout, b.readout, atol=1e-6)  # norm and head found without the table


@pytest.mark.parametrize("recipe", RECIPES)
def test_readout_of_a_planted_state_gives_its_word(adapters, recipe):
    """A state whose image under the final norm is a scaled unembedding row reads out that row's
    word: the top token of the full vocabulary, and the answer margin's sign follows it. The norm's
    weights are drawn at random (a copy), so the planted state must undo them."""
    from stagelens.adapters.readout import AnswerReadout
    from stagelens.extract import answer_margin

    adapter = adapters[recipe]
    norm = copy.deepcopy(adapter.readout.final_norm)
    with torch.no_grad():
        norm.weight.copy_(torch.empty_like(norm.weight).uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(0)))
    readout = AnswerReadout(norm, adapter.readout.unembedding, adapter.readout.word_ids)
    rows = adapter.readout.unembedding.weight.detach()
    for j, word in enumerate(ANSWER_WORDS):
        token = adapter.answer_ids[word][0]
        planted = (3.0 * rows[token] / norm.weight.detach())[None, None]  # norm(planted) = c * rows[token], c > 0
        with torch.no_grad():
            normed = norm(planted)[0, 0]
            full = adapter.readout.unembedding(normed).softmax(-1)
        assert torch.nn.functional.cosine_similarity(normed, rows[token], dim=0) > 0.9999
        assert int(full.argmax()) == token
        probs = readout.log_probs(planted)[0, 0].exp().numpy()
        assert int(probs.argmax()) == j
        log_probs = np.log(probs)
        if word.lower() in ("yes", "no"):
            assert (answer_margin(log_probs, "yes") > 0) == (word.lower() == "yes")
        else:
            assert (answer_margin(log_probs, "1") > 0) == (word == "1")


@pytest.mark.parametrize("recipe", ["tiny-llava-next", "tiny-qwen2-vl"])
def test_bfloat16_forward_returns_float32_close_to_float32(adapters, tiny_model_dirs, image_rows, recipe):
    bf16 = load_adapter(spec_of(str(tiny_model_dirs[recipe]), dtype="bfloat16"))
    images = load_images(image_rows, 2)
    low = bf16.forward(images, QUESTION, [0, 4], ["last", "image_mean"])
    full = adapters[recipe].forward(images, QUESTION, [0, 4], ["last", "image_mean"])
    assert low.vectors["last"].dtype == np.float32
    scale = np.abs(full.vectors["last"]).max()
    np.testing.assert_allclose(low.vectors["last"], full.vectors["last"], atol=0.05 * scale)


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_token_answer_path_equals_forward_with_the_token_appended(adapters, tiny_model_dirs, image_rows, recipe):
    """A whitespace-then-word path (Llama-2 digits) scores p(ws) * p(word | ws), via one cached step."""
    adapter = load_adapter(spec_of(tiny_model_dirs[recipe]))  # fresh: its answer paths are changed
    tok = adapter.processor.tokenizer
    ws, one = tok.convert_tokens_to_ids("Ġ"), tok.convert_tokens_to_ids("1")
    adapter.answer_paths["1"] = [(ws, one)]
    adapter._prefixes = [ws]
    images = load_images(image_rows, 3)
    got = adapter.forward(images, QUESTION, [0, 4], ["last"])

    model = adapter.model
    inputs = adapter.build_inputs(images, QUESTION)
    extended = dict(inputs)
    n = inputs["input_ids"].shape[0]
    extended["input_ids"] = torch.cat([inputs["input_ids"], torch.full((n, 1), ws)], dim=1)
    extended["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones(n, 1, dtype=torch.long)], dim=1)
    if "mm_token_type_ids" in inputs:
        extended["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros(n, 1, dtype=torch.long)], dim=1)
    with torch.no_grad():
        first = model(**adapter.model_kwargs(inputs), use_cache=False).logits[:, -1].double().softmax(-1)
        second = model(**adapter.model_kwargs(extended), use_cache=False).logits[:, -1].double().softmax(-1)
    expected = (first[:, ws] * second[:, one]).numpy()
    np.testing.assert_allclose(got.answer_probs[:, ANSWER_WORDS.index("1")], expected, rtol=1e-4, atol=1e-9)
    plain = adapters[recipe].forward(images, QUESTION, [0, 4], ["last"])
    np.testing.assert_allclose(got.vectors["last"], plain.vectors["last"], atol=1e-6)
    others = [j for j, w in enumerate(ANSWER_WORDS) if w != "1"]
    np.testing.assert_allclose(got.answer_probs[:, others], plain.answer_probs[:, others], rtol=1e-5)


def test_answer_paths_for_a_vocabulary_without_space_digit_tokens():
    """Llama-2-like: "1" is "▁" + "1"; words with a one-token spelling keep only that."""
    vocab = {"▁": 1, "▁▁": 2, "1": 3, "0": 4, "▁yes": 5, "▁Yes": 6, "▁no": 7, "▁No": 8}
    spell = {"yes": ["▁yes"], " yes": ["▁", "▁yes"], "Yes": ["▁Yes"], " Yes": ["▁", "▁Yes"],
             "no": ["▁no"], " no": ["▁", "▁no"], "No": ["▁No"], " No": ["▁", "▁No"],
             "1": ["▁", "1"], " 1": ["▁▁", "1"], "0": ["▁", "0"], " 0": ["▁▁", "0"]}
    names = {v: k for k, v in vocab.items()}

    class Tok:
        def encode(self, text, add_special_tokens=False):
            return [vocab[t] for t in spell[text]]

        def decode(self, ids):
            return "".join(names[i] for i in ids).replace("▁", " ")

        def convert_ids_to_tokens(self, ids):
            return [names[i] for i in ids]

    from stagelens.prompts import answer_token_paths

    paths = answer_token_paths(Tok())
    assert paths["yes"] == [(5,)] and paths["No"] == [(8,)]
    assert paths["1"] == [(1, 3), (2, 3)] and paths["0"] == [(1, 4), (2, 4)]
    assert answer_token_ids(Tok())["1"] == [3]


def test_hub_id_from_offline_cache_records_the_commit(tiny_model_dirs, tmp_path):
    """A hub id resolved from the local hub cache: loads, and the revision becomes the commit hash."""
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--stagelens--tiny-llava"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_model_dirs["tiny-llava"], repo / "snapshots" / commit)
    code = ("from stagelens.adapters import load_adapter; from stagelens.spec import ModelSpec; "
            "print(load_adapter(ModelSpec('t', 'stagelens/tiny-llava', revision='main', device='cpu')).info.revision)")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == commit


def reference_vision_states(adapter, images):
    """(per image: per vision layer its patch mean, its CLS or None) from one independent
    output_hidden_states call of the vision tower, in float64, images split by plain slicing."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model, inputs = adapter.model, adapter.build_inputs(images, QUESTION)
    with torch.no_grad():
        if "image_grid_thw" in inputs:  # Qwen2-VL: packed patches, no CLS
            hidden = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"],
                                        output_hidden_states=True).hidden_states
            sizes = inputs["image_grid_thw"].prod(-1).tolist()
            return [[(part.double().mean(0).numpy(), None) for part in torch.split(h, sizes)] for h in hidden]
        pixels = inputs["pixel_values"]
        if "image_sizes" in inputs:  # LLaVA-NeXT: each image's tiles, padded to the batch's most
            tiles = [image_size_to_num_patches(s, model.config.image_grid_pinpoints, model.config.vision_config.image_size)
                     for s in inputs["image_sizes"].tolist()]
            pixels = torch.cat([pixels[i, :n] for i, n in enumerate(tiles)])
        else:
            tiles = [1] * len(images)
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    starts = np.cumsum([0] + tiles)
    if not adapter.vision.facts.cls_token:  # SigLIP: every token a patch
        return [[(h[a:b].double().mean((0, 1)).numpy(), None) for a, b in zip(starts, starts[1:])] for h in hidden]
    return [[(h[a:b, 1:].double().mean((0, 1)).numpy(), h[a, 0].double().numpy()) for a, b in zip(starts, starts[1:])]
            for h in hidden]


@pytest.fixture(scope="module")
def vision_adapters(adapters, tmp_path_factory):
    """The pipeline's tiny models and a SigLIP-tower family of the coverage matrix (Gemma 3)."""
    from stagelens.builders.tiny import build

    gemma3 = build("tiny-gemma3", tmp_path_factory.mktemp("tiny_gemma3") / "tiny-gemma3", seed=0)
    return {**adapters, "tiny-gemma3": load_adapter(spec_of(gemma3))}


@pytest.mark.parametrize("recipe", [*RECIPES, "tiny-gemma3"])
def test_vision_layers_equal_the_towers_output_hidden_states(vision_adapters, image_rows, recipe):
    """The image pass's vision-layer vectors are the vision tower's hidden states (every layer,
    per image: mean over its patch tokens, CLS apart; Gemma 3's SigLIP tower has none), and the
    projector's output mean is the LM's layer-0 image_mean (what the model's get_image_features hands the LM; LLaVA-NeXT's includes
    its image_newline rows)."""
    adapter = vision_adapters[recipe]
    images = load_images(image_rows, 4)
    V = adapter.vision.num_layers
    got = adapter.forward_image(images, [0], list(range(V + 1)))
    reference = reference_vision_states(adapter, images)
    assert len(reference) == V + 1
    assert set(got.vision) == ({"patch_mean", "cls"} if adapter.vision.facts.cls_token else {"patch_mean"})
    for v in range(V + 1):
        for i, (mean, cls) in enumerate(reference[v]):
            np.testing.assert_allclose(got.vision["patch_mean"][v][i], mean, atol=1e-5, rtol=1e-5)
            if cls is not None:
                np.testing.assert_allclose(got.vision["cls"][v][i], cls, atol=1e-5, rtol=1e-5)
    assert not np.allclose(got.vision["patch_mean"][0], got.vision["patch_mean"][V], atol=1e-3)
    inputs = adapter.build_inputs(images, QUESTION)
    keys = ("pixel_values", "image_sizes", "image_grid_thw")
    with torch.no_grad():
        features = adapter.model.model.get_image_features(**{k: v for k, v in inputs.items() if k in keys}).pooler_output
    projected = np.stack([f.double().mean(0).numpy() for f in features])
    np.testing.assert_allclose(got.vectors["image_mean"][0], projected, atol=1e-5, rtol=1e-5)
    # LLaVA feeds its projector vision_feature_layer -2 (the second-to-last hidden state), CLS dropped.
    facts = adapter.vision.projector_input
    if recipe in ("tiny-llava", "tiny-llava-next"):
        assert facts["vision_layers"] == [V - 1] and facts["drops_cls"] is True
    else:
        assert facts["vision_layers"] == [V] and facts["drops_cls"] is False


@pytest.mark.parametrize("recipe", ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl"])
def test_a_prompt_pass_reads_the_vision_layers_the_image_pass_reads(adapters, image_rows, recipe):
    """The vision tower does not see the prompt: a prompt pass (share_prefix's train-split job) keeps
    the vision layers and image positions the image pass keeps; out-of-range layers are named."""
    adapter = adapters[recipe]
    images = load_images(image_rows, 3)
    stages = list(range(adapter.vision.num_layers + 1))
    image_pass = adapter.forward_image(images, [0, 1], stages)
    prompt_pass = adapter.forward_prepared(adapter.prepare(images, QUESTION), [0, 1], ["last", "image_mean"], stages)
    np.testing.assert_allclose(prompt_pass.vectors["image_mean"], image_pass.vectors["image_mean"], rtol=1e-5, atol=1e-5)
    assert set(prompt_pass.vision) == set(image_pass.vision)
    for position, per_layer in image_pass.vision.items():
        for got, expected in zip(prompt_pass.vision[position], per_layer, strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out of range 0..2"):
        adapter.forward_image(images, [0], [3])
