"""tools/prepare_videos.py: raw videos to shards, on videos these tests generate with PyAV.

Checked: every input accounted for with the right reason; scene cuts within a frame of the truth
and no frame of the next scene in a clip; black-border crops within 2 px; rotation, variable
frame rate and odd sizes; the shard format training reads; resume after SIGKILL without loss or
duplicates; time and memory limits; merge; the real clips in ../shared/data; train.py on the output.
"""

import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from omegaconf import OmegaConf

from kvideo.registry import load_config
from kvideo.data.prepare import load_prepare_config, merge, prepare
from kvideo.data.prepare.captions import CAPTIONERS, CaptionFileError, ClipContext, CocaCaptioner, load_caption_table
from kvideo.data.prepare.clips import clip_frames, output_size, plan_clips
from kvideo.data.prepare.config import ConfigError, PrepareConfig
from kvideo.data.prepare.process import clip_key
from kvideo.data.prepare.runner import expand_inputs, resolve_part
from kvideo.data.prepare.scan import scan_source
from kvideo.data.shapesworld import caption as shapes_caption
from kvideo.data.shapesworld import ShapesWorldSpec, metadata, render_clip, sample_clip_spec, write_shapesworld
from kvideo.data.shards import ClipDataset, ClipFormat, ShardIndex
from kvideo.data.video_io import probe, read_video, write_video
from kvideo.train.engine import train

from conftest import MOVQ_CONFIG, ROOT, SHARED_DATA, tiny_movq_overrides

TOOL = ROOT / "tools" / "prepare_videos.py"
DEFAULT_YAML = ROOT / "configs" / "prepare" / "default.yaml"
SHAPES_YAML = ROOT / "configs" / "prepare" / "shapes.yaml"

# ----------------------------------------------------------------------------------------------
# Test videos
# ----------------------------------------------------------------------------------------------

SCENE_COLORS = [(170, 20, 20), (40, 230, 60), (30, 40, 120)]  # differ in hue and brightness


def textured(n, h, w, color, seed):
    """n frames of a colour with fixed texture and a bar moving right (so motion > 0)."""
    rng = np.random.default_rng(seed)
    frames = np.empty((n, h, w, 3), np.uint8)
    frames[:] = np.clip(np.asarray(color) + rng.integers(-20, 20, (h, w, 1)), 30, 255)
    for i in range(n):
        x = (3 * i) % max(w - 16, 1)
        frames[i, h // 3 : h // 3 + 16, x : x + 16] = 255 - np.asarray(color)
    return frames


def boxed(frames, height, width, y, x):
    """The frames inside a black canvas (letterbox / pillarbox bars)."""
    out = np.zeros((len(frames), height, width, 3), np.uint8)
    out[:, y : y + frames.shape[1], x : x + frames.shape[2]] = frames
    return out


def write_vfr(path, num_frames=80, h=240, w=320):
    """Gaps alternate 50 ms / 25 ms (26.7 fps on average); frame j shows j in Gray code, one
    stripe of 8 per bit, so a picked frame can be identified and no two frames look like a cut."""
    container = av.open(str(path), "w")
    stream = container.add_stream("libx264", rate=40)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.codec_context.time_base = Fraction(1, 1000)
    stream.options = {"crf": "10"}
    t, times = 0, []
    for j in range(num_frames):
        gray = j ^ (j >> 1)
        img = np.empty((h, w, 3), np.uint8)
        for b in range(8):
            img[:, b * w // 8 : (b + 1) * w // 8] = 224 if (gray >> b) & 1 else 64
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts, frame.time_base = t, Fraction(1, 1000)
        times.append(t / 1000)
        for p in stream.encode(frame):
            container.mux(p)
        t += 50 if j % 2 == 0 else 25
    for p in stream.encode():
        container.mux(p)
    container.close()
    return np.asarray(times)


def decode_gray_code(frame, w=320):
    bits = [frame[:, b * w // 8 : (b + 1) * w // 8].mean() > 144 for b in range(8)]
    gray = sum(int(bit) << b for b, bit in enumerate(bits))
    j = 0
    while gray:
        j ^= gray
        gray >>= 1
    return j


def write_audio_only(path):
    container = av.open(str(path), "w")
    stream = container.add_stream("aac", rate=16000)
    stream.layout = "mono"
    for i in range(16):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, i * 1024
        for p in stream.encode(frame):
            container.mux(p)
    for p in stream.encode():
        container.mux(p)
    container.close()


ROTATED_UPRIGHT = (384, 288)  # (height, width) as displayed


def rotated_frames(n=55):
    """Upright frames (384 high, 288 wide) with a red marker in the top-left corner."""
    frames = textured(n, *ROTATED_UPRIGHT, (60, 90, 200), seed=7)
    frames[:, :40, :40] = (250, 10, 10)
    return frames


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Every kind of input, with the outcome each should have."""
    d = tmp_path_factory.mktemp("prepare_in")
    cut_frames = np.concatenate([textured(62, 240, 320, SCENE_COLORS[0], 0), textured(63, 240, 320, SCENE_COLORS[1], 1),
                                 textured(55, 240, 320, SCENE_COLORS[2], 2)])
    write_video(d / "cuts.mp4", cut_frames, 25)
    write_video(d / "letterbox.mp4", boxed(textured(60, 216, 384, (120, 160, 90), 3), 288, 384, 36, 0), 25)
    write_video(d / "pillarbox.mp4", boxed(textured(66, 288, 288, (90, 120, 170), 4), 288, 384, 0, 48), 30)
    times = write_vfr(d / "vfr.mp4")
    upright = rotated_frames()
    write_video(d / "rotated.mp4", np.ascontiguousarray(np.rot90(upright, k=-1, axes=(1, 2))), 25, rotation=90)
    write_video(d / "odd.mp4", textured(55, 257, 321, (150, 150, 60), 5), 25, pix_fmt="yuv444p")
    write_video(d / "lowfps.mp4", textured(45, 240, 320, (100, 100, 100), 6), 15)
    write_video(d / "small.mp4", textured(55, 120, 160, (100, 100, 100), 6), 25)
    write_video(d / "short.mp4", textured(30, 240, 320, (100, 100, 100), 6), 25)
    write_video(d / "nocaption.mp4", textured(10, 240, 320, (100, 100, 100), 6), 25)
    good = (d / "cuts.mp4").read_bytes()
    (d / "corrupt.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    (d / "truncated.mp4").write_bytes(good[: len(good) * 2 // 5])
    (d / "empty.mp4").write_bytes(b"")
    (d / "notvideo.mov").write_text("this is not a video\n" * 100)
    write_audio_only(d / "audio.mp4")
    (d / "README.md").write_text("not an input: no video extension")
    for name in ("cuts", "vfr", "rotated", "odd", "lowfps", "small", "short", "truncated", "corrupt", "empty",
                 "notvideo", "audio"):
        (d / f"{name}.txt").write_text(f"caption of {name}\n")
    captions = d.parent / f"{d.name}_captions.csv"
    captions.write_text(f"path,caption\n{d.name}/letterbox.mp4,a letterboxed clip\n"
                        f"{d.name}/pillarbox.mp4,\"a pillarboxed clip, with a comma\"\n")
    listing = d.parent / f"{d.name}_list.txt"
    listing.write_text(f"# extra inputs\n{d.name}/missing.mp4\n{d.name}/cuts.mp4\n")
    expected = {
        "cuts.mp4": "clips", "letterbox.mp4": "clips", "pillarbox.mp4": "clips", "vfr.mp4": "clips",
        "rotated.mp4": "clips", "odd.mp4": "clips", "lowfps.mp4": "low_fps", "small.mp4": "too_small",
        "short.mp4": "too_short", "nocaption.mp4": "no_caption", "corrupt.mp4": "decode_error",
        "truncated.mp4": "decode_error", "empty.mp4": "decode_error", "notvideo.mov": "decode_error",
        "audio.mp4": "decode_error", "missing.mp4": "decode_error",
    }
    return {"dir": d, "captions": captions, "list": listing, "expected": expected, "vfr_times": times,
            "rotated": upright}


def corpus_config(corpus, *extra):
    return load_prepare_config([DEFAULT_YAML], [f"captions.file={corpus['captions']}", "run.keep_decoded_mb=0",
                                                "writer.max_shard_mb=0.1", "writer.fsync=false", *extra])


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    """One run of the whole corpus (one worker, every file decoded twice: the streaming path)."""
    out = tmp_path_factory.mktemp("prepare_out")
    report = prepare([corpus["dir"], corpus["list"]], out, corpus_config(corpus), progress=False)
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    return {"out": out, "report": report, "manifest": manifest, "rejects": rejects}


def rows_of(rows, name):
    return [r for r in rows if Path(r["source"]).name == name]


def clip_video(out, row):
    index = ShardIndex(str(out / row["shard"]))
    return read_video(index.read(index.keys.index(row["key"]), "mp4"))[0]


# ----------------------------------------------------------------------------------------------
# The corpus run
# ----------------------------------------------------------------------------------------------


def test_every_input_is_accounted_for_with_the_right_reason(prepared, corpus):
    sources = {Path(r["source"]).name for r in prepared["manifest"]} | {Path(r["source"]).name for r in prepared["rejects"]}
    assert sources == set(corpus["expected"])  # README.md is no input; cuts.mp4 listed twice counts once
    for name, outcome in corpus["expected"].items():
        kept, dropped = rows_of(prepared["manifest"], name), rows_of(prepared["rejects"], name)
        if outcome == "clips":
            assert kept and not dropped, (name, dropped)
        else:
            assert not kept and [r["reason"] for r in dropped] == [outcome], (name, dropped)
            assert dropped[0]["detail"]
    assert "audio-only" in rows_of(prepared["rejects"], "audio.mp4")[0]["detail"]
    assert "does not exist" in rows_of(prepared["rejects"], "missing.mp4")[0]["detail"]
    short = rows_of(prepared["rejects"], "short.mp4")[0]
    assert short["start_s"] == 0.0 and short["end_s"] == pytest.approx(1.2)  # a scene, with its times
    report = prepared["report"]
    assert report["complete"] and report["inputs"] == report["sources_done"] == len(corpus["expected"])
    assert report["clips_out"] == len(prepared["manifest"]) == 8
    assert report["rejects_by_reason"] == {"decode_error": 6, "too_short": 1, "too_small": 1, "low_fps": 1,
                                           "no_caption": 1, "timeout": 0}
    assert report["seconds_out"] == pytest.approx(sum(r["end_s"] - r["start_s"] for r in prepared["manifest"]))
    assert report["throughput_source_s_per_wall_s"] > 0


def test_scene_cuts_are_exact_and_nothing_bleeds(prepared):
    rows = sorted(rows_of(prepared["manifest"], "cuts.mp4"), key=lambda r: r["start_s"])
    truth = [(0.0, 2.48), (2.48, 5.0), (5.0, 7.2)]
    assert len(rows) == 3
    for row, (start, end), color in zip(rows, truth, SCENE_COLORS):
        assert abs(row["start_s"] - start) <= 1 / 25 + 1e-6 and abs(row["end_s"] - end) <= 1 / 25 + 1e-6
        frames = clip_video(prepared["out"], row)
        assert len(frames) == row["num_frames"] == int(np.floor((end - start - 1 / 25) * 24 + 1e-6)) + 1
        means = frames.reshape(len(frames), -1, 3).mean(axis=1)  # (f, 3)
        nearest = np.argmin(np.linalg.norm(means[:, None] - np.asarray(SCENE_COLORS)[None], axis=-1), axis=1)
        assert (nearest == SCENE_COLORS.index(color)).all()  # every frame is of this scene
        assert row["fps"] == 24.0 and row["caption"] == "caption of cuts" and row["crop"] is None


def test_black_borders_are_cropped(prepared):
    (letter,) = rows_of(prepared["manifest"], "letterbox.mp4")
    (pillar,) = rows_of(prepared["manifest"], "pillarbox.mp4")
    assert np.abs(np.subtract(letter["crop"], [0, 36, 384, 216])).max() <= 2
    assert np.abs(np.subtract(pillar["crop"], [48, 0, 288, 288])).max() <= 2
    assert (letter["width"], letter["height"]) == tuple(letter["crop"][2:])
    assert pillar["caption"] == "a pillarboxed clip, with a comma" and letter["caption"] == "a letterboxed clip"
    frames = clip_video(prepared["out"], pillar)
    assert frames[:, :, :2].mean() > 40 and frames[:, :, -2:].mean() > 40  # no black column left


def test_rotated_odd_sized_and_variable_frame_rate_sources(prepared, corpus):
    (rot,) = rows_of(prepared["manifest"], "rotated.mp4")
    assert (rot["height"], rot["width"]) == ROTATED_UPRIGHT and rot["crop"] is None
    frames = clip_video(prepared["out"], rot)
    assert frames[:, 5:30, 5:30, 0].mean() > 200 and frames[:, 5:30, 5:30, 2].mean() < 60  # marker top-left
    assert frames[:, -30:-5, -30:-5, 0].mean() < 150

    (odd,) = rows_of(prepared["manifest"], "odd.mp4")
    assert (odd["width"], odd["height"]) == (320, 256) and odd["crop"] == [0, 0, 320, 256]

    (vfr,) = rows_of(prepared["manifest"], "vfr.mp4")
    times = corpus["vfr_times"]
    frames = clip_video(prepared["out"], vfr)
    targets = np.arange(len(frames)) / 24.0
    nearest = [int(np.argmin(np.abs(times - t) + 1e-9 * np.arange(len(times)))) for t in targets]
    assert [decode_gray_code(f) for f in frames] == nearest  # picked by timestamp
    assert vfr["num_frames"] == int(np.floor(times[-1] * 24 + 1e-6)) + 1


def test_shards_are_what_training_reads(prepared):
    out = prepared["out"]
    index = ShardIndex(str(out))
    assert sorted(index.keys) == sorted(r["key"] for r in prepared["manifest"])  # no duplicates, no strays
    shards = sorted(out.glob("*.tar"))
    assert len(shards) > 1 and not list(out.glob("*.tmp"))
    for shard in shards:  # size-capped: over the cap only when a single clip is larger
        if shard.stat().st_size > 0.1 * 2**20:
            assert len(ShardIndex(str(shard))) == 1
    meta = index.metadata(0)
    for field in ("caption", "fps", "num_frames", "width", "height", "motion_score"):
        assert field in meta
    row = next(r for r in prepared["manifest"] if r["key"] == index.keys[0])
    assert {k: meta[k] for k in ("caption", "num_frames", "width", "height", "motion_score")} == \
        {k: row[k] for k in ("caption", "num_frames", "width", "height", "motion_score")}
    assert all(r["motion_score"] > 0 for r in prepared["manifest"] if "cuts" in r["source"])
    sample = ClipDataset(index, ClipFormat(8, 24, (32, 32)), seed=0)[(0, 0)]
    assert "failed" not in sample and tuple(sample["video"].shape) == (3, 8, 32, 32)


def test_rerun_skips_finished_work(prepared, corpus):
    before = {p.name: p.stat().st_mtime_ns for p in prepared["out"].glob("*.tar")}
    journal = prepared["out"] / "journal-00000-of-00001.jsonl"
    lines = len(journal.read_text().splitlines())
    report = prepare([corpus["dir"], corpus["list"]], prepared["out"], corpus_config(corpus), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in prepared["out"].glob("*.tar")} == before
    records = [json.loads(x) for x in journal.read_text().splitlines()]
    assert len(records) == lines + 1 and records[-1]["kind"] == "run" and records[-1]["processed"] == 0
    assert report["clips_out"] == prepared["report"]["clips_out"]


@pytest.mark.parametrize("detector", ["adaptive", "content"])
def test_detectors_cut_at_the_first_frame_of_each_scene(corpus, detector):
    cfg = load_prepare_config([DEFAULT_YAML], [f"scenes.detector={detector}"])
    path = str(corpus["dir"] / "cuts.mp4")
    assert scan_source(path, probe(path), cfg).cuts == [62, 125]


def test_second_decode_gives_the_frames_of_the_first(corpus):
    """Pass 2 from kept frames (short files) and from a second decode agree exactly."""
    cfg = load_prepare_config([DEFAULT_YAML])
    path = str(corpus["dir"] / "rotated.mp4")
    info = probe(path)
    kept, streamed = scan_source(path, info, cfg, keep_bytes=2**30), scan_source(path, info, cfg)
    assert kept.frames is not None and streamed.frames is None
    plans, _ = plan_clips(kept, cfg)
    a = [f for _, f in clip_frames(path, kept, plans, rotation=info["rotation"])]
    b = [f for _, f in clip_frames(path, streamed, plans, rotation=info["rotation"])]
    assert len(a) == 1 and np.array_equal(a[0], b[0])


# ----------------------------------------------------------------------------------------------
# Kill and resume, limits, merge
# ----------------------------------------------------------------------------------------------


def small_inputs(d: Path, n: int, seed: int = 10, frames: int = 53):
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_video(d / f"clip{i:02d}.mp4", textured(frames, 256, 256, (40 + 20 * i, 120, 200 - 15 * i), seed + i), 25)
        (d / f"clip{i:02d}.txt").write_text(f"clip number {i}")
    return sorted(str(p) for p in d.glob("*.mp4"))


def journal_records(out: Path):
    path = next(out.glob("journal-*.jsonl"), None)
    if path is None:
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]


def test_resume_after_sigkill_loses_and_duplicates_nothing(tmp_path):
    sources = small_inputs(tmp_path / "in", 6)
    out = tmp_path / "out"
    cmd = [sys.executable, str(TOOL), str(tmp_path / "in"), "--out", str(out), "--no-progress",
           "writer.max_shard_clips=1", "writer.shuffle_buffer_clips=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600  # generous: a busy machine is slow, not wrong
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(r["kind"] == "shard" for r in journal_records(out)) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group: main process and workers
    proc.wait()
    killed = journal_records(out)
    assert 2 <= sum(r["kind"] == "shard" for r in killed) < len(sources)
    # What a kill can leave behind: a half-written shard, a shard never journaled, a torn line.
    (out / "shard-00000-of-00001-000099.tar.tmp").write_bytes(b"partial")
    (out / "shard-00000-of-00001-000098.tar").write_bytes(b"\0" * 1024)
    with open(out / "journal-00000-of-00001.jsonl", "a") as f:
        f.write('{"kind": "shard", "shard": "shard-00000-of-00001-000098.tar", "cli')

    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    keys = [r["key"] for r in manifest]
    assert sorted(keys) == sorted(clip_key(s, 0) for s in sources)  # nothing lost, nothing twice
    assert sorted(ShardIndex(str(out)).keys) == sorted(keys)
    assert not list(out.glob("*.tmp")) and not (out / "shard-00000-of-00001-000098.tar").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["sources_done"] == len(sources)


@pytest.fixture
def misbehaving(monkeypatch):
    from prepare_fakes import MisbehavingCaptioner

    monkeypatch.setitem(CAPTIONERS, "misbehaving", MisbehavingCaptioner)


def test_hanging_hogging_and_crashing_files_are_abandoned(tmp_path, misbehaving):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a_hang", "b_hog", "c_crash", "clip00"):  # tiny, so only the captioner takes time
        write_video(d / f"{name}.mp4", textured(8, 32, 32, (90, 120, 150), 0), 24)
    cfg = load_prepare_config([DEFAULT_YAML], ["captions.captioner=misbehaving", "run.time_limit_s=10",
                                               "run.memory_limit_mb=1024", "writer.fsync=false",
                                               "filters.min_duration_s=0.3", "filters.min_area=1024", "filters.min_side=32"])
    report = prepare([d], tmp_path / "out", cfg, progress=False)
    rejects = {Path(r["source"]).name: r for r in map(json.loads, (tmp_path / "out" / "rejects.jsonl").read_text().splitlines())}
    assert {k: r["reason"] for k, r in rejects.items()} == {"a_hang.mp4": "timeout", "b_hog.mp4": "timeout",
                                                            "c_crash.mp4": "timeout"}
    assert "run.time_limit_s" in rejects["a_hang.mp4"]["detail"]
    assert "run.memory_limit_mb" in rejects["b_hog.mp4"]["detail"]
    assert "died" in rejects["c_crash.mp4"]["detail"]
    (row,) = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert row["caption"] == "a clip of clip00.mp4"  # the run went on after all three
    assert report["rejects_by_reason"]["timeout"] == 3


def test_parts_split_deterministically_and_merge(tmp_path):
    sources = small_inputs(tmp_path / "in", 3, frames=53)
    out = tmp_path / "out"
    cmd = [sys.executable, str(TOOL), str(tmp_path / "in"), "--out", str(out), "--no-progress",
           "--num-shards", "2", "--shard-id", "0", "writer.fsync=false"]
    subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True, capture_output=True, timeout=900)
    part0 = [json.loads(x) for x in (out / "manifest-00000-of-00002.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in part0) == sources[0::2]
    with pytest.raises(ValueError, match=r"parts \[1\] of 2 are missing"):
        merge([out], tmp_path / "merged")
    cfg = load_prepare_config([DEFAULT_YAML], ["writer.fsync=false"])
    prepare([tmp_path / "in"], out, cfg, num_shards=2, shard_id=1, progress=False)
    done = subprocess.run([sys.executable, str(TOOL), "merge", str(out), "--out", str(tmp_path / "merged")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    merged = [json.loads(x) for x in (tmp_path / "merged" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in merged) == sources
    assert sorted(ShardIndex(str(tmp_path / "merged")).keys) == sorted(r["key"] for r in merged)
    assert json.loads((tmp_path / "merged" / "report.json").read_text())["complete"]
    assert merge([out], out)["clips_out"] == 3  # merging in place works too


# ----------------------------------------------------------------------------------------------
# Real clips, ShapesWorld, training
# ----------------------------------------------------------------------------------------------


def test_real_clips(tmp_path):
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"path": str(SHARED_DATA / n), "caption": f"real {n}"}) + "\n"
                                for n in ("bigbuckbunny.mp4", "carphone_pristine.mp4")))
    cfg = load_prepare_config([DEFAULT_YAML], [f"captions.file={captions}", "writer.fsync=false"])
    report = prepare([SHARED_DATA / "bigbuckbunny.mp4", SHARED_DATA / "carphone_pristine.mp4"], tmp_path / "out", cfg,
                     progress=False)
    (row,) = [json.loads(x) for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    (rej,) = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert Path(row["source"]).name == "bigbuckbunny.mp4" and row["caption"] == "real bigbuckbunny.mp4"
    assert (row["width"], row["height"], row["fps"], row["crop"]) == (1280, 720, 24.0, None)
    assert row["end_s"] - row["start_s"] == pytest.approx(5.28, abs=0.05)
    assert row["num_frames"] / 24 == pytest.approx(5.3, abs=0.1)
    assert Path(rej["source"]).name == "carphone_pristine.mp4" and rej["reason"] == "too_small"
    assert "176x144" in rej["detail"]
    assert report["seconds_in"] == pytest.approx(5.28 + 4.0, abs=0.1)


def test_shapesworld_clips_back_to_shards_and_train_from_them(tmp_path):
    raw = tmp_path / "raw"
    write_shapesworld(raw, ShapesWorldSpec(4, size=32, seed=0, num_frames=12, raw=True), progress=False)
    spec = sample_clip_spec(123, size=32, num_frames=12)  # one more clip, captioned by the template
    write_video(raw / "extra.mp4", render_clip(spec), 24, pix_fmt="yuv444p")
    (raw / "extra.json").write_text(json.dumps(metadata(spec, motion_score=0.0)))
    cfg = load_prepare_config([DEFAULT_YAML, SHAPES_YAML], [f"captions.file={raw / 'captions.jsonl'}", "writer.fsync=false"])
    report = prepare([raw], tmp_path / "shards", cfg, progress=False)
    rows = {Path(r["source"]).name: r for r in map(json.loads, (tmp_path / "shards" / "manifest.jsonl").read_text().splitlines())}
    assert report["clips_out"] == 5 and rows["extra.mp4"]["caption"] == shapes_caption(spec)
    listed = {json.loads(x)["path"]: json.loads(x)["caption"] for x in (raw / "captions.jsonl").read_text().splitlines()}
    assert all(rows[name]["caption"] == text for name, text in listed.items())
    assert all((r["width"], r["height"], r["crop"]) == (32, 32, None) for r in rows.values())

    run = tmp_path / "run"
    train(load_config([MOVQ_CONFIG], tiny_movq_overrides(run, tmp_path / "shards", **{
        "train.max_steps": 2, "train.eval_every": 0, "train.checkpoint_every": 2})))
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("step") == 2 for m in metrics)


# ----------------------------------------------------------------------------------------------
# Config, inputs, captions
# ----------------------------------------------------------------------------------------------


def test_default_yaml_is_the_schema():
    assert OmegaConf.to_container(OmegaConf.load(DEFAULT_YAML)) == OmegaConf.to_container(OmegaConf.structured(PrepareConfig))


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "prepare").glob("*.yaml")), ids=lambda p: p.name)
def test_every_prepare_config_loads(path):
    load_prepare_config([path])


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="scenes.treshold"):
        load_prepare_config([DEFAULT_YAML], ["scenes.treshold=3"])
    with pytest.raises(ConfigError, match="filters.min_fps"):
        load_prepare_config([], ["filters.min_fps=fast"])
    with pytest.raises(ConfigError, match="scenes.detector.*adaptive, content"):
        load_prepare_config([], ["scenes.detector=histogram"])
    with pytest.raises(ConfigError, match="captions.captioner.*coca, shapesworld"):
        load_prepare_config([], ["captions.captioner=blip"])
    cfg = load_prepare_config([], ["captions.captioner=coca", f"captions.coca.weights={tmp_path / 'nope.pt'}"])
    with pytest.raises(ConfigError, match="captions.coca.weights.*not found"):
        prepare([tmp_path], tmp_path / "out", cfg, progress=False)
    cli = subprocess.run([sys.executable, str(TOOL), str(tmp_path), "--out", str(tmp_path / "o"),
                          "captions.captioner=coca"], capture_output=True, text=True)
    assert cli.returncode == 2 and "captions.coca.weights" in cli.stderr


def test_inputs_lists_and_parts(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.mp4", "a/b/y.MOV", "a/b/z.txt", "w.webm"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.txt").write_text("w.webm  # a comment\n\na/x.mp4\nnot/there.mp4\n")
    found = expand_inputs([tmp_path / "a", tmp_path / "list.txt"], PrepareConfig().inputs.extensions)
    assert [Path(p).relative_to(tmp_path).as_posix() for p in found] == ["a/b/y.MOV", "a/x.mp4", "not/there.mp4", "w.webm"]
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        expand_inputs([tmp_path / "nope.mp4"], ["mp4"])
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_part(None, None) == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert resolve_part(None, None) == (2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_part(None, None) == (1, 3)
    assert resolve_part(5, 0) == (0, 5)
    with pytest.raises(ValueError, match="not in"):
        resolve_part(2, 2)


def test_one_file_reached_by_two_paths_is_one_source(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "a.mp4").write_bytes(b"one")
    (tmp_path / "videos" / "d.mp4").write_bytes(b"one")  # equal content, another file: its own source
    os.symlink(tmp_path / "videos" / "a.mp4", tmp_path / "videos" / "b.mp4")
    os.link(tmp_path / "videos" / "a.mp4", tmp_path / "videos" / "c.mp4")
    (tmp_path / "list.txt").write_text("videos/a.mp4\nvideos/c.mp4\n")
    found = expand_inputs([tmp_path / "videos", tmp_path / "list.txt"], ["mp4"])
    assert [Path(p).name for p in found] == ["a.mp4", "d.mp4"]


def test_a_rerun_with_another_input_list_is_an_error(tmp_path):
    from kvideo.data.prepare.runner import check_inputs
    from kvideo.data.prepare.writer import Journal, PartFiles

    files = PartFiles(tmp_path, 0, 2)
    first = ["/data/v/a.mp4", "/data/v/b.mp4", "/data/v/c.mp4"]
    check_inputs(files, Journal(files.journal), first)  # the first run records the list
    journal = Journal(files.journal)
    check_inputs(files, journal, first)  # the same list resumes
    with pytest.raises(ValueError, match=r"another input list \(3 files, now 3; 1 added, first /data/v/d.mp4; "
                                         r"1 removed, first /data/v/a.mp4"):
        check_inputs(files, journal, ["/data/v/b.mp4", "/data/v/c.mp4", "/data/v/d.mp4"])
    with pytest.raises(ValueError, match="3 removed, first /data/v/a.mp4.*a different mount point"):
        check_inputs(files, journal, ["/mnt/v/a.mp4", "/mnt/v/b.mp4", "/mnt/v/c.mp4"])


def test_merge_refuses_parts_of_different_input_lists(tmp_path):
    from kvideo.data.prepare.runner import inputs_digest
    from kvideo.data.prepare.writer import PartFiles

    for index, sources in enumerate([["/a.mp4", "/b.mp4"], ["/a.mp4", "/c.mp4"]]):
        records = [{"kind": "inputs", "digest": inputs_digest(sources), "count": 2},
                   {"kind": "run", "inputs": 0, "processed": 0, "source_seconds": 0, "wall_s": 0, "workers": 1,
                    "time": "now"}]
        PartFiles(tmp_path, index, 2).journal.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match="merge: the parts were prepared from different input lists"):
        merge([tmp_path], tmp_path / "merged")


def test_the_coca_captioner_refuses_hub_names(tmp_path):
    (tmp_path / "coca.pt").write_bytes(b"")
    cfg = load_prepare_config([], ["captions.captioner=coca", f"captions.coca.weights={tmp_path / 'coca.pt'}",
                                   "captions.coca.model=hf-hub:laion/CoCa-ViT-B-32"])
    with pytest.raises(ConfigError, match="captions.coca.model.*hub or schema name"):
        CocaCaptioner.check(cfg)


def test_one_run_per_part_at_a_time(tmp_path):
    from kvideo.data.prepare.writer import PartFiles, lock_part

    files = PartFiles(tmp_path, 1, 4)
    held = lock_part(files)
    with pytest.raises(RuntimeError, match="another prepare run is writing part 00001-of-00004"):
        lock_part(files)
    held.close()
    lock_part(files).close()


def test_caption_files(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"source": "v/a.mp4", "text": " hi "}\n\n{"path": "/abs/b.mp4", "caption": "b"}\n')
    assert load_caption_table(tmp_path / "c.jsonl") == {str(tmp_path / "v" / "a.mp4"): "hi", "/abs/b.mp4": "b"}
    (tmp_path / "bad.jsonl").write_text('{"path": "a.mp4"}\n')
    with pytest.raises(CaptionFileError, match="bad.jsonl:1.*caption"):
        load_caption_table(tmp_path / "bad.jsonl")
    (tmp_path / "bad.csv").write_text("file,words\na.mp4,hello\n")
    with pytest.raises(CaptionFileError, match="header"):
        load_caption_table(tmp_path / "bad.csv")


TINY_COCA = {  # an open_clip CoCa small enough to build in a test
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
    "custom_text": True,
}


def test_coca_captioner_from_a_local_checkpoint(tmp_path):
    import open_clip
    import torch

    (tmp_path / "kv_tiny_coca.json").write_text(json.dumps(TINY_COCA))
    open_clip.add_model_config(tmp_path / "kv_tiny_coca.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model("kv_tiny_coca").state_dict(), tmp_path / "coca.pt")
    cfg = load_prepare_config([], ["captions.captioner=coca", f"captions.coca.weights={tmp_path / 'coca.pt'}",
                                   "captions.coca.model=kv_tiny_coca", "captions.coca.seq_len=4"])
    frames = textured(5, 48, 64, (120, 60, 30), 0)
    text = CocaCaptioner(cfg).caption(ClipContext("x.mp4", 0.0, 0.2, frames, 24.0))
    assert text is None or (isinstance(text, str) and text == text.strip())  # random weights: any words
    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="captions.coca.weights.*does not load"):
        CocaCaptioner(load_prepare_config([], ["captions.captioner=coca", f"captions.coca.weights={tmp_path / 'other.pt'}",
                                               "captions.coca.model=kv_tiny_coca"]))


def test_output_size_never_upscales():
    assert output_size(1280, 720, 1080) == (1280, 720)
    assert output_size(1920, 1440, 1080) == (1440, 1080)
    assert output_size(3840, 2160, 1080) == (1920, 1080)
    assert output_size(1081, 2000, 1080) == (1080, 1998)
