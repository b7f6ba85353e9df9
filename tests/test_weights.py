"""kvideo.weights: LPIPS read from one local file and converted from the official sources.
(The text encoder's loader is tested in tests/test_text_encoder.py.)"""

from __future__ import annotations

import pytest
import torch
import torchvision

from kvideo.models.lpips import LPIPS, TAP_CHANNELS
from kvideo.weights import convert_lpips_weights, load_lpips


def images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def lpips_sources(tmp_path_factory):
    """A torchvision-layout VGG16 file (random features, a stand-in classifier key) and an
    official-layout lin file (random non-negative heads)."""
    root = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    features = torchvision.models.vgg16(weights=None).features
    vgg = {f"features.{k}": v for k, v in features.state_dict().items()}
    vgg["classifier.6.bias"] = torch.zeros(1000)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate(TAP_CHANNELS)}
    torch.save(vgg, root / "vgg16.pth")
    torch.save(lin, root / "vgg_lin.pth")
    return root


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_lpips_loads_from_one_local_file(lpips_sources, tmp_path, suffix):
    path = convert_lpips_weights(lpips_sources / "vgg16.pth", lpips_sources / "vgg_lin.pth", tmp_path / f"lpips{suffix}")
    lpips = load_lpips(path)
    assert isinstance(lpips, LPIPS)
    assert not lpips.training and not any(p.requires_grad for p in lpips.parameters())
    lpips.train()
    assert not lpips.training
    x, y = images(2, 32, 32, seed=0), images(2, 32, 32, seed=1)
    x.requires_grad_(True)
    d = lpips(x, y)
    assert d.shape == (2,) and (d > 0).all()
    torch.testing.assert_close(lpips(y, y), torch.zeros(2))
    d.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the VGG weights really came from the file
    torch.testing.assert_close(lpips.features[28].bias, torch.load(lpips_sources / "vgg16.pth")["features.28.bias"])


def test_lpips_errors(lpips_sources, tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_lpips(tmp_path / "missing.pth")
    torch.save({"net.0.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(KeyError, match="missing"):
        load_lpips(tmp_path / "wrong.pth")
    good = convert_lpips_weights(lpips_sources / "vgg16.pth", lpips_sources / "vgg_lin.pth", tmp_path / "ok.pth")
    state = torch.load(good)
    state["lins.0.weight"] = -state["lins.0.weight"]
    torch.save(state, tmp_path / "negative.pth")
    with pytest.raises(ValueError, match="non-negative"):
        load_lpips(tmp_path / "negative.pth")
    state["lins.0.weight"] = torch.rand(1, 32, 1, 1)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match="wrong shape"):
        load_lpips(tmp_path / "shape.pth")
    with pytest.raises(KeyError, match="lin0.model.1.weight"):
        convert_lpips_weights(lpips_sources / "vgg16.pth", lpips_sources / "vgg16.pth", tmp_path / "x.pth")
