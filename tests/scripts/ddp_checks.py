"""Run under `accelerate launch` with N CPU processes (tests/test_distributed.py): checks of the distributed
building blocks against one process, each printing `ok <name>` on rank 0. Exits non-zero on the first failure."""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from facetrain.config.schema import ModelConfig
from facetrain.data.images import Preprocess
from facetrain.evaluation.embedding import embed_dataset
from facetrain.model.network import create_model
from facetrain.runtime.distributed import _scale_grad, convert_to_global_batchnorm, gather_for_loss, shard_range


class Images(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], i


def assert_close_to_scale(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to float summation order: relative to the tensor's own scale (gradients of BatchNorm biases
    are sums that cancel to ~1e-7, where an element-wise relative tolerance means nothing)."""
    error = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert error <= 1e-4 * scale + 1e-6, f"{what}: max error {error:.3g} at scale {scale:.3g}"


def main() -> int:
    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    say = print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(0)
    model = create_model(ModelConfig(backbone="test_efficientnet", embedding_dim=16, channels_last=False))
    reference = copy.deepcopy(model)  # one process's view, unconverted, never wrapped
    pre = Preprocess(32, [0.5] * 3, [0.5] * 3)

    # 1. forward of the gradient-scaling slice: the identity bit for bit at any world size
    x = torch.randn(4096, dtype=torch.float32)
    assert torch.equal(_scale_grad(x, float(world)), x), "scale_grad changes values in the forward pass"
    say("ok scale_grad_forward_exact", flush=True)

    # 2. embedding through a DDP-wrapped BatchNorm model when some ranks get no image, or fewer batches
    ddp = acc.prepare(copy.deepcopy(model))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    for n, batch in ((1, 4), (3, 1)):
        got = embed_dataset(ddp, Images(images[:n]), pre, batch, acc)
        want = embed_dataset(reference, Images(images[:n]), pre, batch, None)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    say("ok embed_with_empty_ranks", flush=True)

    # 3. BatchNorm over the global batch: each rank's slice, gathered loss, DDP-averaged gradients == one
    #    process on the whole batch (gradients and running statistics)
    synced = copy.deepcopy(model).train()
    assert convert_to_global_batchnorm(synced) > 0
    synced = acc.prepare(synced)
    single = copy.deepcopy(model).train()
    batch = torch.randn(4 * world, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.arange(4 * world) // 2
    rows = shard_range(len(batch), rank, world)
    emb = synced(batch[rows.start:rows.stop])
    all_emb, all_labels = gather_for_loss(emb, labels[rows.start:rows.stop], acc)
    loss = F.cross_entropy(all_emb @ all_emb.T * 10, all_labels)  # any loss of the whole global batch
    acc.backward(loss)
    ref_emb = single(batch)
    F.cross_entropy(ref_emb @ ref_emb.T * 10, labels).backward()
    unwrapped = acc.unwrap_model(synced)
    for (name, p), q in zip(unwrapped.named_parameters(), single.parameters(), strict=True):
        assert_close_to_scale(p.grad, q.grad, f"grad {name}")
    for (name, b), c in zip(unwrapped.named_buffers(), single.buffers(), strict=True):
        assert_close_to_scale(b.float(), c.float(), f"buffer {name}")
    say("ok global_batchnorm_equals_one_process", flush=True)
    acc.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
