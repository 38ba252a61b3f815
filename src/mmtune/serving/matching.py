"""A trained matcher: embed either side, search a corpus by meaning, score pairs, and find the rows of a table
whose two sides do not belong together.

:class:`MatchPredictor` is what :meth:`mmtune.Predictor.load` returns for a run with ``data.query`` /
``data.response``. :class:`SearchIndex` holds a corpus's unit vectors (exact inner product; a FAISS index
when the ``faiss`` package is present and ``faiss=True``) and saves as ``index.npy`` (loaded with
``allow_pickle=False``) plus ``index.json`` (row ids, shown values, the run it was built with)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch

from ..data.collate import Collator, read_options
from ..data.dataset import MultimodalDataset, read_once_dataset
from ..data.manifest import ManifestSpec, TableSource, row_index
from ..evaluation.ranking import partner_ranks
from ..inference import side_embeddings
from ..io import atomic_write_json, atomic_write_with
from ..modalities import modality_of
from ..models.matcher import SIDES

INDEX_FORMAT = 1


def classifier_only(pred, what: str):
    """``pred`` when it is a classifier's Predictor; a matcher gets a one-line ValueError naming what it offers."""
    if isinstance(pred, MatchPredictor):
        where = f" {str(pred.run_dir)!r}" if pred.run_dir else ""
        raise ValueError(f"run{where} is a matcher (data.query / data.response): {what} is for classifier runs; a "
                         "matcher offers mmtune search, check-pairs, serve and report (embed, search, score_pairs, "
                         "check_pairs, zero_shot, few_shot from Python)")
    return pred


class MatchPredictor:
    """A two-tower matcher with its processors. ``data`` is a DataFrame or a manifest path holding the side's
    column (``data.query`` / ``data.response`` of the run's config); every row is validated first and bad rows
    raise BadRowsError naming them."""

    task = "matching"

    def __init__(self, model, config, tasks, run_dir: Optional[Path] = None, device: Union[str, torch.device] = "cpu",
                 metrics: Optional[Dict[str, Any]] = None):
        self.model = model.eval()
        self.config, self.tasks, self.run_dir = config, list(tasks), run_dir
        self.device = torch.device(device)
        self.model.to(self.device)
        self.metrics = dict(metrics or {})
        d = config.data
        self.columns = {"query": d.query, "response": d.response}
        self.fields = {side: model.side_fields(side) for side in SIDES}
        self.id_column = d.id_column
        # what the server's metadata and row reader ask of any predictor
        self.modalities = config.modalities
        self.backend, self.members, self.calibration, self.workers = "torch", None, {}, 1
        self.embedding_kinds = list(SIDES)
        self.reads = read_options(config, [Collator({n: e.processor for n, e in model.encoders.items()},
                                                    config.modalities)], config.modalities)
        """How the towers' files are read, as in training (see ``Predictor.reads``)."""

    @classmethod
    def from_bundle(cls, bundle, device="cpu") -> "MatchPredictor":
        return cls(bundle.model, bundle.config, bundle.tasks, bundle.run_dir, device, bundle.metrics)

    def predict(self, *args, **kwargs):
        classifier_only(self, "predict")

    def predict_proba(self, *args, **kwargs):
        classifier_only(self, "predict_proba")

    def evaluate(self, *args, **kwargs):
        classifier_only(self, "evaluate")

    def explain(self, *args, **kwargs):
        classifier_only(self, "explain")

    # ---- embeddings ------------------------------------------------------------------------
    def _side_dataset(self, data: TableSource, side: str) -> MultimodalDataset:
        if side not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)} (got {side!r})")
        # the id column is carried when the table has one, never required (a table of class names has none)
        spec = ManifestSpec({f: self.config.data.column(f) for f in self.fields[side]}, (), None)
        return read_once_dataset(data, spec, side, "fix these rows (or remove them from the input) and run it again",
                                 modalities=self.fields[side], reads=self.reads)

    def _embed(self, ds: MultimodalDataset, side: str, batch_size: Optional[int]) -> np.ndarray:
        names = self.model.side_encoders(side)
        collate = Collator({n: self.model.encoders[n].processor for n in names},
                           sorted({f for n in names for f in self.model.encoders[n].processor.modalities}))
        t = self.config.trainer
        bs = batch_size or t.eval_batch_size or 2 * t.batch_size
        batches = (collate([ds[i] for i in range(s, min(s + bs, len(ds)))]) for s in range(0, len(ds), bs))
        return side_embeddings(self.model, side, batches, self.device)

    def embed(self, data: TableSource, side: str = "query", batch_size: Optional[int] = None) -> pd.DataFrame:
        """One row of unit-vector coordinates (``e0 … e<d-1>``) per input row, indexed like the input."""
        ds = self._side_dataset(data, side)
        vec = self._embed(ds, side, batch_size)
        return pd.DataFrame(vec, index=row_index(data, len(vec)), columns=[f"e{i}" for i in range(vec.shape[1])])

    def index(self, corpus: TableSource, side: str = "response", batch_size: Optional[int] = None,
              faiss: bool = False) -> "SearchIndex":
        """A :class:`SearchIndex` over ``corpus``'s ``side`` column (built once; :meth:`SearchIndex.save`)."""
        ds = self._side_dataset(corpus, side)
        vec = self._embed(ds, side, batch_size)
        df = ds.df
        ids = (df[self.id_column].astype(str).tolist() if self.id_column and self.id_column in df.columns
               else [str(i) for i in range(len(df))])
        return SearchIndex(vec, ids, self._shown(ds, side), side, str(self.run_dir) if self.run_dir else None, faiss)

    def search(self, queries: TableSource, corpus: Union[TableSource, "SearchIndex"], top_k: int = 10,
               side: str = "query", batch_size: Optional[int] = None) -> pd.DataFrame:
        """The ``top_k`` corpus rows nearest each query (cosine): columns ``query_row``, ``rank`` (1 = best),
        ``id``, ``score``, ``value`` — ``top_k`` rows per query, best first."""
        idx = corpus if isinstance(corpus, SearchIndex) else self.index(corpus, "response" if side == "query" else "query",
                                                                         batch_size)
        q = self._embed(self._side_dataset(queries, side), side, batch_size)
        return idx.search(q, top_k)

    def score_pairs(self, data: TableSource, batch_size: Optional[int] = None) -> pd.DataFrame:
        """Each row's own pair: ``score`` (cosine of its query and response) and, for a run trained with match
        labels, ``probability`` that they belong together."""
        q = self._embed(self._side_dataset(data, "query"), "query", batch_size)
        r = self._embed(self._side_dataset(data, "response"), "response", batch_size)
        out = pd.DataFrame({"score": (q * r).sum(1)}, index=row_index(data, len(q)))
        if self.tasks:
            with torch.inference_mode():
                logit = self.model.heads["match"](torch.as_tensor(out["score"].to_numpy(), dtype=torch.float32))
            out["probability"] = torch.sigmoid(logit).numpy()
        return out

    def check_pairs(self, data: TableSource, batch_size: Optional[int] = None) -> pd.DataFrame:
        """Every row's pair scored against the rest of the table: its ``score``, the ``partner_rank`` of its own
        response among the table's responses for its query (1 = the model would pick it), the response the
        model would pick (``picked_row``, ``picked_score``) and the query and response as shown — sorted with the
        rows least likely to belong together first (by rank of the true partner, then score)."""
        dq, dr = self._side_dataset(data, "query"), self._side_dataset(data, "response")
        q, r = self._embed(dq, "query", batch_size), self._embed(dr, "response", batch_size)
        scores, rank, picked = partner_ranks(q, r, dr.df[self.columns["response"]].tolist())
        shown_q = self._shown(dq, "query")
        shown_r = self._shown(dr, "response")
        out = pd.DataFrame({"row": np.arange(len(q)), "score": np.diag(scores), "partner_rank": rank,
                            "picked_row": picked, "picked_score": scores[np.arange(len(q)), picked],
                            "query": shown_q, "response": shown_r,
                            "picked_response": [shown_r[i] for i in picked]})
        if self.id_column and self.id_column in dq.df.columns:
            out.insert(1, "id", dq.df[self.id_column].astype(str).to_numpy())
        return out.sort_values(["partner_rank", "score"], ascending=[False, True], kind="stable").reset_index(drop=True)

    # ---- classification from the towers ------------------------------------------------------
    def zero_shot(self, data: TableSource, classes: Sequence[Any], template: str = "{}", side: str = "query",
                  batch_size: Optional[int] = None) -> pd.DataFrame:
        """Classify each row's ``side`` with no labelled row: each class name written through ``template``
        (``"a photo of a {}"``) is embedded on the other side — which must be text — and a row's probabilities are
        the softmax of its cosines times the learned inverse temperature. Columns are the class names."""
        other = "response" if side == "query" else "query"
        field = self.fields[other][0]
        if not modality_of(field).free_text:
            raise ValueError(f"zero-shot classification writes the class names as the {other} side, which is "
                             f"{modality_of(field).name} in this run ({self.columns[other]!r}); it needs a text side")
        if len(classes) < 2 or "{}" not in template:
            raise ValueError("zero-shot needs at least two class names and a template with {} where the name goes "
                             f"(got {len(classes)} name(s), template {template!r})")
        names = pd.DataFrame({self.config.data.column(field): [template.format(c) for c in classes]})
        prototypes = self._embed(self._side_dataset(names, other), other, batch_size)
        vec = self._embed(self._side_dataset(data, side), side, batch_size)
        return self._softmax(vec @ prototypes.T, classes, data)

    def few_shot(self, labelled: TableSource, label: str, data: TableSource, head: str = "centroid",
                 side: str = "query", batch_size: Optional[int] = None) -> pd.DataFrame:
        """Classify ``data`` from a handful of labelled rows per class (``labelled``'s ``label`` column): the
        embeddings of ``side`` with a nearest-class-mean head (``centroid``: each class's mean direction, softmax
        of cosines × the learned inverse temperature) or a logistic regression (``logistic``, scikit-learn, on
        the unit vectors). Columns are the classes (as text)."""
        if head not in ("centroid", "logistic"):
            raise ValueError(f"few-shot head must be 'centroid' or 'logistic' (got {head!r})")
        ds = self._side_dataset(labelled, side)
        if label not in ds.df.columns:
            raise ValueError(f"the labelled table has no column {label!r}; columns: {', '.join(map(str, ds.df.columns))}")
        y = ds.df[label].astype(str).to_numpy()
        classes = sorted(set(y))
        if len(classes) < 2:
            raise ValueError(f"few-shot needs rows of at least two classes in {label!r} (got {classes})")
        train = self._embed(ds, side, batch_size)
        vec = self._embed(self._side_dataset(data, side), side, batch_size)
        if head == "logistic":
            from sklearn.linear_model import LogisticRegression

            clf = LogisticRegression(C=10.0, max_iter=2000).fit(train, y)
            return pd.DataFrame(clf.predict_proba(vec), columns=list(clf.classes_),
                                index=row_index(data, len(vec)))
        means = np.stack([train[y == c].mean(0) for c in classes])
        means /= np.linalg.norm(means, axis=1, keepdims=True).clip(1e-12)
        return self._softmax(vec @ means.T, classes, data)

    def _softmax(self, cosines: np.ndarray, classes, data) -> pd.DataFrame:
        z = float(self.model.heads["match"].scale) * cosines
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        return pd.DataFrame(p, columns=[str(c) for c in classes], index=row_index(data, len(p)))

    def _shown(self, ds: MultimodalDataset, side: str) -> List[str]:
        return [str(v) for v in ds.shown(self.fields[side][0])]


class SearchIndex:
    """Unit vectors of a corpus with the row ids and shown values; exact inner-product search (NumPy), or a FAISS
    ``IndexFlatIP`` with ``faiss=True`` when that package is installed (the same hits, faster on large corpora)."""

    def __init__(self, vectors: np.ndarray, ids: Sequence[str], values: Sequence[str], side: str = "response",
                 run: Optional[str] = None, faiss: bool = False):
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.ids, self.values, self.side, self.run = list(ids), list(values), side, run
        if len(self.ids) != len(self.vectors) or len(self.values) != len(self.vectors):
            raise ValueError(f"a search index needs one id and one value per vector ({len(self.vectors)} vectors, "
                             f"{len(self.ids)} ids, {len(self.values)} values)")
        self._faiss = None
        if faiss:
            from ..extras import require

            _faiss = require("faiss", "faiss", "a FAISS search index (faiss=True; the exact NumPy search needs nothing)")
            self._faiss = _faiss.IndexFlatIP(self.vectors.shape[1])
            self._faiss.add(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    def search(self, queries: np.ndarray, top_k: int = 10) -> pd.DataFrame:
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a positive whole number (got {top_k!r})")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"queries must be (n, {self.vectors.shape[1]}) vectors of this index's width "
                             f"(got {tuple(queries.shape)})")
        k = min(top_k, len(self))
        if self._faiss is not None:
            scores, hits = self._faiss.search(queries, k)
        else:
            sims = queries @ self.vectors.T
            hits = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(sims, hits, axis=1)
        n = len(queries)
        return pd.DataFrame({"query_row": np.repeat(np.arange(n), k), "rank": np.tile(np.arange(1, k + 1), n),
                             "id": [self.ids[j] for j in hits.ravel()], "score": scores.ravel().astype(np.float64),
                             "value": [self.values[j] for j in hits.ravel()]})

    def save(self, folder: Union[str, Path]) -> Path:
        """``folder/index.npy`` and ``folder/index.json`` (written atomically; the vectors first)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_with(folder / "index.npy", lambda tmp: _save_npy(tmp, self.vectors))
        atomic_write_json(folder / "index.json", {"format": INDEX_FORMAT, "side": self.side, "run": self.run,
                                                  "rows": len(self), "dim": int(self.vectors.shape[1]),
                                                  "ids": self.ids, "values": self.values})
        return folder

    @classmethod
    def load(cls, folder: Union[str, Path], faiss: bool = False) -> "SearchIndex":
        """Read a saved index; a file that is not one (or does not match its JSON) raises ValueError naming it."""
        folder = Path(folder)
        meta_path, vec_path = folder / "index.json", folder / "index.npy"
        for p in (meta_path, vec_path):
            if not p.is_file():
                raise FileNotFoundError(f"{str(folder)!r} is not a search index ({p.name} missing): build one with "
                                        "`mmtune search --run RUN --corpus TABLE --save-index FOLDER`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            vectors = np.load(vec_path, allow_pickle=False)
        except (ValueError, OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"search index {str(folder)!r} is damaged ({type(exc).__name__}); build it again") from None
        if (not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT or vectors.ndim != 2
                or vectors.dtype != np.float32 or len(meta.get("ids", [])) != len(vectors)):
            raise ValueError(f"search index {str(folder)!r} is damaged or of another format (format "
                             f"{meta.get('format') if isinstance(meta, dict) else '?'}; this mmtune reads "
                             f"{INDEX_FORMAT}); build it again")
        return cls(vectors, meta["ids"], meta["values"], meta.get("side", "response"), meta.get("run"), faiss)


def pairs_page(table: pd.DataFrame, pred: MatchPredictor) -> str:
    """An offline HTML page of :meth:`MatchPredictor.check_pairs` rows: each row's query and response (images
    inline), its score, the rank of its own partner and the response the model would pick instead."""
    import html

    qm, rm = modality_of(pred.fields["query"][0]), modality_of(pred.fields["response"][0])
    rows = []
    for _, r in table.iterrows():
        rows.append(f"<tr><td>{int(r['row'])}</td><td>{html.escape(str(r.get('id', '')))}</td>"
                    f"<td>{qm.render_html(r['query'])}</td><td>{rm.render_html(r['response'])}</td>"
                    f"<td>{r['score']:.3f}</td><td>{int(r['partner_rank'])}</td>"
                    f"<td>{rm.render_html(r['picked_response'])} ({r['picked_score']:.3f})</td></tr>")
    run = html.escape(str(pred.run_dir or ""))
    return ("<!doctype html><html><head><meta charset='utf-8'><title>pairs least likely to belong together</title>"
            "<style>body{font-family:sans-serif}td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left}"
            "</style></head><body><h1>Pairs least likely to belong together</h1>"
            f"<p>Run {run}. Each row's own {html.escape(pred.columns['response'])} is ranked among the table's for its "
            f"{html.escape(pred.columns['query'])}: rank 1 means the model would pick it; the worst come first.</p>"
            "<table><tr><th>row</th><th>id</th><th>query</th><th>response</th><th>score</th><th>rank of own partner"
            "</th><th>the model's pick</th></tr>" + "".join(rows) + "</table></body></html>")


def disagreement_page(table: pd.DataFrame, pred) -> str:
    """An offline HTML page of a classifier's :meth:`~mmtune.Predictor.disagreement` rows: each modality's value
    (images inline), what each predicts alone, and the disagreement."""
    import html

    mods = list(pred.modalities)
    head = "".join(f"<th>{html.escape(m)}</th>" for m in mods) + "".join(f"<th>{html.escape(m)} alone</th>" for m in mods)
    rows = []
    for _, r in table.iterrows():
        cells = "".join(f"<td>{modality_of(m).render_html(r[m])}</td>" for m in mods)
        alone = "".join(f"<td>{html.escape(str(r[f'{m} only']))} ({r[f'{m} only probability']:.2f})</td>" for m in mods)
        rows.append(f"<tr><td>{int(r['row'])}</td><td>{html.escape(str(r.get('id', '')))}</td>{cells}{alone}"
                    f"<td>{html.escape(str(r['prediction']))}</td><td>{r['disagreement']:.3f}</td></tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>rows whose modalities disagree</title>"
            "<style>body{font-family:sans-serif}td,th{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left}"
            "</style></head><body><h1>Rows whose modalities disagree</h1>"
            f"<p>Run {html.escape(str(pred.run_dir or ''))}: each modality's prediction alone (the others hidden); the "
            "rows where they differ most first.</p><table><tr><th>row</th><th>id</th>" + head +
            "<th>prediction</th><th>disagreement</th></tr>" + "".join(rows) + "</table></body></html>")


def _save_npy(path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


__all__ = ["MatchPredictor", "SearchIndex", "disagreement_page", "pairs_page"]
