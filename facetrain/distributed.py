"""All cross-rank communication in one place (on top of an `accelerate.Accelerator`).

Global-batch mining with exact gradients: every rank gathers all ranks' embeddings, computes the *same*
loss on the global batch, and back-propagates only through its own slice. DDP then averages gradients over
W ranks, so each rank's slice gradient is scaled by W first (`_scale_grad`): the averaged gradient equals a
single process's gradient on the same global batch, and the loss value (logged) is the global-batch loss,
not W times it. Loss-owned parameters (ArcFace weights) see the unscaled, identical gradient on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import Accelerator


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by `factor` in the backward pass."""
    return x * factor - x.detach() * (factor - 1.0)


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
