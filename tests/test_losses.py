"""Losses and miners compute their similarities in fp32, whatever autocast the training step runs under."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances

from facetrain.config import LossConfig
from facetrain.losses import MetricLoss


@pytest.mark.parametrize("name,miner", [("triplet", "triplet_hard"), ("arcface", "none"), ("contrastive", "none"),
                                        ("multi_similarity", "multi_similarity")])
def test_similarities_the_loss_and_miner_see_are_fp32_under_bf16_autocast(name, miner):
    torch.manual_seed(0)
    loss = MetricLoss(LossConfig(name=name, miner=miner, margin=0.1 if name != "arcface" else 28.6),
                      num_classes=4, embedding_dim=16)
    seen = []
    for module in loss.modules():
        if isinstance(module, distances.BaseDistance):  # the similarity matrices themselves, not the inputs
            module.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    emb = F.normalize(torch.randn(16, 16), dim=-1).bfloat16()  # what a bf16 forward pass hands over
    labels = torch.arange(16) // 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(emb, labels)
    assert seen and set(seen) == {torch.float32}, seen
    reference = loss(emb.float(), labels)  # no autocast at all
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-7)
