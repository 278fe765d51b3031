"""Offline training: everything one artifact holds (`artifact`), the ranker's rows and
training (`ranker`), and the one training loop of binary classifiers both CTR stacks use
(`loop`)."""
