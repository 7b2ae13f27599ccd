"""The stateful parts a checkpoint holds that are not plain torch objects, as `state_dict` / `load_state_dict` pairs.

The Checkpointer saves a dict of parts by name (`Checkpointer(parts={"model": ..., "optimizer": ..., ...})`). The
model, optimizer, schedule (optim.Schedule) and loss already have both methods; the two below adapt the parts a run
may not have: a checkpoint holds None for them when the run that wrote it had none.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> object: ...


class EmaWeights:
    """The weight average (train.ema_decay): its network's weights. A checkpoint of a run without EMA (None)
    starts the average at the restored weights of `net` (restored first: the Checkpointer loads "model" first)."""

    optional = True  # a checkpoint may lack it

    def __init__(self, ema, net: torch.nn.Module):
        self.ema, self.net = ema, net

    def state_dict(self) -> dict:
        return self.ema.module.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        self.ema.module.load_state_dict(state or self.net.state_dict())


class ScalerState:
    """The fp16 grad scaler. A checkpoint without one (None, or {} from a disabled scaler) leaves it as it is."""

    optional = True

    def __init__(self, scaler):
        self.scaler = scaler

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.scaler.load_state_dict(state)
