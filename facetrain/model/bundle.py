"""A bundle's weights: write a trained model as a bundle, load one back as a model in eval mode.

The file names, the metadata and what `--model` can name are `model.files` (torch-free); this module adds the
PyTorch side. Weights are safetensors: nothing is unpickled on load.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from facetrain.config.load import to_dict
from facetrain.config.schema import ModelConfig
from facetrain.data.images import Preprocess
from facetrain.errors import UserError
from facetrain.model.card import CARD_FILE, CARD_KEY, build_card, render_markdown
from facetrain.model.files import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    META_FILE,
    WEIGHTS_FILE,
    check_init_from,
    read_bundle_meta,
)
from facetrain.model.network import EmbeddingModel, create_model


def write_bundle(directory: str | Path, model: nn.Module, model_cfg: ModelConfig, pre: Preprocess,
                 extra: dict | None = None) -> None:
    """Write weights + metadata + model card into `directory` (which must exist; the callers write into a
    `.tmp` directory and swap it into place, so the three files appear together)."""
    directory = Path(directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    meta = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "model": to_dict(model_cfg),
            "preprocess": pre.to_dict(), "threshold": None, "threshold_far": None}
    meta.update(extra or {})
    meta[CARD_KEY] = build_card(meta)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    (directory / CARD_FILE).write_text(render_markdown(meta[CARD_KEY]))


def write_random_bundle(directory: str | Path, backbone: str, embedding_dim: int, image_size: int,
                        channels_last: bool = True, seed: int = 0) -> Path:
    """A bundle of `backbone` with seeded random weights (no download), created at `directory`: a model of a
    real architecture's cost for benchmarks and tests that need one but not a trained one."""
    import torch

    from facetrain.config.schema import DataConfig
    from facetrain.model.network import resolve_preprocess

    directory = Path(directory)
    directory.mkdir(parents=True)
    cfg = ModelConfig(backbone=backbone, embedding_dim=embedding_dim, channels_last=channels_last)
    with torch.random.fork_rng(devices=[]):  # the caller's random streams stay untouched
        torch.manual_seed(seed)
        model = create_model(cfg)
    write_bundle(directory, model, cfg, resolve_preprocess(DataConfig(image_size=image_size), model), {"step": 0})
    return directory


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


def load_initial_weights(model: nn.Module, model_cfg: ModelConfig) -> dict:
    """Copy model.init_from's network weights (backbone and head) into `model`, in place; returns its metadata.
    Frozen stages
    (model.freeze_stages) may differ from the run that wrote them: a frozen BatchNorm holds the same tensors as a
    trained one less its batch counter, so only `num_batches_tracked` may be missing or left over."""
    meta = check_init_from(model_cfg)
    path = Path(meta["path"]) / WEIGHTS_FILE
    try:
        missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    except RuntimeError as err:  # a tensor of another shape
        first = str(err).strip().splitlines()[-1].strip()[:200]
        raise UserError(f"model.init_from: {path} does not fit this model: {first}") from None
    misfit = [k for k in (*missing, *unexpected) if not k.endswith("num_batches_tracked")]
    if misfit:
        raise UserError(f"model.init_from: {path} does not fit this model ({len(misfit)} tensors differ, e.g. "
                        f"{misfit[0]}); give a bundle of the same backbone")
    return meta
