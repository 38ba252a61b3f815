"""Where Grad-CAM looks inside an encoder: its last feature map or its deepest stack of layers (a site), hooked to
keep the value and its gradient; the map from them."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn


def _largest_stack(module: nn.Module) -> Optional[nn.ModuleList]:
    best, size = None, 0
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList) and len(sub) > 1:
            n = sum(p.numel() for p in sub.parameters())
            if n > size:
                best, size = sub, n
    return best


class _Site:
    """Where Grad-CAM looks in an encoder: the output of the last block of its main stack when that is a feature
    map (B, C, H, W), else the input of the last block (tokens (B, T, D) of a transformer, whose CLS output would
    not see the patch tokens of the last block's own output). The captured tensor is made a leaf that requires
    gradients, so that frozen encoders explain too."""

    def __init__(self, encoder: nn.Module):
        stack = _largest_stack(encoder)
        self.block = stack[-1] if stack is not None else None
        self.value: Optional[torch.Tensor] = None
        self.handles = []

    def __enter__(self):
        if self.block is None:
            return self

        def pre(module, args):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dim() == 3 and x.is_floating_point():
                x = x.detach().requires_grad_(True)
                self.value = x
                return (x, *args[1:])
            return None

        def post(module, args, out):
            t = out[0] if isinstance(out, (tuple, list)) else out
            if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point():
                leaf = t.detach().requires_grad_(True)
                self.value = leaf
                return (leaf, *out[1:]) if isinstance(out, tuple) else leaf
            return None

        self.handles = [self.block.register_forward_pre_hook(pre), self.block.register_forward_hook(post)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _cam_from(value: torch.Tensor, grad: torch.Tensor) -> np.ndarray:
    """Grad-CAM over tokens (B, T, D) — LayerGradCam's formula with the tokens as positions: channel weights = mean
    gradient over tokens; map = ReLU(Σ_c w_c A_c). A square grid (without a leading CLS token) gives (B, g, g),
    else a strip (B, 1, T)."""
    b, t, _ = value.shape
    w = grad.mean(dim=1, keepdim=True)
    cam = torch.relu((w * value).sum(-1)).detach()
    side = int(round((t - 1) ** 0.5))
    if side * side == t - 1 and side > 1:
        return cam[:, 1:].reshape(b, side, side).cpu().numpy()
    side = int(round(t ** 0.5))
    if side * side == t and side > 1:
        return cam.reshape(b, side, side).cpu().numpy()
    return cam.reshape(b, 1, t).cpu().numpy()


def _normalise(cam: np.ndarray) -> np.ndarray:
    total = cam.sum()
    return cam / total if total > 0 else np.full_like(cam, 1.0 / cam.size)
