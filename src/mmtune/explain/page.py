"""Drawing an :class:`~mmtune.explain.Explanation`: one self-contained HTML page (PNGs inlined), the PNGs
beside it, and ``attributions.jsonl`` (one JSON object per row)."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Dict

import numpy as np


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _overlay(value: Any, cam: np.ndarray, title: str) -> bytes:
    """The heatmap over the picture (an image), or over time (and frequency) for a recording."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3) if cam.shape[0] > 1 else (5, 1.6))
    if hasattr(value, "size") and hasattr(value, "convert"):  # a PIL image
        w, h = value.size
        ax.imshow(value)
        ax.imshow(cam, cmap="jet", alpha=0.45, extent=(0, w, h, 0), interpolation="bilinear")
    else:
        ax.imshow(cam, cmap="jet", aspect="auto", origin="lower", interpolation="nearest")
        ax.set_xlabel("time")
    ax.set_title(title, fontsize=8)
    ax.axis("off") if cam.shape[0] > 1 else None
    data = _png(fig)
    plt.close(fig)
    return data


def _attention(entry: Dict[str, Any], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = np.asarray(entry["weights"])
    fig, ax = plt.subplots(figsize=(4, 2.5))
    ax.imshow(w, aspect="auto", cmap="viridis")
    ax.set_xlabel("attended: " + ", ".join(dict.fromkeys(entry["keys"])), fontsize=7)
    ax.set_ylabel("query token", fontsize=7)
    ax.set_title(title, fontsize=8)
    data = _png(fig)
    plt.close(fig)
    return data


def attention_on(entry: Dict[str, Any], field: str):
    """The query field's attention over ``field``'s tokens, averaged over its real tokens, as a map: a grid for a
    picture's tokens (a leading CLS token dropped), else a strip. None when it does not attend to ``field``."""
    keys = entry["keys"]
    cols = [j for j, k in enumerate(keys) if k == field]
    if not cols:
        return None
    w = np.asarray(entry["weights"])[:, cols]
    mask = entry.get("query_mask")
    w = w[np.asarray(mask, dtype=bool)] if mask is not None and np.asarray(mask).any() else w
    m = w.mean(0)
    side = int(round((len(m) - 1) ** 0.5))
    if side > 1 and side * side == len(m) - 1:
        m = m[1:].reshape(side, side)
    elif int(round(len(m) ** 0.5)) ** 2 == len(m) and len(m) > 1:
        m = m.reshape(int(round(len(m) ** 0.5)), -1)
    else:
        m = m.reshape(1, -1)
    total = m.sum()
    return m / total if total > 0 else m


def _histograms(acts: Dict[str, Any]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = acts.get("layers", {})
    n = len(layers)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(2.2 * max(n, 1), 1.8), squeeze=False)
    for ax, (name, s) in zip(axes[0], layers.items()):
        edges = np.asarray(s["edges"])
        ax.bar(edges[:-1], s["histogram"], width=np.diff(edges), align="edge")
        ax.set_title(name, fontsize=7)
        ax.tick_params(labelsize=6)
    data = _png(fig)
    plt.close(fig)
    return data


def _words(words) -> str:
    if not words:
        return ""
    top = max(abs(w["attribution"]) for w in words) or 1.0
    out = []
    for w in words:
        a = w["attribution"] / top
        colour = f"rgba(220,40,40,{abs(a):.2f})" if a > 0 else f"rgba(40,90,220,{abs(a):.2f})"
        out.append(f'<span title="{w["attribution"]:+.4f}" style="background:{colour}">{html.escape(w["word"])}</span>')
    return " ".join(out)


def write_explanations(expl, out_dir, title: str = "Explanations") -> Dict[str, Any]:
    from ..extras import require

    require("matplotlib", "report", "the explanation page")
    from ..io import atomic_write_text

    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    table = expl.table
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}td,th{padding:2px 8px;text-align:left}"
             ".row{border-top:1px solid #ccc;padding:8px 0}img{vertical-align:top;margin:4px}span{padding:1px}</style>",
             f"<h1>{html.escape(title)}</h1><h2>The table ({table['rows']} rows)</h2>",
             "<table><tr><th>field</th><th>mean contribution (masking)</th><th>mean attribution share</th></tr>"]
    for f, v in table["mean_contribution_masking"].items():
        parts.append(f"<tr><td>{html.escape(f)}</td><td>{v:+.4f}</td><td>{table['mean_attribution_share'].get(f, 0):.3f}</td></tr>")
    parts.append("</table>")
    if table.get("top_words"):
        parts.append("<h3>Words most attributed to each predicted class</h3><table>")
        for c, ws in table["top_words"].items():
            said = ", ".join(f"{html.escape(w['word'])} ({w['mean_attribution']:+.3f})" for w in ws)
            parts.append(f"<tr><td>{html.escape(str(c))}</td><td>{said}</td></tr>")
        parts.append("</table>")
    if table.get("most_disagreement"):
        parts.append("<h3>Rows where the modalities disagree most (look at these first)</h3><ul>")
        for d in table["most_disagreement"]:
            alone = "; ".join(f"{html.escape(f)} alone: {html.escape(str(a['prediction']))} ({a['probability']:.2f})"
                              for f, a in (d.get("alone") or {}).items())
            parts.append(f"<li><a href='#row{d['row']}'>row {d['row']}</a>: {d['disagreement']:.2f} — {alone}</li>")
        parts.append("</ul>")
    if expl.activations.get("layers"):
        parts.append(f"<h3>Activations ({expl.activations['rows']} rows)</h3>")
        hist = _histograms(expl.activations)
        (out / "plots" / "activations.png").write_bytes(hist)
        parts.append(_img(hist, "activation histograms"))
        parts.append("<table><tr><th>block</th><th>mean</th><th>std</th><th>dead units</th><th>constant units</th>"
                     "<th>saturated units</th></tr>")
        for name, s in expl.activations["layers"].items():
            parts.append(f"<tr><td>{html.escape(name)}</td><td>{s['mean']:+.3f}</td><td>{s['std']:.3f}</td>"
                         f"<td>{s['dead_fraction']:.1%} of {s['units']}</td><td>{s['constant_fraction']:.1%}</td>"
                         f"<td>{s['saturated_fraction']:.1%}</td></tr>")
        parts.append("</table>")
    parts.append("<h2>Rows</h2>")
    lines = []
    for i, row in enumerate(expl.rows):
        head = f"row {row['row']}" + (f" (id {html.escape(str(row['id']))})" if "id" in row else "")
        pred = html.escape(str(row["prediction"])) + (f", p = {row['probability']:.3f}" if "probability" in row else "")
        parts.append(f"<div class='row' id='row{row['row']}'><b>{head}</b>: {pred}<br>")
        contrib = ", ".join(f"{html.escape(f)} {v:+.3f} (share {row['attribution_share'].get(f, 0):.2f})"
                            for f, v in row["contribution_masking"].items())
        parts.append(f"contribution by masking (probability lost when hidden) and attribution share: {contrib}<br>")
        if row.get("gates"):
            parts.append("gates: " + ", ".join(f"{html.escape(f)} {g:.2f}" for f, g in row["gates"].items()) + "<br>")
        for f, ws in row.get("words", {}).items():
            parts.append(f"{html.escape(f)}: {_words(ws)}<br>")
        for f, cols in row.get("columns", {}).items():
            parts.append(f"{html.escape(f)}: " + ", ".join(f"{html.escape(c)} {v:+.3f}" for c, v in cols.items()) + "<br>")
        for f, cam in (expl.cams[i] if i < len(expl.cams) else {}).items():
            data = _overlay(expl.shown[i].get(f), cam, f"{f}: Grad-CAM")
            name = f"row{row['row']}-{f.replace('.', '_')}.png"
            (out / "plots" / name).write_bytes(data)
            parts.append(_img(data, f"{f} heatmap"))
        for f, entry in (expl.attention[i] if i < len(expl.attention) else {}).items():
            data = _attention(entry, f"{f} attends to")
            name = f"row{row['row']}-attention-{f.replace('.', '_')}.png"
            (out / "plots" / name).write_bytes(data)
            parts.append(_img(data, f"{f} attention"))
            for g, value in expl.shown[i].items():  # where this field looked in each picture
                amap = attention_on(entry, g) if hasattr(value, "convert") else None
                if amap is not None and amap.shape[0] > 1:
                    data = _overlay(value, amap, f"{f} → {g}: attention")
                    name = f"row{row['row']}-attention-{f.replace('.', '_')}-on-{g.replace('.', '_')}.png"
                    (out / "plots" / name).write_bytes(data)
                    parts.append(_img(data, f"{f} attention on {g}"))
        parts.append("</div>")
        lines.append(json.dumps({**row, "cam": {f: c.tolist() for f, c in (expl.cams[i] if i < len(expl.cams) else {}).items()}}))
    atomic_write_text(out / "explanations.html", "\n".join(parts))
    atomic_write_text(out / "attributions.jsonl", "\n".join(lines) + "\n")
    atomic_write_text(out / "summary.json", json.dumps(table, indent=2))
    return {"html": out / "explanations.html", "jsonl": out / "attributions.jsonl"}
