"""All cross-rank communication in one place (on top of an `accelerate.Accelerator`).

Global-batch mining with exact gradients: every rank gathers all ranks' embeddings, computes the *same*
loss on the global batch, and back-propagates only through its own slice. DDP then averages gradients over
W ranks, so each rank's slice gradient is scaled by W first (`_ScaleGrad`, the identity in the forward pass,
bit for bit, at any W): the averaged gradient equals a single process's gradient on the same global batch, and
the loss value (logged) is the global-batch loss, not W times it. Every rank sees bit-identical inputs to the
loss, so miners pick the same tuples everywhere. Loss-owned parameters (a margin head's class weights) are not in
DDP's model; their gradient is the full global-batch gradient on every rank, and `average_gradients` all-reduces
it anyway, so that non-deterministic kernels (GPU atomics) can never let the ranks' copies drift apart;
`check_identical` verifies that they did not (at every checkpoint).

BatchNorm under DDP normalises each rank's slice with that slice's statistics unless `model.sync_bn` is on:
then `convert_to_global_batchnorm` makes every BatchNorm layer normalise with the statistics of the global
batch (differentiable all-reduces of the per-channel sums), on every backend accelerate launches (gloo on
CPUs, NCCL on GPUs), so that a multi-process step equals the one-process step on the same global batch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from facetrain.errors import UserError

# What the launcher (accelerate launch, torchrun, Slurm's srun) tells a process through its environment: read here
# and nowhere else in the library.


def launcher_local_world_size(default: int) -> int:
    """Processes on this machine (LOCAL_WORLD_SIZE), else `default`."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", default))


def launcher_mixed_precision() -> str:
    """The precision `accelerate launch --mixed_precision` asked for (`no` when none)."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no")


def launcher_wants_cpu() -> bool:
    """`ACCELERATE_USE_CPU=1`: run on the CPU even where a GPU exists."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass (the same tensor values, bit for bit: `x * W - x * (W - 1)` is not, for W - 1
    not a power of two); multiplies the gradient by `factor` in the backward pass."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _ScaleGrad.apply(x, factor)


def gather_for_loss(emb: torch.Tensor, labels: torch.Tensor, accelerator: Accelerator):
    """(global embeddings with gradient through this rank's slice, global labels), in rank order."""
    world = accelerator.num_processes
    if world == 1:
        return emb, labels
    all_emb = accelerator.gather(emb.detach()).view(world, *emb.shape)
    all_labels = accelerator.gather(labels)
    parts = list(all_emb.unbind(0))
    parts[accelerator.process_index] = _scale_grad(emb, float(world))
    return torch.cat(parts), all_labels


def shard_range(n: int, rank: int, world: int) -> range:
    """Contiguous slice of n items for `rank` (sizes differ by at most one)."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))


def gather_uneven(t: torch.Tensor, n_total: int, accelerator: Accelerator) -> torch.Tensor:
    """Concatenate per-rank contiguous shards (from `shard_range`) of unequal length, in order, without the
    padding that equal-size collectives need: no duplicated and no dropped rows."""
    world = accelerator.num_processes
    if world == 1:
        return t
    longest = -(-n_total // world)
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    gathered = accelerator.gather(padded).view(world, longest, *t.shape[1:])
    rows = [gathered[r, : len(shard_range(n_total, r, world))] for r in range(world)]
    return torch.cat(rows)


def any_rank(flag: bool, accelerator: Accelerator) -> bool:
    """True on every rank if it is true on any rank (stop requests, non-finite steps)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def broadcast_object(obj, accelerator: Accelerator, src: int = 0):
    """Rank `src`'s Python object on every rank (e.g. rank-0 validation metrics)."""
    if accelerator.num_processes == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_process_result(compute: Callable[[], object], accelerator: Accelerator | None):
    """`compute()` run on the main process only (or here, without an accelerator), its result on every rank. Its
    UserError or OSError stops every rank with the same line: raised on the main process alone, it would leave
    the other ranks waiting in this collective."""
    outcome = None
    if accelerator is None or accelerator.is_main_process:
        try:
            outcome = (True, compute())
        except (UserError, OSError) as err:
            outcome = (False, str(err))
    if accelerator is not None:
        outcome = broadcast_object(outcome, accelerator)
    ok, value = outcome
    if not ok:
        raise UserError(value)
    return value


def leave_process_group() -> bool:
    """Leave the process group together and destroy it before the interpreter exits (cli.run_cli calls this when
    a command succeeded). Without it a rank that finishes first (every rank but 0 after an evaluation or a
    training run) exits while gloo's threads still run, and aborts: "terminate called without an active
    exception", seen on 2-process runs. Returns whether there was a group of several processes."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    several = dist.get_world_size() > 1
    if several:
        dist.barrier()
    dist.destroy_process_group()
    return several


def average_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """All-reduce-average the gradients of parameters DDP does not own (the loss's), in one flat buffer."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def check_identical(tensors: dict[str, torch.Tensor], accelerator: Accelerator, what: str) -> None:
    """Raise if `tensors` differ between ranks (compared through float64 sums and sums of squares)."""
    if accelerator.num_processes == 1 or not tensors:
        return
    local = torch.stack([torch.stack([t.double().sum(), t.double().square().sum()]) for t in tensors.values()])
    every = accelerator.gather(local.to(accelerator.device)[None]).view(accelerator.num_processes, *local.shape)
    drift = (every - every[0]).abs().max().item()
    if drift != 0.0:
        name = list(tensors)[int((every - every[0]).abs().amax(dim=(0, 2)).argmax())]
        raise RuntimeError(f"{what} differ between processes ({name}: checksum drift {drift:.3g}); this is a bug "
                           "in facetrain's distributed code, please report it")


# ----------------------------------------------------------------------------------------------------------
# BatchNorm over the global batch (model.sync_bn)


def _global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Training-mode batch norm of this rank's slice `x` with the mean and variance of the global batch: two
    differentiable all-reduces (per-channel sum with the count, then the sum of squared deviations: the two-pass
    variance, as exact as one process's), so the backward pass also sums the statistics' gradients over ranks."""
    from torch.distributed.nn.functional import all_reduce

    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()  # statistics in fp32 whatever the autocast dtype, as torch's own batch norm does
    count = torch.tensor([x.numel() / x.shape[1]], dtype=torch.float32, device=x.device)
    sums = all_reduce(torch.cat([xf.sum(dims), count]))
    total = sums[-1]
    mean = sums[:-1] / total
    centered = xf - mean.view(shape)
    var = all_reduce(centered.square().sum(dims)) / total
    y = centered * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked += 1
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            unbiased = var * (total / (total - 1).clamp(min=1))
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    return y.to(x.dtype)


def _syncing(bn: nn.Module) -> bool:
    return bn.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _global_forward(self, x: torch.Tensor) -> torch.Tensor:
    if not _syncing(self):
        return self._local_forward(x)
    y = _global_batch_norm(self, x)
    # timm's BatchNormAct2d: normalisation, then its dropout and activation (plain BatchNorm has neither)
    for name in ("drop", "act"):
        layer = getattr(self, name, None)
        if isinstance(layer, nn.Module):
            y = layer(y)
    return y


_GLOBAL_CLASSES: dict[type, type] = {}


def convert_to_global_batchnorm(model: nn.Module) -> int:
    """Make every BatchNorm layer of `model` (torch's and timm's BatchNormAct variants; frozen ones excepted)
    normalise with global-batch statistics in training mode when a process group of several ranks exists. In
    place: the layers keep their parameters, buffers and state-dict keys, so checkpoints and bundles are
    unchanged; eval mode and single processes run the original forward. Returns the number of layers."""
    # torch marks the autograd-aware collectives deprecated in favour of ones that are not differentiable
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_reduce is deprecated")
    converted = 0
    for module in model.modules():
        cls = type(module)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or cls in _GLOBAL_CLASSES.values():
            continue
        if cls not in _GLOBAL_CLASSES:  # the name keeps "BatchNorm" (model.fold_batchnorm recognises it)
            _GLOBAL_CLASSES[cls] = type(f"Global{cls.__name__}", (cls,),
                                        {"forward": _global_forward, "_local_forward": cls.forward})
        module.__class__ = _GLOBAL_CLASSES[cls]
        converted += 1
    return converted
