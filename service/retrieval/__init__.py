"""Candidate generation: two-tower vectors searched in a FAISS index."""
