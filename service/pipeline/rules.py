"""Business rules and diversity over a ranked candidate list, after ranking: what turns
the ranker's order into the answer a product team wants.

In order:
1. **boost / bury**: an item holding one of a rule's attribute values has its rule score
   multiplied by the rule's factor (boost >= 1, bury <= 1; several rules multiply). The
   rule score is the ranker's click probability, or, for answers in retrieval order (the
   ranker off or failed), the place in that order mapped onto (0, 1] (first 1, last 1/n):
   retrieval order is not score order where kNN-Embed's interests or item-to-item
   candidates take their shares. The answer keeps showing the ranker's (retrieval's) own
   scores; its order is the rules'.
2. **diversity** (MMR, Carbonell and Goldstein 1998): the answer is picked greedily, each
   place going to the candidate with the best (1 - d) relevance - d max cosine to the items
   already picked, relevance being the rule score scaled to [0, 1] over the candidates and the
   cosine taken between the item vectors the index holds. d = 0 is score order.
3. **max_per**: while picking, an item is passed over when one of its values of the
   attribute already fills its `count` places; if that leaves the answer short of k, the
   best passed-over items fill it (and the rule says so by its name, `max_per:relaxed`).
4. **pin**: items placed at their positions, candidates or not (a pinned item that was no
   candidate has score 0), moving the others down; an item the catalog hides or deleted is
   never pinned.

The answer names the rules that changed it. Numpy only: the gateway applies the rules too.
"""

from dataclasses import dataclass

import numpy as np

from service.retrieval.candidates import is_in_sorted
from service.retrieval.catalog import ItemCatalog
from service.schemas import Rules


@dataclass
class RuledAnswer:
    item_ids: np.ndarray  # uint64, the answer in order
    scores: np.ndarray  # float32
    applied: list[str]


def rule_scores(scores: np.ndarray, ranked: bool) -> np.ndarray:
    """What factors scale: the ranker's probabilities, or the place in retrieval order."""
    scores = np.asarray(scores, dtype=np.float32)
    if ranked:
        return scores.copy()
    n = len(scores)
    return ((n - np.arange(n)) / max(n, 1)).astype(np.float32)


def holding(catalog: ItemCatalog, ids: np.ndarray, attribute: str, values) -> np.ndarray:
    wanted = set(values)
    return np.array([not held.isdisjoint(wanted) for held in catalog.values_of(ids, attribute)])


def pick(
    ids: np.ndarray,
    scores: np.ndarray,
    k: int,
    rules: Rules,
    catalog: ItemCatalog,
    vectors: np.ndarray | None,
    applied: list[str],
) -> np.ndarray:
    """Positions of the k candidates picked, in order (candidates sorted best first)."""
    diversity = rules.diversity or 0.0
    if vectors is None or not len(ids):
        diversity = 0.0
    if diversity == 0.0 and rules.max_per is None:
        return np.arange(min(k, len(ids)))
    values = catalog.values_of(ids, rules.max_per.attribute) if rules.max_per else None
    spread = float(scores.max() - scores.min()) if len(scores) else 0.0
    relevance = (scores - scores.min()) / spread if spread > 0 else np.ones_like(scores)
    if diversity > 0.0:
        unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        closest = np.full(len(ids), -np.inf, dtype=np.float32)  # max cosine to those picked
    taken, passed, counts = [], [], {}
    free = np.ones(len(ids), dtype=bool)
    while len(taken) < k and free.any():
        if diversity > 0.0:
            penalty = np.where(np.isfinite(closest), closest, 0.0)
            objective = (1.0 - diversity) * relevance - diversity * penalty
        else:
            objective = relevance.copy()
        objective[~free] = -np.inf
        best = int(np.argmax(objective))  # ties: the earlier, better-ranked candidate
        free[best] = False
        if values is not None and any(
            counts.get(v, 0) >= rules.max_per.count for v in values[best]
        ):
            passed.append(best)
            continue
        taken.append(best)
        if values is not None:
            for v in values[best]:
                counts[v] = counts.get(v, 0) + 1
        if diversity > 0.0:
            closest = np.maximum(closest, unit @ unit[best])
    if diversity > 0.0 and taken != list(range(len(taken))):
        applied.append("diversity")
    if passed and len(taken) < k:
        applied.append("max_per:relaxed")
        taken.extend(sorted(passed)[: k - len(taken)])
    elif passed:
        applied.append("max_per")
    return np.array(taken, dtype=np.int64)


def apply_rules(
    ids: np.ndarray,
    scores: np.ndarray,
    k: int,
    rules: Rules,
    catalog: ItemCatalog,
    ranked: bool,
    vectors: np.ndarray | None = None,
) -> RuledAnswer:
    """The top k of candidates `ids` under `rules`, with their `scores` as answered;
    `ranked`: whether those are the ranker's (any order), else retrieval cosines in
    retrieval order; `vectors`: the candidates' item vectors, for diversity (none: none)."""
    applied: list[str] = []
    ids = np.asarray(ids, dtype=np.uint64)
    shown = np.asarray(scores, dtype=np.float32)
    scores = rule_scores(shown, ranked)
    for name, factors in (("boost", rules.boost), ("bury", rules.bury)):
        touched = False
        for rule in factors or []:
            hit = holding(catalog, ids, rule.attribute, rule.values)
            scores[hit] *= rule.factor
            touched |= bool(hit.any()) and rule.factor != 1.0
        if touched:
            applied.append(name)
    order = np.lexsort((np.arange(len(ids)), -scores))  # best first, ties as they came
    ids, scores, shown = ids[order], scores[order], shown[order]
    if vectors is not None:
        vectors = vectors[order]
    chosen = pick(ids, scores, k, rules, catalog, vectors, applied)
    answer_ids, answer_scores = ids[chosen], shown[chosen]
    pins = sorted(
        (
            p
            for p in rules.pin or []
            if not is_in_sorted(np.array([p.item_id], np.uint64), catalog.blocked)[0]
        ),
        key=lambda p: p.position,
    )
    if pins:
        by_id = dict(zip(ids.tolist(), shown.tolist()))
        pinned = {p.item_id for p in pins}
        rest = [
            (i, s) for i, s in zip(answer_ids.tolist(), answer_scores.tolist()) if i not in pinned
        ]
        for pin in pins:
            rest.insert(
                min(pin.position - 1, len(rest)), (pin.item_id, by_id.get(pin.item_id, 0.0))
            )
        rest = rest[:k]
        if [i for i, _ in rest] != answer_ids.tolist():
            applied.append("pin")
        answer_ids = np.array([i for i, _ in rest], dtype=np.uint64)
        answer_scores = np.array([s for _, s in rest], dtype=np.float32)
    return RuledAnswer(answer_ids, answer_scores.astype(np.float32), applied)
