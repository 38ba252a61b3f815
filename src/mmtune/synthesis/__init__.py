"""Synthetic minority examples in the space of the encoders' pooled features."""
from .feature_gan import ConditionalGAN
from .oversample import synthesize_rows, targets_for_ratio

__all__ = ["ConditionalGAN", "synthesize_rows", "targets_for_ratio"]
