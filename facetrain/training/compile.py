"""model.compile: the training network run through torch.compile, with a one-line error where it cannot work."""

from __future__ import annotations

import torch

from facetrain.errors import UserError


def compile_forward(model: torch.nn.Module):
    """model.compile: torch.compile compiles at the first call (minutes on a CPU). Where it cannot work (no C++
    compiler for the CPU backend, no Triton for GPUs) that call fails with one line, not a traceback wall."""
    from torch._dynamo.exc import BackendCompilerFailed

    if next(model.parameters()).device.type == "cpu":
        _require_cpu_compiler()
    compiled = torch.compile(model)

    def forward(images: torch.Tensor) -> torch.Tensor:
        try:
            return compiled(images)
        except BackendCompilerFailed as err:
            reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise UserError(f"model.compile: torch.compile failed on this machine ({reason.strip()[:200]}); set "
                            "model.compile false, or install what it names") from None

    return forward


def _require_cpu_compiler() -> None:
    """The CPU backend needs a working C++ compiler ($CXX or the default): probed now (~0.1 s), so a machine
    without one is told before the first step rather than after dynamo has traced the whole model (~30 s)."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as err:  # noqa: BLE001 -- InvalidCxxCompiler, or the probe's own failure: both mean "none"
        reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise UserError(f"model.compile: torch.compile needs a C++ compiler on this machine ({reason.strip()[:200]}); "
                        "set model.compile false, or install one (e.g. g++) or point CXX at it") from None
