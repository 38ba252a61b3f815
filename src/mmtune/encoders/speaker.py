"""An offline pretrained audio encoder: the speaker encoder (a 3-layer LSTM over 40-band mel frames, 256-d
embeddings, trained for speaker verification) whose weights ship inside the ``resemblyzer`` package.

Only the weights file is read (``pip install --no-deps resemblyzer``: the package's own imports — librosa,
webrtcvad — are not needed); the network and its input features are written here: 16 kHz audio raised to
-30 dBFS, a mel power spectrogram (25 ms windows, 10 ms hop, 40 Slaney-scale bands), cut into partial
utterances of 160 frames (1.6 s) at half-overlap; each partial is embedded and the embeddings are averaged
(padding partials masked) and L2-normalised. The partial embeddings are the tokens."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from .base import Encoder, EncoderOutput
from .offline import OFFLINE_ENCODERS, Preset
from .processors import register_kind

RATE, N_FFT, HOP, N_MELS, PARTIAL, STEP = 16000, 400, 160, 40, 160, 80


def slaney_mel_filterbank(sr: int = RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the Slaney mel scale (linear below 1 kHz, logarithmic
    above), each scaled to unit area ("slaney" normalisation) — the filters the encoder was trained with."""
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, np.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp

    def to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)

    def to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    edges = to_hz(np.linspace(to_mel(0.0), to_mel(sr / 2), n_mels + 2))
    fdiff, ramps = np.diff(edges), edges[:, None] - freqs[None, :]
    weights = np.maximum(0, np.minimum(-ramps[:-2] / fdiff[:-1, None], ramps[2:] / fdiff[1:, None]))
    return (weights * (2.0 / (edges[2:n_mels + 2] - edges[:n_mels]))[:, None]).astype(np.float32)


class SpeakerProcessor:
    """Clips -> ``mels`` (B, P, 160, 40) partial utterances and ``partials`` (B, P) (False: padding)."""

    modalities = ("audio",)
    kind = "speaker_mel"

    def __init__(self, max_seconds: float = 10.0):
        self.max_seconds = float(max_seconds)
        self.sampling_rate = RATE
        self._fb = torch.tensor(slaney_mel_filterbank())

    def _mel(self, x: np.ndarray) -> torch.Tensor:
        rms = float(np.sqrt(np.mean(x ** 2))) if len(x) else 0.0
        if rms > 0:  # raise quiet clips to -30 dBFS (never lower loud ones), as in training
            gain = 10 ** ((-30.0 - 20 * np.log10(rms)) / 20)
            x = x * max(1.0, gain)
        spec = torch.stft(torch.tensor(x, dtype=torch.float32), N_FFT, HOP, window=torch.hann_window(N_FFT),
                          center=True, pad_mode="constant", return_complex=True).abs() ** 2
        return (self._fb @ spec).T  # (frames, 40), power

    def __call__(self, columns: Mapping[str, List[Any]]) -> Dict[str, torch.Tensor]:
        from .audio import _clip

        mels = [self._mel(_clip(c, RATE, self.max_seconds)) for c in columns["audio"]]
        n_part = [max(1, int(np.ceil(max(0, len(m) - PARTIAL) / STEP)) + 1) for m in mels]
        p_max = max(n_part)
        out = torch.zeros(len(mels), p_max, PARTIAL, N_MELS)
        mask = torch.zeros(len(mels), p_max, dtype=torch.bool)
        for i, (m, n) in enumerate(zip(mels, n_part)):
            for j in range(n):
                part = m[j * STEP: j * STEP + PARTIAL]
                out[i, j, :len(part)] = part
                mask[i, j] = True
        return {"mels": out, "partials": mask}

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mmtune_processor.json").write_text(json.dumps({"kind": self.kind, "max_seconds": self.max_seconds}))

    @classmethod
    def load(cls, folder: Path, meta: Dict[str, Any]) -> "SpeakerProcessor":
        return cls(meta["max_seconds"])


def weights_path() -> Path:
    """The speaker encoder's weights inside the installed ``resemblyzer`` package (found, never imported)."""
    from ..extras import MissingExtraError

    spec = importlib.util.find_spec("resemblyzer")
    path = Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt" if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise MissingExtraError("checkpoint 'resemblyzer-speaker' needs the weights inside the resemblyzer package: "
                                "pip install --no-deps resemblyzer (only its weights file is read)")
    return path


class SpeakerEncoder(Encoder):
    modality = "audio"

    def __init__(self, weights: bool = True, max_seconds: float = 10.0):
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, 256, 3, batch_first=True)
        self.linear = nn.Linear(256, 256)
        self.processor = SpeakerProcessor(max_seconds)
        if weights:
            state = torch.load(weights_path(), map_location="cpu", weights_only=True)["model_state"]
            self.load_state_dict({k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}, strict=True)

    @property
    def out_dim(self) -> int:
        return 256

    def forward(self, mels, partials, **kw) -> EncoderOutput:
        b, p = partials.shape
        _, (hidden, _) = self.lstm(mels.reshape(b * p, PARTIAL, N_MELS))
        e = torch.relu(self.linear(hidden[-1]))
        e = (e / e.norm(dim=1, keepdim=True).clamp_min(1e-8)).reshape(b, p, -1)
        w = partials.to(e.dtype).unsqueeze(-1)
        pooled = (e * w).sum(1) / w.sum(1).clamp_min(1.0)
        return EncoderOutput(pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-8), e, partials)

    def layer_groups(self) -> List[List[nn.Parameter]]:
        """Each LSTM layer, then the projection."""
        by_layer = [[p for n, p in self.lstm.named_parameters() if n.endswith(f"_l{i}")] for i in range(3)]
        return by_layer + [list(self.linear.parameters())]

    def save_parts(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mmtune_encoder.json").write_text(json.dumps({"arch": "resemblyzer-speaker"}))
        self.processor.save(folder / "processor")


def _build(spec, weights: bool, bundle_dir: Optional[Path]) -> Encoder:
    if bundle_dir is not None:
        meta = json.loads((bundle_dir / "processor" / "mmtune_processor.json").read_text())
        return SpeakerEncoder(False, meta["max_seconds"])
    return SpeakerEncoder(weights, spec.max_seconds)


OFFLINE_ENCODERS.register("resemblyzer-speaker", Preset("audio", _build))
register_kind("speaker_mel", SpeakerProcessor)
