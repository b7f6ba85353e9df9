"""FSDP2 training (`train.parallel=fsdp`) and its sharded checkpoints, on gloo ranks on the CPU.

The references: a plain process for FSDP on one rank, and DDP on the same two ranks for FSDP on
two (each rank draws its noise and timesteps from its own seeded stream, so two ranks and one
process with the doubled batch see the same samples but not the same noise: DDP on two ranks,
already proven against one process in its gradients, is the reference that shares the streams).
"""

import pytest
import torch

from kvideo.inference import checkpoints as ckpt
from kvideo.registry import load_config
from kvideo.train.engine import train

from conftest import ROOT
from test_engine import _run_script
from test_keyframe import KEYFRAME_CONFIG, tiny_keyframe_overrides

STEPS = {"train.max_steps": 4, "train.checkpoint_every": 2, "train.num_threads": 1, "train.preview_every": 0,
         "train.keep_checkpoints": 0, "recipe.motion_free": 0.5}


def _torchrun(run, shards, movq_run, t2i_run, nproc=2, **extra):
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "train.py",
            str(KEYFRAME_CONFIG), *tiny_keyframe_overrides(run, shards, movq_run, t2i_run, **{**STEPS, **extra})]
    proc = _run_script(args, {"OMP_NUM_THREADS": "1"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    return ckpt.latest_checkpoint(run)


def _close(a_dir, b_dir, which="ema", atol=1e-5):
    a, _ = ckpt.load_weights(a_dir, which)
    b, _ = ckpt.load_weights(b_dir, which)
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, f"largest difference {worst}"
    return a


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes_shards, movq_run, t2i_run):
    """The runs several tests compare, each trained once: DDP and FSDP on two ranks (4 steps; FSDP
    with previews, which rank 0 samples with the EMA weights gathered from both ranks, outside the
    training RNG streams), and FSDP on two ranks stopped at step 2."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    out = {"root": root,
           "ddp": _torchrun(root / "ddp", shapes_shards, movq_run, t2i_run),
           "fsdp": _torchrun(root / "fsdp", shapes_shards, movq_run, t2i_run, **{"train.parallel": "fsdp",
                                                                                  "train.preview_every": 2}),
           "stop": _torchrun(root / "stop", shapes_shards, movq_run, t2i_run, **{"train.parallel": "fsdp",
                                                                                  "train.max_steps": 2})}
    return out


def test_fsdp_on_one_rank_trains_the_plain_model(tmp_path, shapes_shards, movq_run, t2i_run):
    plain = train(load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(
        tmp_path / "plain", shapes_shards, movq_run, t2i_run, **STEPS)))
    sharded = train(load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(
        tmp_path / "fsdp", shapes_shards, movq_run, t2i_run, **STEPS, **{"train.parallel": "fsdp"})))
    assert (sharded / "sharded" / ".metadata").is_file() and not (sharded / "model.safetensors").exists()
    assert ckpt.verify_checkpoint(sharded) is None
    for which in ("model", "ema"):
        weights = _close(plain, sharded, which)
    assert any("temporal" in k for k in weights)


@pytest.mark.slow
def test_fsdp_on_two_ranks_matches_ddp(runs):
    fsdp = runs["fsdp"]
    assert len(list((runs["root"] / "fsdp" / "previews").iterdir())) >= 2
    assert sorted(p.name for p in (fsdp / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    for which in ("model", "ema"):
        _close(runs["ddp"], fsdp, which)


@pytest.mark.slow
def test_a_sharded_run_resumes_exactly(runs, shapes_shards, movq_run, t2i_run):
    """Stopped at step 2 and resumed from its sharded checkpoint: bit for bit the straight run."""
    resume = runs["root"] / "resumed"
    resumed = _torchrun(resume, shapes_shards, movq_run, t2i_run, **{"train.parallel": "fsdp", "resume": str(runs["stop"])})
    for which in ("model", "ema"):
        _close(runs["fsdp"], resumed, which, atol=0.0)
    state = torch.load(resumed / "train_state.pt", weights_only=True)
    assert state["step"] == 4 and [d["batches_done"] for d in state["data"]] == [4, 4]


@pytest.mark.slow
def test_a_two_rank_sharded_checkpoint_resumes_on_one_rank(runs, tmp_path, shapes_shards, movq_run, t2i_run):
    """Resharding 2 -> 1: the weights, the EMA and the optimizer moments read back whole, and the
    data position recomputed at the sample level."""
    import torch.distributed.checkpoint as dcp

    two = runs["stop"]
    overrides = tiny_keyframe_overrides(tmp_path / "run", shapes_shards, movq_run, t2i_run, **{
        **STEPS, "train.parallel": "fsdp", "resume": str(two), "train.max_steps": 3})
    one = train(load_config([KEYFRAME_CONFIG], overrides))
    assert one.name == "step_0000003"
    # the data continues at the sample where the two ranks stopped: 2 ranks x 2 batches x 2 clips
    data = torch.load(one / "train_state.pt", weights_only=True)["data"]
    assert data == [{"batches_done": 1, "origin": [0, 8], "skipped": {}}]

    def moments(d):  # the optimizer's second moments, read whole
        reader = dcp.FileSystemReader(str(d / "sharded"))
        meta = reader.read_metadata().state_dict_metadata
        keys = [k for k in meta if k.startswith("optimizers.main.state.") and k.endswith(".exp_avg_sq")]
        out = {k: torch.empty(meta[k].size, dtype=meta[k].properties.dtype) for k in keys}
        dcp.load(out, storage_reader=reader, no_dist=True)
        return out

    before, after = moments(two), moments(one)
    assert before.keys() == after.keys() and len(before) > 10
    # carried over, one Adam step later: v' = beta2 v + (1 - beta2) g^2 >= beta2 v (a restarted
    # second moment would be (1 - beta2) g^2 alone, far smaller)
    ratio = [float(after[k].sum() / before[k].sum()) for k in before if float(before[k].sum()) > 0]
    assert min(ratio) >= 0.999 - 1e-6


def test_whole_weights_of_a_sharded_checkpoint_serve_sampling_and_export(tmp_path, shapes_shards, movq_run, t2i_run):
    import subprocess
    import sys

    sharded = train(load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(
        tmp_path / "fsdp", shapes_shards, movq_run, t2i_run, **{**STEPS, "train.max_steps": 2, "train.parallel": "fsdp"})))
    out = tmp_path / "export"
    subprocess.run([sys.executable, "tools/export_checkpoint.py", str(sharded), "--out", str(out)], cwd=ROOT,
                   check=True)
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "ema.safetensors", "config.yaml"}
    for which in ("model", "ema"):
        _close(sharded, out, which, atol=0.0)
    from kvideo.inference.loading import load_bundle

    bundle = load_bundle(sharded, "keyframe")  # what sample.py and the pipelines load
    ema, _ = ckpt.load_weights(sharded, "ema")
    loaded = bundle.denoiser.state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)


def test_the_gan_stage_under_fsdp_trains_the_plain_model(tmp_path, shapes_shards):
    """movq: two phases (autoencoder, discriminator), the adaptive GAN weight's gradient through
    the decoder's last layer, the codebook's buffers; a checkpoint saved before the discriminator
    has stepped (its first steps would be damped if saving initialised its Adam state)."""
    from conftest import tiny_movq_overrides
    from test_engine import CONFIG as MOVQ_CONFIG

    def run(name, **extra):
        return train(load_config([MOVQ_CONFIG], tiny_movq_overrides(tmp_path / name, shapes_shards, **{
            "train.max_steps": 4, "train.checkpoint_every": 1, "recipe.gan_start": 2, "train.eval_every": 0,
            "recipe.dead_code_every": 0, **extra})))

    plain, sharded = run("plain"), run("fsdp", **{"train.parallel": "fsdp"})
    for which in ("model", "ema"):
        weights = _close(plain, sharded, which)
    assert any(k.startswith("disc.") for k in weights)


@pytest.mark.slow
def test_hsdp_replicates_across_groups(runs, shapes_shards, movq_run, t2i_run):
    """hsdp with groups of one rank: a 2 x 1 mesh (replicated twice, sharded once), DDP's weights."""
    hsdp = _torchrun(runs["root"] / "hsdp", shapes_shards, movq_run, t2i_run, **{
        "train.parallel": "hsdp", "train.fsdp.shard_size": 1})
    for which in ("model", "ema"):
        _close(runs["ddp"], hsdp, which)


def _resume_point_on_rank(rank, store_file, run_dirs, results):
    import torch.distributed as tdist
    from omegaconf import OmegaConf

    from kvideo.train.engine import _resume_point

    tdist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    try:
        found = _resume_point(OmegaConf.create({"resume": "auto"}), run_dirs[rank], rank == 0)
        results[rank] = str(found)
    finally:
        tdist.destroy_process_group()


def test_rank_zero_decides_the_resume_point_for_every_rank(tmp_path, shapes_shards):
    """Rank 1 is shown a run directory without checkpoints (as a rank whose view of a shared
    disk lags would be): it still resumes from the checkpoint rank 0 chose."""
    import torch.multiprocessing as mp

    from conftest import tiny_movq_overrides
    from test_engine import CONFIG as MOVQ_CONFIG

    last = train(load_config([MOVQ_CONFIG], tiny_movq_overrides(tmp_path / "run", shapes_shards, **{
        "train.max_steps": 1, "train.eval_every": 0})))
    (tmp_path / "empty").mkdir()
    results = mp.Manager().dict()
    mp.spawn(_resume_point_on_rank, args=(str(tmp_path / "store"), [tmp_path / "run", tmp_path / "empty"], results),
             nprocs=2)
    assert results[0] == results[1] == str(last)


@pytest.mark.parametrize("setting", [{"train.fsdp.frozen": "shard"}, {"recipe.train_spatial": "false"}],
                         ids=["frozen_tower_sharded", "spatial_layers_frozen"])
def test_frozen_parts_replicated_or_sharded(tmp_path, shapes_shards, movq_run, t2i_run, setting):
    """The frozen text tower sharded instead of replicated; whole frozen blocks (the 1.0 recipe
    trains only the temporal layers) left out of the units: the plain model's weights either way."""
    common = {**STEPS, "train.max_steps": 2, **setting}
    plain = train(load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(
        tmp_path / "plain", shapes_shards, movq_run, t2i_run, **common)))
    sharded = train(load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(
        tmp_path / "fsdp", shapes_shards, movq_run, t2i_run, **common, **{"train.parallel": "fsdp"})))
    for which in ("model", "ema"):
        _close(plain, sharded, which)
