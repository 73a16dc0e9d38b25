"""Resource estimates of the heavy jobs: sizes read from hub ids, folders and recipes."""

from __future__ import annotations

import pytest

from stagelens import resources

HUB = {"path": "llava-hf/llava-1.5-7b-hf", "dtype": "float16", "device": "auto", "batch_size": 4}


@pytest.mark.parametrize("model_id, billions", [
    ("llava-hf/llava-1.5-7b-hf", 7.0), ("Qwen/Qwen2-VL-7B-Instruct", 7.0), ("Qwen/Qwen2-VL-2B-Instruct", 2.0),
    ("org/model-0.5b", 0.5), ("org/bert-base", None), ("org/7bit-model", None),
])
def test_billions_in_name(model_id, billions):
    assert resources.billions_in_name(model_id) == billions


def test_weights_by_recipe_hub_id_and_folder(tmp_path):
    assert resources.weights_mb({**HUB}) == 7 * 1000 * 2
    assert resources.weights_mb({**HUB, "dtype": "float32"}) == 7 * 1000 * 4
    assert resources.weights_mb({**HUB, "path": "org/unnamed"}) == int(resources.DEFAULT_BILLIONS * 1000 * 2)
    assert resources.weights_mb({"recipe": "tiny-llava", "dtype": "float32"}) == 50
    assert resources.weights_mb({"recipe": "embedded", "dtype": "float32"}) == 800
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 3 * 2**20)
    (tmp_path / "notes.txt").write_bytes(b"\0" * 2**20)  # not weights
    assert resources.weights_mb({**HUB, "path": str(tmp_path)}) == 3
    assert resources.weights_mb({**HUB, "path": str(tmp_path), "dtype": "float32"}) == 6  # 16-bit file, fp32 in memory


def test_extraction_estimates_grow_with_the_model_and_the_images():
    small, large = {**HUB, "path": "org/m-1b"}, {**HUB, "path": "org/m-70b"}
    assert resources.extract_mem_mb(large) > resources.extract_mem_mb(small) > 2048
    assert resources.extract_mem_mb({**small, "batch_size": 8}) - resources.extract_mem_mb(small) == 4 * 256
    assert resources.extract_runtime(small, 10_000) > resources.extract_runtime(small, 100) >= 10
    cpu = {**small, "device": "cpu"}
    assert resources.extract_runtime(cpu, 10_000) > resources.extract_runtime(small, 10_000)
    assert (resources.extract_gpu(small), resources.extract_gpu(cpu)) == (1, 0)
    assert (resources.extract_threads(small), resources.extract_threads(cpu)) == (2, 4)


def test_classes_from_the_list_or_the_folders(tmp_path):
    for name in ("a", "b", ".hidden"):
        (tmp_path / "root" / name).mkdir(parents=True)
    assert resources.n_classes({"root": str(tmp_path / "root"), "class_list": None}) == 2
    (tmp_path / "classes.tsv").write_text("folder\tname\na\tA\nb\tB\nc\tC\n")
    assert resources.n_classes({"root": str(tmp_path / "root"), "class_list": str(tmp_path / "classes.tsv")}) == 3
    assert resources.n_classes({"root": str(tmp_path / "missing"), "class_list": None}) == 0
    assert resources.prepare_dataset_runtime(120) == 16


def test_probe_jobs_ask_for_a_gpu_only_when_the_torch_solver_uses_one():
    base = {"solver": "torch", "device": "cpu", "cv_folds": 5, "Cs": [0.1, 1.0]}
    assert not resources.probe_uses_gpu(base) and resources.probe_threads(base) == 1
    for device in ("cuda", "cuda:1", "auto"):
        assert resources.probe_uses_gpu({**base, "device": device})
        assert resources.probe_threads({**base, "device": device}) == 2
    assert not resources.probe_uses_gpu({**base, "solver": "sklearn", "device": "cuda"})
    # The paper's size (120 classes x 50, width 4,096) fits in the memory asked for: 8 copies of
    # 6,000 x 4,096 float32 (750 MiB) and the basis; and it grows with the rows.
    paper = resources.probe_mem_mb(base, 120, 50)
    assert 2048 + 8 * 6000 * 4096 * 4 / 2**20 < paper < 8192
    assert resources.probe_mem_mb(base, 120, 100) > paper
    assert resources.probe_runtime(base, 120, 50, 2) > resources.probe_runtime(base, 10, 50, 2)
