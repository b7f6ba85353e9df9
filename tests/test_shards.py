"""Shard reading: index, clips by timestamp, rank/worker splits, resume position, broken samples."""

import io
import json
import shutil
import tarfile

import pytest
import torch

from kvideo.data.shards import (ClipDataset, ClipFormat, ResumableBatchSampler, ShardIndex, TrainData, expand_shards,
                                 reshard_positions)


def _clip_dataset(shards, num_frames=6, fps=12.0, size=(24, 32), **kw):
    return ClipDataset(ShardIndex(str(shards)), ClipFormat(num_frames, fps, size), seed=0, **kw)


def train_data(dataset, batch_size, *, num_workers=0, **kw):
    """The TrainData of one rank of one process, shuffled with seed 0."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, rank=0, world_size=1, seed=0, shuffle=True)
    return TrainData(dataset, sampler, num_workers=num_workers, **kw)


def test_index_finds_every_sample(shapes_shards):
    index = ShardIndex(str(shapes_shards))
    assert len(index) == 24 and len(set(index.keys)) == 24
    meta = index.metadata(0)
    assert {"caption", "fps", "num_frames", "motion_score", "width", "height"} <= set(meta)
    assert index.read(0, "mp4")[4:8] == b"ftyp"


def test_clip_shape_range_and_determinism(shapes_shards):
    data = _clip_dataset(shapes_shards)
    a, b = data[(3, 5)], data[(3, 5)]
    assert a["video"].shape == (3, 6, 24, 32)  # (c, f, h, w), resized to cover then cropped
    assert a["video"].min() >= -1 and a["video"].max() <= 1
    assert torch.equal(a["video"], b["video"])  # randomness is a function of (seed, epoch, index)
    c = data[(4, 5)]
    assert c["key"] == a["key"]
    single = _clip_dataset(shapes_shards, num_frames=1, size=(32, 32))[(0, 0)]
    assert single["video"].shape == (3, 1, 32, 32)


def test_frames_follow_the_requested_fps(shapes_shards):
    """At 12 fps from a 24 fps source, consecutive clip frames are every other source frame."""
    from kvideo.data.video_io import read_video

    index = ShardIndex(str(shapes_shards))
    data = ClipDataset(index, ClipFormat(6, 12.0, (32, 32)), seed=0, train=False)
    clip = data[(0, 0)]["video"]
    src, _ = read_video(index.read(0, "mp4"))
    expected = torch.from_numpy(src[0:12:2]).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert torch.allclose(clip, expected, atol=1e-5)


def test_window_s_keeps_an_image_at_the_start_of_a_window(shapes_shards):
    """data.window_s: a single frame is drawn only where a clip of window_s seconds still fits."""
    index = ShardIndex(str(shapes_shards))
    meta = index.metadata(0)
    duration = meta["num_frames"] / meta["fps"]
    image = ClipDataset(index, ClipFormat(1, 24.0, (32, 32)), seed=0)
    starts = [image._window(meta, torch.Generator().manual_seed(k)) for k in range(200)]
    reserved = ClipDataset(index, ClipFormat(1, 24.0, (32, 32), window_s=0.75 * duration), seed=0)
    kept = [reserved._window(meta, torch.Generator().manual_seed(k)) for k in range(200)]
    assert max(starts) > 0.5 * duration  # without it, anywhere in the clip
    assert 0 <= min(kept) and max(kept) <= 0.25 * duration and max(kept) > 0.2 * duration
    with pytest.raises(ValueError, match="data.window_s"):
        ClipFormat(6, 12.0, (32, 32), window_s=0.1)


def test_ranks_and_epochs_cover_the_data_without_duplicates():
    n, bs, world = 103, 4, 3
    per_rank = []
    for rank in range(world):
        s = ResumableBatchSampler(n, bs, rank=rank, world_size=world, seed=1, shuffle=True)
        it = iter(s)
        per_rank.append([i for _ in range(s.batches_per_epoch) for (_, i) in next(it)])
    seen = [i for r in per_rank for i in r]
    assert len(seen) == len(set(seen))  # no sample twice in one epoch across ranks
    assert len(seen) >= n - world * bs  # only the last partial batches are dropped
    # the next epoch is a different order
    s = ResumableBatchSampler(n, bs, rank=0, world_size=world, seed=1, shuffle=True)
    assert s.epoch_order(0) != s.epoch_order(1)


def test_sampler_resumes_at_any_batch():
    full = ResumableBatchSampler(50, 4, rank=1, world_size=2, seed=3, shuffle=True)
    it = iter(full)
    straight = [next(it) for _ in range(20)]  # crosses two epoch boundaries (6 batches each)
    for k in (0, 5, 6, 13):
        resumed = iter(ResumableBatchSampler(50, 4, rank=1, world_size=2, seed=3, shuffle=True, start_batch=k))
        assert [next(resumed) for _ in range(20 - k)] == straight[k:]


def test_too_little_data_is_a_clear_error():
    with pytest.raises(ValueError, match="not one full batch"):
        ResumableBatchSampler(3, 4, rank=0, world_size=1, seed=0, shuffle=True)


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.shards: no .tar shards"):
        expand_shards(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        expand_shards(str(tmp_path / "nowhere"))


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_broken_samples_are_skipped_and_counted(tmp_path, shapes_shards):
    shards = tmp_path / "shards"
    shutil.copytree(shapes_shards, shards)
    meta = {"caption": "broken", "fps": 24, "num_frames": 12, "width": 32, "height": 32, "motion_score": 0.0}
    with tarfile.open(shards / "zz-broken.tar", "w") as tar:
        for k in range(4):
            _add(tar, f"bad{k}.mp4", b"\x00\x00\x00\x18ftypisomgarbage" * 10)
            _add(tar, f"bad{k}.json", json.dumps(meta).encode())
        _add(tar, "lonely.json", json.dumps(meta).encode())  # incomplete sample: ignored
    data = _clip_dataset(shards)
    assert len(data) == 28 and data.index.incomplete == 1
    bad = data.index.keys.index("bad0")
    assert "failed" in data[(0, bad)]
    train = train_data(data, 4)
    got = 0
    for _ in range(7):  # one epoch: 28 samples, 4 of them broken
        got += train.next()["size"]
    assert train.failed_total == 4 and got == 24


def _read(samplers, batches):
    return [item for b in range(batches) for s in samplers for item in s.batch(b)]


def test_a_position_recomputed_for_another_number_of_ranks_neither_repeats_nor_skips():
    n, bs = 50, 4
    old = [ResumableBatchSampler(n, bs, rank=r, world_size=2, seed=3, shuffle=True) for r in range(2)]
    consumed = _read(old, 3)  # 2 ranks x 3 batches x 4 = the epoch's first 24 items
    perm = old[0].permutation(0)
    assert sorted(i for _, i in consumed) == sorted(perm[:24])
    states = [{"batches_done": 3, "skipped": {"undecodable": r + 1}} for r in range(2)]
    moved = reshard_positions(states, n, bs, seed=3, shuffle=True, world_size=3)
    assert [m["origin"] for m in moved] == [[0, 24]] * 3 and moved[0]["skipped"] == {"undecodable": 3}
    new = [ResumableBatchSampler(n, bs, rank=r, world_size=3, seed=3, shuffle=True, origin=tuple(m["origin"]))
           for r, m in enumerate(moved)]
    rest = _read(new, new[0].first_epoch_batches)  # the rest of epoch 0 over 3 ranks
    assert new[0].first_epoch_batches == 2 and all(e == 0 for e, _ in rest)
    assert sorted(i for _, i in rest) == sorted(perm[24:48])  # the next 24 items, none read before
    assert new[0].batch(2)[0][0] == 1  # then whole epochs as usual
    assert new[0].epoch_order(1) == ResumableBatchSampler(n, bs, rank=0, world_size=3, seed=3,
                                                          shuffle=True).epoch_order(1)
    # resharding again, back to 2 ranks, one batch into the partial epoch: item 24 + 12 = 36
    again = reshard_positions([{"batches_done": 1, "origin": [0, 24]}] * 3, n, bs, seed=3, shuffle=True, world_size=2)
    assert again[0]["origin"] == [0, 36]
    # at the end of an epoch the position is the next epoch's start
    assert reshard_positions([{"batches_done": 6}] * 2, n, bs, seed=3, shuffle=True, world_size=1)[0]["origin"] == [1, 0]


def test_no_position_is_exact_when_the_ranks_read_different_numbers_of_batches():
    assert reshard_positions([{"batches_done": 3}, {"batches_done": 4}], 50, 4, seed=0, shuffle=True,
                             world_size=1) is None
