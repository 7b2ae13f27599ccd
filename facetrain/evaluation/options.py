"""`EvalOptions`: everything `facetrain.eval` accepts, checked before any file is read. Its own module because
both the evaluation flow (evaluator.py) and the protocols (protocols.py) take it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from facetrain.config.constants import MAX_IMAGE_PIXELS
from facetrain.errors import UserError
from facetrain.evaluation.bootstrap import DEFAULT_LEVEL, DEFAULT_REPLICATES, check_bootstrap_options
from facetrain.evaluation.fta import DEFAULT_FTA_POLICY, FTA_POLICIES

#: eval's former `--bad-images` values, still accepted: the `--fta` policy each one means.
BAD_IMAGES_AS_FTA = {"error": "error", "skip": "exclude"}


@dataclass
class EvalOptions:
    """Everything `facetrain.eval` accepts (facetrain/eval.py maps the command line onto this)."""

    model: str
    data: str = ""
    pairs: str = ""
    benchmarks: str = ""
    output: str = ""
    target_far: float | None = None
    calibrate: bool = True
    flip: bool = False
    batch_size: int = 64
    num_workers: int = -1
    mixed_precision: str = "auto"
    fold_batchnorm: bool | None = None
    roc_mode: str = "auto"
    max_exact_pairs: int = 20_000_000
    tensorboard: str = ""
    save_embeddings: bool = False
    plots: bool = True
    aligned: bool = False
    backend: str = "torch"
    fta: str = ""
    """Failures to acquire (`evaluation.fta`): nonmatch (default), exclude or error; "" until `check`."""
    bad_images: str = ""
    """The former option (error / skip), mapped onto `fta` by `check`; "" when not given."""
    input_spec: str = ""
    """A third-party ONNX model's input (deploy.teacher.parse_input_spec); implies backend onnxruntime."""
    max_image_pixels: int = MAX_IMAGE_PIXELS
    bootstrap: int = DEFAULT_REPLICATES
    ci_level: float = DEFAULT_LEVEL
    seed: int = 0
    argv: list[str] = field(default_factory=list)

    def check(self) -> None:
        if bool(self.data) == bool(self.benchmarks):
            raise UserError("--data or --benchmarks: give exactly one (a held-out folder, or the folder of "
                            "insightface's lfw.bin, cfp_fp.bin, ... files)")
        if self.benchmarks and self.pairs:
            raise UserError("--pairs: goes with --data (the images it lists), not with --benchmarks")
        if self.target_far is not None and not 0.0 < self.target_far < 1.0:
            raise UserError(f"--target-far: must be in (0, 1), e.g. 1e-3; got {self.target_far}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size: must be >= 1, got {self.batch_size}")
        if self.max_exact_pairs < 1:
            raise UserError(f"--max-exact-pairs: must be >= 1, got {self.max_exact_pairs}")
        if self.pairs and not Path(self.pairs).exists():
            raise UserError(f"--pairs: not found: {self.pairs} (a pairs file, or CFP's Protocol folder)")
        check_bootstrap_options(self.bootstrap, self.ci_level)
        if self.input_spec:
            from facetrain.deploy.input_spec import parse_input_spec

            parse_input_spec(self.input_spec)  # a malformed spec: one line before any file is read
            self.backend = "onnxruntime"  # a third-party file runs in onnxruntime, never in torch
        self._resolve_fta()

    def _resolve_fta(self) -> None:
        """`fta` from --fta or the former --bad-images (error = --fta error, skip = --fta exclude)."""
        if self.fta and self.fta not in FTA_POLICIES:
            raise UserError(f"--fta: choose {', '.join(FTA_POLICIES)}, got {self.fta!r}")
        if self.bad_images:
            if self.bad_images not in BAD_IMAGES_AS_FTA:
                raise UserError(f"--bad-images: choose error or skip, got {self.bad_images!r}")
            meant = BAD_IMAGES_AS_FTA[self.bad_images]
            if self.fta and self.fta != meant:
                raise UserError(f"--bad-images {self.bad_images} means --fta {meant}, which contradicts --fta "
                                f"{self.fta}: give --fta only")
            self.fta = meant
        self.fta = self.fta or DEFAULT_FTA_POLICY
