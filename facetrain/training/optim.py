"""Optimizers, learning-rate schedules and the article's presets, by name.

    optim.name:      OPTIMIZER_NAMES of facetrain/config/names.py
    optim.scheduler: SCHEDULER_NAMES of facetrain/config/names.py
    optim.preset:    PRESETS of facetrain/config/names.py (sets name + scheduler together when the config loads)

Schedules advance per optimizer step or per epoch (`optim.scheduler_interval`); `plateau` advances on each
validation with the validation metric. The schedules are defined here as multipliers of optim.lr (LambdaLR),
so their meaning is the same whatever the interval: cosine / cosine_warmup go from lr to eta_min over
optim.t_max intervals (0 = the run) and stay there; step drops by gamma every step_size intervals (0 = a
third of the run); exponential multiplies by gamma per interval (0 = so that the run ends at lr/100), never
below eta_min. Schedule-free AdamW needs `optimizer.train()` before training steps
and `optimizer.eval()` before validation and saving: the trainer does that whenever the optimizer has them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from facetrain.config.names import OPTIMIZER_NAMES, SCHEDULER_NAMES, keyed_by
from facetrain.config.schema import OptimConfig

STEP_DROPS = 3
"""optim.step_size 0: the run is split into this many equal periods (lr, lr x gamma, lr x gamma^2)."""
EXPONENTIAL_END = 1e-2
"""optim.gamma 0 with the exponential schedule: gamma = EXPONENTIAL_END^(1 / intervals), so the run ends at
lr x EXPONENTIAL_END, the decay of the article's ExponentialLR(0.95) over ~90 epochs."""
STEP_GAMMA = 0.1
"""optim.gamma 0 with the step schedule: the factor of each drop."""


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


OPTIMIZERS: dict[str, Callable[[list[dict], OptimConfig], torch.optim.Optimizer]] = keyed_by(OPTIMIZER_NAMES, {
    "adam": _adam,
    "adamw": _adamw,
    "sgd": _sgd,
    "ranger": _ranger,
    "schedulefree_adamw": _schedulefree_adamw,
})


def _cosine_factor(t: int, length: int, floor: float) -> float:
    """Half a cosine from 1 down to `floor` over `length` intervals, then `floor`: it never climbs back."""
    progress = min(1.0, t / max(1, length))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _lambda(fn: Callable[[OptimConfig, int], Callable[[int], float]]):
    return lambda opt, cfg, total, decreasing: torch.optim.lr_scheduler.LambdaLR(opt, fn(cfg, total))


def _cosine_fn(cfg: OptimConfig, total: int) -> Callable[[int], float]:
    """cosine and cosine_warmup: optim.t_max is the length of the whole schedule in intervals, warm-up included
    (0 = the run); the cosine ends at eta_min there and stays (the same meaning in both schedules)."""
    warmup = cfg.warmup_steps if cfg.scheduler == "cosine_warmup" else 0
    length = (cfg.t_max or total) - warmup
    floor = cfg.eta_min / cfg.lr

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / (warmup + 1)
        return _cosine_factor(t - warmup, length, floor)

    return factor


def _step_fn(cfg: OptimConfig, total: int) -> Callable[[int], float]:
    size = cfg.step_size or max(1, math.ceil(total / STEP_DROPS))
    gamma = cfg.gamma or STEP_GAMMA
    return lambda t: gamma ** (t // size)


def _exponential_fn(cfg: OptimConfig, total: int) -> Callable[[int], float]:
    gamma = cfg.gamma or EXPONENTIAL_END ** (1.0 / max(1, total))
    floor = cfg.eta_min / cfg.lr
    return lambda t: max(floor, gamma ** t)


SCHEDULERS: dict[str, Callable] = keyed_by(SCHEDULER_NAMES, {
    "cosine": _lambda(_cosine_fn),
    "cosine_warmup": _lambda(_cosine_fn),
    # cut the rate when the validation metric stops improving, in the metric's own direction
    "plateau": lambda opt, cfg, total, decreasing: torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min" if decreasing else "max", factor=cfg.plateau_factor, patience=cfg.plateau_patience),
    "step": _lambda(_step_fn),
    "exponential": _lambda(_exponential_fn),
    "constant": lambda opt, cfg, total, decreasing: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0),
})


def schedule_notes(cfg: OptimConfig, total: int) -> list[str]:
    """One-line warnings about a schedule that ends inside the run (printed by the trainer at the start)."""
    unit = "epochs" if cfg.scheduler_interval == "epoch" else "steps"
    if cfg.scheduler in ("cosine", "cosine_warmup") and 0 < cfg.t_max < total:
        return [f"optim.t_max {cfg.t_max} is shorter than the run ({total} {unit}): the learning rate reaches "
                f"optim.eta_min {cfg.eta_min:g} after {cfg.t_max} {unit} and stays there for the last "
                f"{total - cfg.t_max} (it does not restart); set optim.t_max 0 to span the whole run"]
    return []


def param_groups(model: nn.Module, extra: nn.Module | None, cfg: OptimConfig) -> list[dict]:
    """Backbone at lr x backbone_lr_mult; head and loss parameters (a margin head's class weights) at lr."""
    backbone = [p for n, p in model.named_parameters() if n.startswith("backbone.") and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
    if extra is not None:
        rest += [p for p in extra.parameters() if p.requires_grad]
    groups = [{"params": rest, "lr": cfg.lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult, "name": "backbone"})
    return groups


def create_optimizer(model: nn.Module, extra: nn.Module | None, cfg: OptimConfig) -> torch.optim.Optimizer:
    """optim.name's optimizer (optim.preset was applied when the config loaded: facetrain/config/checks.py)."""
    return OPTIMIZERS[cfg.name](param_groups(model, extra, cfg), cfg)


def create_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_intervals: int,
                     decreasing: bool = False):
    """`total_intervals`: optimizer steps (interval=step) or epochs (interval=epoch) in the whole run;
    `decreasing`: the validation metric a plateau schedule watches is better when smaller (eer)."""
    return SCHEDULERS[cfg.scheduler](optimizer, cfg, total_intervals, decreasing)


LOWER_IS_BETTER = {"eer"}
"""Validation metrics where a smaller value is better (the rest: larger)."""


class Schedule:
    """When the learning rate changes, in one place: after every optimizer step (optim.scheduler_interval step),
    at the end of every epoch (epoch), or on each validation with the validation metric (plateau); plus the
    schedule-free optimizer's switch between its training weights and the averaged ones it is validated with."""

    def __init__(self, optimizer, cfg: OptimConfig, steps_per_epoch: int, max_steps: int, val_metric: str):
        self.per_epoch = cfg.scheduler_interval == "epoch"
        self.steps_per_epoch = steps_per_epoch
        self.intervals = math.ceil(max_steps / steps_per_epoch) if self.per_epoch else max_steps
        """The run's length in scheduler intervals (epochs or optimizer steps)."""
        self.on_plateau = cfg.scheduler == "plateau"
        self.decreasing = val_metric in LOWER_IS_BETTER
        self.scheduler = create_scheduler(optimizer, cfg, self.intervals, self.decreasing)
        self.optimizer = optimizer
        self.schedule_free = cfg.name.startswith("schedulefree") and hasattr(optimizer, "eval")
        self.notes = schedule_notes(cfg, self.intervals)
        """One-line warnings about the schedule, for the start of the run."""

    def after_step(self, step: int) -> None:
        """Call after optimizer step number `step` (1-based) has been taken."""
        if self.on_plateau or (self.per_epoch and step % self.steps_per_epoch):
            return
        self.scheduler.step()

    def after_validation(self, value: float) -> None:
        if self.on_plateau:
            self.scheduler.step(value)

    def set_mode(self, model: nn.Module, training: bool) -> None:
        """Train or eval mode for the model and, schedule-free, the weights it holds (eval: the averaged ones)."""
        model.train(training)
        if self.schedule_free:
            self.optimizer.train() if training else self.optimizer.eval()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)
