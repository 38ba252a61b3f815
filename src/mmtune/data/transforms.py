"""Augmentation of training batches: images with kornia (on the batch, on its device), text by words.

Both run on training batches only — the LightningModule applies the image augmentation in
``training_step`` and the training DataLoader's collator applies the text augmentation — so
validation, test and prediction inputs are never augmented."""
from __future__ import annotations

import random
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn


class ImageAugment(nn.Module):
    """Random resized crop, rotation, horizontal flip, colour jitter and optionally RandAugment on a
    batch of *normalised* pixel values: they are mapped back to [0, 1] with the processor's mean and
    std, augmented, and normalised again."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self._pipelines: Dict[Tuple[int, int], nn.Module] = {}

    def _pipeline(self, size: Tuple[int, int]) -> nn.Module:
        if size not in self._pipelines:
            import kornia.augmentation as K

            c = self.cfg
            ops: List[nn.Module] = [K.RandomResizedCrop(size, scale=tuple(c.crop_scale))]
            if c.rotation > 0:
                ops.append(K.RandomRotation(c.rotation))
            if c.flip:
                ops.append(K.RandomHorizontalFlip())
            if c.color_jitter > 0:
                j = c.color_jitter
                ops.append(K.ColorJitter(j, j, j, 0.0, p=0.8))
            if c.randaugment:
                from kornia.augmentation.auto import RandAugment

                ops.append(RandAugment(n=c.randaugment_n, m=c.randaugment_m))
            self._pipelines[size] = nn.Sequential(*ops)
        return self._pipelines[size]

    @torch.no_grad()
    def forward(self, pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        m = torch.as_tensor(mean, dtype=pixel_values.dtype, device=pixel_values.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=pixel_values.dtype, device=pixel_values.device).view(1, -1, 1, 1)
        x = (pixel_values * s + m).clamp(0, 1)
        x = self._pipeline(tuple(pixel_values.shape[-2:])).to(x.device)(x).clamp(0, 1)
        return (x - m) / s


class TextAugment:
    """Per word, with the configured probabilities: delete it, replace it by ``mask_token``, or swap it
    with its right neighbour. A text never loses all its words."""

    def __init__(self, cfg, mask_token: Optional[str] = None, seed: Optional[int] = None):
        self.cfg = cfg
        self.mask_token = mask_token or "[UNK]"
        self.rng = random.Random(seed)

    @property
    def active(self) -> bool:
        c = self.cfg
        return c.word_dropout > 0 or c.word_mask > 0 or c.word_swap > 0

    def __call__(self, text: Optional[str]) -> Optional[str]:
        if text is None or not self.active:
            return text
        words = text.split()
        c, r = self.cfg, self.rng
        kept = [w for w in words if r.random() >= c.word_dropout] or words[:1]
        kept = [self.mask_token if r.random() < c.word_mask else w for w in kept]
        i = 0
        while i < len(kept) - 1:
            if r.random() < c.word_swap:
                kept[i], kept[i + 1] = kept[i + 1], kept[i]
                i += 1
            i += 1
        return " ".join(kept)


def augment_tokens(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], cfg, mask_id: Optional[int],
                   special_ids: Sequence[int]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Token-level augmentation of a training batch: each real, non-special token is replaced by
    ``mask_id`` with probability ``cfg.token_mask`` and hidden from attention with probability
    ``cfg.token_dropout``. Special tokens (CLS, SEP, padding) are never touched."""
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    eligible = real & ~torch.isin(input_ids, torch.as_tensor(list(special_ids), device=input_ids.device))
    if cfg.token_mask > 0 and mask_id is not None:
        hit = eligible & (torch.rand(input_ids.shape, device=input_ids.device) < cfg.token_mask)
        input_ids = input_ids.masked_fill(hit, mask_id)
    if cfg.token_dropout > 0 and attention_mask is not None:
        drop = eligible & (torch.rand(input_ids.shape, device=input_ids.device) < cfg.token_dropout)
        attention_mask = attention_mask.masked_fill(drop, 0)
    return input_ids, attention_mask


def augment_waveform(inputs: Dict[str, torch.Tensor], cfg) -> Dict[str, torch.Tensor]:
    """Training batches of a waveform encoder (``input_values`` (B, T), padding marked by ``attention_mask``):
    a random gain of ±``gain_db`` dB, white noise at ``noise_snr_db`` dB below each clip's power, and a
    circular shift by up to ``shift`` of the clip — applied to the real samples only."""
    x = inputs.get("input_values")
    if x is None or x.dim() != 2:
        return inputs
    mask = inputs.get("attention_mask")
    real = mask.to(x.dtype) if mask is not None else torch.ones_like(x)
    b, t = x.shape
    gain = 10 ** (torch.empty(b, 1, device=x.device).uniform_(-cfg.gain_db, cfg.gain_db) / 20) if cfg.gain_db > 0 else 1.0
    x = x * gain
    if cfg.shift > 0:
        lengths = real.sum(1).long().clamp_min(1)
        out = x.clone()
        for i in range(b):
            n = int(lengths[i])
            k = int(torch.randint(-int(cfg.shift * n), int(cfg.shift * n) + 1, (1,)))
            out[i, :n] = torch.roll(x[i, :n], k)
        x = out
    if cfg.noise_snr_db is not None:
        power = (x ** 2 * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp_min(1)
        noise = torch.randn_like(x) * torch.sqrt(power / 10 ** (cfg.noise_snr_db / 10))
        x = x + noise * real
    return {**inputs, "input_values": x}


def augment_spectrogram(inputs: Dict[str, torch.Tensor], cfg) -> Dict[str, torch.Tensor]:
    """SpecAugment on training batches of a spectrogram encoder (``spectrogram`` (B, C, mels, frames)): up to
    ``time_masks`` bands of frames and ``freq_masks`` bands of mel bins set to the clip's mean."""
    x = inputs.get("spectrogram")
    if x is None:
        return inputs
    x = x.clone()
    b, _, m, t = x.shape
    fill = x.mean(dim=(1, 2, 3))
    for i in range(b):
        for _ in range(cfg.time_masks):
            w = int(torch.randint(0, max(1, int(cfg.time_mask_width * t)) + 1, (1,)))
            s = int(torch.randint(0, max(1, t - w + 1), (1,)))
            x[i, :, :, s:s + w] = fill[i]
        for _ in range(cfg.freq_masks):
            w = int(torch.randint(0, cfg.freq_mask_bins + 1, (1,)))
            s = int(torch.randint(0, max(1, m - w + 1), (1,)))
            x[i, :, s:s + w, :] = fill[i]
    return {**inputs, "spectrogram": x}
