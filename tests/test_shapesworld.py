"""ShapesWorld v1: renderer and scorer agree with the spec and with each other."""

import importlib.util
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest

from kvideo.data.shapesworld import (
    BACKGROUNDS, COLORS, DIRECTIONS, HELD_OUT_PAIRS, SHAPES, SPEEDS, ClipSpec, ShapesWorldSpec, allowed_pairs,
    canonical_test_prompts, caption, check_motion_fits, clip_spec_from_attributes, make_clip,
    metadata, parse_caption, prompt_clip, render_clip, sample_clip_spec, spec_from_metadata,
)
from kvideo.data.shapes_scorer import aggregate_scores, motion_room, score_clip
from kvideo.data.video_io import encode_video_bytes, read_video

MOTIONS = [(d, s) for d in DIRECTIONS[:4] for s in SPEEDS] + [("still", "none")]
ROOT = Path(__file__).resolve().parents[1]
META_KEYS = {"caption", "background", "color", "shape", "direction", "speed", "speed_px_per_frame",
             "size", "start_xy", "fps", "num_frames", "seed", "motion_score", "width", "height"}


def covering_attributes(n):
    """n attribute dicts cycling through every color, shape, background and motion."""
    return [dict(color=list(COLORS)[i % 6], shape=SHAPES[(i // 6) % 3],
                 background=list(BACKGROUNDS)[(i // 2) % 3], direction=MOTIONS[i % 9][0],
                 speed=MOTIONS[i % 9][1]) for i in range(n)]


def load_tool(name):
    """Import tools/NAME.py (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def h264_round_trip(frames, fps, pix_fmt="yuv444p"):
    return read_video(encode_video_bytes(frames, fps, crf=14, pix_fmt=pix_fmt))[0]


# ----------------------------------------------------------------------------- the spec


def test_constants_match_the_spec():
    assert BACKGROUNDS == {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
    assert COLORS["red"] == (230, 25, 25) and COLORS["cyan"] == (25, 210, 220) and len(COLORS) == 6
    assert SHAPES == ("circle", "square", "triangle")
    assert DIRECTIONS == ("left", "right", "up", "down", "still")
    assert SPEEDS == {"slow": 0.1, "fast": 0.3}
    assert set(HELD_OUT_PAIRS) == {("red", "triangle"), ("blue", "circle"), ("yellow", "square")}
    fast = ClipSpec("black", "red", "circle", "right", "fast", 8.0, (20.0, 20.0))
    assert fast.speed_px_per_frame == pytest.approx(0.8)
    slow = ClipSpec("black", "red", "circle", "right", "slow", 8.0, (20.0, 20.0))
    assert slow.speed_px_per_frame == pytest.approx(0.2667, abs=1e-4)
    assert np.allclose(fast.centers()[-1] - fast.centers()[0], (38.4 * 47 / 48, 0))


def test_shape_geometry_and_anti_aliasing():
    r, c = 9.3, (30.37, 31.81)
    for shape, area in (("circle", math.pi * r * r), ("square", 4 * r * r), ("triangle", 2 * r * r)):
        spec = ClipSpec("black", "blue", shape, "still", None, r, c, num_frames=1)
        alpha = render_clip(spec)[0, :, :, 2].astype(float) / 230  # blue channel: 0 bg, 230 object
        assert alpha.sum() == pytest.approx(area, rel=0.03), shape  # 4x4 samples: edges quantised
        assert 0 < np.sum((alpha > 0.05) & (alpha < 0.95)) < 0.5 * alpha.sum()  # soft edges only
        rows, cols = np.nonzero(alpha > 0)  # inside the box [c - r, c + r], and filling it
        for lo, hi, centre in ((cols.min(), cols.max(), c[0]), (rows.min(), rows.max(), c[1])):
            assert math.floor(centre - r) <= lo and hi <= math.floor(centre + r)
            assert hi - lo + 1 >= 2 * r - 1
        if shape == "triangle":  # apex up: the bottom half holds 3/4 of the area
            ys = np.arange(64)[:, None] + 0.5
            assert (alpha * (ys > c[1])).sum() / alpha.sum() == pytest.approx(0.75, abs=0.02)


def test_directions_and_speed_in_pixels():
    for direction, (sx, sy) in (("left", (-1, 0)), ("right", (1, 0)), ("up", (0, -1)), ("down", (0, 1))):
        spec = clip_spec_from_attributes(dict(background="gray", color="red", shape="square",
                                              direction=direction, speed="fast"), 3)
        delta = spec.centers()[-1] - spec.centers()[0]
        assert np.allclose(delta, np.array([sx, sy]) * 0.3 * 64 * 47 / 24)


# ----------------------------------------------------------------------------- sampling


def test_same_seed_same_clip():
    a, b = sample_clip_spec(1234), sample_clip_spec(1234)
    assert a == b and a.seed == 1234
    assert np.array_equal(render_clip(a), render_clip(b))
    (mp4_a, meta_a), (mp4_b, meta_b) = make_clip(99, num_frames=12), make_clip(99, num_frames=12)
    assert json.dumps(meta_a, sort_keys=True) == json.dumps(meta_b, sort_keys=True)
    assert mp4_a == mp4_b
    assert sample_clip_spec(1235) != a


def test_held_out_pairs_are_excluded():
    rng = np.random.default_rng(0)
    pairs = {(s.color, s.shape) for s in (sample_clip_spec(rng) for _ in range(3000))}
    assert pairs == set(allowed_pairs()) and len(pairs) == 15
    assert not pairs & set(HELD_OUT_PAIRS)
    rng = np.random.default_rng(0)
    everything = {(s.color, s.shape) for s in (sample_clip_spec(rng, exclude_held_out=False) for _ in range(600))}
    assert set(HELD_OUT_PAIRS) <= everything


@pytest.mark.parametrize("size,fps,num_frames", [(64, 24, 48), (32, 24, 12), (96, 30, 40), (64, 12, 24)])
def test_object_inside_canvas_in_every_frame(size, fps, num_frames):
    rng = np.random.default_rng(size + num_frames)
    for _ in range(150):
        spec = sample_clip_spec(rng, size=size, fps=fps, num_frames=num_frames)
        centers = spec.centers()
        assert np.all(centers - spec.size >= 1.0 - 1e-9) and np.all(centers + spec.size <= size - 1.0 + 1e-9)
        assert 0.12 * size <= spec.size <= 0.16 * size
    frames = render_clip(spec)
    bg = np.array(BACKGROUNDS[spec.background], np.uint8)
    for border in (frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]):
        assert np.all(border == bg)


def test_too_long_motion_is_refused():
    with pytest.raises(ValueError, match="travels"):
        check_motion_fits(size=64, fps=24, num_frames=200)
    with pytest.raises(ValueError, match="travels"):
        sample_clip_spec(np.random.default_rng(0), num_frames=200)
    with pytest.raises(ValueError, match="still clips"):
        ClipSpec("black", "red", "circle", "still", "fast", 8.0, (20.0, 20.0))
    with pytest.raises(ValueError, match="unknown color"):
        ClipSpec("black", "purple", "circle", "still", None, 8.0, (20.0, 20.0))


@pytest.mark.parametrize("field,value", [("num_clips", -1), ("size", 0), ("fps", 0.0), ("num_frames", 0),
                                         ("clips_per_shard", 0), ("split", "test")])
def test_shapesworld_spec_names_the_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"ShapesWorldSpec\.{field}"):
        ShapesWorldSpec(**{"num_clips": 4, field: value})
    with pytest.raises(ValueError, match=r"ShapesWorldSpec \(size, fps, num_frames\): .*travels"):
        ShapesWorldSpec(4, num_frames=200)
    assert ShapesWorldSpec(0).clips_per_shard == 256


# ----------------------------------------------------------------------------- captions


def test_captions_and_metadata():
    moving = ClipSpec("gray", "red", "circle", "left", "slow", 8.0, (40.0, 30.0), seed=5)
    still = ClipSpec("white", "cyan", "triangle", "still", None, 8.0, (40.0, 30.0))
    assert caption(moving) == "a red circle moving left slowly on a gray background"
    assert caption(still) == "a cyan triangle standing still on a white background"
    assert parse_caption("A red circle moving left slowly on a gray background.") == dict(
        background="gray", color="red", shape="circle", direction="left", speed="slow")
    assert parse_caption(caption(still))["speed"] == "none"
    rng = np.random.default_rng(0)
    texts = {caption(moving, rng) for _ in range(40)}
    assert len(texts) >= 3 and caption(moving) in texts
    assert all(parse_caption(t) == parse_caption(caption(moving)) for t in texts)
    for bad in ("a red circle", "a purple circle moving left slowly on a gray background"):
        with pytest.raises(ValueError):
            parse_caption(bad)
    meta = metadata(still, motion_score=0.0)
    assert set(meta) == META_KEYS and meta["speed"] == "none" and meta["speed_px_per_frame"] == 0.0
    meta = metadata(moving)
    assert meta["motion_score"] > 0 and meta["seed"] == 5 and (meta["width"], meta["height"]) == (64, 64)
    assert spec_from_metadata(json.loads(json.dumps(meta))) == moving


def test_canonical_test_prompts():
    prompts = canonical_test_prompts()
    assert prompts == canonical_test_prompts()
    held = [p for p in prompts if p["split"] == "held_out"]
    seen = [p for p in prompts if p["split"] == "seen"]
    assert len(held) == 30 and len(seen) == 30 and len({p["prompt"] for p in prompts}) == 60
    for p in prompts:
        attrs = parse_caption(p["prompt"])
        assert caption(attrs) == p["prompt"]  # canonical form
        assert ((attrs["color"], attrs["shape"]) in HELD_OUT_PAIRS) == (p["split"] == "held_out")


def test_prompt_clip_is_deterministic_and_coded_like_the_shards():
    prompt = canonical_test_prompts()[0]["prompt"]
    raw, coded = prompt_clip(prompt, 3, 64), prompt_clip(prompt, 3, 64, coded=True)
    assert raw.shape == coded.shape == (48, 64, 64, 3) and coded.dtype == np.uint8
    assert np.array_equal(raw, prompt_clip(prompt, 3, 64)) and not np.array_equal(raw, prompt_clip(prompt, 4, 64))
    err = np.abs(raw.astype(np.int16) - coded.astype(np.int16))
    assert 0 < err.mean() < 2.0  # H.264 at crf 14: close, not identical
    assert score_clip(coded, 24.0, prompt)["all_correct"]
    assert not np.array_equal(coded, prompt_clip(prompt, 3, 64, coded=True, pix_fmt="yuv420p"))


def test_shards_pix_fmt_reads_the_first_clip(shapes_shards):
    from kvideo.data.video_io import probe
    from kvideo.evaluation import shards_pix_fmt

    assert shards_pix_fmt(str(shapes_shards)) == "yuv444p"  # ShapesWorldSpec's default
    assert probe(encode_video_bytes(np.zeros((2, 16, 16, 3), np.uint8), 24.0, pix_fmt="yuv420p"))["pix_fmt"] == "yuv420p"


def test_score_checkpoints_prints_a_row_each_and_writes_the_results(tmp_path, capsys):
    from kvideo.evaluation import pct, score_checkpoints

    ckpts = [(tmp_path / "step_0000010", 10, 1.25), (tmp_path / "step_0000020", 20, None)]
    out = tmp_path / "eval" / "results.json"
    results = score_checkpoints(ckpts, lambda ckpt: {"acc": int(ckpt.name[-2:]) / 40}, ["acc"],
                                lambda r: [pct(r["acc"])], out)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["| checkpoint | train min | acc |", "|---|---|---|",
                     "| step_0000010 | 1.2 | 25% |", "| step_0000020 | ? | 50% |"]
    assert json.loads(out.read_text()) == results == [{"acc": 0.25, "step": 10, "train_minutes": 1.25},
                                                      {"acc": 0.5, "step": 20, "train_minutes": None}]


# ----------------------------------------------------------------------------- scorer


def test_scorer_is_perfect_on_rendered_clips_after_h264():
    failures, results = [], []
    for i, attrs in enumerate(covering_attributes(60)):
        spec = clip_spec_from_attributes(attrs, i)
        result = score_clip(h264_round_trip(render_clip(spec), spec.fps), spec.fps, caption(spec))
        results.append(result)
        if not result["all_correct"]:
            failures.append((caption(spec), result["pred"], result["fill_ratio"], result["speed_measured"]))
    assert not failures, failures
    speeds = {s: [r["speed_measured"] for r in results if r["target"]["speed"] == s] for s in SPEEDS}
    assert np.allclose(speeds["slow"], 0.1, atol=0.01) and np.allclose(speeds["fast"], 0.3, atol=0.01)
    assert max(r["area_cv"] for r in results) < 0.05 and max(r["color_drift"] for r in results) < 10
    assert max(r["background_flicker"] for r in results) < 1.0  # flat backgrounds: H.264's noise only


def test_background_flicker_measures_the_backgrounds_change_from_frame_to_frame():
    spec = clip_spec_from_attributes(covering_attributes(1)[0], 0)
    frames = render_clip(spec)
    clean = score_clip(frames, spec.fps, caption(spec))
    assert clean["background_flicker"] == 0.0  # rendered, not encoded: a flat background stays flat
    # every other frame's background brightened by 6: every frame pair away from the object
    # changes by exactly 6, the object (and the pixels within 2 px of it) left out
    bg = np.asarray(frames[0, 0, 0], dtype=np.int16)
    lit = frames.astype(np.int16)
    is_bg = (lit == bg).all(-1)
    lit[1::2][is_bg[1::2]] += 6
    flickering = score_clip(np.clip(lit, 0, 255).astype(np.uint8), spec.fps, caption(spec))
    assert flickering["background_flicker"] == pytest.approx(6.0, abs=1e-4)
    assert flickering["correct"] == clean["correct"]
    assert score_clip(frames[:1], spec.fps, caption(spec))["background_flicker"] is None


def test_scorer_on_yuv420p_and_other_sizes_and_rates():
    """4:2:0 video (what most writers produce) and a 96 px, 30 fps clip are scored right too."""
    for i, attrs in enumerate(covering_attributes(18)):
        spec = clip_spec_from_attributes(attrs, 100 + i)
        result = score_clip(h264_round_trip(render_clip(spec), 24, "yuv420p"), 24, attrs)
        assert result["all_correct"], (attrs, result["pred"], result["fill_ratio"])
    for i, attrs in enumerate(covering_attributes(9)):
        spec = clip_spec_from_attributes(attrs, i, size=96, fps=30, num_frames=40)
        result = score_clip(render_clip(spec), 30, caption(spec))
        assert result["all_correct"], (attrs, result["pred"])
        assert result["speed_requested"] == SPEEDS.get(attrs["speed"], 0.0)


def test_motion_room_of_the_first_and_the_last_frame():
    # a clip's first frame leaves room for its whole trip; its last frame, fast, does not
    for i, attrs in enumerate(covering_attributes(40)):
        spec = clip_spec_from_attributes(attrs, i)
        frames = render_clip(spec)
        first = motion_room(frames[0], caption(spec), fps=spec.fps, num_frames=spec.num_frames)
        if spec.direction == "still":
            assert first is None
            continue
        assert first["fits"], (caption(spec), first)
        travel = SPEEDS[spec.speed] * spec.canvas_size * (spec.num_frames - 1) / spec.fps
        assert first["travel_px"] == pytest.approx(travel)
        last = motion_room(frames[-1], caption(spec), fps=spec.fps, num_frames=spec.num_frames)
        assert last["room_px"] == pytest.approx(first["room_px"] - travel, abs=1.5)
        assert last["fits"] is (spec.speed == "slow" and last["room_px"] >= travel)
    empty = np.zeros((64, 64, 3), np.uint8)
    assert motion_room(empty, "a red circle moving left quickly on a black background", fps=24, num_frames=29) is None


def test_scorer_rejects_wrong_prompts():
    spec = ClipSpec("black", "red", "circle", "right", "fast", 8.5, (15.0, 30.0))
    frames = render_clip(spec)
    result = score_clip(frames, 24, "a blue circle moving right quickly on a black background")
    assert result["correct"] == dict(background=True, color=False, shape=True, direction=True, speed=True)
    assert not result["all_correct"] and result["pred"]["color"] == "red"
    for prompt, wrong in (("a red square moving right quickly on a black background", "shape"),
                          ("a red circle moving left quickly on a black background", "direction"),
                          ("a red circle moving right slowly on a black background", "speed"),
                          ("a red circle moving right quickly on a white background", "background")):
        result = score_clip(frames, 24, prompt)
        assert [k for k, ok in result["correct"].items() if not ok] == [wrong]
    still = score_clip(frames, 24, "a red circle standing still on a black background")
    assert not still["correct"]["direction"] and not still["correct"]["speed"]


def test_scorer_background_threshold_and_empty_clips():
    spec = ClipSpec("gray", "green", "square", "still", None, 9.0, (30.0, 30.0))
    tinted = render_clip(spec, background_rgb=(178, 148, 88))  # 67 away from gray
    result = score_clip(tinted, 24, caption(spec))
    assert result["pred"]["background"] == "unknown" and not result["correct"]["background"]
    assert result["correct"]["color"] and result["correct"]["shape"] and result["correct"]["direction"]
    slightly = render_clip(spec, background_rgb=(150, 140, 120))  # 27 away: still gray
    assert score_clip(slightly, 24, caption(spec))["all_correct"]
    empty = np.full((12, 64, 64, 3), 128, np.uint8)
    result = score_clip(empty, 24, caption(spec))
    assert result["pred"]["shape"] == "unknown" and result["correct"] == dict(
        background=True, color=False, shape=False, direction=False, speed=False)


def test_aggregate_scores_by_split():
    items = []
    for attrs in ({"color": "red", "shape": "triangle"}, {"color": "green", "shape": "circle"}):
        spec = clip_spec_from_attributes(dict(background="white", direction="up", speed="slow", **attrs), 0)
        items.append((render_clip(spec), 24, caption(spec)))
        items.append((render_clip(spec), 24, dict(_attrs(spec), color="magenta")))  # wrong colour
    out = aggregate_scores([score_clip(frames, fps, prompt) for frames, fps, prompt in items])
    assert out["n"] == 4
    assert out["accuracy"]["color"] == 0.5 and out["accuracy"]["shape"] == 1.0 and out["all_correct"] == 0.5
    assert out["by_split"]["held_out"]["n"] == 1 and out["by_split"]["seen"]["n"] == 3
    json.dumps(out)  # serialisable


def _attrs(spec):
    return dict(background=spec.background, color=spec.color, shape=spec.shape,
                direction=spec.direction, speed=spec.speed_name)


# ----------------------------------------------------------------------------- tools


def test_make_shapesworld_shards_and_score_tool(tmp_path, capsys):
    make_main, score_main = load_tool("make_shapesworld").main, load_tool("score_shapes").main

    out = tmp_path / "train"
    make_main(["--out", str(out), "--num-clips", "5", "--num-frames", "12", "--clips-per-shard", "2",
               "--seed", "3"])
    shards = sorted(out.glob("shard-*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    keys, metas = [], {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            names = sorted(m.name for m in tar.getmembers())
            assert len(names) % 2 == 0
            for js, mp4 in zip(names[0::2], names[1::2]):
                assert js.endswith(".json") and mp4.endswith(".mp4") and mp4[:-4] == js[:-5]
                meta = json.loads(tar.extractfile(js).read())
                frames, _ = read_video(tar.extractfile(mp4).read())
                assert set(meta) == META_KEYS and frames.shape == (12, 64, 64, 3)
                assert (meta["color"], meta["shape"]) not in HELD_OUT_PAIRS
                keys.append(js[:-5])
                metas[js[:-5]] = meta
    assert keys == [f"clip_{i:07d}" for i in range(5)]
    prompts = [json.loads(line) for line in (out / "test_prompts.jsonl").read_text().splitlines()]
    assert prompts == canonical_test_prompts()
    assert json.loads((out / "dataset.json").read_text())["num_clips"] == 5

    capsys.readouterr()
    report = score_main([str(out)])
    assert report["summary"]["n"] == 5 and report["summary"]["all_correct"] == 1.0
    assert "| all | 5 |" in capsys.readouterr().out

    # Same seed: identical metadata; the val split draws different clips.
    again = tmp_path / "again"
    make_main(["--out", str(again), "--num-clips", "2", "--num-frames", "12", "--seed", "3"])
    with tarfile.open(again / "shard-000000.tar") as tar:
        assert json.loads(tar.extractfile("clip_0000001.json").read()) == metas["clip_0000001"]
    val = tmp_path / "val"
    make_main(["--out", str(val), "--num-clips", "2", "--num-frames", "12", "--seed", "3", "--split", "val"])
    with tarfile.open(val / "shard-000000.tar") as tar:
        assert json.loads(tar.extractfile("clip_0000001.json").read())["seed"] != metas["clip_0000001"]["seed"]


def test_make_shapesworld_raw_and_score_tool_prompts(tmp_path):
    make_main, score_main = load_tool("make_shapesworld").main, load_tool("score_shapes").main

    out = tmp_path / "raw"
    make_main(["--out", str(out), "--num-clips", "3", "--num-frames", "12", "--raw"])
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["path"] for r in rows] == [f"clip_{i:07d}.mp4" for i in range(3)]
    assert all((out / r["path"]).exists() and parse_caption(r["caption"]) for r in rows)
    assert not list(out.glob("*.tar")) and (out / "test_prompts.jsonl").exists()
    assert score_main([str(out), "--json"])["summary"]["all_correct"] == 1.0

    # One video with a sidecar caption, one mismatched through a --prompts file.
    video = out / "clip_0000000.mp4"
    video.with_suffix(".txt").write_text(rows[0]["caption"])
    assert score_main([str(video)])["summary"]["all_correct"] == 1.0
    attrs = parse_caption(rows[0]["caption"])
    other = "white" if attrs["background"] != "white" else "black"
    wrong = tmp_path / "prompts.jsonl"
    wrong.write_text(json.dumps({"path": str(video), "prompt": caption(dict(attrs, background=other))}) + "\n")
    report = score_main([str(video), "--prompts", str(wrong)])
    assert report["summary"]["accuracy"]["background"] == 0.0
    assert report["summary"]["accuracy"]["shape"] == 1.0
