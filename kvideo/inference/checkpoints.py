"""Reading checkpoints: find a run's newest one, read its config and weights, type the config.

The layout (written by `kvideo.train.checkpoint`):

    run_dir/checkpoints/
      step_0001000/
        model.safetensors   weights of the unwrapped model
        ema.safetensors     EMA of the trainable weights and the buffers (frozen weights are
                            model.safetensors', not written twice)
        config.yaml         the resolved run config
        train_state.pt      the training state (read by the training engine only)
      latest                a one-line text file naming the newest complete checkpoint

Everything that samples, evaluates or initialises from a checkpoint reads it through here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from kvideo.registry import load_config

STEP_DIR = re.compile(r"^step_(\d{7,})$")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (temporary ones are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run: the one `latest` names, else the highest step."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "train_state.pt").is_file():
            return candidate
        # a crash while the same step was saved again left the old copy aside (train.checkpoint)
        aside = sorted(root.glob(f"{candidate.name}.replaced-*"))
        if aside and (aside[0] / "train_state.pt").is_file():
            return aside[0]
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint dir, a run dir (its newest) or a weights file."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return p.parent
    if (p / "model.safetensors").is_file():
        return p
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is not None:
            return found
    raise FileNotFoundError(f"no checkpoint at '{path}': expected a checkpoint directory "
                            f"(with model.safetensors), a run directory with checkpoints/, or a .safetensors file")


def read_config(ckpt_dir: str | Path) -> dict:
    """The run config stored in a checkpoint, as plain data, never resolved: checkpoints store the
    resolved config, so an interpolation (`${oc.env:...}` would read this machine's environment)
    means a file kvideo did not write, and is a ValueError naming the key."""
    path = Path(ckpt_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{ckpt_dir}' has no config.yaml")
    plain = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    for key, value in _leaves(plain):
        if isinstance(value, str) and "${" in value:
            raise ValueError(f"checkpoint '{ckpt_dir}': config.yaml key '{key}' holds an interpolation ({value!r}); "
                             "kvideo writes checkpoint configs resolved and does not resolve them when reading")
    return plain


def _leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf of plain config data."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _leaves(v, f"{prefix}{i}.")
    else:
        yield prefix.rstrip("."), node


def load_weights(ckpt_dir: str | Path, which: str = "ema") -> Tuple[Dict[str, torch.Tensor], dict]:
    """(state_dict, config) from `model` or `ema` weights of a checkpoint directory. The `ema`
    state is complete: ema.safetensors laid over model.safetensors (the EMA leaves frozen weights out)."""
    if which not in ("model", "ema"):
        raise ValueError(f"which must be 'model' or 'ema', got '{which}'")
    paths = {name: Path(ckpt_dir) / f"{name}.safetensors" for name in dict.fromkeys([which, "model"])}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint '{ckpt_dir}' has no {path.name}")
    state = load_file(str(paths[which]))
    if which == "ema":  # the frozen weights, read from model.safetensors alone
        with safe_open(str(paths["model"]), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if k not in state})
    return state, read_config(ckpt_dir)


def load_stage_weights(path: str | Path, stage: str, which: str = "ema"):
    """(state_dict, typed config) of a checkpoint of `stage`, from a checkpoint dir, a run dir
    (its newest) or a weights file; a checkpoint of another stage is a ValueError naming both."""
    ckpt_dir = resolve_checkpoint(path)
    state, stored = load_weights(ckpt_dir, which)
    if stored.get("stage") != stage:
        raise ValueError(f"checkpoint '{ckpt_dir}' is from stage '{stored.get('stage')}', expected a {stage} checkpoint")
    return state, load_config(base=stored, require_complete=False)
