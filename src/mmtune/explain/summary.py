"""What the explanations say about a table: mean contributions, the most attributed words per class, the rows
where the modalities disagree most."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Dict, List

import numpy as np


def summarise(rows: List[Dict[str, Any]], task, top: int = 10) -> Dict[str, Any]:
    """Mean contributions, the words most attributed per predicted class, the rows where the modalities disagree."""
    fields = sorted({f for r in rows for f in r.get("contribution_masking", {})})
    out: Dict[str, Any] = {
        "rows": len(rows),
        "mean_contribution_masking": {f: float(np.mean([r["contribution_masking"][f] for r in rows])) for f in fields},
        "mean_attribution_share": {f: float(np.mean([r["attribution_share"].get(f, 0.0) for r in rows])) for f in fields},
    }
    words: Dict[str, Dict[str, List[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for ws in r.get("words", {}).values():
            for w in ws:
                key = w["word"].lower().strip(".,!?;:'\"")
                if key:
                    words[str(r["prediction"])][key].append(w["attribution"])
    out["top_words"] = {c: [{"word": w, "mean_attribution": float(np.mean(v)), "rows": len(v)}
                            for w, v in sorted(ws.items(), key=lambda kv: -np.mean(kv[1]))[:top]]
                        for c, ws in words.items()}
    if not task.regression:
        ranked = sorted(rows, key=lambda r: -r.get("disagreement", 0.0))
        out["most_disagreement"] = [{"row": r["row"], "disagreement": r.get("disagreement", 0.0),
                                     "alone": r.get("alone")} for r in ranked[:top] if r.get("disagreement", 0.0) > 0]
    return out


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    return v
