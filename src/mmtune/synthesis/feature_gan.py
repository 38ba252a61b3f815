"""A conditional GAN over feature vectors (the concatenated pooled encoder outputs)."""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn


class ConditionalGAN:
    """Generator G(z, y) and discriminator D(x, y), both MLPs with a class embedding, trained with the
    non-saturating GAN loss on standardised features. ``fit`` records the losses per epoch and stops
    early when the discriminator wins outright (its loss below 0.05 for ``divergence_patience`` epochs
    in a row) or a loss stops being finite; ``sample`` returns features in the original scale."""

    def __init__(self, dim: int, n_classes: int, noise_dim: int = 32, hidden: int = 256, lr: float = 2e-4,
                 seed: int = 0):
        torch.manual_seed(seed)
        self.dim, self.n_classes, self.noise_dim = dim, n_classes, noise_dim
        self.g_embed = nn.Embedding(n_classes, noise_dim)
        self.G = nn.Sequential(nn.Linear(2 * noise_dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                               nn.LeakyReLU(0.2), nn.Linear(hidden, dim))
        self.d_embed = nn.Embedding(n_classes, dim)
        self.D = nn.Sequential(nn.Linear(2 * dim, hidden), nn.LeakyReLU(0.2), nn.Dropout(0.1),
                               nn.Linear(hidden, hidden // 2), nn.LeakyReLU(0.2), nn.Linear(hidden // 2, 1))
        g_params = list(self.G.parameters()) + list(self.g_embed.parameters())
        d_params = list(self.D.parameters()) + list(self.d_embed.parameters())
        self.opt_g = torch.optim.Adam(g_params, lr=lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(d_params, lr=lr, betas=(0.5, 0.999))
        self.mean = torch.zeros(dim)
        self.std = torch.ones(dim)
        self.gen = torch.Generator().manual_seed(seed)
        self.history: Dict[str, List[float]] = {"d_loss": [], "g_loss": []}
        self.stopped: Optional[str] = None

    def _g(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.G(torch.cat([z, self.g_embed(y)], dim=1))

    def _d(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.D(torch.cat([x, self.d_embed(y)], dim=1)).squeeze(1)

    def fit(self, X: np.ndarray, y: np.ndarray, epochs: int = 300, batch_size: int = 64,
            divergence_patience: int = 30) -> "ConditionalGAN":
        X = torch.as_tensor(X, dtype=torch.float32)
        y = torch.as_tensor(y, dtype=torch.long)
        self.mean, self.std = X.mean(0), X.std(0).clamp_min(1e-6)
        Xs = (X - self.mean) / self.std
        bce = nn.BCEWithLogitsLoss()
        n = len(Xs)
        streak = 0
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=self.gen)
            d_sum = g_sum = 0.0
            steps = 0
            for s in range(0, n, batch_size):
                idx = perm[s:s + batch_size]
                xr, yr = Xs[idx], y[idx]
                z = torch.randn(len(idx), self.noise_dim, generator=self.gen)
                fake = self._g(z, yr)
                d_loss = bce(self._d(xr, yr), torch.full((len(idx),), 0.9)) + \
                    bce(self._d(fake.detach(), yr), torch.zeros(len(idx)))
                self.opt_d.zero_grad()
                d_loss.backward()
                self.opt_d.step()
                g_loss = bce(self._d(fake, yr), torch.ones(len(idx)))
                self.opt_g.zero_grad()
                g_loss.backward()
                self.opt_g.step()
                d_sum += d_loss.detach().item()
                g_sum += g_loss.detach().item()
                steps += 1
            self.history["d_loss"].append(d_sum / steps)
            self.history["g_loss"].append(g_sum / steps)
            if not (np.isfinite(d_sum) and np.isfinite(g_sum)):
                self.stopped = f"a loss stopped being finite at epoch {epoch + 1}"
                break
            streak = streak + 1 if d_sum / steps < 0.05 else 0
            if streak >= divergence_patience:
                self.stopped = f"the discriminator won outright for {divergence_patience} epochs (epoch {epoch + 1})"
                break
        return self

    @torch.no_grad()
    def sample(self, y: np.ndarray) -> np.ndarray:
        """Generated feature vectors for class indices ``y``."""
        self.G.eval()
        y = torch.as_tensor(y, dtype=torch.long)
        z = torch.randn(len(y), self.noise_dim, generator=self.gen)
        out = self._g(z, y) * self.std + self.mean
        self.G.train()
        return out.numpy()
