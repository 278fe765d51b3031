"""The embedding table: raw 64-bit ids to vectors, behind one small interface."""

from service.embeddings.memory_store import InMemoryEmbeddingStore
from service.embeddings.store import EmbeddingStore, Lookup, TableConfig

__all__ = ["EmbeddingStore", "InMemoryEmbeddingStore", "Lookup", "TableConfig"]
