"""The distribution metrics against their reference implementations, on random weights.

FID's Inception and Fréchet distance against pytorch-fid; FVD against StyleGAN-V's computation
(not installable: `stylegan_v_fvd` below transcribes its FeatureStats.get_mean_cov and
compute_fvd) with a scripted stand-in for its TorchScript I3D; CLIPSIM against open_clip used
directly.
"""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from kvideo.metrics.clip_score import clip_temp, clipsim, load_clip
from kvideo.metrics.frechet import FeatureStats, frechet_distance, kernel_distance
from kvideo.metrics.fvd import fvd, i3d_features, load_i3d, take_clip
from kvideo.metrics.inception import FIDInception, inception_features, load_fid_inception
from kvideo.metrics.stand_ins import RandomI3D, save_random_fid_inception


def test_fid_inception_features_equal_pytorch_fid(tmp_path, monkeypatch):
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    path = save_random_fid_inception(tmp_path / "pt_inception-2015-12-05.pth")
    # pytorch-fid fetches its weights by URL: hand it the same random file instead
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url",
                        lambda *a, **k: torch.load(path, weights_only=True))
    reference = pytorch_fid_inception.InceptionV3([3]).eval()
    ours = load_fid_inception(path)
    frames = torch.randint(0, 256, (3, 3, 64, 48), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    with torch.no_grad():
        expected = reference(frames.float() / 255)[0].squeeze(3).squeeze(2)
    got = inception_features(ours, frames)
    assert got.shape == (3, 2048)
    assert expected.abs().max() > 1e-3  # the features are not trivially zero
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    # the TensorFlow blocks matter: torchvision's own pooling gives other features
    plain = FIDInception()
    plain.load_state_dict(torch.load(path, weights_only=True))
    from torchvision.models import inception as tv
    plain.Mixed_7c = tv.InceptionE(2048)
    plain.Mixed_7c.load_state_dict(ours.Mixed_7c.state_dict())
    assert not torch.allclose(inception_features(plain.eval(), frames), expected, atol=1e-4)


def test_inception_weights_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception"):
        load_fid_inception(tmp_path / "missing.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth"):
        load_fid_inception(tmp_path / "other.pth")


def features(n, d=64, shift=0.0, seed=0):
    g = np.random.RandomState(seed)
    return (g.randn(n, d) @ (np.eye(d) + 0.3 * g.randn(d, d)) + shift).astype(np.float32)


def test_fid_equals_pytorch_fid_frechet_distance():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    a, b = features(300), features(250, shift=0.5, seed=1)
    expected = fid_score.calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False),
                                                    b.mean(0), np.cov(b, rowvar=False))
    stats = []
    for x in (a, b):
        s = FeatureStats()
        for i in range(0, len(x), 64):  # batched
            s.append(x[i:i + 64])
        stats.append(s.mean_cov(ddof=1))
    got = frechet_distance(*stats[0], *stats[1])
    assert got == pytest.approx(expected, rel=1e-6)


def stylegan_v_fvd(detector, clips_a, clips_b):
    """StyleGAN-V's src/metrics: detector(images, rescale=True, resize=True, return_features=True),
    FeatureStats.append (float32 -> float64 raw sums), get_mean_cov (/ N), compute_fvd."""
    stats = []
    for clips in (clips_a, clips_b):
        with torch.no_grad():  # StyleGAN-V's feature loops run under no_grad
            x = detector(clips, rescale=True, resize=True, return_features=True).numpy().astype(np.float32)
        x64 = x.astype(np.float64)
        mean = x64.sum(axis=0) / x.shape[0]
        cov = (x64.T @ x64) / x.shape[0] - np.outer(mean, mean)
        stats.append((mean, cov))
    (mu_gen, sigma_gen), (mu_real, sigma_real) = stats
    m = np.square(mu_gen - mu_real).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma_gen, sigma_real))  # StyleGAN-V passes disp=False (deprecated)
    return float(np.real(m + np.trace(sigma_gen + sigma_real - s * 2)))


def videos(n, t=20, seed=0, shift=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(0, 200, (n, t, 16, 16, 3), generator=g)
    return (v + shift).clamp(0, 255).to(torch.uint8).numpy()


def our_fvd(detector, videos_a, videos_b, batch_size):
    out = []
    for vids in (videos_a, videos_b):
        clips = torch.from_numpy(np.stack([take_clip(v) for v in vids])).permute(0, 4, 1, 2, 3)  # (b, 3, 16, h, w)
        out.append(torch.cat([i3d_features(detector, clips[i:i + batch_size]) for i in range(0, len(clips), batch_size)]))
    return fvd(*out)


def test_fvd_equals_stylegan_v_and_behaves(tmp_path):
    torch.manual_seed(0)
    torch.jit.script(RandomI3D()).save(str(tmp_path / "i3d_torchscript.pt"))
    detector = load_i3d(tmp_path / "i3d_torchscript.pt")
    a, b = videos(40), videos(30, seed=1, shift=40)
    to_clips = lambda v: torch.from_numpy(np.ascontiguousarray(v[:, :16])).permute(0, 4, 1, 2, 3)
    expected = stylegan_v_fvd(detector, to_clips(a), to_clips(b))
    assert our_fvd(detector, a, b, batch_size=7) == pytest.approx(expected, rel=1e-6)
    assert our_fvd(detector, a, b, batch_size=40) == pytest.approx(expected, rel=1e-6)
    assert abs(our_fvd(detector, a, a, batch_size=5)) < 1e-6 * expected
    assert our_fvd(detector, a, videos(30, seed=1, shift=10), 8) < our_fvd(detector, a, b, 8)
    # strided clips are another clip: other features
    strided = torch.from_numpy(np.stack([take_clip(v, mode="strided") for v in a])).permute(0, 4, 1, 2, 3)
    assert not torch.allclose(i3d_features(detector, strided), i3d_features(detector, to_clips(a)))
    with pytest.raises(ValueError, match="shorter than the 16-frame"):
        take_clip(a[0][:10])
    with pytest.raises(FileNotFoundError, match="--i3d"):
        load_i3d(tmp_path / "missing.pt")


def test_frechet_distances_of_a_set_with_itself_and_a_shift():
    a = features(200)
    s = FeatureStats()
    s.append(a)
    mu, sigma = s.mean_cov(ddof=1)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    distances = []
    for shift in (0.1, 0.5, 2.0):
        t = FeatureStats()
        t.append(a + shift)
        distances.append(frechet_distance(mu, sigma, *t.mean_cov(ddof=1)))
    assert distances == sorted(distances) and distances[0] == pytest.approx(0.1 ** 2 * 64, rel=1e-3)
    kid_same, kid_far = kernel_distance(a, features(200, seed=3)), kernel_distance(a, a + 1.0)
    assert abs(kid_same) < kid_far


def test_clipsim_and_clip_temp_equal_open_clip_directly(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    torch.save(model.state_dict(), tmp_path / "vit_b_32.pt")
    scorer = load_clip("ViT-B-32", tmp_path / "vit_b_32.pt")
    frames = videos(1, t=4)[0].repeat(4, axis=1).repeat(4, axis=2)  # (4, 64, 64, 3)
    prompt = "a red square moving left"
    image_emb, text_emb = scorer.frame_embeddings(frames, batch_size=3), scorer.text_embeddings([prompt])[0]
    # directly: open_clip's own model, transform and tokenizer, from the same file
    ref, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=str(tmp_path / "vit_b_32.pt"))
    ref.eval()
    from PIL import Image
    with torch.no_grad():
        img = ref.encode_image(torch.stack([preprocess(Image.fromarray(f)) for f in frames]))
        txt = ref.encode_text(open_clip.get_tokenizer("ViT-B-32")([prompt]))
    expected_sim = F.cosine_similarity(img, txt, dim=-1).mean().item()
    expected_temp = F.cosine_similarity(img[1:], img[:-1], dim=-1).mean().item()
    assert clipsim(image_emb, text_emb) == pytest.approx(expected_sim, abs=1e-5)
    assert clip_temp(image_emb) == pytest.approx(expected_temp, abs=1e-5)
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        load_clip("ViT-Nope", tmp_path / "vit_b_32.pt")


def test_raft_flow_equals_torchvision_raft_directly(tmp_path):
    from torchvision.models.optical_flow import raft_small

    from kvideo.metrics.flow import flow_score, load_raft, pair_flows

    torch.manual_seed(0)
    torch.save(raft_small(weights=None).state_dict(), tmp_path / "raft_small.pth")
    raft = load_raft(tmp_path / "raft_small.pth")
    frames = videos(1, t=3, seed=4)[0].repeat(8, axis=1).repeat(8, axis=2)  # (3, 128, 128, 3): RAFT's size
    ref = raft_small(weights=None)
    ref.load_state_dict(torch.load(tmp_path / "raft_small.pth", weights_only=True))
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        expected = ref.eval()(x[:-1], x[1:])[-1]
    assert torch.allclose(pair_flows(raft, frames, batch_size=1), expected, atol=1e-4)
    assert flow_score(raft, frames) == pytest.approx(expected.norm(dim=1).mean().item(), rel=1e-4)
    small = frames[:, ::2, ::2][:, :60, :62]  # upscaled x3 for RAFT, padded to multiples of 8, brought back
    assert pair_flows(raft, small).shape == (2, 2, 60, 62)
    with pytest.raises(FileNotFoundError, match="--raft"):
        load_raft(tmp_path / "missing.pth")


def test_warping_error_is_zero_along_the_true_flow_and_masks_occlusions():
    from kvideo.metrics.flow import non_occluded, warping_error_from_flows

    frames = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    frames[0, 10:16, 8:14] = (200, 30, 60)
    frames[1, 11:17, 10:16] = (200, 30, 60)  # moved 2 right, 1 down
    forward = torch.tensor([2.0, 1.0]).reshape(1, 2, 1, 1).expand(1, 2, 32, 32).clone()
    assert warping_error_from_flows(frames, forward, -forward) == pytest.approx(0.0, abs=1e-10)
    assert warping_error_from_flows(frames, torch.zeros_like(forward), torch.zeros_like(forward)) > 0.01
    assert non_occluded(forward, -forward).all()
    assert not non_occluded(forward, forward).any()  # forward and backward disagree everywhere
