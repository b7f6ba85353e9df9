"""The training loop every stage shares.

    cfg -> stage -> model, phases -> DDP or FSDP (kvideo.train.parallel) -> loop:
        micro-batches = next grad_accum batches of this rank
        for each active phase: zero grads, forward/backward each micro-batch under autocast,
            skip the step if any rank saw a non-finite loss or gradient, clip, AdamW step
        EMA update, stage.after_step, log, preview, evaluate, checkpoint, SIGTERM check

A stage supplies its model, its phases and batch -> loss (`kvideo.train.stages.base.Stage`); nothing
here knows what a stage trains. Resume is exact on the CPU: the checkpoint holds the model, the
EMA, every optimizer and scheduler, every rank's RNG states and the data position, and the data
order and per-sample randomness are pure functions of (seed, rank, batch number).
"""

from __future__ import annotations

import logging
import math
import random
import signal
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from kvideo import registry
from kvideo.config import to_plain, to_yaml
from kvideo.data.buckets import BucketedTrainData, BucketShape, bucket_states, reshard_data_state
from kvideo.data.datasets import build_dataset
from kvideo.data.shards import SKIP_REASONS, ResumableBatchSampler, TrainData, eval_batches
from kvideo.train.stages import STAGES
from kvideo.train.stages.base import Phase, Stage, check_size
from kvideo.inference import checkpoints as stored
from kvideo.models.blocks import compile_blocks
from kvideo.train import checkpoint as ckpt
from kvideo.train import dist
from kvideo.train.dist import autocast_context
from kvideo.train.ema import EMA
from kvideo.train.parallel import Parallel, clip_grad_norm
from kvideo.train.sharded import load_sharded, save_sharded, sharded_state
from kvideo.train.logging import MetricsWriter, setup_text_logging


class NonFiniteLossError(RuntimeError):
    """Raised when `train.max_nonfinite_in_row` consecutive steps had a non-finite loss."""


class Preempted(RuntimeError):
    """Raised after SIGTERM stopped a run with a checkpoint (`checkpoint`), so that nothing
    downstream (a script chaining stages, `tools/demo.py`) takes the unfinished run for a
    finished one; running the same command again resumes it. train.py exits with 143."""

    def __init__(self, checkpoint: Path, step: int):
        super().__init__(f"SIGTERM received: checkpoint {checkpoint} saved at step {step}; "
                         "run the same command again to resume")
        self.checkpoint, self.step = checkpoint, step


# ----------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------


def skipped_counts(skipped: Dict[str, int], device: torch.device) -> Dict[str, int]:
    """The bad samples skipped so far, summed over ranks: data/skipped and data/skipped/<reason>."""
    counts = dist.sum_across_ranks({f"data/skipped/{r}": skipped.get(r, 0) for r in SKIP_REASONS}, device)
    out = {k: int(v) for k, v in counts.items() if v}
    out["data/skipped"] = int(sum(counts.values()))
    return out


def lr_factor(step: int, train_cfg: DictConfig) -> float:
    """Learning-rate multiplier at `step`: linear warmup, then constant, cosine or linear decay."""
    warmup, total = train_cfg.warmup_steps, max(1, train_cfg.max_steps)
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if train_cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = train_cfg.min_lr_ratio
    if train_cfg.schedule == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if train_cfg.schedule == "linear":
        return floor + (1 - floor) * (1 - progress)
    raise ValueError(f"train.schedule must be constant, cosine or linear, got '{train_cfg.schedule}'")


def rng_state(device: torch.device) -> dict:
    """This process's RNG states as plain tensors and containers (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class _Preemption:
    """Turns SIGTERM (a cluster's preemption notice) into a flag the loop checks every step."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------


FRESH_WITHOUT_INIT = ("disc.",)  # parts an init_weights checkpoint may lack (a release has no discriminator)


def load_init_weights(model: nn.Module, cfg: DictConfig) -> None:
    """`cfg.init_weights`, a checkpoint of this stage (its EMA weights), into `model` before training.
    A checkpoint without its frozen text tower takes the tower `recipe.text_encoder.weights` gives;
    a missing discriminator starts fresh. Any other missing, unexpected or misshapen weight is a
    ValueError naming the checkpoint."""
    from kvideo.inference.loading import with_text_tower

    state, _ = stored.load_stage_weights(cfg.init_weights, cfg.stage, "ema")
    if hasattr(model, "text"):
        state = with_text_tower(state, model, cfg.init_weights)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise ValueError(f"init_weights '{cfg.init_weights}' does not fit the model: {e}") from None
    fresh = [k for k in missing if k.startswith(FRESH_WITHOUT_INIT)]
    wrong = list(unexpected) + [k for k in missing if k not in fresh]
    if wrong:
        raise ValueError(f"init_weights '{cfg.init_weights}' does not fit the model ({len(unexpected)} unexpected, "
                         f"{len(missing) - len(fresh)} missing weights), e.g. {wrong[:4]}")
    logging.getLogger("kvideo").info("started from init_weights %s (%d tensors%s)", cfg.init_weights, len(state),
             f"; {len(fresh)} discriminator tensors fresh" if fresh else "")


def _resume_point(cfg: DictConfig, run_dir: Path, is_main: bool) -> Optional[Path]:
    """The checkpoint to resume from. Rank 0 decides (verifying reads every file) and tells the
    others, so every rank resumes from the same one or every rank raises the same error."""
    if cfg.resume == "none":
        return None
    choice: Tuple[Optional[str], Optional[str]] = (None, None)
    if is_main:
        try:
            found = _pick_checkpoint(cfg, run_dir)
            choice = (None if found is None else str(ckpt.reinstate(Path(found))), None)
        except (OSError, ValueError) as e:
            choice = (None, str(e))
    found, error = dist.broadcast_object(choice)
    if error is not None:
        raise ValueError(error)
    return Path(found) if found is not None else None


def _pick_checkpoint(cfg: DictConfig, run_dir: Path) -> Optional[str]:
    if cfg.resume == "auto":
        found = stored.newest_good_checkpoint(run_dir)
        if found is None and stored.list_checkpoints(run_dir):
            raise ValueError(f"resume=auto: '{run_dir}' holds checkpoints but none is intact (see the warnings): "
                             f"resume from a path (resume=...) or start over (resume=none)")
        return None if found is None else str(found)
    path = stored.resolve_checkpoint(cfg.resume)
    problem = stored.verify_checkpoint(path)
    if problem is not None:
        raise ValueError(f"resume: checkpoint '{path}' is broken ({problem})")
    return str(path)


# What decides which sample each rank reads at each step; a resume under other values would
# repeat or skip data. The shards are compared by `ShardIndex.fingerprint` (names, sizes,
# samples), so moving them to another mount point is not a change.
DATA_ORDER_KEYS = ("seed", "train.batch_size", "data.shuffle", "data.buckets")


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def resume_changes(then_cfg: dict, then_state: dict, cfg: DictConfig, world_size: int, fingerprint: dict) -> List[str]:
    """What differs between the checkpoint's run and this one in the data order (empty if nothing)."""
    changes = []
    for key in DATA_ORDER_KEYS:
        before, now = (_plain(OmegaConf.select(c, key)) for c in (OmegaConf.create(then_cfg), cfg))
        if before != now and not (before in (None, []) and now in (None, [])):  # a key older runs lack, empty
            changes.append(f"{key}: {before!r} -> {now!r}")
    if len(then_state["data"]) != world_size:
        changes.append(f"world size: {len(then_state['data'])} -> {world_size}")
    before = then_state.get("data_fingerprint")
    if before is not None and before != fingerprint:
        changes.append(f"data.shards: other data ({before['samples']} -> {fingerprint['samples']} samples, "
                       f"shard names/sizes {'changed' if before['shards'] != fingerprint['shards'] else 'equal'})")
    return changes


def _first_origin(position: dict) -> Tuple[int, int]:
    return tuple((position["buckets"][0] if "buckets" in position else position)["origin"])


def open_train_data(cfg: DictConfig, shapes: List[BucketShape], datasets: list, info: dist.DistInfo, state: dict):
    """This rank's training batches from `state` on (a checkpoint's data position, or {}): one
    `TrainData`, or with data.buckets one per bucket under a `BucketedTrainData`."""
    def one(shape: BucketShape, dataset, position: dict) -> TrainData:
        order = ResumableBatchSampler(len(dataset), shape.batch_size, rank=info.rank, world_size=info.world_size,
                                      seed=cfg.seed, shuffle=cfg.data.shuffle, start_batch=position.get("batches_done", 0),
                                      origin=tuple(position.get("origin", (0, 0))))
        return TrainData(dataset, order, num_workers=cfg.data.num_workers, timeout_s=cfg.data.timeout_s,
                         skipped=position.get("skipped"))

    if not cfg.data.buckets:
        return one(shapes[0], datasets[0], state)
    positions = bucket_states(state, len(shapes))
    return BucketedTrainData([one(s, d, p) for s, d, p in zip(shapes, datasets, positions)],
                             [s.weight for s in shapes], cfg.seed, draws=state.get("draws", 0))


def train(cfg: DictConfig, stage_cls: Optional[type] = None) -> Path:
    """Train `cfg.stage` to `cfg.train.max_steps`; returns the last checkpoint directory.

    On SIGTERM it saves a checkpoint and raises Preempted; stopping at `train.max_minutes` is a
    normal return. Raises NonFiniteLossError when too many steps in a row produce a non-finite loss.
    """
    stage_cls = stage_cls or STAGES[cfg.stage]
    tc = cfg.train
    info = dist.init_distributed(tc.device, timeout_s=tc.dist_timeout_s, always=tc.parallel != "ddp")
    run_dir = Path(cfg.run_dir)
    log = setup_text_logging(run_dir, info.is_main)
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    preempt = _Preemption()
    try:
        return _train(cfg, stage_cls, info, run_dir, log, preempt)
    finally:
        preempt.restore()
        dist.shutdown()


_OPTIMIZER_IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


def to_channels_last(model: nn.Module) -> None:
    """Every 4-D parameter (2-D convolution weights) in channels_last memory format, in place,
    before the optimizer and the EMA copy them; values and names are unchanged."""
    for p in model.parameters():
        if p.dim() == 4:
            p.data = p.data.contiguous(memory_format=torch.channels_last)


def build_optimizer(phase: Phase, tc) -> torch.optim.AdamW:
    """AdamW over `phase`'s parameter groups with its learning rate, betas and weight decay (the
    phase's own where set, else train's), in the implementation `tc.optimizer_impl` names."""
    base_lr = phase.lr if phase.lr is not None else tc.lr
    return torch.optim.AdamW(phase.param_groups(base_lr), lr=base_lr, betas=tuple(phase.betas or tc.betas),
                             weight_decay=phase.weight_decay if phase.weight_decay is not None else tc.weight_decay,
                             **_OPTIMIZER_IMPLS[tc.optimizer_impl])


def _train(cfg, stage_cls, info, run_dir: Path, log, preempt: _Preemption) -> Path:
    tc = cfg.train
    device = info.device
    config_plain = to_plain(cfg)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(config_plain))
        log.info("run directory %s, stage %s, world size %d, device %s", run_dir, cfg.stage, info.world_size, device)

    # Model: identical initialisation on every rank (seeded before building), or `init_weights`.
    resume_from = _resume_point(cfg, run_dir, info.is_main)
    seed_everything(cfg.seed)
    stage: Stage = stage_cls(cfg, device)
    model = stage.build_model().to(device)
    if cfg.init_weights and resume_from is None:
        load_init_weights(model, cfg)
    if tc.channels_last:
        to_channels_last(model)
    for shape in stage.shapes:
        check_size(shape.data.size, stage.size_multiple(model), "the model's total downsampling")
    if tc.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"train.grad_checkpointing is on but model '{cfg.model.name}' has no set_grad_checkpointing")
        model.set_grad_checkpointing(True)
    counts = registry.count_parameters(model)
    log.info("parameters: total %.2fM, trainable %.2fM (%s)", counts["total_params"] / 1e6,
             counts["trainable_params"] / 1e6, ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts["modules"].items()))

    phases: List[Phase] = stage.phases(model)
    parallel = Parallel(tc.parallel, info, tc.fsdp)
    parts = parallel.wrap(model, phases)  # before the optimizers and the EMA take the (sharded) parameters
    stepped = {ph.name: ph.module for ph in phases}  # the module each optimizer steps (sharded state's keys)
    if tc.compile:
        log.info("torch.compile: %d blocks", compile_blocks(model))
    optimizers, schedulers = {}, {}
    for ph in phases:
        opt = build_optimizer(ph, tc)
        optimizers[ph.name] = opt
        schedulers[ph.name] = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, tc))
    ema = EMA(model, tc.ema_decay, tc.ema_warmup)

    # Resume.
    step, nonfinite_total, data_state, train_seconds = 0, 0, {}, 0.0
    if info.is_main and (run_dir / "checkpoints").is_dir():
        ckpt.remove_stale_temporaries(run_dir / "checkpoints")  # what killed writers left
    state = None
    if resume_from is not None:
        state = ckpt.load_train_state(resume_from)
        if parallel.sharded:
            load_sharded(resume_from, model, ema, optimizers, stepped, state["ema_updates"])
        else:
            weights, _ = stored.load_weights(resume_from, "model")
            model.load_state_dict(weights)
            ema_weights, _ = stored.load_weights(resume_from, "ema")
            ema.load_state_dict(ema_weights, state["ema_updates"])
            for name, opt in optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
        for name in optimizers:
            schedulers[name].load_state_dict(state["schedulers"][name])
        step, nonfinite_total = state["step"], state["nonfinite_total"]
        train_seconds = float(state.get("train_seconds", 0.0))  # older checkpoints: counted from here
        data_state = state["data"][info.rank] if info.rank < len(state["data"]) else {}
        if len(state["rng"]) == info.world_size:
            set_rng_state(state["rng"][info.rank], device)
        else:
            log.warning("checkpoint was written by %d ranks, this run has %d: RNG streams are reseeded",
                        len(state["rng"]), info.world_size)
            seed_everything(cfg.seed + info.rank + 1_000_003 * step)
        log.info("resumed from %s at step %d", resume_from, step)
    else:
        seed_everything(cfg.seed + info.rank)  # per-rank randomness from here on

    datasets = [build_dataset(shape.data, cfg.seed, train=True, fields=stage.reads_fields) for shape in stage.shapes]
    fingerprint = datasets[0].index.fingerprint()
    if state is not None:
        changes = resume_changes(stored.read_config(resume_from), state, cfg, info.world_size, fingerprint)
        if len(changes) == 1 and changes[0].startswith("world size"):
            # only the number of ranks changed: continue at the sample where the old ranks stopped
            moved = reshard_data_state(state["data"], stage.shapes, len(datasets[0]), seed=cfg.seed,
                                       shuffle=cfg.data.shuffle, world_size=info.world_size)
            if moved is not None:
                data_state, changes = moved[info.rank], []
                log.info("world size %d -> %d: the data position is recomputed at the sample level (epoch %d, item %d)",
                         len(state["data"]), info.world_size, *_first_origin(moved[0]))
            else:
                changes = [changes[0] + " (the old ranks had read different numbers of batches, one having skipped "
                                        "a batch of bad samples: no position on the new ranks is exact)"]
        if changes and not cfg.resume_allow_changes:
            raise ValueError(f"resume from '{resume_from}': the data would be read in another order than the run "
                             f"that wrote it ({'; '.join(changes)}), repeating or skipping samples. Restore those "
                             f"settings, start over (resume=none or another run_dir), or set "
                             f"resume_allow_changes=true")
        if changes:
            log.warning("resuming under changed data settings (resume_allow_changes=true): %s", "; ".join(changes))
    data = open_train_data(cfg, stage.shapes, datasets, info, data_state)
    if info.is_main:
        log.info("data: %d samples in %d shards, %d batches per epoch per rank%s", len(datasets[0]),
                 len(datasets[0].index.shards), data.batches_per_epoch,
                 f", buckets {', '.join(s.name for s in stage.shapes)}" if cfg.data.buckets else "")
    val_dataset = build_dataset(cfg.data, cfg.seed, train=False, fields=stage.reads_fields) \
        if (cfg.data.val_shards and tc.eval_every > 0) else None

    metrics = MetricsWriter(run_dir, info.is_main, resume_step=step)
    amp = autocast_context(tc.precision, device, log)
    preview_batch = None
    nonfinite_in_row = 0
    last_saved: Optional[Path] = resume_from
    bar = tqdm(total=tc.max_steps, initial=step, disable=not info.is_main, desc=f"train {cfg.stage}",
               dynamic_ncols=True, smoothing=0.05)
    t_last, steps_since = time.perf_counter(), 0

    def save() -> Path:
        state = {
            "step": step,
            "schedulers": {n: s.state_dict() for n, s in schedulers.items()},
            "ema_updates": ema.num_updates,
            "nonfinite_total": nonfinite_total,
            "train_seconds": train_seconds,
            "rng": dist.gather_objects(rng_state(device)),
            "data": dist.gather_objects(data.state()),
            "data_fingerprint": fingerprint,
        }
        if parallel.sharded:
            tensors = sharded_state(model, ema, optimizers, stepped)
            path = save_sharded(run_dir, step, tensors, state, config_plain, keep=tc.keep_checkpoints, info=info)
            log.info("saved sharded checkpoint %s", path)
            return path
        state["optimizers"] = {n: o.state_dict() for n, o in optimizers.items()}
        path, error = None, None
        if info.is_main:
            try:
                path = ckpt.save_checkpoint(run_dir, step, model.state_dict(), ema.state_dict(), state, config_plain,
                                            keep=tc.keep_checkpoints)
                log.info("saved checkpoint %s", path)
            except ckpt.CheckpointWriteError as e:
                error = e
        if not dist.all_true(error is None, device):  # every rank stops, none waits for rank 0
            raise error or ckpt.CheckpointWriteError("rank 0 could not write the checkpoint (its log says why)")
        return path or stored.latest_checkpoint(run_dir)

    def out_of_time() -> bool:  # train.max_minutes, agreed by every rank
        return tc.max_minutes > 0 and dist.any_true(train_seconds >= 60 * tc.max_minutes, device)

    model.train()
    stop, timed_out = False, out_of_time()
    if timed_out:
        log.info("train.max_minutes=%g reached (%.1f minutes of training steps): nothing to do",
                 tc.max_minutes, train_seconds / 60)
    while step < tc.max_steps and not timed_out:
        t_step = time.perf_counter()
        batches = [data.next() for _ in range(tc.grad_accum)]
        stage.begin_step(step)
        if preview_batch is None:
            preview_batch = batches[0]
        logs: Dict[str, float] = {}
        skipped = False
        for ph in phases:
            if not stage.phase_active(ph.name, step):
                continue
            opt = optimizers[ph.name]
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for i, batch in enumerate(batches):
                with parallel.no_sync(parts[ph.name], last=i == len(batches) - 1):
                    with amp:
                        loss, part_logs = stage.loss(model, parts, batch, step, ph.name)
                    (loss / len(batches)).backward()
                total += float(loss.detach()) / len(batches)
                for k, v in part_logs.items():
                    logs[k] = logs.get(k, 0.0) + float(v) / len(batches)
            params = [p for p in ph.module.parameters() if p.grad is not None]
            norm = clip_grad_norm(params, tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            finite = math.isfinite(total) and bool(torch.isfinite(norm))
            if not dist.all_true(finite, device):
                opt.zero_grad(set_to_none=True)
                skipped = True
                continue
            opt.step()
            schedulers[ph.name].step()  # each phase's schedule counts its own optimizer steps
            logs[f"{ph.name}/loss"] = total
            logs[f"{ph.name}/grad_norm"] = float(norm)
            for group in opt.param_groups:  # the phase's own rate ("rest"), and each scaled group's
                logs[f"{ph.name}/lr" if group["name"] == "rest" else f"{ph.name}/lr_{group['name']}"] = group["lr"]
        if skipped:
            nonfinite_total += 1
            nonfinite_in_row += 1
            log.warning("step %d: non-finite loss or gradient, step skipped (%d in a row, %d in all)",
                        step, nonfinite_in_row, nonfinite_total)
            if nonfinite_in_row >= tc.max_nonfinite_in_row:
                raise NonFiniteLossError(
                    f"{nonfinite_in_row} steps in a row had a non-finite loss (train.max_nonfinite_in_row="
                    f"{tc.max_nonfinite_in_row}); stopping at step {step}. Lower train.lr, check the data, "
                    f"or resume from the last checkpoint {last_saved}")
        else:
            nonfinite_in_row = 0
            ema.update(model)  # a skipped step leaves the weights, and so their average, as they were
        logs.update(stage.after_step(model, step, batches))
        train_seconds += time.perf_counter() - t_step
        step += 1
        steps_since += 1
        bar.update(1)
        timed_out = out_of_time()

        if step % tc.log_every == 0 or step == tc.max_steps or timed_out:
            now = time.perf_counter()
            logs = dist.mean_across_ranks(logs, device)
            logs.update({"steps_per_s": steps_since / (now - t_last), "epoch": data.epoch,
                         "nonfinite_total": nonfinite_total})
            logs.update(skipped_counts(data.skipped, device))
            t_last, steps_since = now, 0
            metrics.write(step, logs)
            main_loss = logs.get(f"{phases[0].name}/loss")
            if main_loss is not None:
                bar.set_postfix(loss=f"{main_loss:.4f}")
        # rank 0 samples previews and evaluates with the EMA weights (gathered whole from every rank
        # under FSDP); the other ranks wait at the next collective (train.dist_timeout_s)
        if tc.preview_every > 0 and step % tc.preview_every == 0:
            shadow = parallel.ema_model(model, ema)
            if shadow is not None:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    stage.preview(shadow.eval(), preview_batch, run_dir / "previews", step)
            del shadow
        if val_dataset is not None and step % tc.eval_every == 0:
            shadow = parallel.ema_model(model, ema)
            if shadow is not None:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    values = stage.evaluate(shadow.eval(), eval_batches(val_dataset, tc.batch_size, tc.eval_batches))
                metrics.write(step, {f"eval/{k}": v for k, v in values.items()})
                log.info("step %d eval: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
            del shadow
        stop = dist.any_true(preempt.requested, device)
        if step % tc.checkpoint_every == 0 or step == tc.max_steps or stop or timed_out:
            last_saved = save()
        if stop:
            log.warning("SIGTERM received: checkpoint saved at step %d, exiting", step)
            break
        if timed_out:
            log.info("train.max_minutes=%g reached at step %d: checkpoint saved, stopping", tc.max_minutes, step)
    bar.close()
    metrics.close()
    if stop:
        raise Preempted(last_saved, step)
    return last_saved if last_saved is not None else save()
