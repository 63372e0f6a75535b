"""Per-step schedules: linear warm-up then cosine decay for the learning rate; cosine-increasing momentum."""

import math

import torch


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """LambdaLR: the factor rises linearly to 1 over `warmup_steps`, then follows a half cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def momentum_at(step: int, total_steps: int, base_momentum: float, schedule: str) -> float:
    """EMA coefficient for `step`: constant, or BYOL's 1 − (1 − m)(cos(π t / T) + 1) / 2 rising to 1."""
    if schedule == "constant":
        return base_momentum
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0
