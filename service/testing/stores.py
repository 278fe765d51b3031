"""Embedding-store test doubles that wrap a real store."""


class DegradedReads:
    """A store whose reads fail the way the Redis store's do (default vectors, nothing
    found, `degraded`); it counts the writes it is asked for and makes none."""

    def __init__(self, store):
        self._store, self.writes = store, 0

    def get_many(self, table, ids):
        lookup = self._store.get_many(table, ids)
        lookup.vectors[:] = 0.0
        lookup.found[:] = False
        lookup.degraded = True
        return lookup

    def put_many(self, *args):
        self.writes += 1

    def __getattr__(self, name):
        return getattr(self._store, name)
