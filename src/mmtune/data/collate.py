"""Turn a list of samples into model inputs with each encoder's own processor."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch


class Collator:
    """Builds ``{"inputs": {encoder: {tensor name: tensor}}, "present": {modality: BoolTensor},
    "labels": {task: LongTensor (B,) or FloatTensor (B, C) multi-hot}, "index": LongTensor}``.

    ``processors`` maps an encoder name to its processor (see ``mmtune.encoders.processors``);
    a processor declares the modalities it reads. A missing value is replaced by the
    processor's blank input and marked absent in ``present``; the model never sees a crash.
    """

    def __init__(self, processors: Mapping[str, Any], modalities: Sequence[str],
                 value_augments: Optional[Mapping[str, Any]] = None, keep_samples: bool = False):
        self.processors = dict(processors)
        self.modalities = sorted(modalities)
        self.value_augments = dict(value_augments or {})  # modality -> function of a raw value; training only
        self.keep_samples = bool(keep_samples)
        """Also return the decoded samples (``samples``), for another set of processors to read (an ensemble whose
        members fitted their processors apart: :class:`~mmtune.ensemble.EnsembleRunner`)."""
        readers = [m for proc in self.processors.values() for m in proc.modalities]
        self._shared = {m for m in readers if readers.count(m) > 1}
        """Modalities more than one processor reads: :meth:`prepare` leaves their values as decoded."""

    def inputs(self, samples: List[Dict[str, Any]], tokens: Optional[Mapping[str, Any]] = None
               ) -> Dict[str, Dict[str, torch.Tensor]]:
        """Each encoder's input tensors for ``samples``, from its processor; an encoder in ``tokens`` (its texts'
        :class:`~mmtune.encoders.processors.Tokens`, by dataset row: :meth:`lengths` keeps them) pads those instead
        of tokenising again."""
        out = {}
        for name, proc in self.processors.items():
            columns = {m: [s["values"].get(m) for s in samples] for m in proc.modalities}
            if tokens and name in tokens and not self.value_augments:
                out[name] = proc.pad(tokens[name], [s["index"] for s in samples], columns)
            else:
                out[name] = proc(columns)
        return out

    def prepare(self, samples: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """``samples`` with each processor's per-value work done ahead of :meth:`__call__` (an image resized to the
        encoder's side), which then makes the same batch of them: what prediction's decoding threads do, so that this
        work runs in parallel. Left undone where the raw values are still needed: value augments (training) change
        them first, and :attr:`keep_samples` hands them to other processors."""
        if self.value_augments or self.keep_samples:
            return samples
        for proc in self.processors.values():
            if not callable(getattr(proc, "prepare", None)):
                continue
            # a value another processor reads too is left as decoded: each resizes it to its own side
            mine = [m for m in proc.modalities if m not in self._shared]
            if not mine:
                continue
            done = proc.prepare({m: [s["values"].get(m) for s in samples] for m in proc.modalities})
            for m, values in done.items():
                if m not in mine:
                    continue
                for sample, value in zip(samples, values):
                    sample["values"][m] = value
        return samples

    def sides(self) -> Dict[str, int]:
        """Per modality a processor resizes (images), the largest side one resizes it to: what a dataset may decode
        it at (:func:`read_options`)."""
        out: Dict[str, int] = {}
        for proc in self.processors.values():
            got = proc.sides() if callable(getattr(proc, "sides", None)) else {}
            for m, side in got.items():
                if m in self.modalities and side:
                    out[m] = max(out.get(m, 0), int(side))
        return out

    def lengths(self, dataset, chunk: int = 4096, keep: Optional[Dict[str, Any]] = None) -> Optional[np.ndarray]:
        """Per row of ``dataset``, the positions its inputs fill in a batch before padding, summed over the
        processors that pad (a text processor: the row's token count); None when none does. What batches are
        sorted or bucketed by, so that a batch pads little. Read ``chunk`` rows at a time. With ``keep`` (a dict),
        each processor that can (``tokens``) counts by tokenising its texts once and leaves the tokens there, by
        encoder name, for :meth:`__call__` to pad."""
        columns = dict(getattr(dataset, "columns", ()))
        total = None
        for name, proc in self.processors.items():
            if not callable(getattr(proc, "lengths", None)) or not all(m in columns for m in proc.modalities):
                continue
            kept = keep is not None and callable(getattr(proc, "tokens", None)) and callable(getattr(proc, "pad", None))
            parts, tokens = [], []
            for start in range(0, len(dataset), chunk):
                rows = np.arange(start, min(start + chunk, len(dataset)))
                cells = {m: dataset.take(m, rows) for m in proc.modalities}
                got = proc.tokens(cells) if kept else None
                if got is not None:
                    tokens.append(got)
                    got = got.lengths
                else:
                    kept = False
                    got = proc.lengths(cells)
                if got is None:
                    break
                parts.append(np.asarray(got, dtype=np.int64))
            else:
                counts = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
                total = counts if total is None else total + counts
                if kept and tokens:
                    keep[name] = type(tokens[0]).concat(tokens)
        return total

    def __call__(self, samples: List[Dict[str, Any]], tokens: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        present = {
            m: torch.tensor([s["values"].get(m) is not None for s in samples], dtype=torch.bool)
            for m in self.modalities
        }
        if self.value_augments:
            samples = [{**s, "values": {m: (self.value_augments[m](v) if m in self.value_augments and v is not None else v)
                                        for m, v in s["values"].items()}} for s in samples]
        batch = {
            "inputs": self.inputs(samples, tokens),
            "present": present,
            "labels": collate_labels(samples),
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
        }
        if samples and "weight" in samples[0]:
            batch["weights"] = torch.tensor([s["weight"] for s in samples], dtype=torch.float32)
        if self.keep_samples:
            batch["samples"] = samples
        return batch


def read_options(config, collators: Sequence[Optional[Collator]], modalities: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Per modality whose files take options (``Modality.read_options``: images), the keyword arguments its files are
    read with for ``collators``' processors, as ``config`` says: ``side``, the largest side any of them resizes it
    to (``data.jpeg_draft``), and ``orient`` (``data.exif_orientation``). What a dataset's ``reads`` holds, the same in
    training, prediction and the server; a modality left out is read as stored."""
    from ..modalities import modality_of

    sides: Dict[str, int] = {}
    if config.data.jpeg_draft:
        for collator in collators:
            for m, side in (collator.sides() if collator is not None else {}).items():
                sides[m] = max(sides.get(m, 0), side)
    out: Dict[str, Dict[str, Any]] = {}
    for m in modalities:
        takes = modality_of(m).read_options
        opts: Dict[str, Any] = {}
        if "side" in takes and sides.get(m):
            opts["side"] = sides[m]
        if "orient" in takes and config.data.exif_orientation:
            opts["orient"] = True
        if opts:
            out[m] = opts
    return out


def collate_labels(samples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    out = {}
    for task in samples[0]["labels"] if samples else ():
        vals = [s["labels"][task] for s in samples]
        out[task] = torch.tensor(vals, dtype=torch.float32 if isinstance(vals[0], (list, float)) else torch.long)
    return out
