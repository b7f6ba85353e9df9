"""The memory and FLOP planner (kvideo/train/plan.py, tools/plan.py) against real training steps.

The planner predicts a step's peak memory from a trace on fake tensors: no memory is allocated,
the numbers come from shapes and dtypes. The tests measure the same step for real on the CPU
with torch's memory profiler (`torch.profiler.profile(profile_memory=True)`, whose
`MemoryProfileTimeline` attributes every CPU allocation and free of the profiled step to a
tensor; the weights, AdamW moments, EMA shadows and frozen networks allocated before it are
counted as pre-existing when the step touches them, and it touches all of them) and compare the
two peaks. Tiny random models, generated inputs, no weights files.
"""

import json
import logging

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

from kvideo.models.movq import MovqConfig
from kvideo.registry import load_config
from kvideo.train.dist import autocast_context
from kvideo.train.ema import EMA
from kvideo.train.engine import build_optimizer
from kvideo.train.parallel import clip_grad_norm
from kvideo.train.plan import GIB, Cluster, build_trainee, max_batch, measure, per_gpu, plan_cluster
from kvideo.train.stages.base import Phase

from conftest import ROOT

# The UNet of tests/conftest.py's tiny_t2i_overrides (the keyframe tests add temporal layers to
# it), on 64x64 frames: 16x16 latents of the tiny MoVQ (f = 4), encoded every step.
TINY_UNET = {
    "model.model_channels": 16, "model.init_channels": 8, "model.time_embed_dim": 32, "model.context_dim": 16,
    "model.groups": 4, "model.head_dim": 8, "model.dim_mult": "[1,2]", "model.num_blocks": "[1,1]",
    "model.add_cross_attention": "[false,true]", "model.add_self_attention": "[false,true]",
    "recipe.text_encoder.out_dim": 16, "recipe.text_encoder.context_length": 16, "data.latent_cache": "null",
    "data.size": "[64,64]",
}
TINY_MOVQ = MovqConfig(ch=8, ch_mult=[1, 2, 2], norm_groups=4, n_embed=32)


def tiny_config(stage: str, **extra):
    values = {**TINY_UNET, **({"data.num_frames": 4} if stage == "keyframe" else {}), **extra}
    return load_config([ROOT / "configs" / stage / "shapes.yaml"], [f"{k}={v}" for k, v in values.items()],
                       require_complete=False)


def measured_peak(cfg) -> int:
    """Peak bytes of the second of two real training steps (the first makes the AdamW moments),
    as the engine runs one: zero_grad, forward under autocast, backward, clipping, AdamW, EMA."""
    torch.manual_seed(0)
    trainee = build_trainee(cfg, TINY_MOVQ)
    model = trainee.model
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    model.train()
    opt = build_optimizer(Phase("main", model), cfg.train)
    ema = EMA(model, cfg.train.ema_decay)
    amp = autocast_context(cfg.train.precision, torch.device("cpu"), logging.getLogger(__name__))

    def step():
        for phase in trainee.phases(cfg.train.batch_size):
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = phase()
            loss.backward()
            clip_grad_norm([p for p in model.parameters() if p.grad is not None], cfg.train.grad_clip)
            opt.step()
        ema.update(model)

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return max(sum(by_category) for by_category in sizes)


CASES = {"t2i": ("fp32", False, 8), "keyframe": ("bf16", True, 4)}  # precision, checkpointing, batch


def case_config(stage: str):
    precision, checkpointing, batch = CASES[stage]
    return tiny_config(stage, **{"train.precision": precision, "train.grad_checkpointing": str(checkpointing).lower(),
                                 "train.batch_size": batch})


@pytest.fixture(scope="module")
def t2i_footprint():
    return measure(case_config("t2i"), TINY_MOVQ)


@pytest.mark.parametrize("stage", list(CASES))
def test_planned_peak_is_the_measured_peak(stage, request):
    precision, checkpointing, batch = CASES[stage]
    cfg = case_config(stage)
    footprint = request.getfixturevalue("t2i_footprint") if stage == "t2i" else measure(cfg, TINY_MOVQ)
    planned = per_gpu(footprint, "ddp", checkpointing, Cluster(gpus=1, gpu_mem_gb=1), cfg.train.fsdp, batch)
    measured = measured_peak(cfg)
    print(f"{stage} {precision} checkpointing={checkpointing}: planned {planned['total'] / 2**20:.2f} MiB "
          f"({', '.join(f'{k} {v / 2**20:.2f}' for k, v in planned.items() if k != 'total')}), "
          f"measured {measured / 2**20:.2f} MiB")
    assert planned["activations"] > 0.2 * planned["total"]  # the activations matter in the comparison
    assert abs(planned["total"] / measured - 1) <= 0.15


def test_strategies_divide_the_state_and_max_batch_fits(t2i_footprint):
    cfg, footprint = case_config("t2i"), t2i_footprint
    one, four = Cluster(gpus=1, gpu_mem_gb=0.05), Cluster(gpus=4, gpu_mem_gb=0.05)
    ddp = per_gpu(footprint, "ddp", False, four, cfg.train.fsdp, 2)
    fsdp = per_gpu(footprint, "fsdp", False, four, cfg.train.fsdp, 2)
    assert fsdp["optimizer"] == pytest.approx(ddp["optimizer"] / 4) and fsdp["ema"] == pytest.approx(ddp["ema"] / 4)
    assert ddp["grads"] == pytest.approx(2 * per_gpu(footprint, "ddp", False, one, cfg.train.fsdp, 2)["grads"])
    assert footprint.flops.fixed == pytest.approx(0, abs=1e-6 * footprint.flops.per_sample)  # FLOPs per sample
    for strategy in ("ddp", "fsdp", "hsdp"):
        for ckpt in (False, True):
            n = max_batch(footprint, strategy, ckpt, four, cfg.train.fsdp)
            assert n >= 1
            fits = per_gpu(footprint, strategy, ckpt, four, cfg.train.fsdp, n)["total"]
            too_many = per_gpu(footprint, strategy, ckpt, four, cfg.train.fsdp, n + 1)["total"]
            assert fits <= 0.05 * GIB < too_many
    plan = plan_cluster(footprint, cfg, four)
    assert plan["step_flops"] == pytest.approx(8 * footprint.flops.per_sample)


def test_plan_tool_json(capsys, tmp_path):
    from tools.plan import main

    overrides = [f"{k}={v}" for k, v in {**TINY_UNET, "data.size": "[32,32]"}.items()]
    assert main([str(ROOT / "configs" / "t2i" / "shapes.yaml"), *overrides, "--gpus", "2", "--gpu-mem-gb", "0.05",
                 "--movq-size", "shapes", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    rows = plan["strategies"]
    assert [(r["strategy"], r["checkpointing"]) for r in rows] == [
        (s, c) for s in ("ddp", "fsdp", "hsdp") for c in (False, True)]
    for r in rows:
        assert set(r["per_gpu_gb"]) == {"params", "grads", "optimizer", "ema", "activations", "total"}
        assert r["per_gpu_gb"]["total"] == pytest.approx(sum(v for k, v in r["per_gpu_gb"].items() if k != "total"))
        assert r["fits"] == (r["per_gpu_gb"]["total"] <= 0.05) and isinstance(r["max_batch"], int)
    assert isinstance(plan["step_flops"], float) and plan["step_flops"] > 0
    assert main([str(ROOT / "configs" / "t2i" / "shapes.yaml"), "model.nope=1", "--gpus", "1", "--gpu-mem-gb", "80"]) == 2


def test_the_movq_architecture_comes_from_the_checkpoint_config(tmp_path):
    from tools.plan import stage_movq

    ckpt = tmp_path / "movq_run" / "checkpoints" / "step_0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"")  # never read: only the config is
    (ckpt / "config.yaml").write_text("stage: movq\nrun_dir: x\nmodel: {name: movq, size: shapes, ch: 8}\n"
                                      "data: {shards: x}\n")
    cfg = tiny_config("t2i", **{"recipe.movq": str(tmp_path / "movq_run")})
    movq, source = stage_movq(cfg)
    assert (movq.ch, movq.ch_mult) == (8, [1, 2, 2]) and "recipe.movq" in source
    missing, source = stage_movq(tiny_config("t2i", **{"recipe.movq": str(tmp_path / "nowhere")}))
    assert missing.ch_mult == [1, 2, 2, 4] and "not here" in source


def test_a_model_with_identity_attention_is_traced_with_its_references():
    """The planner runs the identity attention and the reference encoder as training does: its
    step costs more FLOPs than the same model's step without references."""
    from kvideo.train.plan import trace_step

    plain = tiny_config("t2i")
    identity = tiny_config("t2i", **{"model.identity_attention": "[false,true]", "data.max_references": 2})
    traces = [trace_step(build_trainee(cfg, TINY_MOVQ), 2, "fp32", False) for cfg in (plain, identity)]
    assert traces[1].flops > traces[0].flops
