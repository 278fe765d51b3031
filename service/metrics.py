"""Prometheus metrics, all under the `recsys_` prefix, in base units, no ids as labels.

Several workers on one port (`recsys serve --workers N`) keep their values in files under
PROMETHEUS_MULTIPROC_DIR, set before this module is imported, and each one's /metrics
answers for all of them (`exposition`): counters and histograms summed, each gauge by its
`multiprocess_mode` over the live workers. Info metrics are per process (every worker's
are the same).
"""

import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

REQUESTS = Counter("recsys_requests_total", "Requests answered.", ["transport", "endpoint", "code"])
REQUEST_LATENCY = Histogram(
    "recsys_request_duration_seconds",
    "Time to answer a request.",
    ["transport", "endpoint"],
    buckets=LATENCY_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "recsys_stage_duration_seconds",
    "Time spent in a pipeline stage.",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
CANDIDATES = Histogram(
    "recsys_candidates",
    "Candidates per request by source.",
    ["source"],
    buckets=(0, 10, 50, 100, 200, 500, 1000, 2000),
)
COLD_START = Counter("recsys_cold_start_total", "Requests for users with no vector and no history.")
MODEL_INFO = Info(
    "recsys_model",
    "The artifact version being served, its retrieval strategy and ranker: which copy serves "
    "(ranker_variant), its validation AUC and float32 bytes beside the ranker as trained's.",
)
READY = Gauge(
    "recsys_ready",
    "1 when models and index are loaded (several workers: how many have them loaded).",
    multiprocess_mode="livesum",
)

SHED = Counter(
    "recsys_shed_requests_total",
    "Requests refused at once: the process was at its in-flight limit.",
    ["transport"],
)
DEGRADED = Counter("recsys_degraded_responses_total", "Responses served by a fallback.", ["reason"])
SERVED_LISTS = Counter(
    "recsys_served_lists_total",
    "Served lists the served-list log wrote, or dropped (queue full, sink failing).",
    ["outcome"],
)
EXPERIMENT_REQUESTS = Counter(
    "recsys_experiment_requests_total",
    "Requests answered, by experiment arm and whether a fallback answered.",
    ["experiment", "arm", "degraded"],
)
EXPERIMENT_LATENCY = Histogram(
    "recsys_experiment_request_duration_seconds",
    "Time to answer, by experiment arm.",
    ["experiment", "arm"],
    buckets=LATENCY_BUCKETS,
)
EXPERIMENT_EVENTS = Counter(
    "recsys_experiment_events_total",
    "Events accepted, by the experiment arm of their user (clicks / impressions: CTR by arm).",
    ["experiment", "arm", "type"],
)
ARTIFACT_MEMORY = Gauge(
    "recsys_artifact_memory_bytes",
    "Resident memory an artifact version added when it was loaded beside the served one.",
    ["version"],
    multiprocess_mode="livesum",
)
RULES_APPLIED = Counter(
    "recsys_rules_applied_total",
    "Answers a business rule changed (boost, bury, max_per, diversity, pin).",
    ["rule"],
)
TIER_BREAKER_OPEN = Gauge(
    "recsys_tier_breaker_open",
    "Gateway: 1 while the circuit breaker of a tier is open (its calls fail at once).",
    ["tier"],
    multiprocess_mode="livemax",
)

EMBEDDING_LOOKUPS = Counter(
    "recsys_embedding_lookups_total",
    "Ids looked up, by outcome: hit (from the store), cache_hit (local cache), miss (default vector: "
    "unknown, expired or not admitted), error (store failed, default vector).",
    ["table", "result"],
)
EMBEDDING_LOOKUP_LATENCY = Histogram(
    "recsys_embedding_lookup_duration_seconds",
    "Time of one batched lookup.",
    ["backend"],
    buckets=LATENCY_BUCKETS,
)
EMBEDDING_BATCH_IDS = Histogram(
    "recsys_embedding_lookup_ids",
    "Distinct ids per batched lookup.",
    ["backend"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
)
EMBEDDING_ADMISSIONS = Counter(
    "recsys_embedding_admissions_total", "Frequency-filter decisions.", ["table", "result"]
)

DELAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
EVENTS_APPENDED = Counter(
    "recsys_events_appended_total", "Events the event log accepted.", ["type"]
)
EVENTS_PROCESSED = Counter(
    "recsys_events_processed_total", "Events the online trainer processed and acked.", ["type"]
)
EVENTS_LOST = Counter(
    "recsys_events_lost_total",
    "Events trimmed from the event log before the trainer processed them.",
)
EVENTS_BACKLOG = Gauge(
    "recsys_events_backlog",
    "Events appended and not yet acked by the online trainer.",
    multiprocess_mode="livemax",
)
ONLINE_UPDATE_DELAY = Histogram(
    "recsys_online_update_delay_seconds",
    "From an event's append to the trainer's write of the vectors it changed.",
    buckets=DELAY_BUCKETS,
)
ONLINE_ROWS_WRITTEN = Counter(
    "recsys_online_rows_written_total", "Vectors the online trainer wrote.", ["table"]
)
INDEX_SYNC_DELAY = Histogram(
    "recsys_index_sync_delay_seconds",
    "From the trainer's announcement of new item vectors to this process's index holding them.",
    buckets=DELAY_BUCKETS,
)
INDEX_INFO = Info("recsys_index", "The item index being served: its version, type and device.")
INDEX_SWAPS = Counter(
    "recsys_index_swaps_total", "Swaps to a new index version while serving.", ["result"]
)
INDEX_UPSERTS = Counter(
    "recsys_index_upserts_total", "Items written into the FAISS index online.", ["result"]
)
FRESHNESS = Gauge(
    "recsys_online_freshness_seconds",
    "Seconds since the last online update: trainer (vectors written) or index (items re-embedded here).",
    ["component"],
    multiprocess_mode="livemax",
)


INFO_SAMPLES = ("recsys_model_info", "recsys_index_info")


def exposition() -> bytes:
    """What /metrics answers: this process's metrics, or with several workers every live
    worker's (aggregated from PROMETHEUS_MULTIPROC_DIR) and this one's info metrics."""
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        return generate_latest(REGISTRY)
    workers = CollectorRegistry()
    multiprocess.MultiProcessCollector(workers)
    return generate_latest(workers) + generate_latest(REGISTRY.restricted_registry(INFO_SAMPLES))
