"""One training step of each ShapesWorld stage, as train.py runs it, on synthetic batches.

`build_step(stage)` reads `configs/STAGE/shapes.yaml`, builds the stage (`kvideo.train.stages`)
with a random MoVQ checkpoint written to a temporary directory (no data is read: batches are
random latents or frames of the config's shape, captions are canonical ShapesWorld prompts),
and returns a `StageStep`: its `step()` is the stage's loss on one batch under the config's
precision, backward and the optimizer step of the stage's first phase (the generator of the GAN
stages, whose discriminator starts after the CPU budgets end). `flops()` counts one step
(torch.utils.flop_counter, forward + backward). benchmarks/bench_unet.py times them.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("movq", "t2i", "keyframe", "interpolation", "video_decoder")


def _random_movq(out: Path, overrides=()) -> Path:
    """A randomly initialised ShapesWorld MoVQ (configs/movq/shapes.yaml with `overrides`) saved as a
    checkpoint under `out`."""
    from kvideo.config import to_plain
    from kvideo.registry import load_config
    from kvideo.train.checkpoint import save_checkpoint
    from kvideo.train.stages import STAGES as STAGE_CLASSES

    cfg = load_config([ROOT / "configs" / "movq" / "shapes.yaml"], [f"run_dir={out}", f"data.shards={out}", *overrides])
    state = STAGE_CLASSES["movq"](cfg, torch.device("cpu")).build_model().state_dict()
    save_checkpoint(out, 0, state, state, {}, to_plain(cfg))
    return out


class StageStep:
    """One stage's model, optimizer and synthetic batch; `step()` returns its seconds."""

    def __init__(self, name: str, work: Path, overrides=(), movq_overrides=(), *, device="cpu", parallel=None,
                 seed: int = 0):
        """`parallel`: (train.parallel kind, DistInfo) to wrap the phase as the engine does (a
        distributed run); `seed`: the synthetic batch's."""
        from kvideo.registry import load_config
        from kvideo.train.dist import autocast_context
        from kvideo.train.engine import build_optimizer
        from kvideo.train.stages import STAGES as STAGE_CLASSES

        movq = work / "movq"
        if not (movq / "checkpoints").is_dir():
            _random_movq(movq, movq_overrides)
        values = [f"run_dir={work / name}", f"data.shards={work}", "train.preview_every=0"]
        if name != "movq":
            values.append(f"recipe.movq={movq}")
        if name in ("t2i", "keyframe", "interpolation"):
            values += ["data.latent_cache=null"]
        if name in ("keyframe", "interpolation"):
            values += ["recipe.init_from=null"]
        if name in ("movq", "video_decoder"):  # the autoencoder stages are that MoVQ's architecture
            values += list(movq_overrides)
        self.cfg = cfg = load_config([ROOT / "configs" / name / "shapes.yaml"], [*values, *overrides])
        self.name, self.device = name, torch.device(device)
        self.stage = STAGE_CLASSES[name](cfg, self.device)
        self.model = self.stage.build_model().to(self.device).train()
        if cfg.train.channels_last:  # as the engine does before building the optimizer
            from kvideo.train.engine import to_channels_last

            to_channels_last(self.model)
        self.phase = self.stage.phases(self.model)[0]
        self.parts = {self.phase.name: self.phase.module}
        if parallel is not None:
            from kvideo.train.parallel import Parallel

            kind, info = parallel
            self.parts = Parallel(kind, info, cfg.train.fsdp).wrap(self.model, [self.phase])
        self.opt = build_optimizer(self.phase, cfg.train)
        self.autocast = autocast_context(cfg.train.precision, self.device, logging.getLogger(__name__))
        self.batch = self._batch(seed)
        self.batch_size = cfg.train.batch_size
        self.params = sum(p.numel() for p in self.phase.module.parameters() if p.requires_grad)

    def _batch(self, seed: int) -> dict:
        from kvideo.data.shapesworld import canonical_test_prompts

        cfg, b = self.cfg, self.cfg.train.batch_size
        f, (h, w) = cfg.data.num_frames, cfg.data.size
        prompts = [p["prompt"] for p in canonical_test_prompts()]
        batch = {"caption": [prompts[i % len(prompts)] for i in range(b)], "size": b,
                 "motion_score": torch.rand(b) * 0.2, "key": [str(i) for i in range(b)], "meta": [{}] * b}
        gen = torch.Generator().manual_seed(seed)
        if self.stage.reads_latents:
            factor = self.stage.movq.downsample_factor
            batch["latents"] = torch.randn(b, self.stage.movq.cfg.embed_dim, f, h // factor, w // factor,
                                           generator=gen).to(self.device)
        else:
            batch["video"] = (torch.rand(b, 3, f, h, w, generator=gen) * 2 - 1).to(self.device)
        batch["motion_score"] = batch["motion_score"].to(self.device)
        return batch

    def _loss(self) -> torch.Tensor:
        with self.autocast:
            loss, _ = self.stage.loss(self.model, self.parts, self.batch, 0, self.phase.name)
        return loss

    def step(self, forward_only: bool = False) -> float:
        """One training step (or, `forward_only`, the loss's forward without gradients: the
        network call a sampling step makes); its seconds."""
        t0 = time.perf_counter()
        if forward_only:
            with torch.no_grad():
                self._loss()
            return time.perf_counter() - t0
        self._loss().backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def compile(self) -> None:
        """`train.compile` as the engine applies it (after the FLOPs are counted eagerly)."""
        if self.cfg.train.compile:
            from kvideo.models.blocks import compile_blocks

            compile_blocks(self.model)

    def flops(self, forward_only: bool = False) -> int:
        """The FLOPs of `step(forward_only)` (the optimizer's not counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad() if forward_only else contextlib.nullcontext():
            loss = self._loss()
            if not forward_only:
                loss.backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def build_steps(names=STAGES, overrides=(), movq_overrides=()) -> list:
    """A StageStep per stage name, sharing one temporary random MoVQ (configs/movq/shapes.yaml with
    `movq_overrides`: the latent geometry every other stage's batch takes)."""
    work = Path(tempfile.mkdtemp(prefix="kvideo_stage_steps_"))
    return [StageStep(name, work, overrides, movq_overrides) for name in names]
