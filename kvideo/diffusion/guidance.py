"""Classifier-free guidance: every branch in ONE batched forward, then a named combination.

    model_fn = text_guided(net, cond, uncond, scale=5.0)   # net(x, t, condition)
    x = sample(model_fn, schedule, x_T, SamplerSpec("ddpm", steps=50))

A branch is a condition: a dataclass of tensors with batch size b (`kvideo.inference.conditioning`)
or a dict of them. `batched_branches` runs the network once on the branches stacked along the
batch axis (`stack_branches`, once per sampling call, not per step), so a guided step costs one
forward of a k-times larger batch, not k forwards. The combinations use
the Kandinsky conventions (reference: ../shared/reference/kandinsky_video.md):

- text (first frame, interpolation): `(w + 1) * cond - w * uncond` = cond + w (cond - uncond);
  w = 0 is no guidance, Kandinsky 3 uses w = 5 (which is a "scale 6" in the diffusers convention);
- text and image (keyframes), branches [text+image, null text+image, null text+no image]:
  `eps_0 + w_I (eps_I - eps_0) + w_T (eps_TI - eps_I)`, w_T = 5, w_I = 2;
- extra terms (`GuidanceTerm`), each a further branch that the first is pushed away from,
  `+ w_k (eps_first - eps_k)`: motion-free guidance (GenTron), the text-and-image branch with no
  information crossing frames, `+ w_M (eps_TI - eps_TI,mf)`; reference guidance (identity), the
  first branch without its reference images, `+ w_R (eps_first - eps_no ref)`; w = 0 is none.

Guidance is applied to the model output whatever the prediction target (eps, v or x0): the
combination is linear, and all three targets are linear in the output at a fixed x_t and t.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Sequence

import torch

Net = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]  # net(x, t, condition) -> prediction


def stack_branches(branches: Sequence[Any], where: str = "condition") -> Any:
    """The branches' conditions as one, stacked along the batch axis: tensors are concatenated,
    dataclasses and dicts field by field, and any other value must be the same in every branch."""
    first = branches[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(list(branches), dim=0)
    if dataclasses.is_dataclass(first):
        if any(type(b) is not type(first) for b in branches):
            raise ValueError(f"guidance branches of different kinds: {[type(b).__name__ for b in branches]}")
        return dataclasses.replace(first, **{f.name: stack_branches([getattr(b, f.name) for b in branches],
                                                                    f"{where}.{f.name}")
                                             for f in dataclasses.fields(first) if f.init})
    if isinstance(first, dict):
        for i, b in enumerate(branches[1:], start=1):
            if set(b) != set(first):
                raise ValueError(f"guidance branch {i} has conditioning keys {sorted(b)}, branch 0 has {sorted(first)}")
        return {k: stack_branches([b[k] for b in branches], f"{where}.{k}") for k in first}
    if all(v is None for v in branches):
        return None
    if all(v == first for v in branches):
        return first
    raise ValueError(f"guidance branches disagree on the non-tensor {where}: {list(branches)}")


def batched_branches(net: Net, x: torch.Tensor, t: torch.Tensor, branches: Sequence[Any]) -> List[torch.Tensor]:
    """net's outputs for each branch's condition, from one forward of the stacked batch.

    x (b, ...) and t (b,) are repeated once per branch; each branch is a condition whose tensors
    have batch size b. Returns one (b, ...) output per branch.
    """
    return _stacked_forward(net, _stack(branches))(x, t)


def _stack(branches: Sequence[Any]) -> tuple:
    if not branches:
        raise ValueError("batched_branches needs at least one branch")
    return len(branches), stack_branches(branches)


def _stacked_forward(net: Net, stacked: tuple) -> Callable[[torch.Tensor, torch.Tensor], List[torch.Tensor]]:
    """(x, t) -> the k branch outputs of one forward, the conditions stacked once, not per step."""
    k, cond = stacked

    def forward(x: torch.Tensor, t: torch.Tensor) -> List[torch.Tensor]:
        out = net(torch.cat([x] * k), torch.cat([t] * k), cond)  # (k b, ...)
        return list(out.split(x.shape[0], dim=0))

    return forward


@dataclasses.dataclass(frozen=True)
class GuidanceTerm:
    """An extra branch of a guided forward that the first branch is pushed away from:
    `+ scale * (eps_first - eps_branch)`. Motion-free guidance is the first branch in motion-free
    mode; reference guidance the first branch without its references. Scale 0 adds no branch."""

    branch: Any
    scale: float


def _guided(net: Net, base: Sequence[Any], combine: Callable[..., torch.Tensor],
            terms: Sequence[GuidanceTerm]) -> Callable:
    """model_fn(x, t) = combine(*base outputs) + sum of the live terms, every branch in one forward."""
    live = [g for g in terms if g.scale != 0]
    if len(base) == 1 and not live:
        return lambda x, t: net(x, t, base[0])
    forward = _stacked_forward(net, _stack(list(base) + [g.branch for g in live]))

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        outs = forward(x, t)
        head, tail = outs[:len(base)], outs[len(base):]
        out = combine(*head)
        for g, e in zip(live, tail):
            out = out + g.scale * (head[0] - e)
        return out

    return model_fn


def text_guided(net: Net, cond: Any, uncond: Any, scale: float, terms: Sequence[GuidanceTerm] = ()) -> Callable:
    """model_fn(x, t) = (w + 1) * net(cond) - w * net(uncond), w = `scale`, plus each term's
    `w_k (net(cond) - net(term.branch))`, in one forward.

    scale 0 leaves out the unconditional branch (no term: the conditional branch alone)."""
    if scale == 0:
        return _guided(net, [cond], lambda c: c, terms)
    return _guided(net, [cond, uncond], lambda c, u: c + scale * (c - u), terms)


def text_image_guided(net: Net, text_image: Any, image: Any, neither: Any, text_scale: float,
                      image_scale: float, terms: Sequence[GuidanceTerm] = ()) -> Callable:
    """Three-way guidance of the keyframe model, in one forward of three branches:
    eps_0 + w_I (eps_I - eps_0) + w_T (eps_TI - eps_I), with eps_TI (text and image),
    eps_I (null text, image) and eps_0 (null text, no image).

    Each term adds a branch of the same forward: motion-free guidance (the text-and-image branch in
    motion-free mode, w_M) gives + w_M (eps_TI - eps_TI,mf); reference guidance (the
    text-and-image branch without its references, w_R) + w_R (eps_TI - eps_TI,no ref)."""
    return _guided(net, [text_image, image, neither],
                   lambda e_ti, e_i, e_0: e_0 + image_scale * (e_i - e_0) + text_scale * (e_ti - e_i), terms)
