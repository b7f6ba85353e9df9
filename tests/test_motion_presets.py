"""tools/motion_presets.py: presets read off the shards' motion scores."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import motion_presets  # noqa: E402

from kvideo.data.shards import ShardIndex


def scores_by_speed(shards):
    index = ShardIndex(str(shards))
    groups = {}
    for i in range(len(index)):
        meta = index.metadata(i)
        speed = "still" if meta["speed"] in ("none", "still") or meta["direction"] == "still" else meta["speed"]
        groups.setdefault(speed, []).append(meta["motion_score"])
    return groups


def test_by_speed_is_each_speeds_median(shapes_shards, tmp_path, capsys):
    out = tmp_path / "presets.json"
    assert motion_presets.main(["--shards", str(shapes_shards), "--by", "speed", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    expected = scores_by_speed(shapes_shards)
    assert set(report["presets"]) == set(expected)
    for speed, scores in expected.items():
        assert report["presets"][speed]["clips"] == len(scores)
        assert report["presets"][speed]["preset"] == pytest.approx(float(np.median(scores)))
    assert report["presets"]["fast"]["preset"] > report["presets"]["slow"]["preset"]
    assert capsys.readouterr().out.strip().splitlines()[-1] == report["override"]


def test_quantiles_of_every_clip(shapes_shards, tmp_path):
    out = tmp_path / "presets.json"
    assert motion_presets.main(["--shards", str(shapes_shards), "--quantiles", "low=0.1,high=0.9",
                                "--json", str(out)]) == 0
    scores = [s for group in scores_by_speed(shapes_shards).values() for s in group]
    presets = json.loads(out.read_text())["presets"]
    assert list(presets) == ["low", "high"]
    assert presets["low"]["preset"] == pytest.approx(float(np.quantile(scores, 0.1)))
    assert presets["high"]["preset"] == pytest.approx(float(np.quantile(scores, 0.9)))


def test_a_v2_clip_counts_by_its_fastest_object():
    shot = lambda *speeds: {"objects": [{"speed": s} for s in speeds]}  # noqa: E731
    assert motion_presets.clip_speed({"shots": [shot("slow", "none"), shot("fast")]}) == "fast"
    assert motion_presets.clip_speed({"shots": [shot("none", "slow")]}) == "slow"
    assert motion_presets.clip_speed({"shots": [shot("none")]}) == "still"
    assert motion_presets.clip_speed({"speed": "fast"}) == "fast"
    assert motion_presets.clip_speed({"caption": "a real video"}) is None


def test_bad_arguments_name_the_problem(shapes_shards, capsys):
    assert motion_presets.main(["--shards", str(shapes_shards), "--where", "kind=single"]) == 2
    assert "no clip with a motion_score matching --where" in capsys.readouterr().err
    assert motion_presets.main(["--shards", str(shapes_shards), "--quantiles", "low=1.5"]) == 2
    assert "a quantile lies in [0, 1]" in capsys.readouterr().err
    assert motion_presets.main(["--shards", str(shapes_shards), "--quantiles", "low"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
