"""The yardstick of every run: a linear probe on the frozen pretrained encoders' pooled features.

Before anything trains, each pretrained encoder's pooled output for every row is taken from the embedding
cache (computed once per rows and encoder; a frozen run reuses it), the features of all encoders are
concatenated with the rows' present-masks, standardised, and a multinomial logistic regression
(scikit-learn) is fitted on the training split for each single-label task, its regularisation ``C`` chosen
on the validation split (log loss). Its test metrics stand beside the model's in ``metrics.json`` — so a
run shows at once whether fine-tuning bought anything over the frozen features."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

C_GRID = (0.01, 0.1, 1.0, 10.0)


def probe_frames(data, max_train_rows: Optional[int] = None, seed: int = 0):
    """Per split, the rows the probe reads: every row, except that a training split longer than
    ``max_train_rows`` is a seeded sample of that many rows (in table order)."""
    frames = dict(data.prepared.frames)
    n = len(frames["train"])
    if max_train_rows is not None and n > max_train_rows:
        keep = np.sort(np.random.default_rng(seed).choice(n, max_train_rows, replace=False))
        frames["train"] = frames["train"].take(keep).reset_index(drop=True)
    return frames


def _reads(cfg, model, modalities) -> Dict[str, Dict[str, Any]]:
    """How the rows' files are read for ``model``'s processors, as in training (``read_options``)."""
    from ..data.collate import Collator, read_options

    return read_options(cfg, [Collator({n: e.processor for n, e in model.encoders.items()}, modalities)], modalities)


def probe_features(model, data, cache_dir: Path, batch_size: int,
                   frames: Optional[Dict[str, Any]] = None) -> Optional[Dict[str, np.ndarray]]:
    """Per split, (N, D) features of the pretrained encoders (those trained from scratch are left out) and the
    present-masks, for the rows of ``frames`` (default: every row of every split); None when no encoder is
    pretrained."""
    from ..data.dataset import MultimodalDataset
    from ..finetune.shards import as_tensor
    from ..finetune.feature_cache import cached_outputs, present_masks
    from ..finetune.fingerprints import encoder_fingerprint

    cfg = data.cfg
    names = [n for n, e in model.encoders.items() if not getattr(e, "from_scratch", False)]
    if not names:
        return None
    frames = frames or data.prepared.frames
    specs = {n: cfg.model.encoders[n].model_dump(mode="json") for n in names}
    prints = {n: encoder_fingerprint(model.encoders[n], specs[n]) for n in names}
    out = {}
    reads = _reads(cfg, model, data.modalities)
    for split in data.splits:
        ds = MultimodalDataset(frames[split], data.prepared.spec, data.prepared.base_dirs[split], False, data.modalities,
                               reads=reads)
        parts = []
        for n in names:
            for sub, d in sorted(cached_outputs(n, model.encoders[n], specs[n], ds, cache_dir, batch_size, False,
                                                prints[n]).items()):
                parts.append(as_tensor(d["pooled"]).numpy().astype(np.float64))
        present = present_masks(ds, data.modalities)
        parts += [present[m].numpy()[:, None].astype(np.float64) for m in sorted(present)]
        out[split] = np.concatenate(parts, axis=1)
    return out


def few_shot_heads(X: Dict[str, np.ndarray], y: Dict[str, np.ndarray], n_classes: int, k: int, seed: int = 0,
                   ece_bins: int = 15, classes=None) -> Optional[Dict[str, Any]]:
    """Heads fitted on ``k`` training rows per class (a seeded draw) of the standardised features ``X``: a logistic
    regression (C = 1) and a nearest-class-mean head (softmax over the cosines to each class's mean, ×10); their
    validation / test metrics. None when some class has fewer than ``k`` training rows."""
    from sklearn.linear_model import LogisticRegression

    from .metrics import classification_metrics

    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_classes):
        idx = np.flatnonzero(y["train"] == c)
        if len(idx) < k:
            return None
        rows.extend(rng.choice(idx, k, replace=False).tolist())
    Xk, yk = X["train"][rows], y["train"][rows]
    clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed).fit(Xk, yk)
    means = np.stack([Xk[yk == c].mean(0) for c in range(n_classes)])
    means /= np.linalg.norm(means, axis=1, keepdims=True).clip(1e-12)
    out: Dict[str, Any] = {"k": k, "rows": len(rows), "logistic": {}, "centroid": {}}
    for s in ("val", "test"):
        if s not in X:
            continue
        unit = X[s] / np.linalg.norm(X[s], axis=1, keepdims=True).clip(1e-12)
        z = 10.0 * unit @ means.T
        p = np.exp(z - z.max(1, keepdims=True))
        for head, proba in (("logistic", _full(clf, X[s], n_classes)), ("centroid", p / p.sum(1, keepdims=True))):
            m = classification_metrics(y[s].tolist(), proba, classes, ece_bins=ece_bins)
            out[head][s] = {key: m[key] for key in ("accuracy", "f1_macro") if key in m}
    return out


def zero_shot(model, data, frames, task, template: str, batch_size: int, cache_dir: Path) -> Optional[Dict[str, Any]]:
    """Classification by the class names before any training, when an encoder is a joint image–text one (its
    outputs ``image`` and ``text`` in one space, as CLIP's): each class name through ``template`` embedded by
    the text tower, each row's image by the image tower (from the embedding cache), the most similar name wins.
    Accuracy and macro F1 on validation and test; None without such an encoder."""
    import torch

    from ..data.dataset import MultimodalDataset, encode_labels
    from ..finetune.shards import as_tensor
    from ..finetune.feature_cache import cached_outputs
    from ..finetune.fingerprints import encoder_fingerprint
    from .metrics import classification_metrics

    joint = [n for n, e in model.encoders.items() if {"image", "text"} <= set(e.output_modalities())]
    if not joint:
        return None
    name = joint[0]
    enc = model.encoders[name]
    spec = data.cfg.model.encoders[name].model_dump(mode="json")
    prompts = [template.format(c) for c in task.classes]
    with torch.no_grad():
        names = enc(**enc.processor({"image": [None] * len(prompts), "text": prompts}))["text"].pooled.float()
    names = torch.nn.functional.normalize(names, dim=-1).numpy()
    out: Dict[str, Any] = {"template": template, "encoder": name}
    for s in ("val", "test"):
        if s not in frames:
            continue
        ds = MultimodalDataset(frames[s], data.prepared.spec, data.prepared.base_dirs[s], False, data.modalities,
                               reads=_reads(data.cfg, model, data.modalities))
        feats = cached_outputs(name, enc, spec, ds, cache_dir, batch_size, False, encoder_fingerprint(enc, spec))
        img = as_tensor(feats["image"]["pooled"]).float()
        img = torch.nn.functional.normalize(img, dim=-1).numpy()
        z = 100.0 * img @ names.T
        p = np.exp(z - z.max(1, keepdims=True))
        m = classification_metrics(encode_labels(task, frames[s][task.column]).tolist(), p / p.sum(1, keepdims=True),
                                   task.classes)
        out[s] = {key: m[key] for key in ("accuracy", "f1_macro") if key in m}
    return out


def linear_probe(model, data, cache_dir: Path, batch_size: int, ece_bins: int = 15, seed: int = 0,
                 max_train_rows: Optional[int] = None, few_shot: Sequence[int] = (),
                 zero_shot_template: Optional[str] = None) -> Dict[str, Any]:
    """``{task: {"C", "val", "test"}}`` for each single-label task (metrics as for the model, from
    :func:`~mmtune.evaluation.metrics.classification_metrics`); ``{}`` when there is nothing to probe. The
    regression is fitted on at most ``max_train_rows`` training rows (a seeded sample), so that its features
    stay small however long the table. ``few_shot``: also heads on k rows per class for each k
    (:func:`few_shot_heads`); ``zero_shot_template``: also zero-shot by the class names when an encoder is a
    joint image–text one (:func:`zero_shot`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.preprocessing import StandardScaler

    from ..data.dataset import encode_labels
    from .metrics import classification_metrics

    import torch

    tasks = [t for t in data.tasks if not t.multilabel and not getattr(t, "regression", False)]
    frames = probe_frames(data, max_train_rows, seed)
    with torch.random.fork_rng(devices=[]):  # reading the rows draws from torch's generator: the run must not notice
        feats = probe_features(model, data, cache_dir, batch_size, frames) if tasks else None
    if feats is None:
        return {}
    scaler = StandardScaler().fit(feats["train"])
    X = {s: scaler.transform(f) for s, f in feats.items()}
    out: Dict[str, Any] = {}
    for t in tasks:
        y = {s: encode_labels(t, frames[s][t.column]) for s in feats}
        if len(np.unique(y["train"])) < 2:
            continue
        best = None
        for c in C_GRID:
            clf = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(X["train"], y["train"])
            p = _full(clf, X["val"], len(t.classes))
            loss = log_loss(y["val"], np.clip(p, 1e-12, 1), labels=list(range(len(t.classes))))
            if best is None or loss < best[0]:
                best = (loss, c, clf)
        _, c, clf = best
        entry: Dict[str, Any] = {"C": c, "train_rows": int(len(y["train"]))}
        for s in ("val", "test"):
            if s in X:
                entry[s] = classification_metrics(y[s].tolist(), _full(clf, X[s], len(t.classes)), t.classes,
                                                  ece_bins=ece_bins)
        shots = {str(k): f for k in few_shot
                 for f in [few_shot_heads(X, y, len(t.classes), k, seed, ece_bins, t.classes)] if f is not None}
        if shots:
            entry["few_shot"] = shots
        if zero_shot_template is not None:
            with torch.random.fork_rng(devices=[]):
                zs = zero_shot(model, data, frames, t, zero_shot_template, batch_size, cache_dir)
            if zs is not None:
                entry["zero_shot"] = zs
        out[t.name] = entry
    return out


def _full(clf, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities over every class (a class absent from the training rows gets 0)."""
    p = np.zeros((len(X), n_classes))
    p[:, clf.classes_] = clf.predict_proba(X)
    return p


def compare(model_metrics: Dict[str, Any], probe: Dict[str, Any]) -> Dict[str, Any]:
    """The model's test (else validation) metrics minus the probe's, per task."""
    split = "test" if "test" in model_metrics else "val"
    out = {}
    for task, entry in probe.items():
        m, p = model_metrics.get(split, {}).get(task, {}), entry.get(split, {})
        out[task] = {"split": split, **{k: m[k] - p[k] for k in ("accuracy", "f1_macro", "log_loss")
                                        if isinstance(m.get(k), (int, float)) and isinstance(p.get(k), (int, float))}}
    return out
