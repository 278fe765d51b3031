"""Table snapshots as Parquet: `id` (uint64) and `vector` (fixed-size list of float32),
with the table name and dim in the schema metadata. pyarrow, pandas or DuckDB read them."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from service.embeddings.store import EmbeddingStore

BATCH = 10_000


def export_table(store: EmbeddingStore, table: str, path: str | Path) -> int:
    config = store.table(table)
    schema = pa.schema(
        [("id", pa.uint64()), ("vector", pa.list_(pa.float32(), config.dim))],
        metadata={"table": table, "dim": str(config.dim)},
    )
    rows = 0
    with pq.ParquetWriter(str(path), schema) as writer, tqdm(desc=f"export {table}", unit="row", mininterval=2) as bar:
        for ids, vectors in store.scan(table, batch_size=BATCH):
            flat = pa.array(vectors.astype(np.float32).reshape(-1), type=pa.float32())
            writer.write_table(
                pa.table({"id": pa.array(ids, type=pa.uint64()), "vector": pa.FixedSizeListArray.from_arrays(flat, config.dim)}, schema=schema)
            )
            rows += len(ids)
            bar.update(len(ids))
    return rows


def import_table(store: EmbeddingStore, table: str, path: str | Path) -> int:
    config = store.table(table)
    parquet = pq.ParquetFile(str(path))
    vector_type = parquet.schema_arrow.field("vector").type
    if getattr(vector_type, "list_size", None) != config.dim:
        raise ValueError(f"{path}: vectors of {getattr(vector_type, 'list_size', '?')} dims, table {table!r} takes {config.dim}")
    rows = 0
    with tqdm(total=parquet.metadata.num_rows, desc=f"import {table}", unit="row", mininterval=2) as bar:
        for batch in parquet.iter_batches(batch_size=BATCH, columns=["id", "vector"]):
            ids = batch.column("id").to_numpy().astype(np.uint64)
            vectors = batch.column("vector").flatten().to_numpy().reshape(-1, config.dim)
            store.put_many(table, ids, vectors)
            rows += len(ids)
            bar.update(len(ids))
    return rows
