"""Ranking metrics of a retrieval: queries scored against a corpus, some candidates relevant to each query.

``scores`` is (queries, candidates); ``relevant`` a boolean matrix of the same shape (a query's own partner,
and any candidate equal to it). A candidate's rank is 1 + the number of candidates scored strictly higher
(ties rank optimistically; with continuous scores there are none). NumPy only, so the same functions serve
evaluation, the report and the Predictor."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

RECALL_AT = (1, 5, 10)


def first_relevant_rank(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """(Q,) rank of each query's best-scored relevant candidate (1 = top); ``inf`` where none is relevant."""
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    best = np.where(relevant, scores, -np.inf).max(axis=1)
    ranks = 1.0 + (scores > best[:, None]).sum(axis=1)
    return np.where(relevant.any(axis=1), ranks, np.inf)


def ndcg_at(scores: np.ndarray, relevant: np.ndarray, k: int = 10) -> np.ndarray:
    """(Q,) nDCG@k with binary gains (what scikit-learn's ``ndcg_score`` computes when no scores tie)."""
    scores = np.asarray(scores, dtype=np.float64)
    relevant = np.asarray(relevant, dtype=bool)
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (np.take_along_axis(relevant, top, axis=1) * discount).sum(axis=1)
    ideal = np.array([discount[:min(int(n), k)].sum() for n in relevant.sum(axis=1)])
    return np.divide(dcg, ideal, out=np.zeros_like(dcg), where=ideal > 0)


def roc_auc(score: np.ndarray, label: np.ndarray) -> Optional[float]:
    """Area under the ROC curve of ``score`` for binary ``label`` (Mann–Whitney with average ranks of ties);
    None when one class is absent."""
    from scipy.stats import rankdata

    score, label = np.asarray(score, dtype=np.float64), np.asarray(label).astype(bool)
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return None
    ranks = rankdata(score)
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def partner_ranks(query: np.ndarray, response: np.ndarray, response_keys: Sequence) -> tuple:
    """Every row's own response ranked among the table's responses for its query (rows whose response cells are
    equal are one candidate): ``(scores (N, N), rank (N,) — 1 = the query's best-scored response is its own —,
    picked (N,) — the row of the best-scored response)``."""
    scores = np.asarray(query) @ np.asarray(response).T
    codes = np.unique(np.asarray([str(k) for k in response_keys], dtype=object), return_inverse=True)[1].ravel()
    rank = first_relevant_rank(scores, codes[:, None] == codes[None, :])
    return scores, rank.astype(int), scores.argmax(1)


def retrieval_metrics(scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = RECALL_AT) -> Dict[str, float]:
    """``recall@k`` (share of queries with a relevant candidate in the top k), ``mrr`` (mean reciprocal rank
    of the first relevant candidate), ``ndcg@10``, and ``queries`` / ``candidates``. Queries with no relevant
    candidate are left out."""
    relevant = np.asarray(relevant, dtype=bool)
    keep = relevant.any(axis=1)
    scores, relevant = np.asarray(scores)[keep], relevant[keep]
    ranks = first_relevant_rank(scores, relevant)
    out: Dict[str, float] = {f"recall@{k}": float((ranks <= k).mean()) if len(ranks) else 0.0 for k in ks}
    out["mrr"] = float((1.0 / ranks).mean()) if len(ranks) else 0.0
    out["ndcg@10"] = float(ndcg_at(scores, relevant, 10).mean()) if len(ranks) else 0.0
    out["queries"], out["candidates"] = int(keep.sum()), int(relevant.shape[1])
    return out


def recall_curve(ranks: np.ndarray, up_to: int = 20) -> Dict[int, float]:
    """Recall@k for k = 1..``up_to`` (the report's plot)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    ranks = ranks[np.isfinite(ranks)]
    return {k: float((ranks <= k).mean()) if len(ranks) else 0.0 for k in range(1, up_to + 1)}


__all__ = ["RECALL_AT", "first_relevant_rank", "ndcg_at", "partner_ranks", "recall_curve", "retrieval_metrics", "roc_auc"]
