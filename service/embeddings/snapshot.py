"""Table snapshots as Parquet: `id` (uint64) and `vector` (fixed-size list of float32),
with the table name and dim in the schema metadata. pyarrow, pandas or DuckDB read them."""

from collections.abc import Callable, Iterator
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
    with (
        pq.ParquetWriter(str(path), schema) as writer,
        tqdm(desc=f"export {table}", unit="row", mininterval=2) as bar,
    ):
        for ids, vectors in store.scan(table, batch_size=BATCH):
            flat = pa.array(vectors.astype(np.float32).reshape(-1), type=pa.float32())
            writer.write_table(
                pa.table(
                    {
                        "id": pa.array(ids, type=pa.uint64()),
                        "vector": pa.FixedSizeListArray.from_arrays(flat, config.dim),
                    },
                    schema=schema,
                )
            )
            rows += len(ids)
            bar.update(len(ids))
    return rows


def _batches(parquet: pq.ParquetFile, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for batch in parquet.iter_batches(batch_size=BATCH, columns=["id", "vector"]):
        yield (
            batch.column("id").to_numpy().astype(np.uint64),
            batch.column("vector").flatten().to_numpy().reshape(-1, dim),
        )


def import_table(
    store: EmbeddingStore,
    table: str,
    path: str | Path,
    written: Callable[[np.ndarray], None] | None = None,
) -> int:
    """Write the snapshot's rows into `table`; `written(ids)` after each batch. The whole file
    is checked first (dimension, ids, finite vectors), so a bad one writes nothing."""
    config = store.table(table)
    try:
        parquet = pq.ParquetFile(str(path))
        vector_type = parquet.schema_arrow.field("vector").type
        id_type = parquet.schema_arrow.field("id").type
    except (OSError, KeyError, pa.ArrowException) as exc:
        raise ValueError(
            f"{Path(path).name}: not a table snapshot (Parquet with id and vector columns): {exc}"
        ) from None
    if getattr(vector_type, "list_size", None) != config.dim:
        raise ValueError(
            f"{Path(path).name}: vectors of {getattr(vector_type, 'list_size', '?')} dims, table {table!r} takes "
            f"{config.dim}"
        )
    if not pa.types.is_unsigned_integer(id_type):
        raise ValueError(f"{Path(path).name}: ids are {id_type}, not unsigned integers")
    for _, vectors in _batches(parquet, config.dim):
        if not np.isfinite(vectors).all():
            raise ValueError(f"{Path(path).name}: vectors hold NaN or infinity")
    rows = 0
    with tqdm(
        total=parquet.metadata.num_rows, desc=f"import {table}", unit="row", mininterval=2
    ) as bar:
        for ids, vectors in _batches(parquet, config.dim):
            store.put_many(table, ids, vectors)
            if written is not None:
                written(ids)
            rows += len(ids)
            bar.update(len(ids))
    return rows
