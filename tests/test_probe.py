"""Probe training and evaluation jobs against independent scikit-learn computations."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from script_job import run_script
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from stagelens.probe import Probe, load_probes, save_probes, shuffled_labels
from stagelens.probe_training import ProbeSettings, fit_probe_and_control
from stagelens.store import read_vectors, write_embeddings

N_CLASSES, DIM, TRAIN_PER_CLASS, TEST_PER_CLASS, SEED = 6, 24, 20, 15, 0
PROBE = {"cv_folds": 3, "Cs": [0.01, 0.1, 1.0], "max_iter": 500, "tol": 1e-4, "solver": "torch", "device": "cpu"}
POSITIONS = ("last", "image_mean")


def _meta(split: str, prompt: str, layer: int = 3) -> dict:
    return {"model_id": "synthetic/model", "model_name": "synth", "revision": "abc123", "layer": layer,
            "num_layers": 8, "positions": list(POSITIONS), "prompt_id": prompt, "split": split}


def _features(labels: np.ndarray, centers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (centers[labels] + rng.normal(size=(len(labels), centers.shape[1]))).astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Train/test anchor files and a test variant file displaced by a constant offset, rows shuffled."""
    root = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(1)
    centers = {pos: rng.normal(size=(N_CLASSES, DIM)) * 0.7 for pos in POSITIONS}
    paths = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        labels = np.repeat(np.arange(N_CLASSES), per_class).astype(np.int32)
        ids = [f"c{y}/{split}{i}" for i, y in enumerate(labels)]
        vectors = {pos: _features(labels, centers[pos], rng) for pos in POSITIONS}
        paths[split] = write_embeddings(root / f"{split}.parquet", ids, labels, vectors, _meta(split, "anchor"))
        if split == "test":
            order = rng.permutation(len(labels))
            shifted = {pos: v[order] + 1.5 for pos, v in vectors.items()}
            paths["variant"] = write_embeddings(
                root / "variant.parquet", [ids[i] for i in order], labels[order], shifted, _meta(split, "lex"))
    return paths


@pytest.fixture(scope="module")
def trained(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("probes")
    run_script(
        "train_probe.py",
        input={"embeddings": files["train"]},
        output={"probe": out / "layer3.safetensors", "control": out / "control.safetensors"},
        params={"probe": PROBE, "seed": SEED},
        log=out / "train.log",
    )
    return out


def _evaluate(files, trained, tmp_path, variant: str, prompt: dict, modules_out=None) -> pl.DataFrame:
    out = tmp_path / "metrics.parquet"
    run_script(
        "evaluate.py",
        input={"probe": trained / "layer3.safetensors", "control": trained / "control.safetensors",
               "variant": files[variant], "anchor": files["test"]},
        output={"metrics": out},
        params={"model_name": "synth", "prompt": prompt, "readout": "prompt", "evaluate": {"n_bootstrap": 200, "ci": 0.95}, "seed": SEED},
        log=tmp_path / "evaluate.log",
        modules_out=modules_out,
    )
    return pl.read_parquet(out)


ANCHOR = {"id": "anchor", "family": "anchor", "expected": "yes"}
LEXICAL = {"id": "lex", "family": "lexical", "expected": "yes"}


def _sklearn_accuracy(files, position: str, variant: str) -> tuple[float, float]:
    """The recipe re-done with plain scikit-learn from the Parquet files: (chosen C, test accuracy)."""
    _, y_train, x_train = read_vectors(files["train"], position)
    _, y_test, x_test = read_vectors(files[variant], position)
    search = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=PROBE["max_iter"], random_state=SEED)),
        {"logisticregression__C": PROBE["Cs"]},
        cv=StratifiedKFold(n_splits=PROBE["cv_folds"], shuffle=True, random_state=SEED),
    ).fit(x_train, y_train)
    return search.best_params_["logisticregression__C"], float(np.mean(search.predict(x_test) == y_test))


@pytest.mark.parametrize("position", POSITIONS)
def test_pipeline_accuracy_equals_sklearn(files, trained, tmp_path, position):
    metrics = _evaluate(files, trained, tmp_path, "test", ANCHOR).filter(pl.col("position") == position)
    chosen_c, expected = _sklearn_accuracy(files, position, "test")
    sidecar = json.loads((trained / "layer3.json").read_text())
    assert sidecar["fit"][position]["C"] == chosen_c
    # The torch solver and scikit-learn reach the same optimum to a tolerance, not bit for bit.
    assert metrics["accuracy"][0] == pytest.approx(expected, abs=0.01)
    assert metrics["accuracy"][0] > 3 / N_CLASSES  # the planted classes are learnable
    # The anchor scored against itself: no drop, and the shift correction changes nothing.
    assert metrics["drop"][0] == 0.0
    assert metrics["shift_corrected_accuracy"][0] == metrics["accuracy"][0]


def test_variant_metrics_pair_by_sample_id(files, trained, tmp_path):
    metrics = _evaluate(files, trained, tmp_path, "variant", LEXICAL).filter(pl.col("position") == "last")
    _, expected = _sklearn_accuracy(files, "last", "variant")
    _, anchor_expected = _sklearn_accuracy(files, "last", "test")
    row = metrics.row(0, named=True)
    assert row["accuracy"] == pytest.approx(expected, abs=0.01)
    assert row["anchor_accuracy"] == pytest.approx(anchor_expected, abs=0.01)
    assert row["drop"] == pytest.approx(row["anchor_accuracy"] - row["accuracy"], abs=1e-12)
    assert row["drop"] == pytest.approx(anchor_expected - expected, abs=0.02)
    assert row["drop"] > 0.1  # the constant offset hurts the frozen probe...
    assert row["shift_corrected_accuracy"] == pytest.approx(anchor_expected, abs=2 / row["n"])  # ...and is undone
    assert (row["model"], row["revision"], row["layer"], row["prompt"], row["family"]) == (
        "synth", "abc123", 3, "lex", "lexical")


def test_evaluate_job_imports_neither_torch_nor_sklearn(files, trained, tmp_path):
    modules = tmp_path / "modules.json"
    _evaluate(files, trained, tmp_path, "variant", LEXICAL, modules_out=modules)
    loaded = set(json.loads(modules.read_text()))
    assert "numpy" in loaded  # the record is real
    assert not {"torch", "sklearn", "scipy"} & loaded


def test_control_probe_sits_near_chance(files, trained, tmp_path):
    metrics = _evaluate(files, trained, tmp_path, "test", ANCHOR)
    sidecar = json.loads((trained / "control.json").read_text())
    assert sidecar["kind"] == "control"
    chance = 1 / N_CLASSES
    for row in metrics.iter_rows(named=True):
        # 90 test images: a chance-level probe stays within ~3 standard errors (0.12) of 1/6.
        assert abs(row["control_accuracy"] - chance) < 0.12
        assert row["selectivity"] == pytest.approx(row["accuracy"] - row["control_accuracy"])
        assert row["selectivity"] > 0.4


def test_sidecar_records_inputs_and_fit(trained):
    sidecar = json.loads((trained / "layer3.json").read_text())
    assert sidecar["input"]["model_name"] == "synth" and sidecar["input"]["layer"] == 3
    assert sidecar["input"]["revision"] == "abc123"
    assert sidecar["hyperparameters"] == {**PROBE, "seed": SEED}
    assert sidecar["software"]["torch"] and sidecar["software"]["scikit-learn"]
    fit = sidecar["fit"]["last"]
    assert fit["n"] == N_CLASSES * TRAIN_PER_CLASS and fit["C"] in PROBE["Cs"]
    assert (fit["solver"], fit["device"], fit["converged"]) == ("torch", "cpu", True)
    assert 0 <= fit["cv_accuracy"] <= 1 and fit["train_accuracy"] >= fit["cv_accuracy"] - 0.2
    # Convergence per C and fold, so an unconverged grid point is visible in the table.
    assert set(fit["cv_fits"]) == {repr(c) for c in PROBE["Cs"]}
    assert all(len(f["n_iter"]) == len(f["converged"]) == PROBE["cv_folds"] for f in fit["cv_fits"].values())
    control = json.loads((trained / "control.json").read_text())["fit"]["last"]
    assert control["C"] == fit["C"] and control["cv_accuracy"] is None


def _settings(**over) -> ProbeSettings:
    return ProbeSettings(**{**PROBE, **over})


def test_probe_files_are_byte_identical_across_runs(files, trained, tmp_path):
    """Same input, same bytes: the fit is deterministic and so is the file layout (issue 15)."""
    again = tmp_path / "again"
    again.mkdir()
    run_script("train_probe.py", input={"embeddings": files["train"]},
               output={"probe": again / "layer3.safetensors", "control": again / "control.safetensors"},
               params={"probe": PROBE, "seed": SEED}, log=again / "train.log")
    for name in ("layer3.safetensors", "layer3.json", "control.safetensors", "control.json"):
        assert (again / name).read_bytes() == (trained / name).read_bytes(), name


def test_saving_the_same_probes_gives_the_same_bytes(tmp_path):
    # Several metadata entries came out in hash order: different bytes from save to save.
    rng = np.random.default_rng(0)
    probe = Probe(weight=rng.normal(size=(3, 4)).astype(np.float32), bias=np.zeros(3, np.float32),
                  mean=np.zeros(4, np.float32), scale=np.ones(4, np.float32), classes=np.arange(3))
    contents = set()
    for i in range(8):
        save_probes({"last": probe, "image_mean": probe}, tmp_path / f"p{i}.safetensors", {"kind": "probe"})
        contents.add((tmp_path / f"p{i}.safetensors").read_bytes())
    assert len(contents) == 1


def test_probe_round_trips_through_safetensors(tmp_path):
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 10)
    x = _features(labels, rng.normal(size=(4, 8)), rng)
    probe, *_ = fit_probe_and_control(x, labels, _settings(Cs=[0.1, 1.0], cv_folds=3), SEED)
    save_probes({"last": probe}, tmp_path / "p.safetensors", {"kind": "probe"})
    loaded = load_probes(tmp_path / "p.safetensors")["last"]
    fresh = rng.normal(size=(50, 8)).astype(np.float32)
    np.testing.assert_array_equal(loaded.logits(fresh), probe.logits(fresh))
    np.testing.assert_array_equal(loaded.predict(fresh), probe.predict(fresh))
    assert json.loads((tmp_path / "p.json").read_text()) == {"kind": "probe"}


def test_binary_probe_predicts_like_sklearn():
    rng = np.random.default_rng(4)
    labels = np.repeat([3, 7], 20)  # non-contiguous class ids
    x = _features(np.repeat([0, 1], 20), rng.normal(size=(2, 5)), rng)
    probe, report, *_ = fit_probe_and_control(x, labels, _settings(Cs=[1.0], cv_folds=2), SEED)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=200)).fit(x, labels)
    fresh = rng.normal(size=(100, 5)).astype(np.float32)
    np.testing.assert_array_equal(probe.predict(fresh), reference.predict(fresh))
    assert report.n_classes == 2


def test_shuffled_labels_are_a_seeded_permutation():
    labels = np.arange(100)
    a, b = shuffled_labels(labels, 0), shuffled_labels(labels, 0)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.sort(a), labels)
    assert not np.array_equal(a, labels)


def test_fit_probe_rejects_tiny_classes():
    x = np.zeros((3, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="2 training samples per class"):
        fit_probe_and_control(x, np.array([0, 0, 1]), _settings(), SEED)
