"""Evaluation of a matcher on its held-out splits: each split's queries ranked against the split's distinct
responses (and back), recall@k, MRR, nDCG@10, the ROC-AUC of the pair score with match labels, and a
predictions table with every row's own-pair score and the rank of its true partner."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import pandas as pd
import torch

from ..inference import pair_embeddings
from .ranking import first_relevant_rank, partner_ranks, recall_curve, retrieval_metrics, roc_auc


def rank_split(query: np.ndarray, response: np.ndarray, response_keys, query_keys, positive: np.ndarray) -> Dict[str, Any]:
    """Metrics of one split. The candidates are the split's distinct responses (rows with equal response cells
    are one candidate, relevant to each of their queries); only rows whose pair belongs together are queries."""
    r_codes, _ = pd.factorize(pd.Series(response_keys, dtype=object).astype(str))
    first = np.unique(r_codes, return_index=True)[1]
    scores = query[positive] @ response[first].T
    relevant = r_codes[positive][:, None] == np.arange(len(first))[None, :]
    out = retrieval_metrics(scores, relevant)
    q_codes, _ = pd.factorize(pd.Series(query_keys, dtype=object).astype(str))
    q_first = np.unique(q_codes, return_index=True)[1]
    back = retrieval_metrics(response[positive] @ query[q_first].T,
                             q_codes[positive][:, None] == np.arange(len(q_first))[None, :])
    out.update({f"response_to_query_{k}": v for k, v in back.items() if k.startswith(("recall", "mrr"))})
    out["recall_curve"] = recall_curve(first_relevant_rank(scores, relevant))
    return out


def evaluate_matching(model, loaders: Mapping[str, Any], frames: Mapping[str, pd.DataFrame], data_cfg,
                      shown: Mapping[str, Mapping[str, list]], device=None) -> Tuple[Dict[str, Any], Dict[str, pd.DataFrame]]:
    """Metrics per split (``val``, ``test``) and predictions per split (``query``, ``response``, ``score``,
    ``partner_rank``, ``picked``, with match labels ``label`` and ``probability``)."""
    device = device or torch.device("cpu")
    q_field, r_field = model.side_fields("query")[0], model.side_fields("response")[0]
    metrics: Dict[str, Any] = {}
    predictions: Dict[str, pd.DataFrame] = {}
    for split, loader in loaders.items():
        if split == "train":
            continue
        out = pair_embeddings(model, loader, device)
        df = frames[split]
        label = out.get("label")
        positive = np.ones(len(df), dtype=bool) if label is None else label.astype(bool)
        if not positive.any():
            continue
        m = rank_split(out["query"], out["response"], df[data_cfg.response].tolist(), df[data_cfg.query].tolist(),
                       positive)
        score = (out["query"] * out["response"]).sum(1)
        if label is not None:
            m["pair_roc_auc"] = roc_auc(out["logit"], label)
            m["pair_accuracy"] = float(((out["logit"] > 0) == positive).mean())
        metrics[split] = m
        _, rank, picked = partner_ranks(out["query"], out["response"], df[data_cfg.response].tolist())
        table = pd.DataFrame({"query": shown[split].get(q_field, df[data_cfg.query].tolist()),
                              "response": shown[split].get(r_field, df[data_cfg.response].tolist()),
                              "score": score, "partner_rank": rank, "picked_row": picked})
        if data_cfg.id_column and data_cfg.id_column in df.columns:
            table.insert(0, data_cfg.id_column, df[data_cfg.id_column].to_numpy())
        if label is not None:
            table["label"] = label.astype(int)
            table["probability"] = 1.0 / (1.0 + np.exp(-out["logit"]))
        predictions[split] = table
    return metrics, predictions


def main_metric(metrics: Mapping[str, Any]) -> Optional[float]:
    """The number a matcher run is judged by: the test split's recall@1, else validation's."""
    for split in ("test", "val"):
        if split in metrics and "recall@1" in metrics[split]:
            return float(metrics[split]["recall@1"])
    return None


__all__ = ["evaluate_matching", "main_metric", "rank_split"]
