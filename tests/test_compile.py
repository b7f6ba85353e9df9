"""`train.compile`: the blocks compiled in place keep their parameter names and compute what the
eager blocks compute (forward and gradients)."""

import copy

import torch
from torch import nn

from kvideo.models.blocks import compile_blocks
from kvideo.models.unet import ResNetBlock


def test_compiled_blocks_keep_names_and_values():
    torch.manual_seed(0)
    model = nn.Sequential(ResNetBlock(8, 8, 16, groups=4), ResNetBlock(8, 16, 16, groups=4))
    eager = copy.deepcopy(model)
    assert compile_blocks(model) == 2
    assert list(model.state_dict()) == list(eager.state_dict())  # no `_orig_mod.` anywhere
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 16)

    def run(m):
        h = x
        for block in m:
            h = block(h, emb)
        h.square().mean().backward()
        return h, [p.grad for p in m.parameters()]

    (out, grads), (ref, ref_grads) = run(model), run(eager)
    assert torch.allclose(out, ref, atol=1e-5)
    assert all(torch.allclose(g, r, atol=1e-5) for g, r in zip(grads, ref_grads))
    # the compiled code really runs: dynamo holds a compiled entry for the blocks' code
    assert model[0]._compiled_call_impl is not None and eager[0]._compiled_call_impl is None
