"""tools/evaluate_videos.py on folders of small mp4s with random-weight detectors: every number
equals the metric modules applied to the decoded videos, features are cached per video, bad
videos are skipped and reported, missing weights are errors naming the flag."""

import json

import numpy as np
import pytest
import torch

from kvideo.data.video_io import read_video, write_video
from kvideo.metrics.clip_score import clipsim, load_clip
from kvideo.metrics.frechet import FeatureStats
from kvideo.metrics.fvd import fvd, i3d_features, load_i3d, take_clip
from kvideo.metrics.inception import inception_features, load_fid_inception
from kvideo.metrics.stand_ins import RandomI3D, save_random_fid_inception
from tools import evaluate_videos



def moving_square(seed, frames=10, size=64, step=1):
    g = np.random.RandomState(seed)
    video = np.full((frames, size, size, 3), g.randint(0, 256, 3), dtype=np.uint8)
    x, y, colour = g.randint(4, 30), g.randint(4, 40), g.randint(0, 256, 3)
    for t in range(frames):
        video[t, y:y + 12, x + step * t:x + step * t + 12] = colour
    return video


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    gen, ref = root / "generated", root / "reference"
    gen.mkdir(), ref.mkdir()
    for i in range(3):
        write_video(gen / f"v{i}.mp4", moving_square(i, step=2), 24)
        (gen / f"v{i}.json").write_text(json.dumps({"prompt": f"a square number {i}"}))
    write_video(gen / "short.mp4", moving_square(9, frames=6), 24)  # shorter than the FVD clip
    (gen / "short.json").write_text(json.dumps({"prompt": "a short one"}))
    (gen / "broken.mp4").write_bytes(b"not a video at all" * 10)
    (gen / "broken.json").write_text(json.dumps({"prompt": "broken"}))
    for i in range(3):
        write_video(ref / f"r{i}.mp4", moving_square(100 + i), 24)
    weights = root / "weights"
    weights.mkdir()
    save_random_fid_inception(weights / "inception.pth")
    torch.manual_seed(0)
    torch.jit.script(RandomI3D()).save(str(weights / "i3d.pt"))
    from torchvision.models.optical_flow import raft_small
    torch.save(raft_small(weights=None).state_dict(), weights / "raft.pth")
    import open_clip
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), weights / "clip.pt")
    return gen, ref, weights


def run(folders, out, *extra):
    gen, ref, w = folders
    return evaluate_videos.main(["--generated", str(gen), "--reference", str(ref), "--out", str(out),
                                 "--inception", str(w / "inception.pth"), "--i3d", str(w / "i3d.pt"),
                                 "--clip", f"ViT-B-32:{w / 'clip.pt'}", "--raft", str(w / "raft.pth"),
                                 "--clip-length", "8", *extra])


def test_every_metric_equals_the_modules_and_features_are_cached(folders, tmp_path, monkeypatch):
    from kvideo.metrics import frechet

    gen, ref, w = folders
    # the 2048-d matrix square root takes half a minute on 2 cores: record what the tool hands
    # the Fréchet distance (test_metrics_reference proves the distance itself against pytorch-fid)
    calls = []
    monkeypatch.setattr(frechet, "frechet_distance", lambda *stats: calls.append(stats) or 123.25)
    assert run(folders, tmp_path / "out", "--metrics", "fid,fvd,clipsim") == 0
    result = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"fid", "fvd", "clipsim"} <= set(result) and "kid" not in result
    skipped = {(s["video"].split("/")[-1], s.get("metric")) for s in result["skipped"]}
    assert ("broken.mp4", None) in skipped and ("short.mp4", "i3d") in skipped
    # the same numbers from the modules on the decoded videos
    good = [read_video(gen / f"v{i}.mp4")[0] for i in range(3)] + [read_video(gen / "short.mp4")[0]]
    refs = [read_video(ref / f"r{i}.mp4")[0] for i in range(3)]
    inception = load_fid_inception(w / "inception.pth")
    stats = []
    for videos in (good, refs):  # every frame of every decodable video, the covariance / (N - 1)
        s = FeatureStats()
        for v in videos:
            s.append(inception_features(inception, torch.from_numpy(v).permute(0, 3, 1, 2)))
        stats += s.mean_cov(ddof=1)
    assert result["fid"] == 123.25 and len(calls) == 1
    for got, expected in zip(calls[0], stats):
        assert np.allclose(got, expected, rtol=1e-6, atol=1e-9)
    i3d = load_i3d(w / "i3d.pt")
    clips = lambda vs: torch.from_numpy(np.stack([take_clip(v, 8) for v in vs if len(v) >= 8])).permute(0, 4, 1, 2, 3)
    assert result["fvd"] == pytest.approx(fvd(i3d_features(i3d, clips(good)), i3d_features(i3d, clips(refs))), rel=1e-6)
    scorer = load_clip("ViT-B-32", w / "clip.pt")
    text = scorer.text_embeddings(["a square number 0"])[0]
    assert result["per_video"]["v0.mp4"]["clipsim"] == pytest.approx(clipsim(scorer.frame_embeddings(good[0]), text),
                                                                     abs=1e-6)
    assert result["settings"]["weights"]["inception"]["sha256"]
    # a second run with more metrics reuses the cached features; overwritten cached features
    # come back in the number, so they are read, not recomputed
    cached = sorted((tmp_path / "out" / "features").glob("inception-*/*.npy"))
    assert len(cached) == 7  # 4 decodable generated + 3 reference videos
    assert run(folders, tmp_path / "out", "--metrics", "kid,flow,warp,clip_temp") == 0
    again = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {"kid", "flow_score", "warping_error", "clip_temp"} <= set(again)
    assert (tmp_path / "out" / "per_video.png").read_bytes()[:4] == b"\x89PNG"
    assert "per_video.png" in (tmp_path / "out" / "report.md").read_text()
    for k, f in enumerate(cached):
        np.save(f, np.random.RandomState(k).randn(10, 2048).astype(np.float32))
    assert run(folders, tmp_path / "out", "--metrics", "kid") == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["kid"] != pytest.approx(again["kid"])


def test_missing_weights_and_bad_flags_are_named(folders, tmp_path, capsys):
    gen, ref, w = folders
    assert evaluate_videos.main(["--generated", str(gen), "--out", str(tmp_path), "--metrics", "fvd",
                                 "--reference", str(ref)]) == 2
    assert "--i3d" in capsys.readouterr().err
    assert evaluate_videos.main(["--generated", str(gen), "--out", str(tmp_path), "--metrics", "fid",
                                 "--inception", str(w / "inception.pth")]) == 2
    assert "--reference" in capsys.readouterr().err
    assert evaluate_videos.main(["--generated", str(gen), "--out", str(tmp_path), "--clip", "ViT-B-32"]) == 2
    assert "ARCH:FILE" in capsys.readouterr().err
    assert evaluate_videos.main(["--generated", str(gen), "--out", str(tmp_path), "--metrics", "fvx"]) == 2
    assert "unknown 'fvx'" in capsys.readouterr().err
    assert evaluate_videos.main(["--generated", str(gen), "--out", str(tmp_path), "--metrics", "flow",
                                 "--raft", str(tmp_path / "nope.pth")]) == 2
    assert "nope.pth" in capsys.readouterr().err


def test_frame_stride_gives_the_features_of_every_kth_frame(folders, tmp_path):
    from kvideo.metrics.suite import Detectors, FeatureCache, folder_features

    gen, _, w = folders
    detectors = Detectors(w / "inception.pth", None, None, None, "cpu")
    cache = FeatureCache(tmp_path / "features")
    every = folder_features(gen, ["inception"], detectors, cache)
    strided = folder_features(gen, ["inception"], detectors, cache, frame_stride=3)
    for a, b in zip(every.features["inception"], strided.features["inception"]):
        if a is not None:
            assert np.allclose(a[::3], b, atol=1e-5)
    assert len({p.parent.name for p in (tmp_path / "features").rglob("*.npy")}) == 2  # kept apart
    with pytest.raises(ValueError, match="stride"):
        folder_features(gen, ["inception"], detectors, cache, frame_stride=0)
