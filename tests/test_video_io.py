"""Video IO: decoding the real test clips, H.264 round trips, resampling by time, errors."""

import io
from fractions import Fraction

import av
import numpy as np
import pytest

from kvideo.data.video_io import (
    VideoDecodeError,
    encode_video_bytes,
    pick_frames_by_time,
    probe,
    read_video,
    write_video,
)

from conftest import SHARED_DATA as DATA

BBB = DATA / "bigbuckbunny.mp4"
CARPHONE = DATA / "carphone_pristine.mp4"


def smooth_clip(num_frames=12, height=48, width=64, step=2):
    """A moving colour gradient: compresses well, so a round trip can be judged by PSNR."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(num_frames):
        xs = x + step * i
        rgb = np.stack([128 + 90 * np.sin(xs / 12), 128 + 90 * np.cos(y / 10), 128 + 60 * np.sin((xs + y) / 16)], -1)
        frames.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return np.stack(frames)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


# ----------------------------------------------------------------------------- real clips


def test_probe_bigbuckbunny():
    info = probe(BBB)
    assert info["has_video"] and info["has_audio"]
    assert (info["width"], info["height"]) == (1280, 720)
    assert info["fps"] == pytest.approx(25.0)
    assert info["duration_s"] == pytest.approx(5.28, abs=0.05)
    assert 128 <= info["num_frames"] <= 134
    assert info["rotation"] == 0


def test_read_bigbuckbunny_full():
    frames, times = read_video(BBB)
    assert frames.dtype == np.uint8 and frames.shape[1:] == (720, 1280, 3)
    assert 128 <= len(frames) <= 134
    assert times.dtype == np.float64 and times[0] == pytest.approx(0.0)
    assert np.allclose(np.diff(times), 1 / 25, atol=1e-3)
    assert frames.std() > 10  # real picture content, not a blank decode


def test_probe_and_read_carphone_from_bytes():
    data = CARPHONE.read_bytes()
    info = probe(data)
    assert (info["width"], info["height"]) == (176, 144)
    assert info["fps"] == pytest.approx(30000 / 1001, rel=1e-4)
    assert not info["has_audio"]
    frames, times = read_video(data)
    assert frames.shape == (120, 144, 176, 3)
    assert 1 / np.median(np.diff(times)) == pytest.approx(29.97, abs=0.01)


def test_time_range_and_max_frames_match_full_decode():
    full, full_times = read_video(CARPHONE)
    part, times = read_video(CARPHONE, start_s=1.0, end_s=2.0)
    assert times[0] >= 1.0 - 1e-6 and times[-1] < 2.0
    assert len(part) == np.sum((full_times >= 1.0 - 1e-6) & (full_times < 2.0))
    first = int(np.searchsorted(full_times, times[0] - 1e-6))
    assert np.array_equal(part, full[first : first + len(part)])  # the seek lands exactly
    few, few_times = read_video(CARPHONE, max_frames=5)
    assert few.shape[0] == 5 and np.array_equal(few, full[:5])


# ----------------------------------------------------------------------------- resampling


def test_pick_frames_by_time_rates():
    t25 = np.arange(50) / 25
    idx = pick_frames_by_time(t25, 24)  # 25 -> 24: one frame in 25 dropped
    assert len(idx) == 48 and np.all(np.diff(idx) >= 1) and np.sum(np.diff(idx) == 2) == 2
    t48 = np.arange(96) / 48
    assert np.array_equal(pick_frames_by_time(t48, 24), np.arange(0, 96, 2))
    t12 = np.arange(12) / 12
    idx = pick_frames_by_time(t12, 24, num_frames=6)  # upsampling repeats frames
    assert list(idx) == [0, 0, 1, 1, 2, 2]


def test_pick_frames_by_time_nearest_start_and_clamp():
    times = np.array([0.0, 0.1, 0.3, 0.35, 1.0])
    # targets 0.12, 0.22, 0.32, 0.42, 0.52 -> nearest 0.1, 0.3 (0.22 is nearer 0.3), 0.3, 0.35, 0.35
    assert list(pick_frames_by_time(times, 10, num_frames=5, start_s=0.12)) == [1, 2, 2, 3, 3]
    assert pick_frames_by_time(times, 10, num_frames=3, start_s=5.0).tolist() == [4, 4, 4]
    assert pick_frames_by_time(np.array([0.0, 0.1]), 10, start_s=0.05).tolist() == [0]  # tie -> earlier
    with pytest.raises(ValueError):
        pick_frames_by_time(np.array([]), 24)


# ----------------------------------------------------------------------------- writing


@pytest.mark.parametrize("fps", [24, 12.5, Fraction(30000, 1001)])
def test_write_read_round_trip(tmp_path, fps):
    clip = smooth_clip()
    path = tmp_path / "clip.mp4"
    write_video(path, clip, fps, crf=10)
    info = probe(path)
    assert info["fps"] == pytest.approx(float(fps), rel=1e-4)
    assert (info["width"], info["height"], info["num_frames"]) == (64, 48, 12)
    frames, times = read_video(path)
    assert frames.shape == clip.shape
    assert np.allclose(times, np.arange(12) / float(fps), atol=2e-3)
    assert psnr(frames, clip) > 36


def test_encode_bytes_matches_file_and_lossless_is_near_exact(tmp_path):
    clip = smooth_clip(num_frames=4)
    data = encode_video_bytes(clip, 24, crf=0, pix_fmt="yuv444p")
    frames, _ = read_video(data)
    assert psnr(frames, clip) > 45  # only RGB<->YUV rounding remains
    buffer = io.BytesIO()
    write_video(buffer, clip, 24, crf=0, pix_fmt="yuv444p")
    assert buffer.getvalue() == data


def test_write_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="63x64"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 64, 63, 3), np.uint8), 24)
    with pytest.raises(ValueError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 64, 64, 3), np.float32), 24)
    with pytest.raises(ValueError, match="zero frames"):
        write_video(tmp_path / "e.mp4", np.zeros((0, 64, 64, 3), np.uint8), 24)
    write_video(tmp_path / "odd444.mp4", np.zeros((2, 64, 63, 3), np.uint8), 24, pix_fmt="yuv444p")


def test_rotation_is_reported_and_applied():
    clip = np.zeros((2, 32, 64, 3), np.uint8)
    clip[:, :8] = 255  # a white band at the top
    data = encode_video_bytes(clip, 24, rotation=90)
    assert probe(data)["rotation"] == 90
    coded, _ = read_video(data)
    upright, _ = read_video(data, apply_rotation=True)
    assert coded.shape == (2, 32, 64, 3) and upright.shape == (2, 64, 32, 3)
    assert upright[0, :, :4].mean() > 200 and upright[0, :, -4:].mean() < 50  # band now on the left


# ----------------------------------------------------------------------------- errors


def test_corrupt_and_missing_inputs_raise_decode_error(tmp_path):
    good = encode_video_bytes(smooth_clip(num_frames=6), 24)
    bad_inputs = [b"", b"not a video at all" * 50, good[: len(good) // 3], tmp_path / "missing.mp4"]
    for bad in bad_inputs:
        with pytest.raises(VideoDecodeError) as info:
            read_video(bad)
        assert info.value.reason and "cannot decode video" in str(info.value)
    with pytest.raises(VideoDecodeError):
        probe(b"\x00" * 1000)


def test_no_video_stream_and_empty_range():
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:  # an audio-only mp4
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for i in range(4):
            frame.pts = i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    data = buffer.getvalue()
    info = probe(data)
    assert info["has_audio"] and not info["has_video"]
    with pytest.raises(VideoDecodeError, match="no video stream"):
        read_video(data)
    video = encode_video_bytes(smooth_clip(num_frames=4), 24)
    with pytest.raises(VideoDecodeError, match="zero frames"):
        read_video(video, start_s=10.0)
