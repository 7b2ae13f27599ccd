"""Which autocast precision a run uses: one small module so that the evaluator, verify and identify can
decide it without importing the trainer (and pytorch-metric-learning with it).

`auto` (the default of train.mixed_precision and of facetrain.eval) resolves to bf16 on GPUs that have it, fp16
on older GPUs, and on CPUs to bf16 only where the CPU has bf16 instructions and the input is large enough for
them to pay off; an explicit setting is used as given.
"""

from __future__ import annotations

from pathlib import Path

import torch

from facetrain.errors import UserError


def cpu_supports_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# On CPUs, bf16 autocast pays off only for larger inputs. Training step of tf_efficientnetv2_b0, batch 32, 2-core
# AMX CPU, bf16 + channels_last vs fp32 + channels_last (bench/RESULTS.md): 0.81x at 64 px, 1.26x at 96, 1.44x
# at 160, 1.66x at 224. The threshold stays above the 96 px break-even because bf16's oneDNN kernels stall far
# worse than fp32's when other processes compete for the cores, and bf16 gradients are noisier when
# fine-tuning pretrained weights (docs/performance.md).
CPU_BF16_MIN_IMAGE_SIZE = 160


def resolve_mixed_precision(requested: str, image_size: int) -> str:
    """`auto`: the launcher's fp16/bf16 if it asked for one, else bf16 where the hardware runs it faster
    (GPUs with bf16; bf16-capable CPUs from CPU_BF16_MIN_IMAGE_SIZE px), else fp16 on older GPUs, else no."""
    if requested != "auto":
        if requested == "fp16" and not torch.cuda.is_available():
            raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 (or no) on CPU")
        return requested
    from facetrain.runtime.distributed import launcher_mixed_precision, launcher_wants_cpu

    launcher = launcher_mixed_precision()
    if launcher in ("fp16", "bf16"):
        return launcher
    use_cpu = launcher_wants_cpu() or not torch.cuda.is_available()
    if use_cpu:
        return "bf16" if cpu_supports_bf16() and image_size >= CPU_BF16_MIN_IMAGE_SIZE else "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
