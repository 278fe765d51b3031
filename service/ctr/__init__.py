"""Standalone CTR models (`recsys ctr train`): the field map of a click table, the tables
by spec, training, and the model as a version folder. Offline tooling; the served ranker
is `service.ranking`."""
