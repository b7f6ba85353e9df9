"""Named sizes: every model keeps a dict of config instances, and this picks one."""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, TypeVar

C = TypeVar("C")


def sized_config(sizes: Dict[str, C], size: str, **overrides) -> C:
    """A fresh copy of `sizes[size]` with fields replaced by `overrides`.

    Raises KeyError for an unknown size (listing the known ones) and TypeError for a field the
    config does not have.
    """
    if size not in sizes:
        kind = type(next(iter(sizes.values()))).__name__ if sizes else "config"
        raise KeyError(f"unknown {kind} size {size!r}; known sizes: {sorted(sizes)}")
    cfg = copy.deepcopy(sizes[size])
    fields = {f.name for f in dataclasses.fields(cfg)}
    for name, value in overrides.items():
        if name not in fields:
            raise TypeError(f"{type(cfg).__name__} has no field {name!r}")
        setattr(cfg, name, value)
    return cfg


def extend_config(base, schema: type, **fields):
    """An instance of `schema` (a dataclass extending type(base)) with base's fields, then `fields`:
    the video models' named sizes are their image model's sizes plus their own settings."""
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    values.update(fields)
    return schema(**values)
