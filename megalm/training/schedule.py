"""Learning-rate schedule: linear warm-up to `lr`, then cosine or linear decay to `min_lr`."""
from __future__ import annotations

import math

import torch

from megalm.config.train import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimiser step `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    decay_steps = max(1, (cfg.lr_decay_steps or cfg.train_steps) - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.lr_decay == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        coeff = 1.0 - progress
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (its state is saved in DeepSpeed checkpoints) whose factor reproduces `lr_at`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg) / cfg.lr)
