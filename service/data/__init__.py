"""Interaction data: the generic input format, bundled loaders and temporal splits."""

from service.data.schema import Dataset
from service.data.split import temporal_split

__all__ = ["Dataset", "temporal_split"]
