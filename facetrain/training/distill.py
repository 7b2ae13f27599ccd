"""Learning from a face model (the `distill` config section): an online teacher embeds the very view the student
trains on, and the distillation terms of training/losses.py pull the student towards it.

Function matching: the teacher sees the student's augmented input of this step (crop, rotation, colour, ...),
not a fixed view of the image, so every step brings new targets and the student learns the teacher's function
rather than memorising a few thousand fixed embeddings (issue 25). The model input is normalised with the
student's mean/std (`Preprocess`); `teacher_view` undoes that to the RGB [0, 1] images a teacher takes.

The teacher itself is loaded by facetrain/deploy/teacher.py (`load_teacher`: a third-party ONNX file with its
input spec, a facetrain export or a bundle); here it is anything with `embed(images) -> (N, D) L2-normalised
float32` and `dim` (`deploy.teacher.Teacher`). The student's embedding reaches the
teacher's size through a learned projection (distill.projection), a stateful part of the checkpoints, never
exported: the bundle and the ONNX file hold the student alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.markup import escape
from torch import nn

from facetrain.config.names import PROJECTION_NAMES, keyed_by
from facetrain.config.schema import DistillConfig
from facetrain.data.images import Preprocess
from facetrain.data.transforms import collate
from facetrain.deploy.teacher import Teacher, describe, load_teacher, teacher_sha256
from facetrain.errors import UserError
from facetrain.runtime.distributed import gather_for_loss
from facetrain.training.losses import DISTILL_LOSSES, DistillTerm, autocast_off


def build_teacher(cfg: DistillConfig, device: torch.device | str = "cpu") -> Teacher:
    """The teacher of distill.teacher, loaded once per process (its file was checked when the config loaded),
    on this rank's training device when it can run there (deploy/teacher.py `onnx_providers`). onnxruntime gets
    this process's torch thread count: under DDP each rank has its share of the cores."""
    return load_teacher(cfg.teacher, cfg.teacher_input or None, threads=torch.get_num_threads(), device=str(device))


def teacher_line(teacher: Teacher, device: torch.device | str) -> str:
    """The run's one line about its teacher; a warning when the student trains on a GPU and the teacher cannot
    (an ONNX teacher on the CPU then costs many times the student's step)."""
    text = f"teacher: {escape(describe(teacher))}"
    on_cpu = torch.device(device).type != "cpu" and any(n.startswith("on the CPU") for n in teacher.notes)
    return f"[yellow]warning:[/] {text}" if on_cpu else text


def teacher_provenance(path: str | Path) -> dict:
    """What the model card records of the teacher (metadata key `teacher`): its file name, the sha256 of its
    bytes (a bundle's: of its weights file), and its licence as the `<file>.SOURCE.txt` beside it states it (the
    licence lines), else "not recorded" -- a student inherits its teacher's terms, so the card says when they are
    unknown."""
    path = Path(path)
    digest = teacher_sha256(path)
    source = path.with_name(path.name + ".SOURCE.txt")
    licence = ""
    if source.is_file():
        lines = [ln.strip() for ln in source.read_text(errors="replace").splitlines()]
        licence = " ".join(ln for ln in lines if "licen" in ln.lower())[:400]
    return {"file": path.name, "sha256": digest,
            "licence": licence or f"not recorded (no licence line in {source.name}): check the teacher's terms"}


def _no_projection(student_dim: int, teacher_dim: int) -> nn.Module:
    if student_dim != teacher_dim:
        raise UserError(f"distill.projection: 'none' needs model.embedding_dim ({student_dim}) equal to the "
                        f"teacher's embedding size ({teacher_dim}); set distill.projection auto or "
                        f"model.embedding_dim {teacher_dim}")
    return nn.Identity()


def _linear(student_dim: int, teacher_dim: int) -> nn.Module:
    return nn.Linear(student_dim, teacher_dim, bias=False)  # no bias: only the direction of its output counts


def _auto(student_dim: int, teacher_dim: int) -> nn.Module:
    return nn.Identity() if student_dim == teacher_dim else _linear(student_dim, teacher_dim)


PROJECTIONS: dict[str, Callable[[int, int], nn.Module]] = keyed_by(PROJECTION_NAMES, {
    "auto": _auto,
    "linear": _linear,
    "none": _no_projection,
})


def teacher_view(images: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """The student's normalised model input (N, 1 or 3, H, W) -> RGB float32 in [0, 1], what a teacher takes."""
    mean = torch.tensor(pre.mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    rgb = (images.float() * std + mean).clamp_(0.0, 1.0)
    return rgb.expand(-1, 3, -1, -1) if rgb.shape[1] == 1 else rgb.contiguous()


def pixels_view(images: torch.Tensor) -> torch.Tensor:
    """Un-normalised uint8 pixels (N, 1 or 3, H, W) -> RGB float32 in [0, 1], what a teacher takes (a gray
    image as three equal channels)."""
    return (images.float() / 255.0).expand(-1, 3, -1, -1)


class Distiller(nn.Module):
    """The distillation terms with a weight > 0, the projection they need (the module's only parameters) and
    the teacher (held outside the module's state: never saved, never trained)."""

    def __init__(self, cfg: DistillConfig, teacher: Teacher, student_dim: int, pre: Preprocess):
        super().__init__()
        self.pre, self.agreement_images = pre, cfg.agreement_images
        self.projection = PROJECTIONS[cfg.projection](student_dim, teacher.dim)
        object.__setattr__(self, "teacher", teacher)  # not a submodule, whatever its type: no state, no gradient
        self.terms: dict[str, tuple[float, DistillTerm]] = {
            name: (getattr(cfg, f"{name}_weight"), term) for name, term in DISTILL_LOSSES.items()
            if getattr(cfg, f"{name}_weight") > 0}
        self._val_targets: torch.Tensor | None = None
        self.cached = None
        """distill.targets cached: the training images' fixed targets by dataset position
        (training/target_cache.py `CachedTargets`), set by the trainer; None = online targets."""

    @property
    def active(self) -> bool:
        """False when every distillation weight is 0: the teacher is then never called."""
        return bool(self.terms)

    @torch.no_grad()
    def targets(self, images: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher's embeddings (N, D) float32 of the student's input batch, on its device; fp32, no
        autocast, no gradient. With cached targets: the first len(positions) rows (the labelled images) are
        looked up by their dataset `positions`; the rows after them (extra views: mixed or unlabelled faces,
        which have no fixed view to cache) are still embedded by the teacher."""
        if self.cached is None:
            return self._online(images)
        fixed = self.cached.lookup(positions).to(images.device, torch.float32)  # training/target_cache.py
        if len(fixed) == len(images):
            return fixed
        return torch.cat([fixed, self._online(images[len(fixed):])])

    def _online(self, images: torch.Tensor) -> torch.Tensor:
        with autocast_off(images.device.type):
            return self.teacher.embed(teacher_view(images, self.pre)).to(images.device, torch.float32)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted sum, {log name: unweighted value}) of the terms on a (global) batch of student embeddings
        and the teacher's embeddings of the same images, in fp32 outside autocast."""
        values = {}
        with autocast_off(student.device.type):
            student, teacher = student.float(), teacher.float()
            projected = self.projection(student) if any(t.projected for _, t in self.terms.values()) else None
            total = torch.zeros((), device=student.device)
            for weight, term in self.terms.values():
                value = term.loss(projected if term.projected else student, teacher)
                values[term.log_name] = value.detach()
                total = total + weight * value
        return total, values

    @torch.no_grad()
    def agreement(self, val_emb: torch.Tensor, val_ds) -> dict[str, float]:
        """{"teacher_agreement": mean cosine between the projected student embeddings of the first
        distill.agreement_images validation images and the teacher's} ({} when off). The teacher embeds those
        images once, on the first call."""
        count = min(self.agreement_images, len(val_emb))
        if count == 0:
            return {}
        if self._val_targets is None:
            self._val_targets = self._embed_first(val_ds, count)
        device = next(self.parameters(), self._val_targets).device
        with autocast_off(device.type):
            projected = self.projection(val_emb[:count].to(device, torch.float32))
        cosine = F.cosine_similarity(projected, self._val_targets.to(device), dim=1)
        return {"teacher_agreement": cosine.mean().item()}

    def _embed_first(self, dataset, count: int, batch_size: int = 64) -> torch.Tensor:
        """The teacher's embeddings of dataset items 0..count-1 ((uint8 image, ...) tuples), on the CPU."""
        subset = torch.utils.data.Subset(dataset, range(count))
        loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, collate_fn=collate)
        chunks = []
        for images, *_ in loader:
            chunks.append(self.teacher.embed(pixels_view(images)).float().cpu())
        return torch.cat(chunks)


def global_terms(distiller: Distiller, images: torch.Tensor, emb: torch.Tensor, labelled: int,
                 all_emb: torch.Tensor, accelerator, positions: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The distillation terms (weighted sum, {log name: value}) over the global set of a micro-step's images:
    every rank's labelled rows (`all_emb`, already gathered for the metric loss) then every rank's extra rows
    (unlabelled and mixed: `emb[labelled:]`, training/extra_views.py), each part in rank order, against the
    teacher's embeddings of the very same input rows. Logs the global count of extra images
    (train/extra_images) when there are any."""
    # cached targets exist for labelled dataset positions only: the extra rows go to the teacher
    targets = distiller.targets(images, positions[:labelled] if positions is not None else None)
    student, teacher = [all_emb], [accelerator.gather(targets[:labelled])]
    extra = len(images) - labelled
    if extra:
        rows = torch.zeros(extra, dtype=torch.int64, device=emb.device)  # gather_for_loss's labels: unused
        student.append(gather_for_loss(emb[labelled:], rows, accelerator)[0])
        teacher.append(accelerator.gather(targets[labelled:]))
    total, values = distiller(torch.cat(student), torch.cat(teacher))
    if extra:
        values["train/extra_images"] = torch.tensor(float(extra * accelerator.num_processes))
    return total, values
