"""Guidance: one batched forward for every branch, and the Kandinsky combinations."""

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from kvideo.diffusion.guidance import batched_branches, text_guided, text_image_guided


class CountingNet:
    """net(x, t, condition) = x * context + image + t, the condition a dict (context, optional image
    and flag) or a `Cond`; counts calls and batch sizes."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, cond):
        if isinstance(cond, Cond):
            cond = {"context": cond.context, "image": cond.image, "flag": cond.flag}
        context, image = cond["context"], cond.get("image")
        self.calls.append(x.shape[0])
        out = x * context[:, :, None, None] + t[:, None, None, None].float()
        return out if image is None else out + image


@dataclass
class Cond:
    """A condition as a dataclass (as kvideo.inference.conditioning's)."""

    context: torch.Tensor
    image: Optional[torch.Tensor] = None
    flag: str = "a"


def _cond(b, value):
    return {"context": torch.full((b, 3), float(value))}


def test_branches_run_in_one_forward_and_split_back():
    net, x, t = CountingNet(), torch.randn(2, 3, 4, 4), torch.tensor([5, 7])
    outs = batched_branches(net, x, t, [_cond(2, 1.0), _cond(2, 2.0), _cond(2, 3.0)])
    assert net.calls == [6]
    for out, v in zip(outs, (1.0, 2.0, 3.0)):
        assert torch.allclose(out, net(x, t, _cond(2, v)), atol=1e-6)


def test_text_guidance_matches_the_kandinsky_formula():
    net, x, t = CountingNet(), torch.randn(2, 3, 4, 4), torch.tensor([1, 2])
    fn = text_guided(net, _cond(2, 2.0), _cond(2, 0.5), scale=5.0)
    got = fn(x, t)
    c, u = net(x, t, _cond(2, 2.0)), net(x, t, _cond(2, 0.5))
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
    e_ti, e_i, e_0 = net(x, t, ti), net(x, t, i), net(x, t, none)
    assert torch.allclose(got, e_0 + 2.0 * (e_i - e_0) + 5.0 * (e_ti - e_i), atol=1e-5)


def test_mismatched_branches_are_named():
    net, x, t = CountingNet(), torch.randn(1, 3, 2, 2), torch.tensor([0])
    with pytest.raises(ValueError, match="keys"):
        batched_branches(net, x, t, [{"context": torch.ones(1, 3)}, {"context": torch.ones(1, 3), "image": x}])
    with pytest.raises(ValueError, match=r"condition\.flag"):
        batched_branches(net, x, t, [{"context": torch.ones(1, 3), "flag": "a"}, {"context": torch.ones(1, 3), "flag": "b"}])
    with pytest.raises(ValueError, match=r"condition\.flag"):
        batched_branches(net, x, t, [Cond(torch.ones(1, 3), flag="a"), Cond(torch.ones(1, 3), flag="b")])
    with pytest.raises(ValueError, match="different kinds"):
        batched_branches(net, x, t, [Cond(torch.ones(1, 3)), {"context": torch.ones(1, 3)}])


def test_dataclass_branches_stack_field_by_field():
    net, x, t = CountingNet(), torch.randn(2, 3, 4, 4), torch.tensor([5, 7])
    img = torch.randn(2, 3, 4, 4)
    branches = [Cond(torch.full((2, 3), 1.0), img), Cond(torch.full((2, 3), 2.0), torch.zeros_like(img))]
    outs = batched_branches(net, x, t, branches)
    assert net.calls == [4]
    for out, cond in zip(outs, branches):
        assert torch.allclose(out, net(x, t, cond), atol=1e-6)
    got = text_guided(net, branches[0], branches[1], scale=5.0)(x, t)
    assert torch.allclose(got, 6 * net(x, t, branches[0]) - 5 * net(x, t, branches[1]), atol=1e-5)
