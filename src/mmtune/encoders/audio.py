"""Audio encoders: any Hugging Face audio checkpoint (wav2vec2, HuBERT, WavLM, AST, the Whisper encoder)
through AutoModel + AutoFeatureExtractor, and an offline one — log-mel spectrograms fed to the ImageNet
EfficientNet-Lite0 (``checkpoint: efficientnet-lite0-audio``), which installs from the package index.

Each processor resamples a clip to its encoder's rate (soxr), takes ``max_seconds`` of it (the centre of a
longer one; training crops a random window first, see ``mmtune.modalities.Audio``) and pads the rest."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from . import processors
from .base import Encoder, EncoderOutput
from .hf import HF_ENCODERS, _hidden_size, load_auto_model
from .offline import OFFLINE_ENCODERS, EfficientNetLiteEncoder, Preset


def _clip(clip, sr: int, seconds: float) -> np.ndarray:
    from ..data.audio import fit_length, resample

    if clip is None:
        return np.zeros(int(sr * min(seconds, 1.0)), dtype=np.float32)  # a blank input (the row is masked anyway)
    x, rate = clip
    x = resample(np.asarray(x, dtype=np.float32), int(rate), sr)
    n = int(round(seconds * sr))
    return fit_length(x, n) if len(x) > n else x


class WaveformProcessor:
    """A transformers feature extractor (Wav2Vec2FeatureExtractor, ASTFeatureExtractor, WhisperFeatureExtractor…)
    after resampling and cropping; padding is marked by ``attention_mask`` where the extractor gives one."""

    modalities = ("audio",)
    kind = "waveform"

    def __init__(self, feature_extractor, max_seconds: float = 10.0):
        self.feature_extractor = feature_extractor
        self.max_seconds = float(max_seconds)
        self.sampling_rate = int(getattr(feature_extractor, "sampling_rate", 16000))

    def __call__(self, columns: Mapping[str, List[Any]]) -> Dict[str, torch.Tensor]:
        clips = [_clip(c, self.sampling_rate, self.max_seconds) for c in columns["audio"]]
        kwargs = {"sampling_rate": self.sampling_rate, "return_tensors": "pt"}
        # an extractor with a fixed window (Whisper: 30 s) pads to it; the others to the longest clip
        padding = "max_length" if getattr(self.feature_extractor, "n_samples", None) else True
        try:
            out = self.feature_extractor(clips, padding=padding, return_attention_mask=True, **kwargs)
        except TypeError:  # extractors without attention masks
            out = self.feature_extractor(clips, **kwargs)
        return dict(out)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.feature_extractor.save_pretrained(str(folder))
        (folder / "mmtune_processor.json").write_text(json.dumps({"kind": "hf_audio", "max_seconds": self.max_seconds}))

    @classmethod
    def load(cls, folder: Path, meta: Dict[str, Any]) -> "WaveformProcessor":
        from transformers import AutoFeatureExtractor

        return cls(AutoFeatureExtractor.from_pretrained(str(folder)), meta["max_seconds"])


class HFAudioEncoder(Encoder):
    """A transformers audio model; the frames of its last hidden state are the tokens (padding frames masked,
    from the model's own conv-length arithmetic where it has one) and their masked mean the pooled vector."""

    modality = "audio"

    def __init__(self, model: nn.Module, feature_extractor, pooling: str = "auto", max_seconds: float = 10.0):
        super().__init__()
        if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
            model = model.get_encoder()  # the Whisper encoder
        self.model = model
        self.pooling = "mean" if pooling == "auto" else pooling
        self.processor = WaveformProcessor(feature_extractor, max_seconds)
        import inspect

        self._accepted = set(inspect.signature(model.forward).parameters)
        self._dim = _hidden_size(model.config)

    @property
    def out_dim(self) -> int:
        return int(self._dim)

    def forward(self, **inputs) -> EncoderOutput:
        from .base import pool_tokens

        tokens = self.model(**{k: v for k, v in inputs.items() if k in self._accepted}).last_hidden_state
        mask = None
        att = inputs.get("attention_mask")
        lengths_of = getattr(self.model, "_get_feat_extract_output_lengths", None)
        if att is not None and lengths_of is not None:
            lengths = lengths_of(att.sum(-1)).clamp(min=1, max=tokens.shape[1])
            mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
        return EncoderOutput(pool_tokens(tokens, mask, self.pooling), tokens, mask)

    def save_parts(self, folder: Path) -> None:
        self.model.config.save_pretrained(str(folder))
        self.processor.save(folder / "processor")


@HF_ENCODERS.register("audio")
def _hf_audio(source, weights, pooling, max_length, image_size, processor_dir=None, max_seconds: float = 10.0) -> Encoder:
    from transformers import AutoFeatureExtractor

    model = load_auto_model(source, weights)
    if processor_dir:
        proc = processors.load_processor(processor_dir)
        return HFAudioEncoder(model, proc.feature_extractor, pooling, proc.max_seconds)
    return HFAudioEncoder(model, AutoFeatureExtractor.from_pretrained(source), pooling, max_seconds)


def mel_filterbank(n_fft: int, n_mels: int, sr: int, fmin: float = 0.0, fmax: Optional[float] = None) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) triangular filters on the HTK mel scale."""
    fmax = fmax or sr / 2
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)  # noqa: E731
    points = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    fb = np.zeros((n_mels, len(freqs)))
    for i in range(n_mels):
        lo, mid, hi = points[i], points[i + 1], points[i + 2]
        fb[i] = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return torch.tensor(fb, dtype=torch.float32)


class LogMelProcessor:
    """Clips -> ``spectrogram`` (B, 3, n_mels, frames): log-mel power (25 ms windows, 10 ms hop), standardised
    per clip and repeated over three channels, so that an ImageNet CNN reads it as an image."""

    modalities = ("audio",)
    kind = "spectrogram"

    def __init__(self, sample_rate: int = 16000, n_mels: int = 64, max_seconds: float = 10.0):
        self.sampling_rate, self.n_mels, self.max_seconds = int(sample_rate), int(n_mels), float(max_seconds)
        self.n_fft, self.hop = int(0.025 * sample_rate), int(0.010 * sample_rate)
        self._fb = mel_filterbank(self.n_fft, self.n_mels, self.sampling_rate)

    def __call__(self, columns: Mapping[str, List[Any]]) -> Dict[str, torch.Tensor]:
        from ..data.audio import fit_length

        n = int(round(self.max_seconds * self.sampling_rate))
        wave = torch.tensor(np.stack([fit_length(_clip(c, self.sampling_rate, self.max_seconds), n) for c in columns["audio"]]))
        spec = torch.stft(wave, self.n_fft, self.hop, window=torch.hann_window(self.n_fft), return_complex=True).abs() ** 2
        logmel = torch.log(self._fb @ spec + 1e-6)  # (B, mels, frames)
        mean, std = logmel.mean(dim=(1, 2), keepdim=True), logmel.std(dim=(1, 2), keepdim=True).clamp_min(1e-5)
        return {"spectrogram": ((logmel - mean) / std).unsqueeze(1).repeat(1, 3, 1, 1)}

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mmtune_processor.json").write_text(json.dumps(
            {"kind": "log_mel", "sample_rate": self.sampling_rate, "n_mels": self.n_mels, "max_seconds": self.max_seconds}))

    @classmethod
    def load(cls, folder: Path, meta: Dict[str, Any]) -> "LogMelProcessor":
        return cls(meta["sample_rate"], meta["n_mels"], meta["max_seconds"])


class SpectrogramEfficientNet(EfficientNetLiteEncoder):
    """The ImageNet EfficientNet-Lite0 over log-mel spectrograms (a known good start for audio)."""

    modality = "audio"

    def __init__(self, weights: bool = True, pooling: str = "auto", max_seconds: float = 10.0, n_mels: int = 64):
        super().__init__(224, weights=weights, pooling=pooling)
        self.processor = LogMelProcessor(16000, n_mels, max_seconds)

    def forward(self, spectrogram, **kw) -> EncoderOutput:
        return super().forward(pixel_values=spectrogram)

    def save_parts(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "mmtune_encoder.json").write_text(json.dumps({"arch": "efficientnet-lite0-audio"}))
        self.processor.save(folder / "processor")


def _spectrogram_preset(spec, weights: bool, bundle_dir: Optional[Path]) -> Encoder:
    if bundle_dir is not None:
        meta = json.loads((bundle_dir / "processor" / "mmtune_processor.json").read_text())
        return SpectrogramEfficientNet(False, spec.pooling, meta["max_seconds"], meta["n_mels"])
    return SpectrogramEfficientNet(weights, spec.pooling, spec.max_seconds)


OFFLINE_ENCODERS.register("efficientnet-lite0-audio", Preset("audio", _spectrogram_preset))
processors.register_kind("hf_audio", WaveformProcessor)
processors.register_kind("log_mel", LogMelProcessor)
