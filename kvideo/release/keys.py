"""Renaming a released checkpoint's parameters to kvideo's, with a report of what is left over.

A released state dict is renamed by a `KeyMap`, an ordered list of `Rename` rules between the
release's names and kvideo's. Each rule is a pair of dot-separated templates matched on whole
name segments (`resnet_attn_blocks.{i}.0` <-> `units.{i}.in_resnet`), so a map runs both ways:
`to_kvideo(key)` applies the rules in order, `to_release(key)` undoes them in reverse order. A
rule whose two sides number things differently (the release's unit i, block 3 or 4 <-> kvideo's
slot 2i or 2i + 1) carries a `Fields` pair of functions between the two sides' placeholders.

`convert(state, key_map, target)` renames every key, fits shapes that differ only by singleton
dimensions (a 1x1 conv weight [o, i, 1, 1] for a Linear [o, i], a [1] gate for a scalar) and
returns a `Conversion`: the kvideo state dict plus the release keys that have no kvideo
counterpart (`unmapped`) and the kvideo keys the release did not fill (`unfilled`), so a
converter can say that every key was mapped or reported. A shape that cannot be fitted, or two
release keys renamed to one kvideo key, is an error.

The maps of the released models are in `kvideo.release.maps`. Nothing here reads a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

# ----------------------------------------------------------------------------------------------
# Renaming rules
# ----------------------------------------------------------------------------------------------

# What a `{name}` in a template matches (within one name segment); any other name is an index.
FIELDS: Dict[str, str] = {
    "norm": r"norm(?:\d+|_out)?",  # a MoVQ norm: norm, norm1, norm2, norm_out
    "side": r"down|up",  # a UNet's down or up levels
    "resnet": r"in|out",  # a kvideo level unit's in or out ResNet
}
INDEX = r"\d+"


@lru_cache(maxsize=None)
def _template_pattern(template: str) -> re.Pattern:
    """A regex matching `template` on whole dot-separated segments of a name; a leading `^`
    anchors it at the start of the name. `{i}`, `{norm}` become named groups (`FIELDS`)."""
    anchored = template.startswith("^")
    parts = re.split(r"\{(\w+)\}", template.lstrip("^"))  # literal, field, literal, field, ...
    body = "".join(f"(?P<{p}>{FIELDS.get(p, INDEX)})" if i % 2 else re.escape(p) for i, p in enumerate(parts))
    start = "^" if anchored else r"(?<![^.])"  # the start of the name or just after a dot
    return re.compile(f"{start}{body}(?![^.])")  # up to the end of the name or a dot


Groups = Dict[str, str]


@dataclass(frozen=True)
class Fields:
    """How one rule's placeholders translate between its two sides: `to_kvideo(release groups)`
    -> kvideo groups and `to_release` back (e.g. {i, block} <-> {slot} with slot = 2 i + block - 3)."""

    to_kvideo: Callable[[Groups], Groups]
    to_release: Callable[[Groups], Groups]


@dataclass(frozen=True)
class Rename:
    """One rule: the release's `release` template <-> kvideo's `kvideo` template.

    Templates are dot-separated name segments with `{field}` placeholders (`FIELDS`; any other
    field is an index). Both sides use the same fields unless `fields` translates them. `scope`
    limits the rule to names starting with it (the MoVQ's encoder wraps its norms, its decoder
    does not)."""

    release: str
    kvideo: str
    scope: str = ""
    fields: Optional[Fields] = None

    def _apply(self, key: str, source: str, target: str, translate) -> str:
        if not key.startswith(self.scope):
            return key
        replacement = target.lstrip("^")

        def substitute(match: re.Match) -> str:
            groups = match.groupdict()
            return replacement.format(**(groups if self.fields is None else translate(groups)))

        return _template_pattern(source).sub(substitute, key)

    def to_kvideo(self, key: str) -> str:
        """`key` with this rule's release segments replaced by kvideo's."""
        return self._apply(key, self.release, self.kvideo, self.fields and self.fields.to_kvideo)

    def to_release(self, key: str) -> str:
        """`key` with this rule's kvideo segments replaced by the release's."""
        return self._apply(key, self.kvideo, self.release, self.fields and self.fields.to_release)


@dataclass(frozen=True)
class KeyMap:
    """A named, ordered list of `Rename` rules between one release's names and kvideo's.

    A name no rule touches is the same on both sides (`in_layer.weight`, `decoder.conv_out.bias`)."""

    name: str
    rules: Tuple[Rename, ...]

    def to_kvideo(self, key: str) -> str:
        """The kvideo name of the release's `key` (rules applied in order)."""
        for rule in self.rules:
            key = rule.to_kvideo(key)
        return key

    def to_release(self, key: str) -> str:
        """The release's name of kvideo's `key` (rules undone in reverse order)."""
        for rule in reversed(self.rules):
            key = rule.to_release(key)
        return key


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------


@dataclass
class Conversion:
    """A release state dict renamed to kvideo's names, and what did not fit.

    state_dict  kvideo name -> tensor (the release's tensor, reshaped where `reshaped` says)
    unmapped    release keys whose kvideo name is not a key of the target (left out)
    unfilled    target keys that no release key filled
    reshaped    kvideo keys whose tensor changed shape on the way (1x1 conv -> Linear, [1] -> [])
    consumed    release keys read by a transformation rather than renamed -> what it did with them
                (a fold, a fusion, a parameter the release never uses)
    derived     kvideo keys computed rather than copied -> how (the fold's result, a constant)
    """

    name: str
    state_dict: Dict[str, torch.Tensor]
    unmapped: List[str] = field(default_factory=list)
    unfilled: List[str] = field(default_factory=list)
    reshaped: List[str] = field(default_factory=list)
    consumed: Dict[str, str] = field(default_factory=dict)
    derived: Dict[str, str] = field(default_factory=dict)

    def derive(self, key: str, tensor: torch.Tensor, how: str) -> None:
        """Fill kvideo's `key` with a computed `tensor` (replacing a renamed one), saying `how`."""
        self.state_dict[key] = tensor
        self.derived[key] = how
        if key in self.unfilled:
            self.unfilled.remove(key)

    @property
    def complete(self) -> bool:
        """True when every release key was mapped and every target key filled."""
        return not self.unmapped and not self.unfilled

    def report(self, limit: int = 8) -> str:
        """One paragraph for a converter's log: counts, then up to `limit` keys of each list."""
        lines = [f"{self.name}: {len(self.state_dict)} kvideo keys filled ({len(self.derived)} derived), "
                 f"{len(self.unmapped)} release keys unmapped, {len(self.consumed)} consumed by a transformation, "
                 f"{len(self.unfilled)} kvideo keys unfilled, {len(self.reshaped)} reshaped"]
        for label, keys in (("unmapped", self.unmapped), ("unfilled", self.unfilled), ("reshaped", self.reshaped)):
            if keys:
                more = f" ... (+{len(keys) - limit})" if len(keys) > limit else ""
                lines.append(f"  {label}: {', '.join(keys[:limit])}{more}")
        return "\n".join(lines)

    def require(self, unfilled_ok: Sequence[str] = (), unmapped_ok: Sequence[str] = ()) -> None:
        """Raise KeyError unless every unfilled / unmapped key starts with one of the given prefixes
        (e.g. `unfilled_ok=("quantize.",)` for a MoVQ release without its codebook)."""
        unfilled = [k for k in self.unfilled if not k.startswith(tuple(unfilled_ok))]
        unmapped = [k for k in self.unmapped if not k.startswith(tuple(unmapped_ok))]
        if unfilled or unmapped:
            raise KeyError(f"{self.name}: {len(unmapped)} release keys have no kvideo counterpart {unmapped[:8]}, "
                           f"{len(unfilled)} kvideo keys were not filled {unfilled[:8]}")


def fit_shape(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`tensor` reshaped to `shape` when they differ only by trailing singleton dimensions (a 1x1
    conv weight [o, i, 1, 1] <-> a Linear weight [o, i]; a [1] gate <-> a scalar []). Raises
    ValueError for any other difference."""
    have, want = tuple(tensor.shape), tuple(shape)
    if have == want:
        return tensor
    shorter, longer = sorted((have, want), key=len)
    if longer[: len(shorter)] == shorter and all(d == 1 for d in longer[len(shorter):]):
        return tensor.reshape(want)
    raise ValueError(f"shape {list(have)} cannot be fitted to {list(want)}")


def convert(state: Mapping[str, torch.Tensor], key_map: KeyMap, target: Mapping[str, torch.Tensor]) -> Conversion:
    """Rename the release's `state` with `key_map` into the keys of `target` (a kvideo state dict,
    on the meta device or not: only its keys and shapes are read) and report what is left over.

    Raises ValueError listing every tensor whose shape does not fit its target, or every kvideo
    key that two release keys were renamed to."""
    out: Dict[str, torch.Tensor] = {}
    sources: Dict[str, str] = {}
    conversion = Conversion(key_map.name, out)
    clashes, wrong = [], []
    for key, tensor in state.items():
        name = key_map.to_kvideo(key)
        if name not in target:
            conversion.unmapped.append(key)
            continue
        if name in sources:
            clashes.append(f"{sources[name]} and {key} -> {name}")
            continue
        sources[name] = key
        try:
            out[name] = fit_shape(tensor, target[name].shape)
        except ValueError as err:
            wrong.append(f"{key} -> {name}: {err}")
            continue
        if out[name].shape != tensor.shape:
            conversion.reshaped.append(name)
    if clashes or wrong:
        raise ValueError(f"{key_map.name}: " + "; ".join(clashes + wrong))
    conversion.unfilled = [k for k in target if k not in out]
    return conversion


def to_release_names(state: Mapping[str, torch.Tensor], key_map: KeyMap) -> Dict[str, torch.Tensor]:
    """A kvideo state dict under the release's names (names only: tensors keep kvideo's shapes,
    which for the Kandinsky 3 UNet and the MoVQ are the release's)."""
    out = {key_map.to_release(k): v for k, v in state.items()}
    if len(out) != len(state):
        raise ValueError(f"{key_map.name}: two kvideo keys share one release name")
    return out
