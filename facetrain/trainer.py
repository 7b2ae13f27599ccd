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
import math
import os
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.utils import ModelEmaV3

from facetrain import checkpoint as ckpt
from facetrain.config import Config, save_config, to_dict
from facetrain.data import (
    FaceDataset,
    ToModelInput,
    build_faceset,
    collate,
    default_num_workers,
    eval_transform,
    split_identities,
    train_transform,
)
from facetrain.distributed import any_rank, broadcast_object, gather_for_loss
from facetrain.embed import embed_dataset
from facetrain.errors import UserError
from facetrain.guard import NonFiniteGuard
from facetrain.losses import MetricLoss, check_names
from facetrain.metrics import all_pairs_roc, verification_metrics
from facetrain.model import create_model, inference_model, replace_dir, resolve_preprocess, write_bundle
from facetrain.optim import create_optimizer, create_scheduler, resolve_preset
from facetrain.precision import resolve_mixed_precision
from facetrain.progress import TrainProgress
from facetrain.sampler import MPerClassBatchSampler

LOWER_IS_BETTER = {"eer"}


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


def _metric_value(metrics: dict, name: str) -> float:
    value = metrics.get(name)
    if value is None:
        return -math.inf
    return -value if name in LOWER_IS_BETTER else value


def train(cfg: Config) -> dict:
    t = cfg.train
    resolve_preset(cfg.optim)
    check_names(cfg.loss)
    out = Path(t.output_dir)

    # ---- accelerator: precision, trackers, process group (created here, never at import time)
    precision = resolve_mixed_precision(t.mixed_precision, cfg.data.image_size)
    accelerator = Accelerator(mixed_precision=precision, log_with="tensorboard" if t.tensorboard else None,
                              project_dir=str(out))
    rank, world = accelerator.process_index, accelerator.num_processes
    main = accelerator.is_main_process
    log = TrainProgress(enabled=main and t.progress, quiet=not main)

    # ---- resume decision (before touching the output directory)
    resume_from = None
    if t.resume == "auto":
        resume_from = ckpt.latest_checkpoint(out)
    elif t.resume:
        resume_from = Path(t.resume)
    elif ckpt.latest_checkpoint(out) is not None:
        raise UserError(f"train.output_dir: {out} already holds checkpoints; continue with --train.resume auto "
                        "or choose another train.output_dir")
    try:  # on every rank (exist_ok makes it race-free): a file or an unwritable path is a one-line error
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"train.output_dir: cannot create folder {out} ({err.strerror}); choose another "
                        "train.output_dir") from None

    # ---- data: split by identity, P x m sampler sharded by rank
    faceset = build_faceset(cfg.data)
    if cfg.data.preflight and faceset.paths is not None:
        from facetrain.preflight import apply_preflight

        faceset = apply_preflight(faceset, cfg.data, out, accelerator)
    train_ids, val_ids = split_identities(faceset, cfg.data)
    train_idx, train_labels = faceset.subset(train_ids)
    val_idx, val_labels = faceset.subset(val_ids)
    sampler = MPerClassBatchSampler(train_labels, t.m, t.batch_size, world, rank, t.seed,
                                    multiple_of=t.grad_accum_steps)
    if sampler.excluded:
        log.print(f"[yellow]warning:[/] {sampler.excluded} training identities have fewer than train.m={t.m} "
                  "images and are not sampled")
    steps_per_epoch = sampler.steps_per_epoch // t.grad_accum_steps
    max_steps = t.max_steps or t.epochs * steps_per_epoch

    # ---- model, loss, optimizer, schedule
    set_seed(t.seed)  # identical initial weights on every rank
    model = create_model(cfg.model)
    pre = resolve_preprocess(cfg.data, model)
    cfg.data.mean, cfg.data.std = pre.mean, pre.std  # the resolved config records what was really used
    loss_fn = MetricLoss(cfg.loss, num_classes=len(train_ids), embedding_dim=cfg.model.embedding_dim)
    optimizer = create_optimizer(model, loss_fn, cfg.optim)
    per_epoch = cfg.optim.scheduler_interval == "epoch"
    scheduler = create_scheduler(optimizer, cfg.optim, math.ceil(max_steps / steps_per_epoch) if per_epoch
                                 else max_steps)
    if cfg.model.sync_bn and world > 1 and accelerator.device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn.to(accelerator.device)
    raw_model = accelerator.unwrap_model(model)
    fwd_model = compile_forward(model) if cfg.model.compile else model
    # Weight EMA (train.ema_decay): validation and the exported best bundle use the averaged weights
    ema = ModelEmaV3(raw_model, decay=t.ema_decay, use_warmup=True) if t.ema_decay > 0 else None
    eval_model = ema.module if ema is not None else model
    set_seed(t.seed + rank)  # per-rank streams for dropout / stochastic depth

    workers = t.num_workers if t.num_workers >= 0 else default_num_workers(world)
    train_ds = FaceDataset(faceset, train_idx, train_labels, train_transform(pre, cfg.data.augment),
                           cfg.data.bad_images)
    val_ds = FaceDataset(faceset, val_idx, val_labels, eval_transform(pre), cfg.data.bad_images)
    loader = torch.utils.data.DataLoader(train_ds, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                         pin_memory=accelerator.device.type == "cuda",
                                         persistent_workers=workers > 0,
                                         # batches each worker keeps ready (DataLoader refuses it without workers)
                                         prefetch_factor=t.prefetch_factor if workers > 0 else None,
                                         # its own generator: creating an iterator draws a base seed, which
                                         # must not consume the global RNG that dropout uses (exact resume)
                                         generator=torch.Generator().manual_seed(t.seed))
    to_input = ToModelInput(pre, accelerator.device, cfg.model.channels_last)  # uint8 batches -> model input

    # ---- state, resume
    state = {"step": 0, "best_metric": None, "best_step": None, "untrained": None, "bad_steps": 0}
    if resume_from is not None:
        weights, saved, rng = ckpt.load_train_state(resume_from, rank)
        ckpt.check_compatible(resume_from, to_dict(cfg))
        try:  # other differences (e.g. the identity count that sizes ArcFace's weights) surface here
            raw_model.load_state_dict(weights)
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            loss_fn.load_state_dict(saved["loss"])
            if ema is not None:  # a checkpoint of a run without EMA starts the average at its weights
                ema.module.load_state_dict(saved.get("ema") or weights)
            if accelerator.scaler is not None and saved.get("scaler"):
                accelerator.scaler.load_state_dict(saved["scaler"])
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[-1].strip()[:200]
            raise UserError(f"train.resume: {resume_from} does not fit this run ({first}); resume with the run's "
                            "own config (its config.yaml) or choose a new train.output_dir") from None
        state.update(json.loads(saved["state_json"]))
        ckpt.restore_rng(rng)
        log.print(f"resumed from {resume_from} at step {state['step']}")
    params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    guard = NonFiniteGuard(optimizer, raw_model, params, accelerator, t.grad_clip, t.max_bad_steps,
                           lambda message: log.print(f"[yellow]warning:[/] {message}"), state["bad_steps"])
    if main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "done.json").unlink(missing_ok=True)
        (out / "STOP").unlink(missing_ok=True)  # a stale request from a previous (requeued) run
    accelerator.wait_for_everyone()
    stop = StopRequest(out / "STOP")
    if t.tensorboard:
        accelerator.init_trackers("tb", config=_flat_hparams(cfg))

    log.print(f"facetrain: {len(train_ids)} train / {len(val_ids)} val identities, {len(train_idx)} / "
              f"{len(val_idx)} images; {world} process(es), {precision} precision, global batch "
              f"{t.batch_size * world} = {sampler.p_global} ids x {t.m}; {steps_per_epoch} steps/epoch, "
              f"{max_steps} steps; output {out}")

    schedule_free = hasattr(optimizer, "eval") and hasattr(optimizer, "train") and "schedulefree" in \
        cfg.optim.name

    def set_train_mode(training: bool) -> None:
        model.train(training)
        if schedule_free:  # schedule-free keeps two weight sequences; eval() selects the averaged one
            optimizer.train() if training else optimizer.eval()

    def validate() -> dict:
        set_train_mode(False)
        # BatchNorm folded into a copy of the weights (model.fold_batchnorm): faster, same embeddings
        infer = inference_model(eval_model, pre.image_size, len(val_ds), cfg.model.fold_batchnorm)
        emb = embed_dataset(infer, val_ds, pre, t.val_batch_size, accelerator, num_workers=workers,
                            channels_last=cfg.model.channels_last)
        metrics = None
        if main:
            metrics = verification_metrics(all_pairs_roc(emb, torch.as_tensor(val_labels)))
        set_train_mode(True)
        return broadcast_object(metrics, accelerator)

    def export_best(metrics: dict) -> None:
        if not main:
            return
        tmp = out / "bundle.tmp"
        try:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            write_bundle(tmp, eval_model if ema is not None else raw_model, cfg.model, pre,
                         {"step": state["step"], "val_metrics": metrics, "config": to_dict(cfg)})
            replace_dir(tmp, out / "bundle")
        except Exception as err:  # a full disk raises SafetensorError, not OSError
            raise UserError(f"bundle: cannot write {tmp} ({ckpt.write_error_reason(err, tmp)}); the previous best "
                            "model is kept: free disk space and rerun with --train.resume auto") from err

    def save_checkpoint() -> Path:
        guard.check()  # skipped steps reported (a diverged run stops here) before their count is saved
        state["bad_steps"] = guard.bad_steps
        set_train_mode(False)
        tmp = ckpt.tmp_dir_for(out, state["step"])
        # never write NaN/inf into a checkpoint (the state is identical on every rank: all stop here together)
        nonfinite = ckpt.nonfinite_tensors(raw_model.state_dict(), loss_fn.state_dict())
        if nonfinite:
            raise UserError(f"checkpoint: step {state['step']}: non-finite values in {nonfinite[0]} "
                            f"({len(nonfinite)} tensor(s)), not written; the last good checkpoint is "
                            f"{ckpt.latest_checkpoint(out) or '(none)'}: rerun with --train.resume auto and a lower "
                            "optim.lr or train.grad_clip")
        error = None
        try:
            if main:
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
        except OSError as err:
            error = err
        accelerator.wait_for_everyone()
        try:
            if error is None:
                ckpt.write_rng(tmp, rank)
                if main:
                    write_bundle(tmp, raw_model, cfg.model, pre, {"step": state["step"], "config": to_dict(cfg)})
                    ckpt.write_train_state(tmp, {
                        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "loss": loss_fn.state_dict(),
                        "ema": ema.module.state_dict() if ema is not None else None,
                        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                        "state_json": json.dumps(state),
                    })
        except Exception as err:  # a full disk raises SafetensorError / RuntimeError here, not OSError
            error = err
        accelerator.wait_for_everyone()
        failed = any_rank(error is not None, accelerator)
        if failed:
            reason = ckpt.write_error_reason(error, tmp) if error is not None else "failed on another rank"
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            previous = ckpt.latest_checkpoint(out)
            raise UserError(f"checkpoint: cannot write {tmp} ({reason}); the previous checkpoint "
                            f"{previous or '(none)'} is kept: free disk space and rerun with --train.resume auto"
                            ) from error
        try:
            final = ckpt.finalize(tmp, t.keep_last) if main else tmp
        except OSError as err:
            raise UserError(f"checkpoint: cannot finish {tmp} ({err.strerror or err}); the previous checkpoint "
                            f"{ckpt.latest_checkpoint(out) or '(none)'} is kept: free disk space and rerun with "
                            "--train.resume auto") from err
        accelerator.wait_for_everyone()
        set_train_mode(True)
        return final

    def after_validation(metrics: dict) -> None:
        value = _metric_value(metrics, t.val_metric)
        accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, int | float)},
                        step=state["step"])
        if cfg.optim.scheduler == "plateau":
            scheduler.step(value)
        improved = state["best_metric"] is None or value > state["best_metric"]
        if improved:
            state["best_metric"], state["best_step"] = value, state["step"]
            export_best(metrics)
        extra = "" if t.val_metric in ("auc", "eer") else f" {t.val_metric} {metrics.get(t.val_metric)}"
        log.print(f"step {state['step']}: val auc {metrics['auc']:.4f} eer {metrics['eer']:.4f}{extra}"
                  + ("  \\[best]" if improved else ""))

    # ---- untrained baseline, so every run reports how much training added
    set_train_mode(True)
    if state["untrained"] is None:
        state["untrained"] = validate()
        log.print(f"untrained model: val auc {state['untrained']['auc']:.4f} eer {state['untrained']['eer']:.4f}")

    # ---- the loop
    sample_log = None
    if t.record_samples:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        sample_log = open(out / "samples" / f"rank{rank}.jsonl", "a", buffering=1)
    last_metrics = None
    stopped = False
    window_start, window_images = time.perf_counter(), 0
    throughput = []  # (step, images, seconds) per log window: the training img/s, for bench/train_throughput.py
    # Test hook (tests/test_robustness.py): FACETRAIN_TEST_FAIL_RANK=r with FACETRAIN_TEST_FAIL_STEP=s makes rank
    # r raise at step s, to check that the other ranks then stop promptly too.
    fail_rank = int(os.environ.get("FACETRAIN_TEST_FAIL_RANK", "-1"))
    fail_step = int(os.environ.get("FACETRAIN_TEST_FAIL_STEP", "-1"))
    log.start(total=max_steps, completed=state["step"])
    while state["step"] < max_steps and not stopped:
        epoch, step_in_epoch = divmod(state["step"], steps_per_epoch)
        sampler.set_epoch(epoch, start=step_in_epoch * t.grad_accum_steps)
        batches = iter(loader)
        for _ in range(min(steps_per_epoch - step_in_epoch, max_steps - state["step"])):
            if rank == fail_rank and state["step"] == fail_step:
                raise RuntimeError(f"injected failure on rank {rank} at step {state['step']} (test hook)")
            loss_sum = torch.zeros((), device=accelerator.device)
            for micro in range(t.grad_accum_steps):
                images, labels, positions = next(batches)
                if sample_log is not None:
                    sample_log.write(json.dumps({"step": state["step"], "micro": micro,
                                                 "positions": positions.tolist()}) + "\n")
                images = to_input(images)
                labels = labels.to(accelerator.device, non_blocking=True)
                last_micro = micro == t.grad_accum_steps - 1
                with (nullcontext() if last_micro else accelerator.no_sync(model)), accelerator.autocast():
                    emb = fwd_model(images)
                    all_emb, all_labels = gather_for_loss(emb, labels, accelerator)
                    loss = loss_fn(all_emb, all_labels)
                if state["step"] == t.inject_nan_at:
                    loss = loss * float("nan")
                accelerator.backward(loss / t.grad_accum_steps)
                loss_sum += loss.detach()
            loss_value = loss_sum / t.grad_accum_steps
            guard.step(loss_value, state["step"])  # skips the update if the loss or a gradient is non-finite
            if ema is not None:  # (after a skipped step the weights are unchanged: the average stays put)
                ema.update(raw_model, step=state["step"] + 1)
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            window_images += t.batch_size * world * t.grad_accum_steps
            if not per_epoch and cfg.optim.scheduler != "plateau":
                scheduler.step()
            elif per_epoch and cfg.optim.scheduler != "plateau" and state["step"] % steps_per_epoch == 0:
                scheduler.step()

            step = state["step"]
            log_now = step % t.log_every == 0 or step == max_steps
            end_of_epoch = step % steps_per_epoch == 0
            val_now = (t.val_every and step % t.val_every == 0) or (not t.val_every and end_of_epoch) \
                or step == max_steps
            ckpt_now = step % t.ckpt_every == 0 or step == max_steps
            if log_now or val_now:  # the loop's host syncs (and save_checkpoint): report skipped steps
                guard.check()
            if log_now:
                now = time.perf_counter()
                ips = window_images / max(now - window_start, 1e-9)
                throughput.append((step, window_images, now - window_start))
                lr = optimizer.param_groups[0]["lr"]
                accelerator.log({"train/loss": loss_value.item(), "train/lr": lr, "train/img_per_s": ips},
                                step=step)
                log.update(step, loss=loss_value.item(), ips=ips)
                window_start, window_images = now, 0  # logging's own cost counts in the next window
            else:
                log.advance(step)
            if val_now:
                last_metrics = validate()
                after_validation(last_metrics)
                window_start, window_images = time.perf_counter(), 0  # img/s measures training only
            # Stop requests: with several processes, agreeing on one is a collective (a host sync), so it is
            # only asked on log steps (train.log_every; Slurm warns minutes ahead); alone, on every step.
            ask = world == 1 or log_now or step == t.stop_at_step
            if ask and any_rank(stop.local() or step == t.stop_at_step, accelerator):
                stopped = step < max_steps
                if stopped:
                    final = save_checkpoint()
                    log.print(f"stop requested: checkpoint {final} written at step {step}; "
                              "continue with --train.resume auto")
                    break
            if ckpt_now:
                save_checkpoint()
    log.stop()
    if sample_log is not None:
        sample_log.close()

    summary = {"step": state["step"], "max_steps": max_steps, "stopped": stopped,
               "untrained": state["untrained"], "final": last_metrics,
               "best_step": state["best_step"], "best_metric_name": t.val_metric,
               "best_metric": None if state["best_metric"] is None else abs(state["best_metric"]),
               "bundle": str(out / "bundle"), "output_dir": str(out),
               # steady-state training img/s: every log window but the first (DataLoader start-up)
               "img_per_s": _steady_img_per_s(throughput), "throughput": throughput}
    if main and not stopped:
        (out / "done.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "throughput"},
                                                  indent=2))
        u, f = state["untrained"], last_metrics
        log.print(f"done: {state['step']} steps. val auc untrained {u['auc']:.4f} -> trained {f['auc']:.4f}, "
                  f"eer {u['eer']:.4f} -> {f['eer']:.4f}. best model: {out / 'bundle'}; "
                  f"TensorBoard: tensorboard --logdir {out / 'tb'}")
    accelerator.end_training()
    return summary
