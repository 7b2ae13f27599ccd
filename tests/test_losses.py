"""Losses and miners compute their similarities in fp32, whatever autocast the training step runs under."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances

from facetrain.config.schema import LossConfig
from facetrain.training.losses import MetricLoss


@pytest.mark.parametrize("name,miner", [("triplet", "triplet_hard"), ("arcface", "none"), ("contrastive", "none"),
                                        ("multi_similarity", "multi_similarity"), ("cosface", "none"),
                                        ("subcenter_arcface", "none")])
def test_similarities_the_loss_and_miner_see_are_fp32_under_bf16_autocast(name, miner):
    torch.manual_seed(0)
    loss = MetricLoss(LossConfig(name=name, miner=miner), num_classes=4, embedding_dim=16)
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


def _head_logits(loss: MetricLoss, emb: torch.Tensor) -> torch.Tensor:
    """cos(embedding, each identity's weights): (batch, identities, sub-centers)."""
    weights = F.normalize(loss.loss.W.detach().t(), dim=-1)
    return (emb @ weights.t()).view(len(emb), 4, -1)


@pytest.mark.parametrize("name,margin,expect_margin", [
    ("arcface", None, math.radians(28.6)), ("arcface", 10.0, math.radians(10.0)),
    ("cosface", None, 0.35), ("cosface", 0.2, 0.2),
    ("subcenter_arcface", None, math.radians(28.6)),
])
def test_margin_heads_are_cross_entropy_on_the_margin_penalised_scaled_cosines(name, margin, expect_margin):
    """Each head against its formula, written out here: the configured margin (or the standard one when unset),
    scale and sub-centers reach the loss. ArcFace: s*cos(theta + m) for the own identity; CosFace: s*(cos - m);
    sub-center ArcFace: the closest of the identity's sub-centers is its cosine."""
    torch.manual_seed(0)
    cfg = LossConfig(name=name, margin=margin, scale=16.0, sub_centers=3)
    loss = MetricLoss(cfg, num_classes=4, embedding_dim=8)
    emb = F.normalize(torch.randn(12, 8), dim=-1)
    labels = torch.arange(12) % 4
    cos = _head_logits(loss, emb)
    assert cos.shape[-1] == (3 if name == "subcenter_arcface" else 1)
    cos = cos.max(dim=-1).values
    own = cos.gather(1, labels[:, None])
    if name == "cosface":
        penalised = own - expect_margin
    else:
        penalised = torch.cos(torch.acos(own.clamp(-1, 1)) + expect_margin)
    logits = cos.scatter(1, labels[:, None], penalised) * 16.0
    expected = F.cross_entropy(logits, labels)
    assert loss(emb, labels).item() == pytest.approx(expected.item(), rel=1e-4)


def test_margin_heads_refuse_a_miner():
    from facetrain.config.load import load_config
    from facetrain.errors import UserError

    for name in ("arcface", "cosface", "subcenter_arcface"):
        with pytest.raises(UserError, match=f"loss.miner: {name} is a classification loss"):
            load_config(None, ["--loss.name", name, "--loss.miner", "triplet_hard"])
