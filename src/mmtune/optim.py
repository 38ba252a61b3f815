"""Optimizers and learning-rate schedules: one table each (``optim.name``, ``schedule.name``).

An optimizer entry builds a ``torch.optim`` optimizer from parameter groups and the ``optim`` section; a
schedule entry builds Lightning's ``lr_scheduler`` dict (or None) from the optimizer, the ``schedule`` and
``optim`` sections, the monitored metric and the total number of optimizer steps."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch

from .registry import Registry

OPTIMIZERS: Registry = Registry("optimizer")
"""``optim.name`` -> ``build(param_groups, optim_cfg) -> torch.optim.Optimizer``."""
SCHEDULES: Registry = Registry("schedule")
"""``schedule.name`` -> ``build(optimizer, schedule_cfg, optim_cfg, monitor, total_steps) -> dict | None``."""

OPTIMIZERS.register("adamw", lambda groups, o: torch.optim.AdamW(groups, lr=o.lr))
# adam / sgd: each group's weight_decay is L2 added to the gradient
OPTIMIZERS.register("adam", lambda groups, o: torch.optim.Adam(groups, lr=o.lr))
OPTIMIZERS.register("sgd", lambda groups, o: torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum))


@SCHEDULES.register("constant")
def _constant(opt, s, o, monitor: str, total_steps: Callable[[], int]) -> Optional[Dict[str, Any]]:
    return None


@SCHEDULES.register("step")
def _step(opt, s, o, monitor, total_steps):
    return {"scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=s.step_epochs, gamma=s.gamma), "interval": "epoch"}


@SCHEDULES.register("plateau")
def _plateau(opt, s, o, monitor, total_steps):
    from .schema import monitor_mode

    mode = monitor_mode(monitor)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=s.gamma, patience=s.patience, min_lr=s.min_lr)
    return {"scheduler": sched, "interval": "epoch", "monitor": monitor}


@SCHEDULES.register("cosine")
def _cosine(opt, s, o, monitor, total_steps):
    factor = cosine_with_warmup(max(1, int(total_steps())), s.warmup_fraction, s.min_lr, o.lr)
    return {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, factor), "interval": "step"}


def cosine_with_warmup(total_steps: int, warmup_fraction: float, min_lr: float, base_lr: float):
    """A multiplier function for LambdaLR: linear from 0 to 1 over the warmup steps, then cosine
    down to ``min_lr / base_lr`` at ``total_steps``."""
    warmup = int(round(total_steps * warmup_fraction))
    floor = min(1.0, min_lr / base_lr) if base_lr > 0 else 0.0

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def optimizer_factory(optim_cfg, finetune_cfg, include_frozen_encoders: bool = False) -> Callable[[Any], torch.optim.Optimizer]:
    """``model -> optimizer``: parameter groups (rates per part and depth, decay on weights only) fed to
    the configured optimizer."""
    from .finetune.param_groups import param_groups

    build = OPTIMIZERS.get(optim_cfg.name)

    def make(model) -> torch.optim.Optimizer:
        ft = finetune_cfg
        groups = param_groups(model, optim_cfg.lr, optim_cfg.weight_decay, ft.encoder_lr, ft.fusion_lr, ft.head_lr,
                              ft.layer_decay, include_frozen_encoders=include_frozen_encoders)
        return build(groups, optim_cfg)

    return make


def schedule_factory(schedule_cfg, optim_cfg, monitor: str):
    """``(optimizer, total_steps) -> Lightning lr_scheduler dict or None``."""
    build = SCHEDULES.get(schedule_cfg.name)
    return lambda opt, total_steps: build(opt, schedule_cfg, optim_cfg, monitor, total_steps)


__all__: List[str] = ["OPTIMIZERS", "SCHEDULES", "cosine_with_warmup", "optimizer_factory", "schedule_factory"]
