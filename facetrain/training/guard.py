"""The non-finite-step guard: a step whose loss or gradients hold NaN/inf never changes the weights.

How a bad step is skipped depends on the optimizer:

* Fused optimizers (adam / adamw / sgd with `optim.fused`, the default) accept a `found_inf` tensor, the
  protocol torch's GradScaler uses: their kernel leaves the weights, moments and step count untouched when it is
  nonzero. The decision then stays on the device and the step needs no host sync. The host reads the guard's
  counters only where the loop synchronises anyway (log steps, validation, checkpoints, stop requests, the
  end): it reports the skipped steps there and stops a diverged run. A report can come up to
  `train.log_every` steps late, but a skipped step never reaches the weights, so nothing is lost.
* Other optimizers (schedule-free, non-fused): one `bool()` per step decides whether `optimizer.step()` runs,
  and the counters are read at once.
* fp16: the grad scaler skips overflowing steps itself (normal while it calibrates); the guard adds only the
  loss check, with a host sync.

The decision is identical on every rank: the loss is computed on the gathered global batch and the gradients
are all-reduced before the check.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from facetrain.errors import UserError
from facetrain.training.checkpoint import nonfinite_tensors


class NonFiniteGuard:
    """`step(loss, index)` replaces `optimizer.step()`; `check()` reports skipped steps and enforces the limits.

    `model`: the network whose BatchNorm statistics are checked when a bad step is reported."""

    def __init__(self, optimizer, model: torch.nn.Module, params: list[torch.nn.Parameter], accelerator,
                 grad_clip: float, max_bad_steps: int, warn: Callable[[str], None], bad_steps: int = 0):
        self.optimizer = optimizer  # accelerate's wrapper: its step() is the one to call
        self.inner = getattr(optimizer, "optimizer", optimizer)
        self.model, self.params, self.accelerator, self.grad_clip = model, params, accelerator, grad_clip
        self.max_bad_steps, self.warn = max_bad_steps, warn
        self.on_device = accelerator.scaler is None and getattr(self.inner, "_step_supports_amp_scaling", False)
        device = accelerator.device
        # device-side counters: bad steps in a row now, the most in a row since the last check, bad steps in
        # all, and the index of the latest bad step
        self._in_a_row = torch.tensor(bad_steps, dtype=torch.int64, device=device)
        self._worst = self._in_a_row.clone()
        self._total = torch.zeros((), dtype=torch.int64, device=device)
        self._last_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self._reported = 0
        self.bad_steps = bad_steps
        """Bad steps in a row as of the last check (saved in checkpoints, restored on resume)."""

    def step(self, loss: torch.Tensor, index: int) -> None:
        """The optimizer step for step `index`, skipped if the loss or the gradient norm is not finite."""
        finite = torch.isfinite(loss)
        if self.grad_clip > 0:
            norm = self.accelerator.clip_grad_norm_(self.params, self.grad_clip)
        elif self.accelerator.scaler is None:  # the check alone: the norm without clipping's multiply pass
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        else:
            norm = None  # fp16: the scaler checks the gradients
        if self.accelerator.scaler is None:
            finite = finite & torch.isfinite(norm)
        if self.on_device:
            self.inner.grad_scale, self.inner.found_inf = None, (~finite).float()
            try:
                self.optimizer.step()
            finally:
                del self.inner.grad_scale, self.inner.found_inf
        elif bool(finite):  # the host sync of the other optimizers
            self.optimizer.step()
        bad = (~finite).long()
        self._in_a_row = (self._in_a_row + 1) * bad
        self._worst = torch.maximum(self._worst, self._in_a_row)
        self._total += bad
        self._last_bad = torch.where(finite, self._last_bad, index)
        if not self.on_device:
            self.check()

    def check(self) -> None:
        """Host side (one sync): warn about steps skipped since the last check; stop a run whose BatchNorm
        statistics went non-finite (skipping cannot undo that) or that had `train.max_bad_steps` bad steps in a
        row."""
        total, self.bad_steps, worst, last = torch.stack(
            [self._total, self._in_a_row, self._worst, self._last_bad]).tolist()  # the one sync
        if total == self._reported:
            return
        new, self._reported = total - self._reported, total
        self._worst = self._in_a_row.clone()
        limit = f"limit train.max_bad_steps={self.max_bad_steps}"
        if new == 1:
            self.warn(f"step {last}: non-finite loss or gradient, step skipped ({worst} in a row, {limit})")
        else:
            self.warn(f"{new} steps with a non-finite loss or gradient skipped, the last at step {last} "
                      f"(at most {worst} in a row, {limit})")
        if nonfinite_tensors(dict(self.model.named_buffers())):  # only read after bad steps: free otherwise
            raise UserError(f"training diverged at step {last}: non-finite values reached the model's "
                            "normalisation statistics, so skipping the step cannot help; rerun with "
                            "--train.resume auto and a lower optim.lr or train.grad_clip")
        if worst >= self.max_bad_steps:
            raise UserError(f"training diverged: {worst} consecutive non-finite steps at step {last}; lower "
                            "optim.lr or set train.grad_clip (no checkpoint with non-finite weights was written)")
