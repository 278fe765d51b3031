"""The tables an artifact's models read, by name, and their configurations.

user                two-tower user id vectors       (id_dim floats)
item                two-tower item id vectors       (id_dim floats)
interest            kNN-Embed: each user's recency-weighted item-cluster counts (one float per cluster)
interest_smoothing  kNN-Embed: the mean mixture of each user's nearest users (one float per cluster)
user_state          the online trainer's state of each user row it trained: Adagrad's
                    accumulated squared gradients (id_dim floats); serving never reads it
item_state          the same for item rows
"""

from service.embeddings.store import TableConfig

USER_TABLE, ITEM_TABLE = "user", "item"
INTEREST_TABLE, SMOOTHING_TABLE = "interest", "interest_smoothing"
USER_STATE_TABLE, ITEM_STATE_TABLE = "user_state", "item_state"


def table_configs(
    id_dim: int, clusters: int, ttl_seconds: float | None = None
) -> list[TableConfig]:
    """The six tables of an artifact whose id vectors have `id_dim` floats and whose
    kNN-Embed has `clusters` item clusters; rows expire `ttl_seconds` after their last write."""
    return [
        TableConfig(USER_TABLE, id_dim, ttl_seconds=ttl_seconds),
        TableConfig(ITEM_TABLE, id_dim, ttl_seconds=ttl_seconds),
        TableConfig(INTEREST_TABLE, clusters, ttl_seconds=ttl_seconds),
        TableConfig(SMOOTHING_TABLE, clusters, ttl_seconds=ttl_seconds),
        TableConfig(USER_STATE_TABLE, id_dim, ttl_seconds=ttl_seconds),
        TableConfig(ITEM_STATE_TABLE, id_dim, ttl_seconds=ttl_seconds),
    ]
