"""Optimizers, learning-rate schedules and the article's presets, by name.

    optim.name:      adam | adamw | sgd | ranger | schedulefree_adamw
    optim.scheduler: cosine | cosine_warmup | plateau | step | exponential | constant
    optim.preset:    adam_cosine | adamw_plateau | sgd_step | ranger_exponential | schedulefree_adamw |
                     adamw_cosine_warmup   (sets name + scheduler together)

Schedules advance per optimizer step or per epoch (`optim.scheduler_interval`); `plateau` advances on each
validation with the validation metric. Schedule-free AdamW needs `optimizer.train()` before training steps
and `optimizer.eval()` before validation and saving: the trainer does that whenever the optimizer has them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from facetrain.config import OptimConfig
from facetrain.errors import UserError

PRESETS: dict[str, tuple[str, str]] = {
    "adam_cosine": ("adam", "cosine"),
    "adamw_plateau": ("adamw", "plateau"),
    "sgd_step": ("sgd", "step"),
    "ranger_exponential": ("ranger", "exponential"),
    "schedulefree_adamw": ("schedulefree_adamw", "constant"),
    "adamw_cosine_warmup": ("adamw", "cosine_warmup"),
}


def _fused(cfg: OptimConfig) -> bool | None:
    # None = torch's default (multi-tensor foreach); True = the fused kernel (optim.fused)
    return True if cfg.fused else None


def _adam(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                            fused=_fused(cfg))


def _adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                             fused=_fused(cfg))


def _sgd(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.momentum > 0, fused=_fused(cfg))


def _ranger(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    from pytorch_ranger import Ranger  # RAdam + Lookahead

    return Ranger(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def _schedulefree_adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    import schedulefree

    return schedulefree.AdamWScheduleFree(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                          weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps)


OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = {
    "adam": _adam,
    "adamw": _adamw,
    "sgd": _sgd,
    "ranger": _ranger,
    "schedulefree_adamw": _schedulefree_adamw,
}


def _cosine_factor(t: int, total: int, floor: float) -> float:
    progress = min(1.0, t / max(1, total))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _lambda(fn: Callable[[int], float]):
    return lambda opt, cfg, total: torch.optim.lr_scheduler.LambdaLR(opt, fn(cfg, total))


def _cosine_warmup_fn(cfg: OptimConfig, total: int) -> Callable[[int], float]:
    period = (cfg.t_max or total) - cfg.warmup_steps
    floor = cfg.eta_min / cfg.lr

    def factor(t: int) -> float:
        if t < cfg.warmup_steps:
            return (t + 1) / (cfg.warmup_steps + 1)
        return _cosine_factor(t - cfg.warmup_steps, period, floor)

    return factor


SCHEDULERS: dict[str, Callable] = {
    "cosine": lambda opt, cfg, total: torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=cfg.t_max or total, eta_min=cfg.eta_min),
    "cosine_warmup": _lambda(_cosine_warmup_fn),
    "plateau": lambda opt, cfg, total: torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience),
    "step": lambda opt, cfg, total: torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma),
    "exponential": lambda opt, cfg, total: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=cfg.gamma),
    "constant": lambda opt, cfg, total: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0),
}


def resolve_preset(cfg: OptimConfig) -> None:
    """Apply optim.preset (if any) to optim.name and optim.scheduler; check every name."""
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise UserError(f"optim.preset: unknown preset {cfg.preset!r} (choose one of: {', '.join(PRESETS)})")
        cfg.name, cfg.scheduler = PRESETS[cfg.preset]
    if cfg.name not in OPTIMIZERS:
        raise UserError(f"optim.name: unknown optimizer {cfg.name!r} (choose one of: {', '.join(OPTIMIZERS)})")
    if cfg.scheduler not in SCHEDULERS:
        raise UserError(f"optim.scheduler: unknown scheduler {cfg.scheduler!r} "
                        f"(choose one of: {', '.join(SCHEDULERS)})")
    if cfg.warmup_steps < 0 or cfg.t_max < 0:
        raise UserError("optim.warmup_steps and optim.t_max: must be >= 0")


def param_groups(model: nn.Module, extra: nn.Module | None, cfg: OptimConfig) -> list[dict]:
    """Backbone at lr x backbone_lr_mult; head and loss parameters (ArcFace weights) at lr."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    if extra is not None:
        rest += [p for p in extra.parameters() if p.requires_grad]
    groups = [{"params": rest, "lr": cfg.lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult, "name": "backbone"})
    return groups


def create_optimizer(model: nn.Module, extra: nn.Module | None, cfg: OptimConfig) -> torch.optim.Optimizer:
    resolve_preset(cfg)
    return OPTIMIZERS[cfg.name](param_groups(model, extra, cfg), cfg)


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_intervals: int):
    """`total_intervals`: optimizer steps (interval=step) or epochs (interval=epoch) in the whole run."""
    resolve_preset(cfg)
    return SCHEDULERS[cfg.scheduler](optimizer, cfg, total_intervals)
