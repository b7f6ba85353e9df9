"""Guidance: one batched forward for every branch, and the Kandinsky combinations."""

import pytest
import torch

from kvideo.diffusion.guidance import batched_branches, text_guided, text_image_guided


class CountingNet:
    """net(x, t, context, image) = x * context + image + t; counts calls and batch sizes."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context, image=None, flag="a"):
        self.calls.append(x.shape[0])
        out = x * context[:, :, None, None] + t[:, None, None, None].float()
        return out if image is None else out + image


def _cond(b, value):
    return {"context": torch.full((b, 3), float(value))}


def test_branches_run_in_one_forward_and_split_back():
    net, x, t = CountingNet(), torch.randn(2, 3, 4, 4), torch.tensor([5, 7])
    outs = batched_branches(net, x, t, [_cond(2, 1.0), _cond(2, 2.0), _cond(2, 3.0)])
    assert net.calls == [6]
    for out, v in zip(outs, (1.0, 2.0, 3.0)):
        assert torch.allclose(out, net(x, t, **_cond(2, v)), atol=1e-6)


def test_text_guidance_matches_the_kandinsky_formula():
    net, x, t = CountingNet(), torch.randn(2, 3, 4, 4), torch.tensor([1, 2])
    fn = text_guided(net, _cond(2, 2.0), _cond(2, 0.5), scale=5.0)
    got = fn(x, t)
    c, u = net(x, t, **_cond(2, 2.0)), net(x, t, **_cond(2, 0.5))
    assert torch.allclose(got, 6 * c - 5 * u, atol=1e-5)
    net.calls.clear()
    assert torch.allclose(text_guided(net, _cond(2, 2.0), _cond(2, 0.5), scale=0.0)(x, t), c)
    assert net.calls == [2]  # no unconditional forward without guidance


def test_three_way_guidance_in_one_forward():
    net, x, t = CountingNet(), torch.randn(1, 3, 2, 2), torch.tensor([3])
    img = torch.randn(1, 3, 2, 2)
    ti = {"context": torch.full((1, 3), 2.0), "image": img}
    i = {"context": torch.zeros(1, 3), "image": img}
    none = {"context": torch.zeros(1, 3), "image": torch.zeros_like(img)}
    got = text_image_guided(net, ti, i, none, text_scale=5.0, image_scale=2.0)(x, t)
    assert net.calls == [3]
    e_ti, e_i, e_0 = net(x, t, **ti), net(x, t, **i), net(x, t, **none)
    assert torch.allclose(got, e_0 + 2.0 * (e_i - e_0) + 5.0 * (e_ti - e_i), atol=1e-5)


def test_mismatched_branches_are_named():
    net, x, t = CountingNet(), torch.randn(1, 3, 2, 2), torch.tensor([0])
    with pytest.raises(ValueError, match="keys"):
        batched_branches(net, x, t, [{"context": torch.ones(1, 3)}, {"context": torch.ones(1, 3), "image": x}])
    with pytest.raises(ValueError, match="'flag'"):
        batched_branches(net, x, t, [{"context": torch.ones(1, 3), "flag": "a"}, {"context": torch.ones(1, 3), "flag": "b"}])
