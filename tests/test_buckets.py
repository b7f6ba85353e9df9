"""Resolution and duration buckets (`data.buckets`): the draw, exact resume, ranks agreeing, the
latent cache per frame size, and buckets a stage cannot train on."""

from pathlib import Path

import pytest
import torch

from kvideo.data.buckets import draw_bucket
from kvideo.inference import checkpoints as ckpt
from kvideo.registry import load_config
from kvideo.train.engine import train

from conftest import T2I_CONFIG, tiny_t2i_overrides

BUCKETS = "[{size: [32, 32], frames: 1, batch_size: 2, weight: 1}, {size: [16, 16], frames: 1, batch_size: 4, weight: 1}]"


def _t2i(run, shards, movq_run, **extra):
    values = {"data.buckets": BUCKETS, "train.max_steps": 6, "train.checkpoint_every": 3, "train.preview_every": 0,
              "train.keep_checkpoints": 0, **extra}
    return load_config([T2I_CONFIG], tiny_t2i_overrides(run, shards, movq_run, **values))


def test_the_draw_follows_the_weights_and_depends_on_nothing_but_seed_and_number():
    draws = [draw_bucket([3.0, 1.0], seed=5, draw=i) for i in range(4000)]
    assert abs(draws.count(0) / len(draws) - 0.75) < 0.03
    assert draws == [draw_bucket([3.0, 1.0], seed=5, draw=i) for i in range(4000)]  # any rank, any resume
    assert draws != [draw_bucket([3.0, 1.0], seed=6, draw=i) for i in range(4000)]
    assert {draw_bucket([1.0], seed=s, draw=s) for s in range(10)} == {0}


def test_two_buckets_train_and_resume_exactly(tmp_path, shapes_shards, movq_run):
    straight = train(_t2i(tmp_path / "a", shapes_shards, movq_run))
    train(_t2i(tmp_path / "b", shapes_shards, movq_run, **{"train.max_steps": 3}))
    resumed = train(_t2i(tmp_path / "b", shapes_shards, movq_run))
    for which in ("model", "ema"):
        a, _ = ckpt.load_weights(straight, which)
        b, _ = ckpt.load_weights(resumed, which)
        assert all(torch.equal(a[k], b[k]) for k in a), which
    data = torch.load(straight / "train_state.pt", weights_only=True)["data"][0]
    assert data["draws"] == 6 and data == torch.load(resumed / "train_state.pt", weights_only=True)["data"][0]
    done = [b["batches_done"] for b in data["buckets"]]
    assert sum(done) == 6 and min(done) > 0, done  # both shapes were trained on
    # the bucket list is part of the data order: another list is refused on resume
    with pytest.raises(ValueError, match="data.buckets"):
        train(_t2i(tmp_path / "b", shapes_shards, movq_run, **{
            "train.max_steps": 9, "data.buckets": "[{size: [32, 32], frames: 1, batch_size: 2}]"}))


def test_a_latent_cache_per_frame_size(tmp_path, shapes_shards, movq_run):
    cache = tmp_path / "cache"
    train(_t2i(tmp_path / "run", shapes_shards, movq_run, **{"train.max_steps": 2, "data.latent_cache": str(cache)}))
    assert sorted(p.name for p in cache.iterdir()) == ["16x16", "32x32"]
    assert all((cache / d / "cache.json").is_file() for d in ("16x16", "32x32"))


def test_ranks_draw_the_same_buckets(tmp_path, shapes_shards, movq_run):
    from test_engine import _run_script

    run = tmp_path / "run"
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", str(T2I_CONFIG),
            *tiny_t2i_overrides(run, shapes_shards, movq_run, **{
                "data.buckets": BUCKETS.replace("batch_size: 4", "batch_size: 2"), "train.max_steps": 4,
                "train.preview_every": 0, "train.num_threads": 1})]
    proc = _run_script(args, {"OMP_NUM_THREADS": "1"})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    rank0, rank1 = torch.load(ckpt.latest_checkpoint(run) / "train_state.pt", weights_only=True)["data"]
    assert rank0["draws"] == rank1["draws"] == 4
    assert [b["batches_done"] for b in rank0["buckets"]] == [b["batches_done"] for b in rank1["buckets"]]


def test_a_bucket_the_stage_cannot_train_on_is_refused(tmp_path, shapes_shards, movq_run, t2i_run):
    from test_keyframe import KEYFRAME_CONFIG, tiny_keyframe_overrides

    cfg = load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(tmp_path / "run", shapes_shards, movq_run, t2i_run, **{
        "data.buckets": "[{size: [32, 32], frames: 4, batch_size: 2}, {size: [32, 32], frames: 1, batch_size: 2}]"}))
    with pytest.raises(ValueError, match="data.num_frames >= 2"):
        train(cfg)
    cfg = load_config([T2I_CONFIG], tiny_t2i_overrides(tmp_path / "run2", shapes_shards, movq_run, **{
        "data.buckets": "[{size: [30, 32], frames: 1, batch_size: 2}]"}))
    with pytest.raises(ValueError, match="data.size"):
        train(cfg)
    assert not Path(tmp_path / "run2" / "checkpoints").exists()
