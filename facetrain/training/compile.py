"""model.compile: the training network run through torch.compile, with a one-line error where it cannot work."""

from __future__ import annotations

import torch

from facetrain.errors import UserError


def compile_forward(model: torch.nn.Module):
    """model.compile: torch.compile compiles at the first call (minutes on a CPU). Where it cannot work (no C++
    compiler for the CPU backend, no Triton for GPUs) that call fails with one line, not a traceback wall."""
    from torch._dynamo.exc import BackendCompilerFailed

    compiled = torch.compile(model)

    def forward(images: torch.Tensor) -> torch.Tensor:
        try:
            return compiled(images)
        except BackendCompilerFailed as err:
            reason = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
            raise UserError(f"model.compile: torch.compile failed on this machine ({reason.strip()[:200]}); set "
                            "model.compile false, or install what it names") from None

    return forward
