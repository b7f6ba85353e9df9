"""The training engine: checkpoints, exact resume, SIGTERM, non-finite losses, DDP on gloo."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvideo.config import ConfigError
from kvideo.registry import load_config
from kvideo.train.stages.movq import MovqStage
from kvideo.inference import checkpoints as ckpt
from kvideo.train.engine import NonFiniteLossError, train

from conftest import ROOT, tiny_movq_overrides

CONFIG = ROOT / "configs" / "movq" / "shapes.yaml"


def _cfg(run_dir, shards, **extra):
    return load_config([CONFIG], tiny_movq_overrides(run_dir, shards, **extra))


def _weights(ckpt_dir, which="model"):
    return load_file(str(Path(ckpt_dir) / f"{which}.safetensors"))


def test_checkpoint_round_trip(tmp_path, shapes_shards):
    cfg = _cfg(tmp_path / "run", shapes_shards, **{"train.max_steps": 2})
    last = train(cfg)
    assert last.name == "step_0000002"
    assert ckpt.latest_checkpoint(tmp_path / "run") == last
    assert (last.parent / "latest").read_text().strip() == "step_0000002"
    assert {p.name for p in last.iterdir()} == {"model.safetensors", "ema.safetensors", "config.yaml", "train_state.pt",
                                           "manifest.json"}
    # weights carry no wrapper prefixes and load into a fresh model
    model = MovqStage(cfg, torch.device("cpu")).build_model()
    state = _weights(last)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state)
    model.load_state_dict(state)
    ema_state = _weights(last, "ema")
    assert ema_state.keys() == state.keys()
    # the training state is plain data
    ts = torch.load(last / "train_state.pt", weights_only=True)
    assert ts["step"] == 2 and set(ts["optimizers"]) == {"ae", "disc"} and len(ts["rng"]) == 1
    assert ts["data"][0]["batches_done"] == 2
    # the config inside is the resolved run config and reloads
    stored = ckpt.read_config(last)
    assert stored["train"]["max_steps"] == 2 and stored["model"]["ch"] == 8
    assert load_config(base=stored).model.n_embed == 32
    # no temporary directories are left behind
    assert not [p for p in last.parent.iterdir() if ".tmp" in p.name]


def test_exact_resume_matches_straight_run(tmp_path, shapes_shards):
    # gan_start=2 and dead_code_every=2: both phases and a codebook restart happen on each side
    # of the stop; the resumed run uses 2 DataLoader workers, the straight run none.
    straight = train(_cfg(tmp_path / "a", shapes_shards, **{"train.max_steps": 6, "train.checkpoint_every": 3}))
    train(_cfg(tmp_path / "b", shapes_shards, **{"train.max_steps": 3, "data.num_workers": 2}))
    resumed = train(_cfg(tmp_path / "b", shapes_shards, **{"train.max_steps": 6, "train.checkpoint_every": 3,
                                                               "data.num_workers": 2}))
    assert straight.name == resumed.name == "step_0000006"
    for which in ("model", "ema"):
        a, b = _weights(straight, which), _weights(resumed, which)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{which} weight {k} differs after resume"
    # metrics.jsonl holds each step once
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if "ae/loss" in ln]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_really_continues_from_the_checkpoint(tmp_path, shapes_shards):
    """Guard for the test above (a fresh restart would also match a straight run): a resumed run
    starts at the checkpoint's step and from its weights, so a changed checkpoint changes the end."""
    from safetensors.torch import save_file

    from kvideo.train.checkpoint import write_manifest

    straight = train(_cfg(tmp_path / "a", shapes_shards, **{"train.max_steps": 4}))
    stop = train(_cfg(tmp_path / "b", shapes_shards, **{"train.max_steps": 2}))
    w = _weights(stop)
    key = next(k for k in w if k.endswith("conv_out.weight"))
    w[key] = w[key] + 0.05
    save_file(w, str(stop / "model.safetensors"))
    write_manifest(stop)  # changed on purpose, not corrupt
    resumed = train(_cfg(tmp_path / "b", shapes_shards, **{"train.max_steps": 4}))
    assert "resumed from" in (tmp_path / "b" / "train.log").read_text()
    assert not torch.equal(_weights(straight)[key], _weights(resumed)[key])


class NaNStage(MovqStage):
    """Produces a non-finite loss from step 1 on."""

    def loss(self, model, parts, batch, step, phase):
        loss, logs = super().loss(model, parts, batch, step, phase)
        return (loss * float("nan") if step >= 1 else loss), logs


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, shapes_shards):
    cfg = _cfg(tmp_path / "run", shapes_shards, **{"train.max_steps": 10, "train.max_nonfinite_in_row": 3,
                                                   "train.checkpoint_every": 1, "recipe.gan_start": 100,
                                                   "recipe.dead_code_every": 0})
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        train(cfg, stage_cls=NaNStage)
    # weights after the skipped steps are those of step 1
    ckpts = ckpt.list_checkpoints(tmp_path / "run")
    w1, w3 = _weights(ckpts[0]), _weights(ckpts[-1])
    assert ckpts[0].name == "step_0000001" and ckpts[-1].name == "step_0000003"
    for k in w1:
        if not k.endswith("usage"):  # codebook statistics still update in the forward pass
            assert torch.equal(w1[k], w3[k]), k
    state = torch.load(ckpts[-1] / "train_state.pt", weights_only=True)
    assert state["nonfinite_total"] == 2
    # nor is the EMA updated on a skipped step: its average stays that of step 1
    assert state["ema_updates"] == 1
    e1, e3 = _weights(ckpts[0], "ema"), _weights(ckpts[-1], "ema")
    for k in e1:
        if not k.endswith("usage"):
            assert torch.equal(e1[k], e3[k]), k


def test_scale_equivariance_adds_its_weighted_term_to_the_ae_loss(tmp_path, shapes_shards):
    cfg = _cfg(tmp_path / "run", shapes_shards, **{"recipe.scale_equivariance.weight": 0.5,
                                                   "recipe.scale_equivariance.factors": "[2]"})
    stage = MovqStage(cfg, torch.device("cpu"))
    model = stage.build_model()
    batch = {"video": torch.rand(2, 3, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1}
    torch.manual_seed(0)
    with_term, logs = stage.loss(model, {"ae": model.ae}, batch, 0, "ae")
    plain = MovqStage(_cfg(tmp_path / "run", shapes_shards, **{"recipe.scale_equivariance.factors": "[2]"}),
                      torch.device("cpu"))  # weight 0: off
    torch.manual_seed(0)
    without, plain_logs = plain.loss(model, {"ae": model.ae}, batch, 0, "ae")
    assert "ae/scale_equivariance" not in plain_logs and logs["ae/scale_equivariance"] > 0
    torch.testing.assert_close(with_term - without, torch.tensor(0.5 * logs["ae/scale_equivariance"]))
    with pytest.raises(ConfigError, match="recipe.scale_equivariance.factors"):
        _cfg(tmp_path / "bad", shapes_shards, **{"recipe.scale_equivariance.factors": "[1]"})


def _run_script(args, env_extra=None, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_sigterm_saves_and_exits_143_so_no_chain_takes_the_run_as_finished(tmp_path, shapes_shards):
    run = tmp_path / "run"
    args = ["train.py", str(CONFIG), *tiny_movq_overrides(run, shapes_shards, **{
        "train.max_steps": 100000, "train.checkpoint_every": 100000, "recipe.gan_start": 100000})]
    proc = _run_script(args)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out  # not 0: `train.py A && train.py B` must not go on to B
    assert "SIGTERM" in out and "run the same command again to resume" in out
    last = ckpt.latest_checkpoint(run)
    assert last is not None
    step = torch.load(last / "train_state.pt", weights_only=True)["step"]
    assert step >= 2 and last.name == f"step_{step:07d}"


def test_ddp_two_processes_on_gloo(tmp_path, shapes_shards):
    run = tmp_path / "run"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", str(CONFIG),
            *tiny_movq_overrides(run, shapes_shards, **{"train.max_steps": 3, "train.num_threads": 1})]
    proc = _run_script(args, {"OMP_NUM_THREADS": "1"})
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    last = ckpt.latest_checkpoint(run)
    ts = torch.load(last / "train_state.pt", weights_only=True)
    assert ts["step"] == 3 and len(ts["rng"]) == 2 and [d["batches_done"] for d in ts["data"]] == [3, 3]
    # the two ranks drew different random streams
    assert not torch.equal(ts["rng"][0]["torch"], ts["rng"][1]["torch"])


def test_gradient_accumulation_and_checkpointing_switch(tmp_path, shapes_shards):
    """grad_accum micro-batches per step; activation checkpointing on: a run still trains."""
    last = train(_cfg(tmp_path / "run", shapes_shards, **{
        "train.max_steps": 2, "train.grad_accum": 2, "train.grad_checkpointing": True, "train.eval_every": 0}))
    ts = torch.load(last / "train_state.pt", weights_only=True)
    assert ts["step"] == 2 and ts["data"][0]["batches_done"] == 4


def test_max_minutes_stops_with_a_checkpoint_and_a_resume_does_not_train_on(tmp_path, shapes_shards):
    # a limit the first step already passes: one step, saved and logged although neither
    # checkpoint_every nor log_every falls on it
    cfg = _cfg(tmp_path / "run", shapes_shards, **{"train.max_steps": 50, "train.max_minutes": 1e-6,
                                                   "train.log_every": 10})
    last = train(cfg)
    assert last.name == "step_0000001"
    state = torch.load(last / "train_state.pt", weights_only=True)
    assert state["train_seconds"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "steps_per_s" in r] == [1]
    assert train(cfg) == last and ckpt.latest_checkpoint(tmp_path / "run") == last  # nothing more to do
    # a larger limit continues the run, counting the minutes already spent
    cfg = _cfg(tmp_path / "run", shapes_shards, **{"train.max_steps": 3, "train.max_minutes": 60.0})
    last = train(cfg)
    assert last.name == "step_0000003"
    assert torch.load(last / "train_state.pt", weights_only=True)["train_seconds"] > state["train_seconds"]


def test_begin_step_sees_every_step_once_also_across_a_resume(tmp_path, shapes_shards, monkeypatch):
    seen = []
    monkeypatch.setattr(MovqStage, "begin_step", lambda self, step: seen.append(step), raising=False)
    train(_cfg(tmp_path / "run", shapes_shards, **{"train.max_steps": 2}))
    train(_cfg(tmp_path / "run", shapes_shards, **{"train.max_steps": 4}))
    assert seen == [0, 1, 2, 3]


def test_an_annealed_timestep_shift_moves_geometrically_to_its_end():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from kvideo.diffusion.losses import LossSpec
    from kvideo.train.stages.diffusion import LatentDiffusionStage

    stage = SimpleNamespace(rc=OmegaConf.create({"diffusion": {"timestep_shift": 3.0, "timestep_shift_end": 1.5}}),
                            cfg=OmegaConf.create({"train": {"max_steps": 100}}), loss_spec=LossSpec(timestep_shift=3.0))
    shifts = []
    for step in (0, 50, 100, 150):
        LatentDiffusionStage.begin_step(stage, step)
        shifts.append(stage.loss_spec.timestep_shift)
    assert shifts == pytest.approx([3.0, 3.0 * 0.5 ** 0.5, 1.5, 1.5])
    constant = SimpleNamespace(rc=OmegaConf.create({"diffusion": {"timestep_shift": 3.0, "timestep_shift_end": None}}),
                               cfg=stage.cfg, loss_spec=LossSpec(timestep_shift=3.0))
    LatentDiffusionStage.begin_step(constant, 50)
    assert constant.loss_spec.timestep_shift == 3.0


def test_training_minutes_leave_out_the_time_a_run_was_stopped(tmp_path):
    from kvideo.train.logging import training_minutes

    def row(step, time, rate=1.0):
        return json.dumps({"step": step, "time": time, "steps_per_s": rate})

    rows = [row(10, 100.0), row(20, 110.0), row(30, 121.0),  # killed after step 30, checkpoint at 20
            row(30, 3720.0), row(40, 3730.0),  # resumed an hour later from step 20: 30 is logged again
            row(50, 7330.0, rate=0.5)]  # stopped again right after a checkpoint at 40: a gap, no re-log
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    minutes = {step: round(m * 60, 6) for step, m in training_minutes(tmp_path).items()}
    assert minutes == {10: 10.0, 20: 20.0, 30: 30.0, 40: 40.0, 50: 60.0}
    assert training_minutes(tmp_path / "missing") == {}


def test_ema_shadows_only_trainable_parameters():
    from kvideo.train.ema import EMA

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    model[0].requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    ema = EMA(model, decay=0.5, warmup=False)
    assert set(ema.state_dict()) == {"1.weight", "1.bias"}
    with torch.no_grad():
        model[1].weight.add_(2.0)
    before = ema.params["1.weight"].clone()
    ema.update(model)
    torch.testing.assert_close(ema.params["1.weight"], before + 1.0)  # halfway to the moved weight
    shadow = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    shadow.load_state_dict(model.state_dict())
    ema.copy_to(shadow)
    assert torch.equal(shadow[0].weight, frozen) and torch.equal(shadow[1].weight, ema.params["1.weight"])


def test_optimizer_implementations_agree():
    """train.optimizer_impl picks torch's fused, foreach or per-tensor AdamW: the same update (to
    float rounding), with the phase's own learning-rate groups and betas."""
    from kvideo.config import TrainConfig
    from kvideo.train.engine import build_optimizer
    from kvideo.train.stages.base import Phase

    results = {}
    for impl in ("fused", "foreach", "loop"):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.SiLU(), torch.nn.Linear(5, 3))
        phase = Phase("net", net, betas=(0.5, 0.9), weight_decay=0.01,
                      lr_scales=[("first", list(net[0].parameters()), 0.1)])
        opt = build_optimizer(phase, TrainConfig(lr=1e-2, optimizer_impl=impl))
        assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-2] and opt.defaults["betas"] == (0.5, 0.9)
        for step in range(3):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        results[impl] = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert torch.allclose(results["fused"], results["loop"], atol=1e-6)
    assert torch.allclose(results["foreach"], results["loop"], atol=1e-6)
    torch.manual_seed(0)
    start = torch.cat([p.flatten() for p in torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.SiLU(),
                                                                 torch.nn.Linear(5, 3)).parameters()])
    assert not torch.allclose(results["loop"], start, atol=1e-4)  # the steps did move the weights


def test_channels_last_trains_the_same_model_and_resumes(tmp_path, shapes_shards):
    """train.channels_last changes the memory layout of the 2-D convolution weights only: the
    same first step as the default layout (to float tolerance), and its checkpoints save, load and
    resume like any other."""
    from kvideo.train.engine import to_channels_last

    model = MovqStage(_cfg(tmp_path / "x", shapes_shards), torch.device("cpu")).build_model()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = model.ae(x)[0]
        to_channels_last(model)
        after = model.ae(x)[0]
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert torch.allclose(before, after, atol=1e-5)
    plain = train(_cfg(tmp_path / "a", shapes_shards, **{"train.max_steps": 1}))
    last = train(_cfg(tmp_path / "b", shapes_shards, **{"train.max_steps": 1, "train.channels_last": "true"}))
    a, b = _weights(plain), _weights(last)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    resumed = train(_cfg(tmp_path / "b", shapes_shards, **{"train.max_steps": 2, "train.channels_last": "true"}))
    assert resumed.name == "step_0000002"


def test_init_weights_starts_a_run_from_a_checkpoint_of_its_stage(tmp_path, shapes_shards):
    """A fine-tuning run starts from another checkpoint's weights (e.g. a converted release, which
    has no discriminator: that starts fresh); a checkpoint of another stage or shape is refused."""
    from kvideo.release.convert import write_checkpoint

    source = train(_cfg(tmp_path / "a", shapes_shards, **{"train.max_steps": 2, "train.eval_every": 0}))
    ae = {k: v for k, v in _weights(source, "ema").items() if k.startswith("ae.")}
    release_like = write_checkpoint(tmp_path / "release_like", load_config(base=ckpt.read_config(source)), ae)
    cfg = _cfg(tmp_path / "b", shapes_shards, **{"train.max_steps": 1, "train.eval_every": 0, "train.lr": 0.0,
                                                  "train.warmup_steps": 0, "init_weights": str(release_like)})
    started = _weights(train(cfg))
    # learning rate 0: still the source's weights (the codebook usage statistics move in every forward)
    assert all(torch.equal(started[k], v) for k, v in ae.items() if k != "ae.quantize.usage")
    fresh = _weights(train(_cfg(tmp_path / "c", shapes_shards, **{"train.max_steps": 1, "train.eval_every": 0,
                                                                    "train.lr": 0.0, "train.warmup_steps": 0})))
    assert not torch.equal(started["ae.encoder.conv_in.weight"], fresh["ae.encoder.conv_in.weight"])
    assert torch.equal(started["disc.main.0.weight"], fresh["disc.main.0.weight"])  # the discriminator's own init

    wider = _cfg(tmp_path / "d", shapes_shards, **{"model.ch": 16, "init_weights": str(release_like)})
    with pytest.raises(ValueError, match="does not fit the model"):
        train(wider)
