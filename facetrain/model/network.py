"""Embedding model: timm backbone + linear head, L2-normalised output; BatchNorm folding for inference.

The model's bundle (weights + metadata on disk) is `model.bundle`; its file names and metadata `model.files`.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from facetrain.config.schema import DataConfig, ModelConfig
from facetrain.data.images import Preprocess
from facetrain.errors import UserError


class EmbeddingModel(nn.Module):
    """backbone (pooled features) -> dropout -> linear -> L2 normalise; cosine score = dot product."""

    def __init__(self, backbone: nn.Module, embedding_dim: int, drop_rate: float = 0.0, freeze_bn: bool = False):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(backbone.num_features, embedding_dim)
        self.freeze_bn = freeze_bn

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if mode and self.freeze_bn:  # normalise with the pretrained running statistics, never update them
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.head(self.dropout(self.backbone(x)))
        # normalise in fp32: under bf16 autocast the norm of a 512-d vector loses ~3 significant digits
        return F.normalize(emb.float(), dim=-1)


def _check_backbone_name(name: str) -> None:
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else " (see timm.list_models())"
        raise UserError(f"model.backbone: unknown timm model {name!r}{hint}")


def create_backbone(cfg: ModelConfig) -> nn.Module:
    _check_backbone_name(cfg.backbone)
    kwargs = dict(num_classes=0, drop_rate=0.0, drop_path_rate=cfg.drop_path_rate or None)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not cfg.pretrained or cfg.init_from:  # model.init_from's weights replace any pretrained ones
        return timm.create_model(cfg.backbone, pretrained=False, **kwargs)
    if cfg.pretrained_file:
        path = Path(cfg.pretrained_file)
        if not path.is_file():
            raise UserError(f"model.pretrained_file: file not found: {path}")
        try:
            return timm.create_model(cfg.backbone, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                     **kwargs)
        except (RuntimeError, KeyError, ValueError, OSError) as err:
            first = str(err).strip().splitlines()[0][:200]
            raise UserError(f"model.pretrained_file: {path} does not fit backbone {cfg.backbone!r}: {first}") from None
    unreachable = _hub_unreachable(cfg.backbone)
    if unreachable:  # fail now: huggingface_hub would retry each weights file 5 times (~45 s) before giving up
        raise _no_pretrained_weights(cfg.backbone, unreachable)
    try:
        return timm.create_model(cfg.backbone, pretrained=True, **kwargs)
    except Exception as err:  # network errors come in many types; the fix is the same
        sentence = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:120]
        raise _no_pretrained_weights(cfg.backbone, f"{type(err).__name__}: {sentence}" if sentence
                                     else type(err).__name__) from None


def _no_pretrained_weights(backbone: str, reason: str) -> UserError:
    return UserError(f"model.pretrained: cannot get timm's pretrained weights for {backbone!r} ({reason}); "
                     "set model.pretrained_file to a local weights file, fill the Hugging Face cache on a machine "
                     "with internet (docs/recipes.md), or set model.pretrained false")


HUB_PROBE_TIMEOUT_S = 5.0
"""Seconds the one metadata request that checks the Hugging Face hub may take before the hub counts as
unreachable."""


def _hub_unreachable(backbone: str) -> str | None:
    """Why timm's hub weights for `backbone` cannot be had now, or None when they can (or are not on the hub):
    not in the local Hugging Face cache, and HF_HUB_OFFLINE set (huggingface_hub's own setting) or one
    metadata request to the hub, without retries, failing to get an answer. Weights already in the cache are
    loaded by timm as usual, online or offline."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    try:
        pcfg = timm.models.get_pretrained_cfg(backbone)
    except RuntimeError:  # an unknown pretrained tag: timm's own error says it
        return None
    if pcfg is None or not pcfg.hf_hub_id:
        return None  # weights from a plain URL (torch.hub), not through huggingface_hub's retries
    repo, _, revision = pcfg.hf_hub_id.partition("@")
    names = [pcfg.hf_hub_filename] if pcfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for name in names:  # timm's load_state_dict_from_hf looks for these
        if isinstance(huggingface_hub.try_to_load_from_cache(repo, name, revision=revision or None), str):
            return None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and they are not in the Hugging Face cache"
    probe = huggingface_hub.get_hf_file_metadata
    no_retry = {"retry_on_errors": False} if "retry_on_errors" in inspect.signature(probe).parameters else {}
    try:
        probe(huggingface_hub.hf_hub_url(repo, names[0], revision=revision or None), timeout=HUB_PROBE_TIMEOUT_S,
              **no_retry)
    except HfHubHTTPError:
        return None  # the hub answered (a missing file is fine: timm tries the next name)
    except Exception as err:  # no answer: DNS, refused or timed-out connection, proxy, TLS
        first = (str(err).strip().splitlines() or [""])[0][:120]
        return f"Hugging Face hub {huggingface_hub.constants.ENDPOINT} unreachable: {type(err).__name__}: {first}"
    return None


def freeze_backbone_stages(backbone: nn.Module, stages: int) -> None:
    """Freeze, in place, the first `stages` coarse parameter groups of a timm backbone (its own
    `group_matcher`: group 0 is the stem, then one group per stage), or the whole backbone for -1. Frozen
    parameters get requires_grad=False and their BatchNorm layers become FrozenBatchNorm2d, so their running
    statistics stay the pretrained ones in train mode too (timm.utils.freeze)."""
    if stages == 0:
        return
    if stages == -1:
        timm.utils.freeze(backbone)
        return
    matcher = getattr(backbone, "group_matcher", None)
    if matcher is None:
        raise UserError(f"model.freeze_stages: backbone {type(backbone).__name__} has no timm stage grouping; "
                        "use -1 (freeze the whole backbone) or 0")
    groups = timm.models.group_modules(backbone, matcher(coarse=True))
    ordered = [groups[k] for k in sorted(groups)]
    if stages > len(ordered):
        raise UserError(f"model.freeze_stages: {stages} > the {len(ordered)} stages of this backbone "
                        "(stem + blocks); use at most that, or -1 for the whole backbone")
    timm.utils.freeze(backbone, [name for group in ordered[:stages] for name in group])


def create_model(cfg: ModelConfig) -> EmbeddingModel:
    backbone = create_backbone(cfg)
    freeze_backbone_stages(backbone, cfg.freeze_stages)  # after the pretrained weights are in
    model = EmbeddingModel(backbone, cfg.embedding_dim, cfg.drop_rate, cfg.freeze_bn)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# ----------------------------------------------------------------------------------------------------------
# Inference: BatchNorm folded into the convolutions


def _is_batchnorm(module: nn.Module) -> bool:
    """BatchNorm with running statistics: torch's, timm's *Act variants (norm + activation in one module) and the
    frozen ones `model.freeze_stages` leaves (torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d)."""
    if "BatchNorm" not in type(module).__name__:
        return False
    stats = [getattr(module, k, None) for k in ("running_mean", "running_var", "weight", "bias")]
    return all(isinstance(t, torch.Tensor) for t in stats) and isinstance(getattr(module, "eps", None), float)


@torch.no_grad()
def _fold_in_place(model: nn.Module) -> int:
    """Fold each BatchNorm registered right after a Conv2d in the same parent into that convolution (weight x
    gamma / sqrt(var + eps) per output channel, bias shifted to match); the BatchNorm becomes its activation
    (timm's BatchNormAct2d) or nothing. Registration order is only a guess at the data flow: `fold_batchnorm`
    checks it. Returns the number of folded pairs."""
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:], strict=False):
            if not (isinstance(conv, nn.Conv2d) and _is_batchnorm(bn)) or bn.running_mean.numel() != conv.out_channels:
                continue
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            conv.bias = nn.Parameter(((bias - bn.running_mean) * scale + bn.bias).to(conv.weight.dtype))
            after = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if isinstance(m, nn.Module)]
            setattr(parent, bn_name, nn.Sequential(*after) if after else nn.Identity())
            folded += 1
    return folded


_FOLD_CHECKED: dict[tuple, bool] = {}  # architecture -> its folding reproduced the outputs


@torch.no_grad()
def fold_batchnorm(model: nn.Module, image_size: int) -> nn.Module:
    """For inference: an eval-mode copy of `model` with its BatchNorm layers folded into the preceding
    convolutions. Same outputs (fp32: to ~1e-6; under bf16 autocast, within bf16 rounding), fewer passes over
    the activations: tf_efficientnetv2_b0's forward (59 BatchNorms, bf16, batch 64, 2-core CPU) takes 6.0-6.5
    instead of 8.7-9.3 ms per 224 px image; `facetrain.eval` on 950 images embeds ~5-10% faster end to end,
    where decoding shares the two cores.

    Which BatchNorm follows which convolution is read from the module order, so the first time an architecture
    is folded, a throwaway copy with random BatchNorm statistics is folded too and its outputs compared on a
    random batch (fp32, 2 images at `image_size`); an architecture whose outputs change (a BatchNorm that is
    not fed by the convolution before it) keeps its BatchNorm layers: `model` itself comes back. Training is
    never affected: the copy is separate and the bundle keeps the original weights."""
    arch = tuple((name, type(m).__name__) for name, m in model.named_modules())
    if arch not in _FOLD_CHECKED:
        _FOLD_CHECKED[arch] = _folding_reproduces(model, image_size)
    if not _FOLD_CHECKED[arch]:
        return model
    folded = copy.deepcopy(model)
    _fold_in_place(folded)
    return folded.eval()


FOLD_MIN_IMAGES = 128
"""Fewer images than this are embedded with the model as it is: the copy (and, once per architecture, the
check) costs about what embedding ~50 images at 224 px saves on a CPU."""


def inference_model(model: nn.Module, image_size: int, n_images: int, fold: bool = True) -> nn.Module:
    """The module to embed `n_images` images with: `fold_batchnorm`'s copy when `fold` (config
    model.fold_batchnorm) and there are at least FOLD_MIN_IMAGES of them, else `model` itself."""
    if not fold or n_images < FOLD_MIN_IMAGES:
        return model
    return fold_batchnorm(getattr(model, "module", model), image_size)  # unwrapped from DDP: eval needs no sync


def _folding_reproduces(model: nn.Module, image_size: int) -> bool:
    generator = torch.Generator().manual_seed(0)
    probe = copy.deepcopy(model).float().eval()
    for m in probe.modules():
        if _is_batchnorm(m):  # statistics far from identity, so a misplaced fold shows in the outputs
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 2.0), (m.weight, 0.5, 1.5),
                              (m.bias, -0.5, 0.5)):
                t.copy_(torch.empty(t.shape).uniform_(lo, hi, generator=generator))
    folded = copy.deepcopy(probe)
    if _fold_in_place(folded) == 0:
        return False
    device = next(probe.parameters()).device
    x = torch.randn(2, 3, image_size, image_size, generator=generator).to(device)
    a, b = probe(x).float(), folded(x).float()
    return bool(torch.isfinite(b).all()) and bool((a - b).abs().max() <= 1e-3 * a.abs().max().clamp_min(1e-6))


def resolve_preprocess(data: DataConfig, model: EmbeddingModel) -> Preprocess:
    """Normalisation from the config, else the backbone's own pretrained config (never a hard-coded mean)."""
    pcfg = getattr(model.backbone, "pretrained_cfg", None) or {}
    mean = data.mean or list(pcfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
    std = data.std or list(pcfg.get("std", timm.data.IMAGENET_DEFAULT_STD))
    return Preprocess(data.image_size, [float(v) for v in mean], [float(v) for v in std])
