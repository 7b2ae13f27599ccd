"""Batched, rank-sharded embedding of a list of images (used by validation, eval, verify and identify).

Each rank embeds a contiguous shard (`distributed.shard_range`) in batches and the shards are gathered in
order, so every rank ends with the embeddings of all images, none duplicated or dropped, whatever the count.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from facetrain.data import Preprocess, ToModelInput, collate
from facetrain.distributed import gather_uneven, shard_range


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset, positions: range):
        self.dataset, self.positions = dataset, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int):
        return self.dataset[self.positions[i]][0]


@torch.no_grad()
def embed_dataset(model: nn.Module, dataset, pre: Preprocess, batch_size: int, accelerator=None,
                  num_workers: int = 0, flip: bool = False, channels_last: bool = False) -> torch.Tensor:
    """L2-normalised embeddings (N, D) float32 on CPU for every item of `dataset` ((uint8 image, ...) tuples
    from `data.eval_transform`), normalised with `pre`'s mean/std.

    flip=True adds the embedding of the mirrored image before re-normalising (the flip test)."""
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    positions = shard_range(len(dataset), rank, world)
    loader = torch.utils.data.DataLoader(_Indexed(dataset, positions), batch_size=batch_size, shuffle=False,
                                         num_workers=num_workers, pin_memory=device.type == "cuda",
                                         collate_fn=collate)
    to_input = ToModelInput(pre, device, channels_last)
    was_training = model.training
    model.eval()
    autocast = accelerator.autocast() if accelerator is not None else nullcontext()
    chunks = []
    with autocast:
        for images in loader:
            images = to_input(images)
            emb = model(images).float()
            if flip:
                emb = torch.nn.functional.normalize(emb + model(torch.flip(images, dims=[3])).float(), dim=-1)
            chunks.append(emb)
    model.train(was_training)
    dim = _output_dim(model)
    local = torch.cat(chunks) if chunks else torch.zeros((0, dim), device=device)
    if world > 1:
        local = gather_uneven(local, len(dataset), accelerator)
    return local.cpu()


def _output_dim(model: nn.Module) -> int:
    inner = getattr(model, "module", model)
    return inner.head.out_features
