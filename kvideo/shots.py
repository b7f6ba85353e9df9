"""Two shots of one character: the second shot conditioned on the first's identity.

    bank = IdentityBank()                                          # or IdentityBank.load(FILE)
    shot1, shot2, bank = two_shots(pipe, ["Ada moves left on a white background",
                                          "Ada moves right on a black background"], names=["Ada"], bank=bank)

Shot 1 is sampled with the bank's references for the names its prompt mentions (none when the
bank is empty); each of `names` the bank lacks is then entered from shot 1's first frame (fitted
to the bank's image size); shot 2 is sampled with the bank's references for its own prompt, with
a new seed, so its background and motion are its own and the character is the first shot's.
This is the cascade layer's: it runs a `Pipeline` twice.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

from kvideo.inference.identity import IdentityBank, names_in
from kvideo.pipeline import Pipeline, VideoOutput


def _references(pipe: Pipeline, bank: IdentityBank, prompt: str):
    return pipe.references_from(bank, [prompt]) if bank.named_in(prompt) else None


def two_shots(pipe: Pipeline, prompts: Sequence[str], names: Sequence[str], bank: Optional[IdentityBank] = None,
              seed: int = 0, **arguments: Any) -> Tuple[VideoOutput, VideoOutput, IdentityBank]:
    """(shot 1, shot 2, the bank with shot 1's entries) for the two `prompts`; `names` are the
    characters shot 1 introduces (entered from its first frame unless the bank holds them
    already). `arguments` are the pipeline call's (PipelineCall fields, motion_score, progress)."""
    if len(prompts) != 2:
        raise ValueError(f"two_shots takes two prompts; got {len(prompts)}")
    bank = bank if bank is not None else IdentityBank()
    missing = sorted(set(names) - set(names_in(prompts[1], names)))
    if missing:
        raise ValueError(f"the second shot's prompt does not name {', '.join(missing)}: {prompts[1]!r}")
    first = pipe(prompts[0], seed=seed, references=_references(pipe, bank, prompts[0]), **arguments)
    frame = first.first_frames[0]  # (3, H, W) in [-1, 1]; the bank fits it to its size
    for name in names:
        if name not in bank:
            bank.add(name, frame)
    second = pipe(prompts[1], seed=seed + 1, references=_references(pipe, bank, prompts[1]), **arguments)
    return first, second, bank
