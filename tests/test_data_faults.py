"""Bad training data is skipped, counted by reason and reported; it never crashes or hangs a run.

The shard built here holds every kind of bad metadata next to the good ShapesWorld samples, each
bad sample with a valid video, so only its metadata (or its size) makes it bad.
"""

import io
import json
import math
import shutil
import tarfile
import time

import pytest

from conftest import T2I_CONFIG, tiny_t2i_overrides
from kvideo.data.shards import ClipDataset, ClipFormat, NoGoodSampleError, ShardIndex
from kvideo.registry import load_config
from kvideo.train.engine import train
from kvideo.train.logging import read_metrics
from test_keyframe import KEYFRAME_CONFIG, tiny_keyframe_overrides
from test_shards import train_data

GOOD = {"caption": "a red circle moving left slowly on a white background", "fps": 24, "num_frames": 12,
        "width": 32, "height": 32, "motion_score": 1.5}

# key -> (metadata as written, reason for a stage reading caption + motion_score, reason for one reading neither)
BAD = {
    "caption_number": ({**GOOD, "caption": 7}, "caption", None),
    "caption_empty": ({**GOOD, "caption": "  "}, "caption", None),
    "caption_missing": ({k: v for k, v in GOOD.items() if k != "caption"}, "caption", None),
    "motion_null": ({**GOOD, "motion_score": None}, "motion_score", None),
    "motion_text": ({**GOOD, "motion_score": "x"}, "motion_score", None),
    "motion_nan": ({**GOOD, "motion_score": math.nan}, "motion_score", None),
    "motion_negative": ({**GOOD, "motion_score": -1.0}, "motion_score", None),
    "motion_bool": ({**GOOD, "motion_score": True}, "motion_score", None),
    "motion_missing": ({k: v for k, v in GOOD.items() if k != "motion_score"}, "motion_score", None),
    "fps_zero": ({**GOOD, "fps": 0}, "timing", "timing"),
    "frames_text": ({**GOOD, "num_frames": "many"}, "timing", "timing"),
    "json_list": ([GOOD], "metadata", "metadata"),
    "json_torn": ('{"caption": "a red', "metadata", "metadata"),
}


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory, shapes_shards):
    """The 24 good samples plus one shard of bad ones: every entry of BAD, an oversized video
    and an undecodable one."""
    out = tmp_path_factory.mktemp("bad_shards")
    shutil.copytree(shapes_shards, out, dirs_exist_ok=True)
    video = ShardIndex(str(shapes_shards)).read(0, "mp4")
    with tarfile.open(out / "zz-bad.tar", "w") as tar:
        for key, (meta, _, _) in BAD.items():
            _add(tar, f"{key}.mp4", video)
            _add(tar, f"{key}.json", (meta if isinstance(meta, str) else json.dumps(meta)).encode())
        _add(tar, "oversized.mp4", video + b"\0" * (2 << 20))  # 2 MB over the test's 1 MB limit
        _add(tar, "oversized.json", json.dumps(GOOD).encode())
        _add(tar, "undecodable.mp4", b"\x00\x00\x00\x18ftypisomgarbage" * 10)
        _add(tar, "undecodable.json", json.dumps(GOOD).encode())
    return out


def _dataset(shards, fields):
    return ClipDataset(ShardIndex(str(shards)), ClipFormat(6, 12.0, (32, 32)), seed=0, fields=fields, max_sample_mb=1.0)


@pytest.mark.parametrize("fields, column", [(("caption", "motion_score"), 1), ((), 2)])
def test_every_kind_of_bad_metadata_is_skipped_with_its_reason(bad_shards, fields, column):
    data = _dataset(bad_shards, fields)
    for key, row in BAD.items():
        item = data[(0, data.index.keys.index(key))]
        reason = row[column]
        if reason is None:  # a field this stage does not read
            assert "failed" not in item, (key, item.get("failed"))
            assert isinstance(item["caption"], str) and math.isfinite(item["motion_score"])
        else:
            assert item["failed"]["reason"] == reason, (key, item["failed"])
            assert item["failed"]["key"] == key and item["failed"]["shard"].endswith("zz-bad.tar")
    assert data[(0, data.index.keys.index("oversized"))]["failed"]["reason"] == "oversized"
    assert data[(0, data.index.keys.index("undecodable"))]["failed"]["reason"] == "undecodable"
    good = data[(0, data.index.keys.index(ShardIndex(str(bad_shards)).keys[0]))]
    assert "failed" not in good and good["caption"] and good["motion_score"] >= 0


def test_train_data_counts_the_skipped_by_reason_over_an_epoch(bad_shards):
    data = _dataset(bad_shards, ("caption", "motion_score"))
    n = len(data)  # 24 good + 15 bad
    train = train_data(data, 3)
    got = sum(train.next()["size"] for _ in range(n // 3 - 5))  # fewer calls: all-bad batches are skipped
    while train.batches_done < n // 3:
        got += train.next()["size"]
    assert train.batches_done == n // 3 and got == 24
    expected = {}
    for _, reason, _ in BAD.values():
        expected[reason] = expected.get(reason, 0) + 1
    expected.update(oversized=1, undecodable=1)
    assert dict(train.skipped) == expected
    assert train.state()["skipped"] == expected


@pytest.mark.parametrize("stage", ["t2i", "keyframe"])
def test_training_goes_on_over_bad_samples_and_reports_them(tmp_path, bad_shards, movq_run, t2i_run, stage):
    run = tmp_path / stage
    extra = {"train.batch_size": 13, "train.max_steps": 3, "data.max_sample_mb": 1.0}  # 39 samples: 3 batches
    if stage == "t2i":
        cfg = load_config([T2I_CONFIG], tiny_t2i_overrides(run, bad_shards, movq_run, **extra))
    else:
        cfg = load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(run, bad_shards, movq_run, t2i_run, **extra))
    train(cfg)
    last = read_metrics(run / "metrics.jsonl")[-1]
    if stage == "t2i":  # reads the caption only: motion scores are not its business
        assert last["data/skipped/caption"] == 3 and "data/skipped/motion_score" not in last
        assert last["data/skipped"] == 3 + 4 + 1 + 1  # caption, timing + metadata, oversized, undecodable
    else:
        assert last["data/skipped/caption"] == 3 and last["data/skipped/motion_score"] == 6
        assert last["data/skipped"] == 15


class HangingDataset(ClipDataset):
    """A decoder that never returns for one sample (in the worker process)."""

    hang_key = ""

    def load(self, i, start, end, gen):
        if self.index.keys[i] == self.hang_key:
            time.sleep(3600)
        return super().load(i, start, end, gen)


def test_a_hanging_decode_is_given_up_after_the_timeout(shapes_shards):
    data = HangingDataset(ShardIndex(str(shapes_shards)), ClipFormat(2, 12.0, (32, 32)), seed=0)
    order = train_data(data, 4).sampler.epoch_order(0)
    HangingDataset.hang_key = data.index.keys[order[5]]  # in the second batch
    train = train_data(data, 4, num_workers=1, timeout_s=3.0)
    keys = [train.next()["key"] for _ in range(5)]  # 6 batches an epoch, the second one given up
    assert train.batches_done == 6 and dict(train.skipped) == {"timeout": 4}
    assert keys[0] == [data.index.keys[i] for i in order[0:4]]
    assert keys[1] == [data.index.keys[i] for i in order[8:12]]  # then on from the third batch
    train._close()


def test_an_epoch_without_one_good_sample_stops_the_run_naming_the_failures(shapes_shards):
    data = ClipDataset(ShardIndex(str(shapes_shards)), ClipFormat(6, 12.0, (32, 32)), seed=0,
                       fields=("caption",), max_sample_mb=0.0001)  # every video is "oversized"
    train = train_data(data, 4)
    with pytest.raises(NoGoodSampleError, match=r"24 samples in a row.*oversized.*over data.max_sample_mb"):
        train.next()
