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
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.utils import ModelEmaV3

from facetrain.alignment.recipe import recipe_of_folder
from facetrain.config.schema import VAL_FARS, Config, save_config, to_dict, val_metric_far
from facetrain.data.dataset import (
    FaceDataset,
    ToModelInput,
    build_faceset,
    collate,
    default_num_workers,
    eval_transform,
    split_identities,
)
from facetrain.data.device_augment import training_input
from facetrain.data.sampler import MPerClassBatchSampler
from facetrain.errors import UserError
from facetrain.evaluation.embedding import embed_dataset
from facetrain.evaluation.metrics import all_pairs_roc, count_pairs, far_needed, verification_metrics
from facetrain.model.files import read_bundle_meta
from facetrain.model.network import create_model, inference_model, resolve_preprocess
from facetrain.runtime.distributed import (
    any_rank,
    average_gradients,
    broadcast_object,
    check_identical,
    convert_to_global_batchnorm,
    gather_for_loss,
)
from facetrain.runtime.precision import resolve_mixed_precision
from facetrain.training import checkpoint as ckpt
from facetrain.training.guard import NonFiniteGuard
from facetrain.training.losses import MetricLoss, check_names
from facetrain.training.optim import Schedule, create_optimizer, resolve_preset
from facetrain.training.progress import TrainProgress

BN_RECOMPUTE_IMAGES = 512
"""Schedule-free runs: training images whose BatchNorm statistics are recomputed for the averaged weights
before each validation (the schedule-free authors' advice; a few hundred images give stable statistics)."""


@torch.no_grad()
def recompute_batchnorm(model: torch.nn.Module, dataset, pre, batch_size: int, device, channels_last: bool) -> int:
    """Replace the running statistics of `model`'s BatchNorm layers by their exact average over `dataset`
    (every other layer in eval mode: no dropout, no RNG drawn). Returns the number of layers."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
        m.train()
    to_input = ToModelInput(pre, device, channels_last)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for images, _, _ in loader:
        model(to_input(images))
    for m, momentum in zip(layers, momenta, strict=True):
        m.momentum = momentum
    model.train(was_training)
    return len(layers)


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


class StopRequest:
    """SIGUSR1/SIGTERM (Slurm's warning before preemption / time limit) or a STOP file set a flag that the
    loop checks once per step; the decision is agreed across ranks so all of them checkpoint together."""

    def __init__(self, stop_file: Path):
        self.stop_file = stop_file
        self.signalled = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.signalled = True

    def local(self) -> bool:
        return self.signalled or self.stop_file.exists()


def _flat_hparams(cfg: Config) -> dict:
    out = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            if isinstance(value, dict):
                out.update({f"{section}.{key}.{k}": v for k, v in value.items()})
            else:
                out[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return out


def _steady_img_per_s(windows: list[tuple[int, int, float]]) -> float | None:
    steady = windows[1:] or windows
    seconds = sum(w[2] for w in steady)
    return sum(w[1] for w in steady) / seconds if seconds > 0 else None


class Trainer:
    """One training run. `run()` reads top to bottom; every part is a method a test can call on a tiny model:

        setup_data()       the identity split and the P x m sampler (the run's length follows from them)
        setup()            model, loss, optimizer, schedule, checkpointer, loaders, guard, outputs (+ resume)
        train_step()       one optimizer step over train.grad_accum_steps micro-batches -> the loss (on device)
        validate()         metrics of the eval-mode model on the validation identities (rank 0 scores)
        after_validation() log, schedule on the metric, export the best bundle
        save_checkpoint()  a full checkpoint of the current step, on every rank together

    `on_log(step)`: called at every log point after logging (a benchmark runs other variants there); its time is
    left out of the training img/s."""

    def __init__(self, cfg: Config, on_log: Callable[[int], None] | None = None):
        self.cfg, self.t, self.on_log = cfg, cfg.train, on_log
        resolve_preset(cfg.optim)
        check_names(cfg.loss)
        self.out = Path(self.t.output_dir)
        # accelerator: precision, trackers, process group (created here, never at import time)
        self.precision = resolve_mixed_precision(self.t.mixed_precision, cfg.data.image_size)
        self.accelerator = Accelerator(mixed_precision=self.precision, project_dir=str(self.out),
                                       log_with="tensorboard" if self.t.tensorboard else None)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main = self.accelerator.is_main_process
        self.log = TrainProgress(enabled=self.main and self.t.progress, quiet=not self.main)
        self.state = {"step": 0, "best_metric": None, "best_step": None, "untrained": None, "bad_steps": 0}
        """The loop's own state, saved as JSON in every checkpoint."""
        self.last_metrics: dict | None = None
        self.throughput: list[tuple[int, int, float]] = []  # (step, images, seconds) per log window
        self._window = (time.perf_counter(), 0)

    # ------------------------------------------------------------------------------------------------ setup

    def resume_point(self) -> Path | None:
        """The checkpoint to continue from (train.resume), refused at once if it was written with other settings
        or another identity split; before any data is read and before the output folder is touched."""
        t, out = self.t, self.out
        resume_from = None
        if t.resume == "auto":
            resume_from = ckpt.latest_checkpoint(out)
        elif t.resume:
            resume_from = Path(t.resume)
        elif ckpt.latest_checkpoint(out) is not None:
            raise UserError(f"train.output_dir: {out} already holds checkpoints; continue with --train.resume "
                            "auto or choose another train.output_dir")
        if resume_from is not None:
            ckpt.check_compatible(resume_from, to_dict(self.cfg))
        return resume_from

    def setup_data(self) -> None:
        cfg, t = self.cfg, self.t
        faceset = build_faceset(cfg.data)
        if cfg.data.preflight and faceset.paths is not None:
            from facetrain.data.preflight import apply_preflight

            faceset = apply_preflight(faceset, cfg.data, self.out, self.accelerator)
        # how the training crops were aligned (a folder written by facetrain.align): eval, verify and identify
        # align raw photos the same way, from the bundle's "alignment" entry
        folder = cfg.data.source in ("folder", "hf") and cfg.data.root
        self.alignment = recipe_of_folder(cfg.data.root) if folder else None
        if cfg.data.source == "packed":  # a pack carries the recipe of the folder it was made from
            self.alignment = faceset.loader.alignment
        self.train_ids, self.val_ids = split_identities(faceset, cfg.data)
        self.train_idx, self.train_labels = faceset.subset(self.train_ids)
        self.val_idx, self.val_labels = faceset.subset(self.val_ids)
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
        self.pre = resolve_preprocess(cfg.data, model)
        cfg.data.mean, cfg.data.std = self.pre.mean, self.pre.std  # the resolved config records what was used
        self.loss_fn = MetricLoss(cfg.loss, num_classes=len(self.train_ids), embedding_dim=cfg.model.embedding_dim)
        optimizer = create_optimizer(model, self.loss_fn, cfg.optim)
        self.schedule = Schedule(optimizer, cfg.optim, self.steps_per_epoch, self.max_steps, t.val_metric)
        if cfg.model.sync_bn and self.world > 1:  # BatchNorm statistics over the global batch, on any backend
            convert_to_global_batchnorm(model)
        self.model, self.optimizer = acc.prepare(model, optimizer)  # the DDP-wrapped network trains
        self.loss_fn.to(acc.device)
        self.net = acc.unwrap_model(self.model)  # the network itself: saved, restored, averaged
        self.forward = compile_forward(self.model) if cfg.model.compile else self.model
        # weight EMA (train.ema_decay): validation and the exported best bundle use the averaged weights
        self.ema = ModelEmaV3(self.net, decay=t.ema_decay, use_warmup=True) if t.ema_decay > 0 else None
        set_seed(t.seed + self.rank)  # per-rank streams for dropout / stochastic depth
        self.loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad]
        self.checkpointer = ckpt.Checkpointer(self.out, acc, self.net, self.optimizer, self.schedule, self.loss_fn,
                                              self.ema, cfg.model, self.pre,
                                              {"config": to_dict(cfg), "alignment": self.alignment}, t.keep_last,
                                              cfg.debug.slow_save_s)

    def setup_loaders(self) -> None:
        cfg, t, acc = self.cfg, self.t, self.accelerator
        self.workers = t.num_workers if t.num_workers >= 0 else default_num_workers(self.world)
        # PIL transforms per image in the workers, or (a pack with data.augment.on_device) batches gathered from
        # the memory map and augmented on the device by to_input (facetrain/data/device_augment.py)
        train_ds, train_collate, self.to_input = training_input(self.faceset, self.train_idx, self.train_labels,
                                                                self.pre, cfg.data, acc.device,
                                                                cfg.model.channels_last)
        self.val_ds = FaceDataset(self.faceset, self.val_idx, self.val_labels, eval_transform(self.pre),
                                  cfg.data.bad_images)
        # schedule-free: training images (fixed, seeded) whose statistics BatchNorm recomputes before validation
        pick = np.sort(np.random.default_rng(t.seed).permutation(len(self.train_idx))[:BN_RECOMPUTE_IMAGES])
        self.bn_ds = FaceDataset(self.faceset, self.train_idx[pick], self.train_labels[pick],
                                 eval_transform(self.pre), cfg.data.bad_images)
        self.loader = torch.utils.data.DataLoader(
            train_ds, batch_sampler=self.sampler, num_workers=self.workers, collate_fn=train_collate,
            pin_memory=acc.device.type == "cuda", persistent_workers=self.workers > 0,
            # batches each worker keeps ready (DataLoader refuses it without workers)
            prefetch_factor=t.prefetch_factor if self.workers > 0 else None,
            # its own generator: creating an iterator draws a base seed, which must not consume the global RNG
            # that dropout uses (exact resume)
            generator=torch.Generator().manual_seed(t.seed))

    def setup(self, resume_from: Path | None = None) -> None:
        """Everything the loop needs after `setup_data`; `resume_from` (a checkpoint) restores the run's state."""
        self.setup_model()
        self.setup_loaders()
        if resume_from is not None:
            self.state.update(self.checkpointer.restore(resume_from))
            self.log.print(f"resumed from {resume_from} at step {self.state['step']}")
        params = [p for p in self.model.parameters() if p.requires_grad] + self.loss_params
        self.guard = NonFiniteGuard(self.optimizer, self.net, params, self.accelerator, self.t.grad_clip,
                                    self.t.max_bad_steps, self._warn, self.state["bad_steps"])
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
        t, acc, step = self.t, self.accelerator, self.state["step"]
        loss_sum = torch.zeros((), device=acc.device)
        for micro in range(t.grad_accum_steps):
            images, labels, positions, *augment_seeds = next(batches)  # seeds: device augmentation
            if self.sample_log is not None:
                self.sample_log.write(json.dumps({"step": step, "micro": micro,
                                                  "positions": positions.tolist()}) + "\n")
            images = self.to_input(images, *augment_seeds)  # uint8 batch -> (augmented) model input
            labels = labels.to(acc.device, non_blocking=True)
            last_micro = micro == t.grad_accum_steps - 1
            with (nullcontext() if last_micro else acc.no_sync(self.model)), acc.autocast():
                all_emb, all_labels = gather_for_loss(self.forward(images), labels, acc)
                loss = self.loss_fn(all_emb, all_labels)
            if step == self.cfg.debug.inject_nan_at:
                loss = loss * float("nan")
            acc.backward(loss / t.grad_accum_steps)
            loss_sum += loss.detach()
        average_gradients(self.loss_params, acc)  # DDP averages the model's gradients; these are the loss's own
        loss_value = loss_sum / t.grad_accum_steps
        self.guard.step(loss_value, step)  # skips the update if the loss or a gradient is non-finite
        if self.ema is not None:  # (after a skipped step the weights are unchanged: the average stays put)
            self.ema.update(self.net, step=step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] = step + 1
        self.schedule.after_step(step + 1)
        return loss_value

    def validate(self) -> dict:
        """Metrics of the model in eval mode; the caller exports it as it is, then calls set_train_mode(True)
        (schedule-free: the averaged weights are in the model only until then)."""
        cfg, t, acc = self.cfg, self.t, self.accelerator
        self.set_train_mode(False)
        if self.schedule.schedule_free and not cfg.model.freeze_bn:
            # the running statistics were gathered with the training sequence's weights, not the average's
            recompute_batchnorm(self.eval_model, self.bn_ds, self.pre, t.val_batch_size, acc.device,
                                cfg.model.channels_last)
        # BatchNorm folded into a copy of the weights (model.fold_batchnorm): faster, same embeddings
        infer = inference_model(self.eval_model, self.pre.image_size, len(self.val_ds), cfg.model.fold_batchnorm)
        emb = embed_dataset(infer, self.val_ds, self.pre, t.val_batch_size, acc, num_workers=self.workers,
                            channels_last=cfg.model.channels_last)
        metrics = None
        if self.main:
            metrics = verification_metrics(all_pairs_roc(emb, torch.as_tensor(self.val_labels)))
        return broadcast_object(metrics, acc)

    def after_validation(self, metrics: dict) -> bool:
        """Log the metrics, give the schedule its metric, export the model if it is the best so far; True then."""
        t, state = self.t, self.state
        value = metrics.get(t.val_metric)  # None when validation could not compute it (never for auc / eer)
        self.accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, int | float)},
                             step=state["step"])
        if value is not None:
            self.schedule.after_validation(value)
        best = state["best_metric"]
        better = value is not None and (best is None or (value < best if self.schedule.decreasing else value > best))
        improved = better or state["best_step"] is None  # the first validation always gives a bundle
        if improved:
            state["best_metric"], state["best_step"] = value, state["step"]
            self.checkpointer.export_best(self.eval_model, state["step"], metrics)
        extra = "" if t.val_metric in ("auc", "eer") else f" {t.val_metric} {value}"
        self.log.print(f"step {state['step']}: val auc {metrics['auc']:.4f} eer {metrics['eer']:.4f}{extra}"
                       + ("  \\[best]" if improved else ""))
        return improved

    def save_checkpoint(self) -> Path:
        self.guard.check()  # skipped steps reported (a diverged run stops here) before their count is saved
        self.state["bad_steps"] = self.guard.bad_steps
        check_identical(self.loss_fn.state_dict(), self.accelerator, "the loss's parameters")
        self.set_train_mode(False)
        final = self.checkpointer.save(self.state)
        self.set_train_mode(True)
        return final

    def log_step(self, step: int, loss: torch.Tensor) -> None:
        """Loss, learning rate and img/s of the window since the last log point (a host sync)."""
        start, images = self._window
        now = time.perf_counter()
        ips = images / max(now - start, 1e-9)
        self.throughput.append((step, images, now - start))
        value = loss.item()
        self.accelerator.log({"train/loss": value, "train/lr": self.optimizer.param_groups[0]["lr"],
                              "train/img_per_s": ips}, step=step)
        self.log.update(step, loss=value, ips=ips)
        if self.on_log is not None:
            self.on_log(step)
        self._window = (time.perf_counter(), 0)  # logging's (and on_log's) own time is not training

    def stop_agreed(self, step: int, log_now: bool) -> bool:
        """A stop request (signal, STOP file, debug.stop_at_step) on any rank. With several processes agreeing is
        a collective (a host sync), so it is only asked on log steps (Slurm warns minutes ahead)."""
        at = step == self.cfg.debug.stop_at_step
        if not (self.world == 1 or log_now or at):
            return False
        return any_rank(self.stop.local() or at, self.accelerator)

    # ------------------------------------------------------------------------------------------------ the run

    def run(self) -> dict:
        resume_from = self.resume_point()
        if resume_from is not None:
            finished = _finished_run(self.out, resume_from, self.cfg)
            if finished is not None:  # nothing to train, nothing rewritten (done.json, config.yaml, bundle stay)
                self.log.print(f"train.resume: {self.out} is complete (step {finished['step']} of "
                               f"{finished['max_steps']}); nothing to do. To train longer, raise train.max_steps "
                               "or train.epochs")
                return finished
        self._make_output_dir()
        self.setup_data()
        if resume_from is not None and (read_bundle_meta(resume_from).get("step") or 0) >= self.max_steps:
            step = read_bundle_meta(resume_from)["step"]  # train.max_steps / epochs lowered to or below it
            self.log.print(f"train.resume: {resume_from} is at step {step}, the run has {self.max_steps} steps; "
                           "nothing to do. To train longer, raise train.max_steps or train.epochs")
            return {"step": step, "max_steps": self.max_steps, "stopped": False, "already_complete": True}
        self.setup(resume_from)
        if self.state["untrained"] is None:  # every run reports how much training added
            self.state["untrained"] = self.validate()
            self.log.print(f"untrained model: val auc {self.state['untrained']['auc']:.4f} eer "
                           f"{self.state['untrained']['eer']:.4f}")
        self.set_train_mode(True)
        stopped = self.loop()
        return self.finish(stopped)

    def loop(self) -> bool:
        """Train to max_steps or a stop request; True if it stopped early (a checkpoint was written)."""
        t, state = self.t, self.state
        self.log.start(total=self.max_steps, completed=state["step"])
        self._window = (time.perf_counter(), 0)
        try:
            while state["step"] < self.max_steps:
                epoch, step_in_epoch = divmod(state["step"], self.steps_per_epoch)
                self.sampler.set_epoch(epoch, start=step_in_epoch * t.grad_accum_steps)
                batches = iter(self.loader)
                for _ in range(min(self.steps_per_epoch - step_in_epoch, self.max_steps - state["step"])):
                    if self.rank == self.cfg.debug.fail_rank and state["step"] == self.cfg.debug.fail_step:
                        raise RuntimeError(f"injected failure on rank {self.rank} at step {state['step']} "
                                           "(debug.fail_rank)")
                    loss = self.train_step(batches)
                    self._window = (self._window[0], self._window[1] + t.batch_size * self.world * t.grad_accum_steps)
                    step = state["step"]
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
                        self.last_metrics = self.validate()
                        self.after_validation(self.last_metrics)  # exports the validated weights as they are
                        self.set_train_mode(True)
                        self._window = (time.perf_counter(), 0)  # img/s measures training only
                    if self.stop_agreed(step, log_now) and not last:
                        final = self.save_checkpoint()
                        self.log.print(f"stop requested: checkpoint {final} written at step {step}; continue "
                                       "with --train.resume auto")
                        return True
                    if step % t.ckpt_every == 0 or last:
                        self.save_checkpoint()
            return False
        finally:
            self.log.stop()
            if self.sample_log is not None:
                self.sample_log.close()

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
        self.stop = StopRequest(out / "STOP")
        if t.tensorboard:
            self.accelerator.init_trackers("tb", config=_flat_hparams(cfg))
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
        summary = {"step": state["step"], "max_steps": self.max_steps, "stopped": stopped,
                   "untrained": state["untrained"], "final": self.last_metrics,
                   "best_step": state["best_step"], "best_metric_name": self.t.val_metric,
                   "best_metric": state["best_metric"], "bundle": str(out / "bundle"), "output_dir": str(out),
                   # steady-state training img/s: every log window but the first (DataLoader start-up)
                   "img_per_s": _steady_img_per_s(self.throughput), "throughput": self.throughput}
        if self.main and not stopped:
            (out / "done.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "throughput"},
                                                      indent=2))
            u, f = state["untrained"], self.last_metrics
            self.log.print(f"done: {state['step']} steps. val auc untrained {u['auc']:.4f} -> trained "
                           f"{f['auc']:.4f}, eer {u['eer']:.4f} -> {f['eer']:.4f}. best model: {out / 'bundle'}; "
                           f"TensorBoard: tensorboard --logdir {out / 'tb'}")
        self.accelerator.end_training()
        return summary


def train(cfg: Config, on_log: Callable[[int], None] | None = None) -> dict:
    """Run one training job (see `Trainer`); returns its summary."""
    return Trainer(cfg, on_log).run()


def check_val_metric_resolvable(val_metric: str, val_labels: np.ndarray) -> None:
    """TAR at FAR f needs >= 1/f impostor pairs, else it is never resolved: stop before training."""
    far = val_metric_far(val_metric)
    n_impostor = count_pairs(val_labels)[1]
    if far is not None and n_impostor < far_needed(far):
        usable = [f"tar@far={f:.0e}" for f in VAL_FARS if n_impostor >= far_needed(f)] + ["auc", "eer"]
        raise UserError(f"train.val_metric: {val_metric} needs >= {far_needed(far):,} impostor pairs, but the "
                        f"{len(np.unique(val_labels))} validation identities ({len(val_labels)} images) give "
                        f"{n_impostor:,}; choose {', '.join(usable)}, or hold out more identities "
                        "(data.val_identities)")


def _finished_run(out: Path, checkpoint: Path, cfg: Config) -> dict | None:
    """The done.json of a run that finished at `checkpoint` under the same run length, else None."""
    done_file = out / "done.json"
    if not done_file.is_file():
        return None
    try:
        done = json.loads(done_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    saved = (read_bundle_meta(checkpoint).get("config") or {}).get("train", {})
    same_length = all(saved.get(k) == getattr(cfg.train, k) for k in ("max_steps", "epochs", "grad_accum_steps"))
    if not same_length or done.get("step") != read_bundle_meta(checkpoint).get("step"):
        return None
    return {**done, "already_complete": True}
