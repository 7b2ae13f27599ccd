"""Embedding model (timm backbone + linear head, L2-normalised output) and the portable model bundle.

A bundle is a directory: `model.safetensors` (weights only, nothing unpickled on load) and `facetrain.json`
(format tag, model config, preprocessing, calibrated threshold, training config). Training writes the best
model as `<output_dir>/bundle/`; every checkpoint directory holds the same two files, so the evaluator and
verifier accept either.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from facetrain.config import DataConfig, ModelConfig, to_dict
from facetrain.data import Preprocess
from facetrain.errors import UserError

BUNDLE_FORMAT = "facetrain-bundle"
BUNDLE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "facetrain.json"


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
    if not cfg.pretrained:
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
    try:
        return timm.create_model(cfg.backbone, pretrained=True, **kwargs)
    except Exception as err:  # network errors come in many types; the fix is the same
        sentence = (str(err).strip().splitlines() or [""])[0].split(". ")[0][:120]
        reason = f"{type(err).__name__}: {sentence}" if sentence else type(err).__name__
        raise UserError(f"model.pretrained: cannot get timm's pretrained weights for {cfg.backbone!r} ({reason}); "
                        "set model.pretrained_file to a local weights file, fill the Hugging Face cache on a machine "
                        "with internet (docs/recipes.md), or set model.pretrained false") from None


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


def resolve_preprocess(data: DataConfig, model: EmbeddingModel) -> Preprocess:
    """Normalisation from the config, else the backbone's own pretrained config (never a hard-coded mean)."""
    pcfg = getattr(model.backbone, "pretrained_cfg", None) or {}
    mean = data.mean or list(pcfg.get("mean", timm.data.IMAGENET_DEFAULT_MEAN))
    std = data.std or list(pcfg.get("std", timm.data.IMAGENET_DEFAULT_STD))
    return Preprocess(data.image_size, [float(v) for v in mean], [float(v) for v in std])


# ----------------------------------------------------------------------------------------------------------
# Bundles


def write_bundle(directory: str | Path, model: nn.Module, model_cfg: ModelConfig, pre: Preprocess,
                 extra: dict | None = None) -> None:
    """Write weights + metadata into `directory` (which must exist)."""
    directory = Path(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    meta = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "model": to_dict(model_cfg),
            "preprocess": pre.to_dict(), "threshold": None, "threshold_far": None}
    meta.update(extra or {})
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written `tmp` directory in for `final` (rename is atomic; the old copy goes last)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def read_bundle_meta(path: str | Path) -> dict:
    path = Path(path)
    if path.is_file() and path.name in (WEIGHTS_FILE, META_FILE):
        path = path.parent
    if not path.exists():
        raise UserError(f"--model: not found: {path}")
    meta_path = path / META_FILE
    if not path.is_dir() or not meta_path.is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"--model: {path} is not a facetrain bundle or checkpoint (expected a directory with "
                        f"{META_FILE} and {WEIGHTS_FILE}, e.g. <output_dir>/bundle)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{meta_path}: corrupt metadata ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != BUNDLE_FORMAT:
        raise UserError(f"{meta_path}: not a facetrain bundle (format tag missing)")
    if meta.get("version", 0) > BUNDLE_VERSION:
        raise UserError(f"{meta_path}: bundle version {meta['version']} is newer than this facetrain; upgrade")
    meta["path"] = str(path)
    return meta


def load_bundle(path: str | Path, map_location: str = "cpu") -> tuple[EmbeddingModel, Preprocess, dict]:
    """(model in eval mode, preprocessing, metadata). Weights come from safetensors: nothing is unpickled."""
    meta = read_bundle_meta(path)
    mcfg = ModelConfig(**{k: v for k, v in meta["model"].items() if k in ModelConfig.__dataclass_fields__})
    mcfg.pretrained, mcfg.pretrained_file, mcfg.compile = False, "", False
    model = create_model(mcfg)
    try:
        state = load_file(str(Path(meta["path"]) / WEIGHTS_FILE), device=map_location)
        model.load_state_dict(state)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:200]
        raise UserError(f"{meta['path']}/{WEIGHTS_FILE}: cannot load weights ({first})") from None
    pre = Preprocess(**meta["preprocess"])
    return model.eval(), pre, meta


def update_bundle_meta(path: str | Path, **fields) -> None:
    """Merge fields (e.g. the calibrated threshold) into a bundle's metadata, atomically."""
    meta = read_bundle_meta(path)
    meta.pop("path", None)
    meta.update(fields)
    target = Path(path) / META_FILE
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, target)
