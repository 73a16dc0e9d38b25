"""Embedding Parquet files: round trip, atomic writer, and readability by polars/pandas/duckdb."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stagelens.store import (
    METADATA_KEY,
    EmbeddingWriter,
    ParquetStreamWriter,
    answers_schema,
    read_metadata,
    read_vectors,
    write_embeddings,
)


def synthetic(n=10, d=6, seed=0):
    rng = np.random.default_rng(seed)
    ids = [f"c{i % 3}/img{i}" for i in range(n)]
    labels = np.arange(n) % 3
    vectors = {"last": rng.normal(size=(n, d)).astype(np.float32), "image_mean": rng.normal(size=(n, d)).astype(np.float32)}
    return ids, labels, vectors


def test_round_trip(tmp_path):
    ids, labels, vectors = synthetic()
    path = write_embeddings(tmp_path / "sub" / "layer3.parquet", ids, labels, vectors, {"layer": 3, "model_id": "m"})
    for pos in ("last", "image_mean"):
        got_ids, got_labels, got = read_vectors(path, pos)
        assert got_ids.tolist() == ids and got_ids.dtype == object
        assert got_labels.dtype == np.int32 and got_labels.tolist() == labels.tolist()
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, vectors[pos])
    assert read_metadata(path) == {"layer": 3, "model_id": "m"}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["layer3.parquet"]


def test_schema_types_and_compression(tmp_path):
    ids, labels, vectors = synthetic(d=5)
    path = write_embeddings(tmp_path / "x.parquet", ids, labels, vectors, {})
    schema = pq.read_schema(path)
    assert str(schema.field("sample_id").type) == "string"
    assert str(schema.field("label").type) == "int32"
    vector_type = schema.field("last").type
    assert pa.types.is_fixed_size_list(vector_type) and vector_type.list_size == 5
    assert vector_type.value_type == pa.float32()
    assert pq.ParquetFile(path).metadata.row_group(0).column(2).compression == "ZSTD"
    assert json.loads(schema.metadata[METADATA_KEY]) == {}


def test_float16_vectors_read_back_as_float32(tmp_path):
    ids, labels, vectors = synthetic()
    path = write_embeddings(tmp_path / "h.parquet", ids, labels, vectors, {}, vector_dtype="float16")
    assert pq.read_schema(path).field("last").type.value_type == pa.float16()
    _, _, got = read_vectors(path)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, vectors["last"], rtol=1e-3, atol=1e-3)


def test_streaming_in_small_row_groups_equals_one_shot(tmp_path):
    ids, labels, vectors = synthetic(n=25)
    writer = EmbeddingWriter(tmp_path / "s.parquet", 6, ["last", "image_mean"], {"a": 1}, row_group_bytes=200)
    for start in range(0, 25, 4):
        sl = slice(start, start + 4)
        writer.append(ids[sl], labels[sl], {k: v[sl] for k, v in vectors.items()})
    path = writer.commit()
    assert pq.ParquetFile(path).num_row_groups > 1
    got_ids, _, got = read_vectors(path, "image_mean")
    assert got_ids.tolist() == ids
    np.testing.assert_array_equal(got, vectors["image_mean"])


def test_abort_leaves_nothing(tmp_path):
    ids, labels, vectors = synthetic()
    writer = EmbeddingWriter(tmp_path / "a.parquet", 6, ["last"], {})
    writer.append(ids, labels, {"last": vectors["last"]})
    assert writer.tmp_path.exists()
    writer.abort()
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_context_manager_aborts_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with EmbeddingWriter(tmp_path / "b.parquet", 6, ["last"], {}) as writer:
            writer.append(["x"], [0], {"last": np.zeros((1, 6))})
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_bad_input_errors(tmp_path):
    ids, labels, vectors = synthetic()
    path = write_embeddings(tmp_path / "c.parquet", ids, labels, {"last": vectors["last"]}, {})
    with pytest.raises(KeyError, match="image_mean"):
        read_vectors(path, "image_mean")
    writer = EmbeddingWriter(tmp_path / "d.parquet", 6, ["last"], {})
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        writer.append(["x"], [0], {"last": np.zeros((1, 5))})
    with pytest.raises(KeyError, match="last"):
        writer.append(["x"], [0], {})
    writer.abort()
    pq.write_table(pq.read_table(path).replace_schema_metadata({}), tmp_path / "plain.parquet")
    with pytest.raises(KeyError, match="stagelens"):
        read_metadata(tmp_path / "plain.parquet")


def test_answers_writer(tmp_path):
    words = ("yes", "no")
    writer = ParquetStreamWriter(tmp_path / "ans.parquet", answers_schema(words, {"prompt_id": "p"}))
    writer.write({"sample_id": ["a", "b"], "label": np.array([0, 1]), "p_yes": np.array([0.7, 0.1]),
                  "p_no": np.array([0.2, 0.8]), "answer": ["yes", "no"], "n_image_tokens": np.array([16, 16])})
    path = writer.commit()
    table = pq.read_table(path)
    assert table.column_names == ["sample_id", "label", "p_yes", "p_no", "answer", "n_image_tokens"]
    assert read_metadata(path) == {"prompt_id": "p"}


def test_readable_by_polars_pandas_duckdb(tmp_path):
    import duckdb
    import pandas as pd
    import polars as pl

    ids, labels, vectors = synthetic(n=7, d=4)
    path = write_embeddings(tmp_path / "r.parquet", ids, labels, vectors, {"layer": 0})
    frame = pl.read_parquet(path)
    assert frame.schema["last"] == pl.Array(pl.Float32, 4)
    np.testing.assert_array_equal(frame["last"].to_numpy(), vectors["last"])
    pdf = pd.read_parquet(path)
    assert pdf["sample_id"].tolist() == ids
    np.testing.assert_array_equal(np.stack(pdf["image_mean"].to_numpy()), vectors["image_mean"])
    con = duckdb.connect()
    rows = con.execute(f"SELECT sample_id, label, last FROM read_parquet('{path}') ORDER BY sample_id").fetchall()
    assert len(rows) == 7
    by_id = {r[0]: r for r in rows}
    np.testing.assert_allclose(by_id[ids[2]][2], vectors["last"][2], rtol=1e-6)
    assert by_id[ids[2]][1] == labels[2]
