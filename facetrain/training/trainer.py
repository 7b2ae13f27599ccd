"""The training loop, top to bottom: accelerator -> data -> model -> loss/optimizer -> resume -> loop.

    accelerate launch -m facetrain.train --config configs/default.yaml          # 1 process (GPU or CPU)
    accelerate launch --multi_gpu --num_processes 8 -m facetrain.train ...      # DDP on 8 GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
        --num_machines 1 --main_process_port 29511 -m facetrain.train ...       # 2 CPU ranks over gloo

Per optimizer step: each rank loads its share of a global P x m batch (sampler.py), embeds it, gathers all
ranks' embeddings and computes the loss on the global batch (distributed.py explains the gradient scaling),
then backward and the optimizer step, which guard.py skips when the loss or a gradient is not finite.
Validation embeds the held-out identities on all ranks and rank 0 scores all pairs with metrics.py (the same
code `facetrain.eval` uses); the best model by `train.val_metric` is exported to <output_dir>/bundle. A stop
request (SIGUSR1/SIGTERM, or a file <output_dir>/STOP) finishes the step, writes a checkpoint and exits 0;
`--train.resume auto` continues from it mid-epoch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.markup import escape
from timm.utils import ModelEmaV3

from facetrain.alignment.recipe import incomplete_alignment, recipe_of_folder
from facetrain.config.load import save_config, to_dict
from facetrain.config.schema import Config
from facetrain.data.dataset import default_num_workers
from facetrain.data.device_augment import training_input
from facetrain.data.faceset import build_faceset, split_identities
from facetrain.data.sampler import MPerClassBatchSampler
from facetrain.data.unlabelled import unlabelled_input
from facetrain.errors import UserError
from facetrain.model.bundle import load_initial_weights
from facetrain.model.card import data_summary
from facetrain.model.network import create_model, resolve_preprocess
from facetrain.runtime.distributed import (
    average_gradients,
    check_identical,
    convert_to_global_batchnorm,
    gather_for_loss,
)
from facetrain.runtime.precision import resolve_mixed_precision
from facetrain.training import distill, target_cache
from facetrain.training.checkpoint import BundleInfo, Checkpointer
from facetrain.training.compile import compile_forward
from facetrain.training.extra_views import ExtraViews
from facetrain.training.guard import NonFiniteGuard
from facetrain.training.loop_state import LoopState
from facetrain.training.losses import MetricLoss
from facetrain.training.optim import Schedule, create_optimizer
from facetrain.training.progress import Throughput, TrainProgress, flat_hparams
from facetrain.training.resume import beyond_run_length, finished_message, finished_run, resume_point
from facetrain.training.stateful import EmaWeights, ScalerState
from facetrain.training.stop import StopRequest
from facetrain.training.trackers import PROJECT, accelerator_trackers, tensorboard_writer
from facetrain.training.validation import PICTURES_DIR, Validator, check_val_metric_resolvable, is_better


class Trainer:
    """One training run. `run()` reads top to bottom; every part is a method a test can call on a tiny model:

        setup_data()       the identity split and the P x m sampler (the run's length follows from them)
        setup()            model, loss, optimizer, schedule, checkpointer, loaders, guard, outputs (+ resume)
        train_step()       one optimizer step over train.grad_accum_steps micro-batches -> the loss (on device)
        after_step()       log, validate, checkpoint and stop on their cadences
        validate()         metrics of the eval-mode model on the validation identities (rank 0 scores)
        after_validation() log, schedule on the metric, export the best bundle
        write_pictures()   the final validation's worst pairs (errors.png) and TensorBoard projector
        save_checkpoint()  a full checkpoint of the current step, on every rank together

    `on_log(step)`: called at every log point after logging (a benchmark runs other variants there); its time is
    left out of the training img/s."""

    def __init__(self, cfg: Config, on_log: Callable[[int], None] | None = None):
        self.cfg, self.t, self.on_log = cfg, cfg.train, on_log
        self.out = Path(self.t.output_dir)
        # accelerator: precision, trackers, process group (created here, never at import time)
        self.precision = resolve_mixed_precision(self.t.mixed_precision, cfg.data.image_size)
        self.trackers = accelerator_trackers(self.t, self.out)  # train.log_with; a missing package stops here
        self.accelerator = Accelerator(mixed_precision=self.precision, project_dir=str(self.out),
                                       log_with=self.trackers or None)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main = self.accelerator.is_main_process
        self.log = TrainProgress(enabled=self.main and self.t.progress, quiet=not self.main)
        self.state = LoopState()
        """The loop's own state, saved as JSON in every checkpoint."""
        self.last_metrics: dict | None = None
        self.throughput = Throughput()
        self.step_terms: dict[str, torch.Tensor] = {}
        """The distillation terms of the last step (device tensors), logged with its loss."""
        self.positions: torch.Tensor | None = None
        """The dataset positions of the current micro-batch (distill.targets cached looks its targets up by them)."""

    # ------------------------------------------------------------------------------------------------ setup

    def setup_data(self) -> None:
        cfg, t = self.cfg, self.t
        faceset = build_faceset(cfg.data)
        if cfg.data.preflight and faceset.paths is not None:
            from facetrain.data.preflight import apply_preflight

            faceset = apply_preflight(faceset, cfg.data, self.out, self.accelerator)
        elif cfg.data.exclude:  # no scan to note them in: data.exclude still applies
            from facetrain.data.preflight import excluded_paths, without_files

            faceset = without_files(faceset, excluded_paths(faceset, cfg.data), excluded=True)
        # how the training crops were aligned (a folder written by facetrain.align): eval, verify and identify
        # align raw photos the same way, from the bundle's "alignment" entry
        folder = cfg.data.source in ("folder", "hf") and cfg.data.root
        self.alignment = recipe_of_folder(cfg.data.root) if folder else None
        half_aligned = incomplete_alignment(cfg.data.root) if folder and self.main else None
        if half_aligned:  # soft_wrap: one line, however long
            self.log.console.print(f"[yellow]{escape(half_aligned)}[/]", soft_wrap=True)
        if cfg.data.source == "packed":  # a pack carries the recipe of the folder it was made from
            self.alignment = faceset.loader.alignment
        self.train_ids, self.val_ids = split_identities(faceset, cfg.data)
        self.train_idx, self.train_labels = faceset.subset(self.train_ids)
        self.val_idx, self.val_labels = faceset.subset(self.val_ids)
        # what the model card says about the data (model/card.py): counts per split, the pre-flight's refusals
        self.data_summary = data_summary(cfg.data.source, cfg.data.root, (len(self.train_ids), len(self.train_idx)),
                                         (len(self.val_ids), len(self.val_idx)), faceset.skipped,
                                         faceset.excluded)
        check_val_metric_resolvable(t.val_metric, self.val_labels)
        self.faceset = faceset
        self.sampler = MPerClassBatchSampler(self.train_labels, t.m, t.batch_size, self.world, self.rank, t.seed,
                                             multiple_of=t.grad_accum_steps)
        if self.sampler.excluded:
            self.log.print(f"[yellow]warning:[/] {self.sampler.excluded} training identities have fewer than "
                           f"train.m={t.m} images and are not sampled")
        self.steps_per_epoch = self.sampler.steps_per_epoch // t.grad_accum_steps
        self.max_steps = t.max_steps or t.epochs * self.steps_per_epoch

    def setup_model(self) -> None:
        cfg, t, acc = self.cfg, self.t, self.accelerator
        set_seed(t.seed)  # identical initial weights on every rank
        model = create_model(cfg.model)
        if cfg.model.init_from:  # fine-tuning a facetrain model: its weights, and its normalisation unless set
            start = load_initial_weights(model, cfg.model)["preprocess"]
            cfg.data.mean, cfg.data.std = cfg.data.mean or start["mean"], cfg.data.std or start["std"]
        self.pre = resolve_preprocess(cfg.data, model)
        cfg.data.mean, cfg.data.std = self.pre.mean, self.pre.std  # the resolved config records what was used
        self.loss_fn = MetricLoss(cfg.loss, num_classes=len(self.train_ids), embedding_dim=cfg.model.embedding_dim)
        # distill.teacher: the teacher (loaded once per rank) and the projection the optimizer trains with the loss
        teacher = distill.build_teacher(cfg.distill, self.accelerator.device) if cfg.distill.teacher else None
        self.distiller = distill.Distiller(cfg.distill, teacher, cfg.model.embedding_dim, self.pre) if teacher else None
        if teacher is not None:  # which file, its input, and where it runs (a GPU run's teacher on the CPU warns)
            self.log.print(distill.teacher_line(teacher, self.accelerator.device))
        extra = self.loss_fn if self.distiller is None else torch.nn.ModuleList([self.loss_fn, self.distiller])
        optimizer = create_optimizer(model, extra, cfg.optim)
        self.schedule = Schedule(optimizer, cfg.optim, self.steps_per_epoch, self.max_steps, t.val_metric)
        if cfg.model.sync_bn and self.world > 1:  # BatchNorm statistics over the global batch, on any backend
            convert_to_global_batchnorm(model)
        self.model, self.optimizer = acc.prepare(model, optimizer)  # the DDP-wrapped network trains
        self.loss_fn.to(acc.device)
        if self.distiller is not None:
            self.distiller.to(acc.device)
        self.net = acc.unwrap_model(self.model)  # the network itself: saved, restored, averaged
        self.forward = compile_forward(self.model) if cfg.model.compile else self.model
        # weight EMA (train.ema_decay): validation and the exported best bundle use the averaged weights
        self.ema = ModelEmaV3(self.net, decay=t.ema_decay, use_warmup=True) if t.ema_decay > 0 else None
        set_seed(t.seed + self.rank)  # per-rank streams for dropout / stochastic depth
        self.loss_params = [p for p in extra.parameters() if p.requires_grad]
        provenance = {"config": to_dict(cfg), "alignment": self.alignment, "data_summary": self.data_summary}
        if cfg.distill.teacher:  # the model card names the teacher and the licence its student inherits
            provenance["teacher"] = distill.teacher_provenance(cfg.distill.teacher)
        self.checkpointer = Checkpointer(self.out, self.stateful_parts(), accelerator=acc, keep_last=t.keep_last,
                                         bundle=BundleInfo(cfg.model, self.pre, provenance),
                                         slow_save_s=cfg.debug.slow_save_s)

    def stateful_parts(self) -> dict:
        """What a checkpoint saves and restores, by name (the names and order of train_state.pt's entries); the
        data position follows from the loop state's step, the guard's count is in the loop state too."""
        scaler = self.accelerator.scaler
        parts = {"model": self.net, "optimizer": self.optimizer, "scheduler": self.schedule, "loss": self.loss_fn,
                 "ema": EmaWeights(self.ema, self.net) if self.ema is not None else None,
                 "scaler": ScalerState(scaler) if scaler is not None else None}
        if self.distiller is not None:  # only then: a run without distillation writes what it always wrote
            parts["distill"] = self.distiller  # the projection
        return parts

    def preflight_unlabelled(self, paths: list[str]) -> list[str]:
        """distill.unlabelled's files through the pre-flight's decode check (unless data.preflight is off)."""
        if not self.cfg.data.preflight:
            return paths
        from facetrain.data.preflight import preflight_extra_files

        return preflight_extra_files(paths, "distill.unlabelled", self.cfg.data, self.out, "preflight_unlabelled",
                                     self.accelerator)

    def setup_loaders(self) -> None:
        cfg, t, acc = self.cfg, self.t, self.accelerator
        self.workers = t.num_workers if t.num_workers >= 0 else default_num_workers(self.world)
        # PIL transforms per image in the workers, or (a pack with data.augment.on_device) batches gathered from
        # the memory map and augmented on the device by to_input (facetrain/data/device_augment.py)
        train_ds, train_collate, self.to_input = training_input(self.faceset, self.train_idx, self.train_labels,
                                                                self.pre, cfg.data, acc.device,
                                                                cfg.model.channels_last)
        # distillation's extra views: unlabelled faces appended to each micro-batch, mixed faces made in train_step
        train_ds, batches, pool = unlabelled_input(cfg, train_ds, self.sampler, self.train_labels, self.pre,
                                                   self.world, self.rank, self.preflight_unlabelled)
        self.extra = ExtraViews(cfg.distill, t.seed, self.rank)
        if self.extra.count:
            self.log.print(self.extra.describe(pool))
        self.validator = Validator(cfg, self.faceset, (self.train_idx, self.train_labels),
                                   (self.val_idx, self.val_labels), self.pre, acc, self.workers,
                                   extra_metrics=self.distiller.agreement if self.distiller is not None else None)
        self.loader = torch.utils.data.DataLoader(
            train_ds, batch_sampler=batches, num_workers=self.workers, collate_fn=train_collate,
            pin_memory=acc.device.type == "cuda", persistent_workers=self.workers > 0,
            # batches each worker keeps ready (DataLoader refuses it without workers)
            prefetch_factor=t.prefetch_factor if self.workers > 0 else None,
            # its own generator: creating an iterator draws a base seed, which must not consume the global RNG
            # that dropout uses (exact resume)
            generator=torch.Generator().manual_seed(t.seed))
        if self.distiller is not None and self.distiller.active and cfg.distill.targets == "cached":
            self.distiller.cached = target_cache.cached_targets(
                cfg.distill, self.distiller.teacher, self.faceset, self.train_idx, self.train_labels, self.pre,
                cfg.data.bad_images, acc, self.workers, self.log.print)

    def setup(self, resume_from: Path | None = None) -> None:
        """Everything the loop needs after `setup_data`; `resume_from` (a checkpoint) restores the run's state."""
        self.setup_model()
        self.setup_loaders()
        if resume_from is not None:
            self.state = self.checkpointer.restore(resume_from)
            self.log.print(f"resumed from {resume_from} at step {self.state.step}")
        params = [p for p in self.model.parameters() if p.requires_grad] + self.loss_params
        self.guard = NonFiniteGuard(self.optimizer, self.net, params, self.accelerator, self.t.grad_clip,
                                    self.t.max_bad_steps, self._warn, self.state.bad_steps)
        self._start_outputs()

    # ------------------------------------------------------------------------------------------------ parts

    @property
    def eval_model(self) -> torch.nn.Module:
        """What validation scores and the best bundle holds: the EMA average, else the network."""
        return self.ema.module if self.ema is not None else self.net

    def set_train_mode(self, training: bool) -> None:
        self.schedule.set_mode(self.model, training)  # schedule-free: eval mode holds the averaged weights

    def train_step(self, batches) -> torch.Tensor:
        """One optimizer step on the next train.grad_accum_steps micro-batches of `batches`; returns the
        global-batch loss (a device tensor: reading it is a host sync). The step is skipped by the guard when
        the loss or a gradient is not finite."""
        t, acc, step = self.t, self.accelerator, self.state.step
        loss_sum = torch.zeros((), device=acc.device)
        self.step_terms = {}  # distillation terms of this step, summed over its micro-batches (logged)
        for micro in range(t.grad_accum_steps):
            images, labels, positions, *augment_seeds = next(batches)  # seeds: device augmentation
            self.positions = positions  # distill.targets cached: the targets are looked up by dataset position
            if self.sample_log is not None:  # the labelled positions, then the unlabelled ones (if any)
                self.sample_log.write(json.dumps({"step": step, "micro": micro,
                                                  "positions": positions[:t.batch_size].tolist(),
                                                  "unlabelled": positions[t.batch_size:].tolist()}) + "\n")
            images = self.to_input(images, *augment_seeds)  # uint8 batch -> (augmented) model input
            images, n = self.extra.inputs(images, labels, step, micro)  # [labelled n | unlabelled | mixed]
            labels = labels[:n].to(acc.device, non_blocking=True)
            last_micro = micro == t.grad_accum_steps - 1
            with (nullcontext() if last_micro else acc.no_sync(self.model)), acc.autocast():
                emb = self.forward(images)  # one forward: BatchNorm sees the extra views too
                all_emb, all_labels = gather_for_loss(emb[:n], labels, acc)
                loss = self.loss_fn(all_emb, all_labels) if self.distiller is None else self.distill_loss(
                    images, emb, n, all_emb, all_labels)
            if step == self.cfg.debug.inject_nan_at:
                loss = loss * float("nan")
            acc.backward(loss / t.grad_accum_steps)
            loss_sum += loss.detach()
        average_gradients(self.loss_params, acc)  # DDP averages the model's gradients; these are the loss's own
        loss_value = loss_sum / t.grad_accum_steps
        self.step_terms = {k: v / t.grad_accum_steps for k, v in self.step_terms.items()}
        self.guard.step(loss_value, step)  # skips the update if the loss or a gradient is non-finite
        if self.ema is not None:  # (after a skipped step the weights are unchanged: the average stays put)
            self.ema.update(self.net, step=step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step = step + 1
        self.schedule.after_step(step + 1)
        return loss_value

    def distill_loss(self, images: torch.Tensor, emb: torch.Tensor, n: int, all_emb: torch.Tensor,
                     all_labels: torch.Tensor) -> torch.Tensor:
        """distill.metric_weight x the metric loss on the global labelled batch + the weighted distillation terms
        on the global batch with its extra views (distill.global_terms: the teacher embeds this rank's input, the
        view the student saw); a weight of 0 skips its term (all 0: no teacher call)."""
        weight = self.cfg.distill.metric_weight
        loss = weight * self.loss_fn(all_emb, all_labels) if weight > 0 else torch.zeros((), device=all_emb.device)
        if self.distiller.active:
            terms, values = distill.global_terms(self.distiller, images, emb, n, all_emb, self.accelerator,
                                                   self.positions)
            loss = loss + terms
            for name, value in values.items():
                self.step_terms[name] = self.step_terms.get(name, 0.0) + value
        return loss

    def validate(self, pictures: bool = False) -> dict:
        """Metrics of the model in eval mode; the caller exports it as it is, then calls set_train_mode(True)
        (schedule-free: the averaged weights are in the model only until then). `pictures`: keep what
        write_pictures draws."""
        self.set_train_mode(False)
        recompute_bn = self.schedule.schedule_free and not self.cfg.model.freeze_bn
        return self.validator.metrics(self.eval_model, recompute_bn, pictures)

    def write_pictures(self, step: int) -> None:
        """The final validation's <output_dir>/validation/errors.png (+ worst_pairs.json) and its embeddings in
        TensorBoard's projector (rank 0; another tracker has no projector: said, not failed)."""
        if not self.main:
            return
        writer = tensorboard_writer(self.accelerator)
        self.validator.write_pictures(self.out / PICTURES_DIR, writer, step)
        if writer is None:
            self.log.print("note: no TensorBoard projector of the validation embeddings: TensorBoard is not among "
                           "this run's trackers (add it: --train.log_with mlflow,tensorboard, train.tensorboard true)")

    def after_validation(self, metrics: dict) -> bool:
        """Log the metrics, give the schedule its metric, export the model if it is the best so far; True then."""
        t, state = self.t, self.state
        value = metrics.get(t.val_metric)  # None when validation could not compute it (never for auc / eer)
        self.accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, int | float)},
                             step=state.step)
        if value is not None:
            self.schedule.after_validation(value)
        # the first validation always gives a bundle
        improved = is_better(value, state.best_metric, self.schedule.decreasing) or state.best_step is None
        if improved:
            state.best_metric, state.best_step = value, state.step
            self.checkpointer.export_best(self.eval_model, state.step, metrics)
        extra = "" if t.val_metric in ("auc", "eer") else f" {t.val_metric} {value}"
        if metrics.get("fta_rate"):  # validation files the pre-flight left out: their pairs are non-matches
            extra += f" fta_rate {metrics['fta_rate']:.4f}"
        self.log.print(f"step {state.step}: val auc {metrics['auc']:.4f} eer {metrics['eer']:.4f}{extra}"
                       + ("  \\[best]" if improved else ""))
        return improved

    def save_checkpoint(self) -> Path:
        self.guard.check()  # skipped steps reported (a diverged run stops here) before their count is saved
        self.state.bad_steps = self.guard.bad_steps
        check_identical(self.loss_fn.state_dict(), self.accelerator, "the loss's parameters")
        if self.distiller is not None:
            check_identical(self.distiller.state_dict(), self.accelerator, "the distillation projection")
        self.set_train_mode(False)
        final = self.checkpointer.save(self.state)
        self.set_train_mode(True)
        return final

    def log_step(self, step: int, loss: torch.Tensor) -> None:
        """Loss, learning rate and img/s of the window since the last log point (a host sync)."""
        ips = self.throughput.close(step)
        value = loss.item()
        terms = {name: v.item() for name, v in self.step_terms.items()}  # distillation terms
        self.accelerator.log({"train/loss": value, "train/lr": self.optimizer.param_groups[0]["lr"],
                              "train/img_per_s": ips, **terms}, step=step)
        self.log.update(step, loss=value, ips=ips)
        if self.on_log is not None:
            self.on_log(step)
        self.throughput.restart()  # logging's (and on_log's) own time is not training

    # ------------------------------------------------------------------------------------------------ the run

    def run(self) -> dict:
        resume_from = resume_point(self.cfg, self.out)  # before any data is read or the output folder touched
        finished = finished_run(self.out, resume_from, self.cfg) if resume_from is not None else None
        if finished is not None:  # nothing to train, nothing rewritten (done.json, config.yaml, bundle stay)
            self.log.print(finished_message(self.out, finished))
            return finished
        self._make_output_dir()
        self.setup_data()
        beyond = beyond_run_length(resume_from, self.max_steps)
        if beyond is not None:
            summary, message = beyond
            self.log.print(message)
            return summary
        self.setup(resume_from)
        if self.state.untrained is None:  # every run reports how much training added
            self.state.untrained = untrained = self.validate()
            self.log.print(f"untrained model: val auc {untrained['auc']:.4f} eer {untrained['eer']:.4f}")
        self.set_train_mode(True)
        stopped = self.loop()
        return self.finish(stopped)

    def loop(self) -> bool:
        """Train to max_steps or a stop request; True if it stopped early (a checkpoint was written)."""
        t, state = self.t, self.state
        self.log.start(total=self.max_steps, completed=state.step)
        self.throughput.restart()
        try:
            while state.step < self.max_steps:
                epoch, step_in_epoch = divmod(state.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch, start=step_in_epoch * t.grad_accum_steps)
                batches = iter(self.loader)
                for _ in range(min(self.steps_per_epoch - step_in_epoch, self.max_steps - state.step)):
                    if self.rank == self.cfg.debug.fail_rank and state.step == self.cfg.debug.fail_step:
                        raise RuntimeError(f"injected failure on rank {self.rank} at step {state.step} "
                                           "(debug.fail_rank)")
                    loss = self.train_step(batches)
                    self.throughput.add(t.batch_size * self.world * t.grad_accum_steps)
                    if self.after_step(state.step, loss):
                        return True
            return False
        finally:
            self.log.stop()
            if self.sample_log is not None:
                self.sample_log.close()

    def after_step(self, step: int, loss: torch.Tensor) -> bool:
        """Log, validate and checkpoint on their cadences; True when a stop request ended the run here (after
        writing a checkpoint)."""
        t = self.t
        last = step == self.max_steps
        log_now = step % t.log_every == 0 or last
        val_now = (step % t.val_every == 0 if t.val_every else step % self.steps_per_epoch == 0) or last
        if log_now or val_now:  # the loop's host syncs (and save_checkpoint): report skipped steps
            self.guard.check()
        if log_now:
            self.log_step(step, loss)
        else:
            self.log.advance(step)
        if val_now:
            self.last_metrics = self.validate(pictures=last)
            self.after_validation(self.last_metrics)  # exports the validated weights as they are
            if last:
                self.write_pictures(step)
            self.set_train_mode(True)
            self.throughput.restart()  # img/s measures training only
        if self.stop.agreed(step, log_now) and not last:
            final = self.save_checkpoint()
            self.log.print(f"stop requested: checkpoint {final} written at step {step}; continue with "
                           "--train.resume auto")
            return True
        if step % t.ckpt_every == 0 or last:
            self.save_checkpoint()
        return False

    # ------------------------------------------------------------------------------------------------ helpers

    def _warn(self, message: str) -> None:
        self.log.print(f"[yellow]warning:[/] {message}")

    def _make_output_dir(self) -> None:
        try:  # on every rank (exist_ok makes it race-free): a file or an unwritable path is a one-line error
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"train.output_dir: cannot create folder {self.out} ({err.strerror}); choose another "
                            "train.output_dir") from None

    def _start_outputs(self) -> None:
        """config.yaml, TensorBoard, the stop request, the audit log; the run's first lines."""
        cfg, t, out = self.cfg, self.t, self.out
        if self.main:
            save_config(cfg, out / "config.yaml")
            (out / "done.json").unlink(missing_ok=True)
            (out / "STOP").unlink(missing_ok=True)  # a stale request from a previous (requeued) run
        self.accelerator.wait_for_everyone()
        self.stop = StopRequest(out / "STOP", self.accelerator, cfg.debug.stop_at_step)
        if self.trackers:
            self.accelerator.init_trackers(PROJECT, config=flat_hparams(cfg))
        self.sample_log = None
        if cfg.debug.record_samples:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            self.sample_log = open(out / "samples" / f"rank{self.rank}.jsonl", "a", buffering=1)
        for note in self.schedule.notes:
            self._warn(note)
        self.log.print(f"facetrain: {len(self.train_ids)} train / {len(self.val_ids)} val identities, "
                       f"{len(self.train_idx)} / {len(self.val_idx)} images; {self.world} process(es), "
                       f"{self.precision} precision, global batch {t.batch_size * self.world} = "
                       f"{self.sampler.p_global} ids x {t.m}; {self.steps_per_epoch} steps/epoch, "
                       f"{self.max_steps} steps; output {out}")

    def finish(self, stopped: bool) -> dict:
        """The run's summary (and done.json when it completed)."""
        state, out = self.state, self.out
        summary = {"step": state.step, "max_steps": self.max_steps, "stopped": stopped,
                   "untrained": state.untrained, "final": self.last_metrics,
                   "best_step": state.best_step, "best_metric_name": self.t.val_metric,
                   "best_metric": state.best_metric, "bundle": str(out / "bundle"), "output_dir": str(out),
                   # steady-state training img/s: every log window but the first (DataLoader start-up)
                   "img_per_s": self.throughput.steady(), "throughput": self.throughput.windows}
        if self.main and not stopped:
            (out / "done.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "throughput"},
                                                      indent=2))
            u, f = state.untrained, self.last_metrics
            self.log.print(f"done: {state.step} steps. val auc untrained {u['auc']:.4f} -> trained "
                           f"{f['auc']:.4f}, eer {u['eer']:.4f} -> {f['eer']:.4f}. best model: {out / 'bundle'}; "
                           f"worst pairs: {out / PICTURES_DIR / 'errors.png'}; "
                           f"TensorBoard: tensorboard --logdir {out / 'tb'}")
        self.accelerator.end_training()
        return summary


def train(cfg: Config, on_log: Callable[[int], None] | None = None) -> dict:
    """Run one training job (see `Trainer`); returns its summary."""
    return Trainer(cfg, on_log).run()

