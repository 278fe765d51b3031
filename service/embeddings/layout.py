"""How embedding rows are laid out in Redis: the code form of docs/embedding-table.md.

    vector:  emb:{<table>:<shard>}:<id>   value = dim little-endian fp32 or fp16, no header
    count:   cnt:{<table>:<shard>}:<id>   value = decimal occurrence count (INCRBY)

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


class KeyMaker:
    """`vector_key` for one table, many ids at a time: the per-shard prefixes are built once."""

    def __init__(self, table: str, shards: int):
        self.shards = shards
        self.prefixes = [b"emb:{%s:%d}:" % (table.encode(), shard) for shard in range(shards)]

    def __call__(self, ids: list[int]) -> list[bytes]:
        prefixes, shards = self.prefixes, self.shards
        return [prefixes[item % shards] + b"%d" % item for item in ids]


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


def decode_rows(
    values: list[bytes | None], dim: int, dtype: str, default: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(float32 vectors, found) from MGET replies; a missing or malformed value is not found
    and gets `default` (zeros when None)."""
    width = dim * DTYPES[dtype].itemsize
    present = [v for v in values if v is not None and len(v) == width]
    if len(present) == len(values):  # the common case: every id held a row
        return np.frombuffer(b"".join(present), dtype=DTYPES[dtype]).reshape(-1, dim).astype(
            np.float32
        ), np.ones(len(values), bool)
    found = np.array([v is not None and len(v) == width for v in values], dtype=bool)
    vectors = (
        np.zeros((len(values), dim), dtype=np.float32)
        if default is None
        else np.tile(default, (len(values), 1))
    )
    if present:
        vectors[found] = np.frombuffer(b"".join(present), dtype=DTYPES[dtype]).reshape(-1, dim)
    return vectors, found
