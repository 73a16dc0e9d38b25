"""Embedding, answer and answer-readout Parquet files: schema, streaming atomic writer, readers.

Imports only numpy and pyarrow so light jobs (probe evaluation) can read embeddings without
paying for torch. The file format is the data contract between extraction and probing:

- columns `sample_id` (string), `label` (int32), one `fixed_size_list<float32|float16>[D]`
  column per token position (`last`, `image_mean`);
- zstd compression, written record batch by record batch;
- schema metadata key b"stagelens" holds a JSON object describing the run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stagelens.atomic import temporary_path
from stagelens.spec import VECTOR_DTYPES

METADATA_KEY = b"stagelens"
COMPRESSION = "zstd"
# Batches are buffered up to this many bytes per file and written as one row group: few,
# reasonably sized row groups, with memory bounded independently of the number of rows.
ROW_GROUP_BYTES = 4 << 20
_VECTOR_DTYPES = {name: pa.type_for_alias(name) for name in VECTOR_DTYPES}


def embedding_schema(
    dim: int, positions: Sequence[str], metadata: Mapping[str, object], vector_dtype: str = "float32"
) -> pa.Schema:
    """Schema of one embedding file: sample_id, label, one fixed-size vector column per position."""
    if vector_dtype not in _VECTOR_DTYPES:
        raise ValueError(f"vector_dtype must be one of {sorted(_VECTOR_DTYPES)}, got {vector_dtype!r}")
    if not positions:
        raise ValueError("an embedding file needs at least one position column")
    value_type = _VECTOR_DTYPES[vector_dtype]
    fields = [pa.field("sample_id", pa.string()), pa.field("label", pa.int32())]
    fields += [pa.field(pos, pa.list_(value_type, int(dim))) for pos in positions]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)})


def answers_schema(words: Sequence[str], metadata: Mapping[str, object]) -> pa.Schema:
    """Schema of one answers file: sample_id, label, p_<word> per answer word, answer, n_image_tokens."""
    fields = [pa.field("sample_id", pa.string()), pa.field("label", pa.int32())]
    fields += [pa.field(f"p_{w}", pa.float32()) for w in words]
    fields += [pa.field("answer", pa.string()), pa.field("n_image_tokens", pa.int32())]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)})


def answer_readout_schema(words: Sequence[str], metadata: Mapping[str, object]) -> pa.Schema:
    """Schema of one answer-readout file: per image x layer, p_<word> per answer word and the margin."""
    fields = [pa.field("sample_id", pa.string()), pa.field("label", pa.int32()), pa.field("layer", pa.int32())]
    fields += [pa.field(f"p_{w}", pa.float32()) for w in words]
    fields += [pa.field("margin", pa.float32())]
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(dict(metadata), sort_keys=True)})


def _vector_array(matrix: np.ndarray, value_type: pa.DataType) -> pa.FixedSizeListArray:
    """(n, D) matrix -> fixed_size_list array without a Python-level loop."""
    # A copy, so a buffered batch never pins the caller's (possibly much larger) array.
    matrix = np.array(matrix, dtype=value_type.to_pandas_dtype(), order="C", copy=True)
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D (n, D) matrix, got shape {matrix.shape}")
    flat = pa.array(matrix.reshape(-1), type=value_type)
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


def columns_to_batch(schema: pa.Schema, columns: Mapping[str, object]) -> pa.RecordBatch:
    """Build a record batch for `schema` from numpy arrays / lists keyed by column name."""
    missing = [f.name for f in schema if f.name not in columns]
    if missing:
        raise KeyError(f"missing columns {missing}; schema has {schema.names}")
    arrays = []
    for f in schema:
        values = columns[f.name]
        if pa.types.is_fixed_size_list(f.type):
            matrix = np.asarray(values)
            if matrix.ndim != 2 or matrix.shape[1] != f.type.list_size:
                raise ValueError(
                    f"column {f.name!r}: expected shape (n, {f.type.list_size}), got {matrix.shape}"
                )
            arrays.append(_vector_array(matrix, f.type.value_type))
        else:
            arrays.append(pa.array(values, type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=schema)


class ParquetStreamWriter:
    """Streams record batches into `<target>` atomically.

    Writes to a hidden temporary file next to the target; `commit()` closes it and moves it
    into place with os.replace, `abort()` deletes it. Used as a context manager it aborts on
    an exception but does NOT commit on success (callers commit all outputs together).
    Batches are buffered up to `row_group_bytes` and written as one row group.
    """

    def __init__(self, path: str | os.PathLike, schema: pa.Schema, row_group_bytes: int = ROW_GROUP_BYTES):
        self.path = Path(path)
        self.schema = schema
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # atomic.py's fixed hidden name, so a rerun replaces what a killed job left behind.
        self.tmp_path = temporary_path(self.path)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(
            self.tmp_path, schema, compression=COMPRESSION
        )
        self.rows = 0
        self.row_group_bytes = row_group_bytes
        self._pending: list[pa.RecordBatch] = []
        self._pending_bytes = 0

    def write(self, columns: Mapping[str, object]) -> None:
        """Append one batch given as a column-name -> values mapping."""
        self.write_batch(columns_to_batch(self.schema, columns))

    def write_batch(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            raise RuntimeError(f"writer for {self.path} is already closed")
        self._pending.append(batch)
        self._pending_bytes += batch.nbytes
        self.rows += batch.num_rows
        if self._pending_bytes >= self.row_group_bytes:
            self._flush()

    def _flush(self) -> None:
        if self._pending and self._writer is not None:
            table = pa.Table.from_batches(self._pending, schema=self.schema)
            self._writer.write_table(table, row_group_size=table.num_rows)
        self._pending = []
        self._pending_bytes = 0

    def commit(self) -> Path:
        """Close the temporary file and move it onto the target path."""
        if self._writer is None:
            raise RuntimeError(f"writer for {self.path} is already closed")
        self._flush()
        self._writer.close()
        self._writer = None
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; safe to call more than once."""
        self._pending = []
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
        self.tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ParquetStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class EmbeddingWriter(ParquetStreamWriter):
    """Streaming writer of one embedding file (one model x split x prompt x layer)."""

    def __init__(
        self,
        path: str | os.PathLike,
        dim: int,
        positions: Sequence[str],
        metadata: Mapping[str, object],
        vector_dtype: str = "float32",
        row_group_bytes: int = ROW_GROUP_BYTES,
    ):
        self.positions = tuple(positions)
        super().__init__(path, embedding_schema(dim, self.positions, metadata, vector_dtype), row_group_bytes)

    def append(
        self, sample_ids: Sequence[str], labels: Sequence[int], vectors: Mapping[str, np.ndarray]
    ) -> None:
        """Append rows: vectors[position] is an (n, D) array for each position of the file."""
        self.write({"sample_id": list(sample_ids), "label": np.asarray(labels, dtype=np.int32), **vectors})


def write_embeddings(
    path: str | os.PathLike,
    sample_ids: Sequence[str],
    labels: Sequence[int],
    vectors: Mapping[str, np.ndarray],
    metadata: Mapping[str, object],
    vector_dtype: str = "float32",
) -> Path:
    """Write a whole embedding file at once (atomic). Handy for tests and synthetic data."""
    positions = list(vectors)
    if not positions:
        raise ValueError("vectors must hold at least one position")
    dim = np.asarray(vectors[positions[0]]).shape[1]
    writer = EmbeddingWriter(path, dim, positions, metadata, vector_dtype)
    try:
        writer.append(sample_ids, labels, vectors)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON object stored under schema metadata key b"stagelens"."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise KeyError(f"{path}: no b'stagelens' key in the Parquet schema metadata")
    return json.loads(raw)


_NUMPY_TYPE = {pa.float32(): np.float32, pa.float16(): np.float16, pa.int32(): np.int32, pa.int64(): np.int64}


def _numpy_view(values: pa.Array, path: str | os.PathLike, column: str) -> np.ndarray:
    """A numeric Arrow array as numpy through its data buffer: pyarrow's own to_numpy imports
    pandas, ~0.15 s that every evaluation job would pay."""
    if values.null_count:
        raise ValueError(f"{path}: column {column!r} holds null values")
    if values.type not in _NUMPY_TYPE:
        raise TypeError(f"{path}: column {column!r} has type {values.type}, expected one of {list(_NUMPY_TYPE)}")
    buffer = np.frombuffer(values.buffers()[1], dtype=_NUMPY_TYPE[values.type])
    return buffer[values.offset : values.offset + len(values)]


def read_vectors(
    path: str | os.PathLike, position: str = "last"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_ids as object array of str, labels int32, vectors float32 (n, D)) of one file."""
    schema = pq.read_schema(path)
    if position not in schema.names:
        vector_cols = [n for n in schema.names if n not in ("sample_id", "label")]
        raise KeyError(f"{path}: no position column {position!r}; the file has {vector_cols}")
    # ParquetFile.read, not pq.read_table: the latter imports pyarrow.dataset (~0.2 s), which
    # every one of a run's ~1,000 evaluation jobs would pay.
    table = pq.ParquetFile(path).read(columns=["sample_id", "label", position])
    column = table.column(position).combine_chunks()
    dim = column.type.list_size
    # .flatten() honours slice offsets; the fixed size makes the reshape exact.
    vectors = _numpy_view(column.flatten(), path, position).astype(np.float32).reshape(len(column), dim)
    sample_ids = np.asarray(table.column("sample_id").to_pylist(), dtype=object)
    labels = _numpy_view(table.column("label").combine_chunks(), path, "label").astype(np.int32)
    return sample_ids, labels, vectors

