"""Ranking: CTR models that score every candidate of a request in one forward pass."""
