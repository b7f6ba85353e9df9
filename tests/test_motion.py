"""Motion score: zero for a still clip, grows with speed, independent of source fps and size."""

import math

import numpy as np
import pytest
import torch

from kvideo.data.motion import motion_score, prepare_motion_frames
from kvideo.data.shapesworld import ClipSpec, render_clip


def square_clip(speed=None, *, fps=24.0, num_frames=24, size=64, direction="right"):
    """A yellow square on black (strong luma contrast), moving at `speed` ('slow'/'fast')."""
    scale = size / 64
    spec = ClipSpec("black", "yellow", "square", "still" if speed is None else direction, speed,
                    size=9.0 * scale, start_xy=(16.0 * scale, 30.0 * scale), fps=fps,
                    num_frames=num_frames, canvas_size=size)
    return render_clip(spec)


def test_static_clip_scores_zero():
    assert motion_score(square_clip(None), 24) == pytest.approx(0.0, abs=1e-6)


def test_motion_grows_with_speed():
    still = motion_score(square_clip(None), 24)
    slow = motion_score(square_clip("slow"), 24)
    fast = motion_score(square_clip("fast"), 24)
    assert still < 1e-6 < slow
    assert fast > 1.5 * slow, (slow, fast)


def test_source_fps_does_not_change_the_score():
    """Same motion in px/second, rendered at 24 and 48 fps: resampling to 24 fps matches them."""
    at24 = motion_score(square_clip("fast", fps=24, num_frames=24), 24)
    at48 = motion_score(square_clip("fast", fps=48, num_frames=48), 48)
    assert at24 > 0
    assert at48 == pytest.approx(at24, rel=0.02)
    # Scoring the 48 fps clip as if it were 24 fps halves the per-frame motion.
    assert motion_score(square_clip("fast", fps=48, num_frames=48), 24) < 0.8 * at24


def test_source_resolution_does_not_change_the_score():
    """The same scene at 64 and 128 px is analysed at short side 256, so the scores are in the
    same units; without the resize the 128 px clip would score twice as high. (Not equal:
    upscaling 4x vs 2x blurs edges differently, and Farneback feels that.)"""
    small = motion_score(square_clip("fast", size=64), 24)
    large = motion_score(square_clip("fast", size=128), 24)
    assert 0.67 < large / small < 1.5, (small, large)


def test_prepare_motion_frames_resamples_and_resizes():
    clip = np.zeros((50, 90, 160, 3), np.uint8)  # 25 fps, 2 s, 16:9
    out = prepare_motion_frames(clip, 25, analysis_short_side=128)
    assert out.shape == (48, 128, 228, 3)


def test_short_clip_and_bad_arguments():
    assert motion_score(square_clip("fast", num_frames=1), 24) == 0.0
    with pytest.raises(ValueError, match="unknown motion method"):
        motion_score(square_clip(None, num_frames=3), 24, method="lucas")
    with pytest.raises(ValueError, match="raft_weights"):
        motion_score(square_clip(None, num_frames=3), 24, method="raft")
    with pytest.raises(ValueError, match="not found"):
        motion_score(square_clip(None, num_frames=3), 24, method="raft", raft_weights="/nonexistent.pt")
    with pytest.raises(ValueError, match="uint8"):
        motion_score(np.zeros((3, 8, 8, 3), np.float32), 24)


def test_raft_from_local_weights(tmp_path):
    """A randomly initialised raft_small, saved and loaded offline, runs and gives a finite score."""
    from torchvision.models.optical_flow import raft_small

    torch.manual_seed(0)
    path = tmp_path / "raft_small.pt"
    torch.save(raft_small(weights=None).state_dict(), path)
    score = motion_score(square_clip("fast", num_frames=3), 24, method="raft", raft_weights=path,
                         analysis_short_side=64)
    assert math.isfinite(score) and score >= 0
    bad = tmp_path / "not_raft.pt"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="not a torchvision RAFT"):
        motion_score(square_clip("fast", num_frames=3), 24, method="raft", raft_weights=bad)
