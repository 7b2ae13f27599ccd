"""Losses and miners by name (registries of pytorch-metric-learning constructors).

    loss.name:  LOSS_NAMES of facetrain/config/names.py (pair/triplet losses of the batch, margin-softmax heads)
    loss.miner: MINER_NAMES of facetrain/config/names.py
    distill.<name>_weight: DISTILL_LOSS_NAMES (the student's embeddings against a teacher's, training/distill.py)

All take (embeddings, labels[, mining tuples]) on the *global* batch (see `distributed.gather_for_loss`).
The margin heads own a class-weight matrix (one column per training identity, `sub_centers` columns for
sub-center ArcFace), trained with the model and saved in its checkpoints; they take no miner.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners
from torch import nn

from facetrain.config.names import DISTILL_LOSS_NAMES, LOSS_NAMES, MINER_NAMES, STANDARD_MARGINS, keyed_by
from facetrain.config.schema import LossConfig


def _distance(cfg: LossConfig) -> distances.BaseDistance:
    return distances.CosineSimilarity() if cfg.distance == "cosine" else distances.LpDistance(p=2)


class BCEPairLoss(nn.Module):
    """The article's binary cross-entropy on pairs: p(same) = sigmoid(scale * (cos - bias)) for every pair
    in the batch (or the mined pairs), positives and negatives weighted equally (a P x m batch has ~P times
    more negative pairs than positive ones). PML has no such loss."""

    def __init__(self, scale: float, bias: float = 0.5):
        super().__init__()
        self.scale, self.bias = scale, bias

    def forward(self, emb: torch.Tensor, labels: torch.Tensor, indices_tuple=None) -> torch.Tensor:
        if indices_tuple is None:
            i, j = torch.triu_indices(len(labels), len(labels), offset=1, device=emb.device)
        elif len(indices_tuple) == 4:  # mined pairs (a1, p, a2, n)
            a1, p, a2, n = indices_tuple
            i, j = torch.cat([a1, a2]), torch.cat([p, n])
        else:  # mined triplets (a, p, n)
            a, p, n = indices_tuple
            i, j = torch.cat([a, a]), torch.cat([p, n])
        same = (labels[i] == labels[j]).float()
        logits = self.scale * ((emb[i] * emb[j]).sum(-1) - self.bias)
        n_pos = same.sum().clamp(min=1)
        n_neg = (1 - same).sum().clamp(min=1)
        weight = same / n_pos + (1 - same) / n_neg
        return (F.binary_cross_entropy_with_logits(logits, same, reduction="none") * weight).sum() / 2


def _margin(cfg: LossConfig) -> float:
    return STANDARD_MARGINS[cfg.name] if cfg.margin is None else cfg.margin


def _triplet(cfg: LossConfig, num_classes: int, dim: int) -> nn.Module:
    return losses.TripletMarginLoss(margin=_margin(cfg), distance=_distance(cfg))


def _contrastive(cfg: LossConfig, num_classes: int, dim: int) -> nn.Module:
    return losses.ContrastiveLoss(pos_margin=cfg.pos_margin, neg_margin=cfg.neg_margin, distance=_distance(cfg))


def _multi_similarity(cfg: LossConfig, num_classes: int, dim: int) -> nn.Module:
    return losses.MultiSimilarityLoss(alpha=cfg.ms_alpha, beta=cfg.ms_beta, base=cfg.ms_base)


def _arcface(cfg: LossConfig, num_classes: int, dim: int) -> nn.Module:
    return losses.ArcFaceLoss(num_classes=num_classes, embedding_size=dim, margin=_margin(cfg), scale=cfg.scale)


def _cosface(cfg: LossConfig, num_classes: int, dim: int) -> nn.Module:
    return losses.CosFaceLoss(num_classes=num_classes, embedding_size=dim, margin=_margin(cfg), scale=cfg.scale)


def _subcenter_arcface(cfg: LossConfig, num_classes: int, dim: int) -> nn.Module:
    return losses.SubCenterArcFaceLoss(num_classes=num_classes, embedding_size=dim, margin=_margin(cfg),
                                       scale=cfg.scale, sub_centers=cfg.sub_centers)


def _bce_pair(cfg: LossConfig, num_classes: int, dim: int) -> nn.Module:
    return BCEPairLoss(scale=cfg.scale)


LOSSES: dict[str, Callable[[LossConfig, int, int], nn.Module]] = keyed_by(LOSS_NAMES, {
    "triplet": _triplet,
    "contrastive": _contrastive,
    "bce_pair": _bce_pair,
    "multi_similarity": _multi_similarity,
    "arcface": _arcface,
    "cosface": _cosface,
    "subcenter_arcface": _subcenter_arcface,
})

MINERS: dict[str, Callable[[LossConfig], miners.BaseMiner | None]] = keyed_by(MINER_NAMES, {
    "none": lambda cfg: None,
    "triplet_all": lambda cfg: miners.TripletMarginMiner(margin=cfg.miner_margin, type_of_triplets="all",
                                                         distance=_distance(cfg)),
    "triplet_hard": lambda cfg: miners.TripletMarginMiner(margin=cfg.miner_margin, type_of_triplets="hard",
                                                          distance=_distance(cfg)),
    "triplet_semihard": lambda cfg: miners.TripletMarginMiner(margin=cfg.miner_margin,
                                                              type_of_triplets="semihard", distance=_distance(cfg)),
    "multi_similarity": lambda cfg: miners.MultiSimilarityMiner(epsilon=cfg.miner_epsilon),
})


class MetricLoss(nn.Module):
    """loss(miner(emb, labels)) with the chosen pieces; holds the loss's own parameters (margin heads). The names
    and their combination were checked when the config loaded (facetrain/config/checks.py)."""

    def __init__(self, cfg: LossConfig, num_classes: int, embedding_dim: int):
        super().__init__()
        self.loss = LOSSES[cfg.name](cfg, num_classes, embedding_dim)
        self.miner = MINERS[cfg.miner](cfg)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Mining and the loss run in fp32 with autocast off: casting the embeddings is not enough, since under
        # autocast PML's similarity matmuls (and ArcFace's embeddings x class-weights product) would run in
        # bf16/fp16 again, and margins of 0.1 in cosine units are then a few bf16 steps (triplet 0.108887 vs
        # 0.108643 in fp32).
        with autocast_off(emb.device.type):
            emb = emb.float()
            tuples = self.miner(emb, labels) if self.miner is not None else None
            return self.loss(emb, labels, tuples) if tuples is not None else self.loss(emb, labels)


def autocast_off(device_type: str):
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


# ----------------------------------------------------------------------------------------------------------
# Distillation: the student's embeddings against a teacher's on the same images (training/distill.py)


def cosine_regression_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of 1 - cos(student_i, teacher_i): 0 when every pair points the same way, 1 when
    orthogonal, 2 when opposite. `student` is already projected to the teacher's size."""
    return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()


def relational_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between the batch's cosine-similarity matrices of the student and the teacher,
    over the off-diagonal entries (the diagonal is 1 in both). Sizes may differ: only the (N, N) matrices meet.
    On the global batch it is exact under DDP like the metric losses (every pair of the global batch counts)."""
    s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    off_diagonal = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    return (s @ s.T - t @ t.T)[off_diagonal].square().mean()


@dataclass(frozen=True)
class DistillTerm:
    """One distillation term: its loss, whether it takes the projected student embedding (the teacher's size)
    or the student's own, and the name it is logged under."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    projected: bool
    log_name: str


DISTILL_LOSSES: dict[str, DistillTerm] = keyed_by(DISTILL_LOSS_NAMES, {
    "cosine": DistillTerm(cosine_regression_loss, projected=True, log_name="train/loss_distill_cos"),
    "relational": DistillTerm(relational_loss, projected=False, log_name="train/loss_distill_rel"),
})
