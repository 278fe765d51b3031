"""How embedding rows are laid out in Redis: the code form of docs/embedding-table.md.

    vector:  emb:{<table>:<shard>}:<id>   value = dim little-endian fp32 or fp16, no header
    count:   cnt:{<table>:<shard>}:<id>   value = decimal occurrence count (INCR)

<table> is the qualified table name (`<namespace>.<name>` when the store has a namespace),
<shard> = id mod the table's shard count, <id> the raw unsigned 64-bit id in decimal.
The hash tag {<table>:<shard>} keeps a shard's keys in one cluster slot, so one MGET
serves a shard, while the shards of a table spread over many slots and nodes.
"""

import re

import numpy as np

DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2")}
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


def check_table_name(name: str) -> str:
    if not _TABLE_NAME.match(name):
        raise ValueError(f"table name {name!r}: use letters, digits, _ . - (at most 64)")
    return name


def vector_key(table: str, shards: int, item: int) -> bytes:
    return b"emb:{%s:%d}:%d" % (table.encode(), item % shards, item)


def count_key(table: str, shards: int, item: int) -> bytes:
    return b"cnt:{%s:%d}:%d" % (table.encode(), item % shards, item)


def vector_pattern(table: str) -> bytes:
    """A SCAN MATCH pattern for every vector key of a table."""
    return b"emb:{%s:*}:*" % table.encode()


def id_of_key(key: bytes) -> int:
    return int(key.rsplit(b":", 1)[1])


def encode_rows(vectors: np.ndarray, dtype: str) -> list[bytes]:
    raw = np.ascontiguousarray(vectors, dtype=DTYPES[dtype])
    return [row.tobytes() for row in raw]


def decode_rows(values: list[bytes | None], dim: int, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(float32 vectors, found) from MGET replies; a missing or malformed value is not found."""
    width = dim * DTYPES[dtype].itemsize
    found = np.array([v is not None and len(v) == width for v in values], dtype=bool)
    vectors = np.zeros((len(values), dim), dtype=np.float32)
    if found.any():
        joined = b"".join(v for v, ok in zip(values, found) if ok)
        vectors[found] = np.frombuffer(joined, dtype=DTYPES[dtype]).reshape(-1, dim)
    return vectors, found
