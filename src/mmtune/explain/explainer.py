"""The explainer: per row, the modalities' contributions and the attributions inside each one; and the worst test
rows explained for the report."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..encoders.base import EncoderOutput
from ..extras import require
from ..modalities import MODALITIES, kind, modality_of


from .sites import _Site, _cam_from, _largest_stack, _normalise
from .summary import _plain, summarise


@dataclass
class Explanation:
    """``rows``: one dict per input row (JSON-ready); ``table``: the summary over all rows; ``images``: per row
    and field, the Grad-CAM map (h, w) in [0, 1] summing to 1 and the decoded image, for drawing."""

    rows: List[Dict[str, Any]]
    table: Dict[str, Any]
    cams: List[Dict[str, np.ndarray]] = field(default_factory=list)
    shown: List[Dict[str, Any]] = field(default_factory=list)
    activations: Dict[str, Any] = field(default_factory=dict)
    attention: List[Dict[str, Any]] = field(default_factory=list)

    def write(self, out_dir, title: str = "Explanations") -> Dict[str, Any]:
        """``explanations.html`` (self-contained), ``attributions.jsonl`` and the PNGs, in ``out_dir``."""
        from .page import write_explanations

        return write_explanations(self, out_dir, title)


class Explainer:
    """Explains a :class:`~mmtune.serving.predictor.Predictor` on the PyTorch backend. Integrated Gradients over
    the encoders' outputs starts from the bundle's reference (the training rows' average outputs; zeros for a
    bundle without one)."""

    def __init__(self, predictor, steps: int = 32, task: Optional[str] = None):
        require("captum", "explain", "explanations")
        if predictor.model is None:
            raise ValueError("explanations need the PyTorch model: load the run bundle with backend 'torch'")
        self.p = predictor
        self.model = predictor.model.eval()
        self.steps = int(steps)
        tasks = [t for t in predictor.tasks if task is None or t.name == task]
        if not tasks:
            raise KeyError(f"unknown task {task!r}; tasks: {[t.name for t in predictor.tasks]}")
        self.task = tasks[0]
        self.device = predictor.device

    # ---- pieces of the model, with gradients wherever asked -------------------------------------
    def _encode(self, inputs) -> Dict[str, EncoderOutput]:
        from ..models.classifier import _key

        out: Dict[str, EncoderOutput] = {}
        for name, enc in self.model.encoders.items():
            o = enc(**inputs[name])
            if isinstance(o, EncoderOutput):
                out[name] = o
            else:
                out.update({_key(name, sub): v for sub, v in o.items()})
        return out

    def _logits(self, outputs, present) -> torch.Tensor:
        fused = self.model.fuse(outputs, present)
        return self.model.heads[self.task.name](fused)

    def _target(self, logits: torch.Tensor) -> torch.Tensor:
        """What is explained: the log-probability of each class (single-label: a shift shared by every class
        explains nothing), the logit of each label (multi-label), the prediction (regression)."""
        if self.task.regression:
            return logits[:, 0]
        return logits if self.task.multilabel else torch.log_softmax(logits, dim=-1)

    def _proba(self, logits: torch.Tensor) -> np.ndarray:
        from ..inference import probabilities

        return probabilities(self.task, logits.detach()).cpu().numpy()

    # ---- the explanation ------------------------------------------------------------------------------
    def explain(self, data, batch_size: int = 16, activation_rows: int = 8) -> Explanation:
        ds = self.p.dataset(data, with_labels=False)
        idx = self.p.row_index(data, len(ds))
        rows, cams, shown, attention = [], [], [], []
        for start in range(0, len(ds), batch_size):
            items = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
            batch = self.p.collator(items)
            r, c, a = self._explain_batch(batch, items, ds, start)
            rows += r
            cams += c
            attention += a
            shown += [it["values"] for it in items]
        for i, row in enumerate(rows):
            row["index"] = _plain(idx[i])
            if self.p.spec.id_column:
                row["id"] = _plain(ds.df[self.p.spec.id_column].iloc[i])
        acts = self._activations(ds, min(activation_rows, len(ds))) if activation_rows else {}
        return Explanation(rows, summarise(rows, self.task), cams, shown, acts, attention)

    def _explain_batch(self, batch, items, ds, start):
        from ..inference import move

        batch = move(batch, self.device)
        inputs, present = batch["inputs"], batch["present"]
        fields = sorted(present)
        with torch.no_grad():
            outputs = self._encode(inputs)
            logits = self._logits(outputs, present)
        proba = self._proba(logits)
        pred = np.zeros(len(proba), dtype=int) if self.task.regression else proba.argmax(1)
        rows: List[Dict[str, Any]] = []
        for i in range(len(proba)):
            row: Dict[str, Any] = {"row": start + i + 1}
            if self.task.regression:
                row["prediction"] = float(proba[i, 0])
            else:
                row["prediction"] = _plain(self.task.classes[pred[i]])
                row["probability"] = float(proba[i, pred[i]])
            rows.append(row)
        # by masking: each field hidden; and each field alone (the others hidden)
        masked, alone = {}, {}
        with torch.no_grad():
            for f in fields:
                masked[f] = self._proba(self._logits(outputs, {**present, f: torch.zeros_like(present[f])}))
                alone[f] = self._proba(self._logits(outputs, {g: (v if g == f else torch.zeros_like(v)) for g, v in present.items()}))
        for i, row in enumerate(rows):
            col = 0 if self.task.regression else pred[i]
            row["contribution_masking"] = {f: float(proba[i, col] - masked[f][i, col]) for f in fields}
            if not self.task.regression:
                row["alone"] = {f: {"prediction": _plain(self.task.classes[int(alone[f][i].argmax())]),
                                    "probability": float(alone[f][i].max())} for f in fields}
                row["disagreement"] = _disagreement([alone[f][i] for f in fields if bool(present[f][i])])
        self._share(outputs, present, pred, rows)
        self._text(inputs, outputs, present, pred, rows, items)
        self._tabular(inputs, outputs, present, pred, rows)
        cams = self._cams(inputs, outputs, present, pred, len(rows))
        attention = self._fusion_state(outputs, present, rows)
        return rows, cams, attention

    def _share(self, outputs, present, pred, rows) -> None:
        """Integrated Gradients over every encoder output (pooled vectors and token sequences) from zeros: each
        field's signed sum, its share of the total |sum|, and the completeness gap."""
        from captum.attr import IntegratedGradients

        keys = sorted(outputs)
        tensors, slots = [], []
        for k in keys:
            tensors.append(outputs[k].pooled.detach())
            slots.append((k, "pooled"))
            if outputs[k].tokens is not None:
                tensors.append(outputs[k].tokens.detach())
                slots.append((k, "tokens"))
        masks = [outputs[k].mask for k in keys]

        n = len(rows)

        def run(values):
            """The explained outputs from the encoder outputs ``values`` (one per slot) of ``k × n`` rows — Integrated
            Gradients passes its steps stacked — the fixed ones (masks, present-masks, unused slots) repeated to match."""
            size = max(t.shape[0] for t in values)
            reps = size // n
            parts: Dict[str, Dict[str, torch.Tensor]] = defaultdict(dict)
            for (k, what), t in zip(slots, values):
                parts[k][what] = t if t.shape[0] == size else t.repeat(reps, *([1] * (t.dim() - 1)))
            outs = {k: EncoderOutput(parts[k]["pooled"], parts[k].get("tokens"),
                                     None if m is None else m.repeat(reps, *([1] * (m.dim() - 1)))) for k, m in zip(keys, masks)}
            return self._target(self._logits(outs, {f: v.repeat(reps) for f, v in present.items()}))

        # only what the fusion reads is attributed (a concat fusion reads no tokens; attention fusions may ignore
        # the pooled vectors): the rest stays fixed
        with torch.enable_grad():
            leaves = [t.clone().requires_grad_(True) for t in tensors]
            grads = torch.autograd.grad(run(leaves).sum(), leaves, allow_unused=True)
        used = [g is not None for g in grads]

        def forward(*args):
            it = iter(args)
            return run([next(it) if u else t for u, t in zip(used, tensors)])

        target = None if self.task.regression else torch.as_tensor(pred, device=self.device)
        ig = IntegratedGradients(forward)
        reference = getattr(self.p, "reference", None) or {}
        bases = [reference[f"{k}::{what}"].to(t).expand_as(t).contiguous() if f"{k}::{what}" in reference else torch.zeros_like(t)
                 for (k, what), t in zip(slots, tensors)]
        chosen = tuple(t for u, t in zip(used, tensors) if u)
        attrs_used, delta = ig.attribute(chosen, baselines=tuple(b for u, b in zip(used, bases) if u), target=target,
                                         n_steps=self.steps, method="gausslegendre", return_convergence_delta=True)
        it = iter(attrs_used)
        attrs = [next(it) if u else torch.zeros_like(t) for u, t in zip(used, tensors)]
        per_key = defaultdict(lambda: torch.zeros(len(rows), device=self.device))
        for (k, what), a in zip(slots, attrs):
            per_key[k] = per_key[k] + a.reshape(len(rows), -1).sum(1)
        with torch.no_grad():
            full = self._target(self._logits(outputs, present))
            zero = run([b if u else t for u, t, b in zip(used, tensors, bases)])
        full = full if self.task.regression else full.gather(1, target[:, None])[:, 0]
        zero = zero if self.task.regression else zero.gather(1, target[:, None])[:, 0]
        for i, row in enumerate(rows):
            signed = {self.model.output_modality[k]: float(per_key[k][i]) for k in keys}
            total = sum(abs(v) for v in signed.values()) or 1.0
            row["attribution"] = signed
            row["attribution_share"] = {f: abs(v) / total for f, v in signed.items()}
            diff = float(full[i] - zero[i])
            row["completeness"] = {"sum": float(sum(signed.values())), "logit_difference": diff,
                                   "delta": float(delta[i])}

    def _replacing(self, name: str, enc, names: List[str], outputs, present):
        """A forward function of encoder ``name``'s input tensors (``names``, in that order) to the explained
        outputs, every other encoder's outputs held fixed, and the fixed tensors it takes after them."""
        others = sorted(k for k in outputs if k != name and not k.startswith(name + "."))
        fields = sorted(present)
        n = len(names)

        def forward(*args):
            kw = dict(zip(names, args[:n]))
            rest = args[n:]
            k = len(others)
            outs = {key: EncoderOutput(p, t, m) for key, p, t, m in zip(others, rest[:k], rest[k:2 * k], rest[2 * k:3 * k])}
            own = enc(**kw)
            if isinstance(own, EncoderOutput):
                outs[name] = own
            else:
                from ..models.classifier import _key

                outs.update({_key(name, sub): v for sub, v in own.items()})
            return self._target(self._logits(outs, dict(zip(fields, rest[3 * k:]))))

        fixed = (tuple(outputs[k].pooled.detach() for k in others)
                 + tuple(outputs[k].tokens.detach() if outputs[k].tokens is not None else None for k in others)
                 + tuple(outputs[k].mask for k in others) + tuple(present[f] for f in fields))
        return forward, fixed

    def _tabular(self, inputs, outputs, present, pred, rows) -> None:
        """Per column: Integrated Gradients on the tabular encoder's column tokens (captum's
        LayerIntegratedGradients), from the average row — numbers at their training mean, no number missing,
        every category the unknown one."""
        from captum.attr import LayerIntegratedGradients

        for name, enc in self.model.encoders.items():
            if enc.modality != "tabular" or not hasattr(enc, "norm"):
                continue
            field = getattr(enc, "field", None) or enc.modality
            names = ["numbers", "missing", "categories"]
            forward, fixed = self._replacing(name, enc, names, outputs, present)
            x = tuple(inputs[name][k] for k in names)
            baseline = tuple(torch.zeros_like(t) for t in x)
            target = None if self.task.regression else torch.as_tensor(pred, device=self.device)
            attrs = LayerIntegratedGradients(forward, enc.norm).attribute(
                x, baselines=baseline, target=target, additional_forward_args=fixed, n_steps=self.steps,
                method="gausslegendre")
            per_column = attrs.sum(-1).detach().cpu().numpy()
            order = list(enc.processor.numeric) + list(enc.processor.categorical)
            for i, row in enumerate(rows):
                row.setdefault("columns", {})[field] = {str(c): float(per_column[i, j]) for j, c in enumerate(order)}

    def _text(self, inputs, outputs, present, pred, rows, items) -> None:
        """Integrated Gradients on each text encoder's input embeddings (baseline: the padding token in place of
        every ordinary token), summed over the embedding and merged into words."""
        from captum.attr import LayerIntegratedGradients

        for name, enc in self.model.encoders.items():
            field = getattr(enc, "field", None) or enc.modality
            model = getattr(enc, "model", None)
            if kind(field) != "text" or enc.modality != "text" or not hasattr(model, "get_input_embeddings"):
                continue
            tok = enc.processor.tokenizer
            names = ["input_ids", *sorted(k for k in inputs[name] if k != "input_ids")]
            forward, fixed = self._replacing(name, enc, names, outputs, present)
            ids = inputs[name]["input_ids"]
            special = torch.zeros_like(ids, dtype=torch.bool)
            for sid in tok.all_special_ids:
                special |= ids == sid
            pad = tok.pad_token_id if tok.pad_token_id is not None else 0
            baseline = torch.where(special, ids, torch.full_like(ids, pad))
            extra = tuple(inputs[name][n] for n in names[1:]) + fixed
            lig = LayerIntegratedGradients(forward, model.get_input_embeddings())
            target = None if self.task.regression else torch.as_tensor(pred, device=self.device)
            attrs, delta = lig.attribute(ids, baselines=baseline, target=target, additional_forward_args=extra,
                                         n_steps=self.steps, method="gausslegendre", return_convergence_delta=True)
            per_token = attrs.sum(-1).detach().cpu().numpy()
            texts = [it["values"].get(field) or "" for it in items]
            enc_words = tok(texts, padding=True, truncation=True, max_length=enc.processor.max_length,
                            return_offsets_mapping=True)
            for i, row in enumerate(rows):
                words = _merge_words(texts[i], enc_words, i, per_token[i])
                row.setdefault("words", {})[field] = words
                row.setdefault("text_completeness", {})[field] = {"sum": float(per_token[i].sum()), "delta": float(delta[i])}

    def _cams(self, inputs, outputs, present, pred, n) -> List[Dict[str, np.ndarray]]:
        """Grad-CAM per file field: captum's LayerGradCam on the last block's feature map (CNNs); for a
        transformer's tokens, the same formula over the tokens entering its last block (:func:`_cam_from`)."""
        from captum.attr import LayerGradCam

        cams: List[Dict[str, np.ndarray]] = [dict() for _ in range(n)]
        target = None if self.task.regression else torch.as_tensor(pred, device=self.device)
        for name, enc in self.model.encoders.items():
            field = getattr(enc, "field", None) or enc.modality
            if kind(field) not in MODALITIES or not modality_of(kind(field)).files:
                continue  # maps over pictures and recordings only; a joint encoder (CLIP) gets none
            with _Site(enc) as site, torch.enable_grad():
                encoded = self._encode(inputs)
                if site.value is None:
                    continue
                if site.value.dim() == 4:
                    maps = None
                else:
                    logits = self._target(self._logits(encoded, present))
                    score = logits.sum() if target is None else logits.gather(1, target[:, None]).sum()
                    grad, = torch.autograd.grad(score, site.value)
                    maps = _cam_from(site.value, grad)
            if maps is None:
                names = sorted(inputs[name])
                forward, fixed = self._replacing(name, enc, names, outputs, present)
                with torch.enable_grad():
                    attr = LayerGradCam(forward, site.block).attribute(
                        tuple(inputs[name][k] for k in names), target=target, additional_forward_args=fixed,
                        relu_attributions=True)
                maps = attr[:, 0].detach().cpu().numpy()
            for i in range(n):
                if bool(present[field][i]):
                    cams[i][field] = _normalise(maps[i])
        return cams

    def _fusion_state(self, outputs, present, rows) -> List[Dict[str, Any]]:
        """The gates (``gated``) and attention weights (``cross_attention``) of these rows: per query field, its
        tokens' attention over the null key and the other fields' tokens, and which tokens are real."""
        fusion = self.model.fusion
        with torch.no_grad():
            self._logits(outputs, present)  # the fusion keeps what its last call computed: these rows'
        out: List[Dict[str, Any]] = [dict() for _ in rows]
        gates = getattr(fusion, "last_gates", None)
        if gates is not None and gates.shape[0] == len(rows):
            keys = getattr(fusion, "keys", [])
            for i, row in enumerate(rows):
                row["gates"] = {self.model.output_modality[k]: float(gates[i, j].mean()) for j, k in enumerate(keys)}
        attn = getattr(fusion, "last_attention", None) or {}
        for k, w in attn.items():
            if w.shape[0] != len(rows):
                continue
            mask = outputs[k].mask
            for i in range(len(rows)):
                out[i][self.model.output_modality[k]] = {
                    "weights": w[i].cpu().numpy(),
                    "keys": [self.model.output_modality.get(x, x) for x in fusion.last_attention_keys[k]],
                    "query_mask": None if mask is None else mask[i].cpu().numpy()}
        return out

    def _activations(self, ds, n: int) -> Dict[str, Any]:
        """Per encoder block (its main stack): mean, standard deviation, a histogram, and the share of units that
        never turn positive (dead), never change (constant) or sit at the block's extreme (saturated) over ``n``
        rows."""
        from ..inference import move

        batch = move(self.p.collator([ds[i] for i in range(n)]), self.device)
        stats: Dict[str, Any] = {}
        handles = []
        for name, enc in self.model.encoders.items():
            stack = _largest_stack(enc)
            if stack is None:
                continue
            for j, block in enumerate(stack):
                def hook(module, args, out, key=f"{name}/{j}"):
                    t = out[0] if isinstance(out, (tuple, list)) else out
                    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                        return
                    x = t.detach().float()
                    units = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() == 4 else x.reshape(-1, x.shape[-1]).T
                    hist, edges = np.histogram(x.cpu().numpy().ravel(), bins=30)
                    top = float(units.abs().max()) or 1.0
                    stats[key] = {"mean": float(x.mean()), "std": float(x.std()),
                                  "dead_fraction": float((units.max(1).values <= 0).float().mean()),
                                  "constant_fraction": float((units.std(1) < 1e-6).float().mean()),
                                  # at the block's own extreme (|x| >= 95 % of its largest) for 90 % of rows and positions
                                  "saturated_fraction": float(((units.abs() >= 0.95 * top).float().mean(1) >= 0.9).float().mean()),
                                  "units": int(units.shape[0]), "histogram": hist.tolist(),
                                  "edges": [float(e) for e in edges]}
                handles.append(block.register_forward_hook(hook))
        try:
            with torch.no_grad():
                self.model(batch["inputs"], batch["present"])
        finally:
            for h in handles:
                h.remove()
        return {"rows": n, "layers": stats}


def _merge_words(text: str, encoding, i: int, scores: np.ndarray) -> List[Dict[str, Any]]:
    """Sub-word tokens back into the words of ``text`` (by the tokenizer's word ids and character offsets), each
    word's attribution the sum of its tokens'."""
    word_ids = encoding.word_ids(i)
    offsets = encoding["offset_mapping"][i]
    spans: Dict[int, List[int]] = {}
    score: Dict[int, float] = defaultdict(float)
    for t, w in enumerate(word_ids):
        if w is None or t >= len(scores):
            continue
        s, e = offsets[t]
        span = spans.setdefault(w, [s, e])
        span[0], span[1] = min(span[0], s), max(span[1], e)
        score[w] += float(scores[t])
    return [{"word": text[s:e], "attribution": score[w], "start": int(s), "end": int(e)}
            for w, (s, e) in sorted(spans.items())]


def _disagreement(probs: List[np.ndarray]) -> float:
    """The largest total-variation distance between the predictions of two modalities alone."""
    best = 0.0
    for a in range(len(probs)):
        for b in range(a + 1, len(probs)):
            best = max(best, 0.5 * float(np.abs(probs[a] - probs[b]).sum()))
    return best


def explain_worst(predictor, frame, base_dir, n: int, out_dir) -> Dict[str, Any]:
    """Explain the ``n`` most confidently misclassified rows of ``frame`` (labelled; the first single-label
    task) into ``out_dir``; what fit links from the report. Returns what it wrote, or why it wrote nothing."""
    from ..data.manifest import absolute_paths
    from ..extras import available
    from ..evaluation.metrics import decide

    if not available("captum"):
        return {"skipped": "captum is not installed: pip install 'mmtune[explain]'"}
    task = next((t for t in predictor.tasks if not t.multilabel and not t.regression), None)
    if task is None:
        return {"skipped": "no single-label task"}
    df = frame.copy()
    absolute_paths(df, predictor.config, base_dir)
    proba = predictor.predict_proba(df, task=task.name)
    proba = proba[[str(c) for c in task.classes]].to_numpy()
    pred = np.asarray([task.classes.index(c) for c in decide(task, proba, predictor.calibration[task.name])])
    y = np.asarray([task.encode(v) for v in df[task.column]])
    wrong = np.where(pred != y)[0]
    chosen = wrong[np.argsort(-proba[wrong, pred[wrong]])][:n]
    if not len(chosen):
        return {"rows": 0, "note": "no misclassified rows"}
    rows = df.iloc[chosen]
    expl = Explainer(predictor, task=task.name).explain(rows)
    for r, i in zip(expl.rows, chosen):
        r["true"] = _plain(task.classes[y[i]])
    written = expl.write(out_dir, f"The {len(chosen)} most confidently misclassified rows")
    return {"rows": int(len(chosen)), "page": str(Path(written["html"]).relative_to(Path(out_dir).parent))}
