"""Reading checkpoints: find a run's newest one, read its config and weights, type the config.

The layout (written by `kvideo.train.checkpoint`):

    run_dir/checkpoints/
      step_0001000/
        model.safetensors   weights of the unwrapped model (a sharded run's checkpoint has
                            `sharded/` instead of both .safetensors: kvideo/train/sharded.py)
        ema.safetensors     EMA of the trainable weights and the buffers (frozen weights are
                            model.safetensors', not written twice)
        config.yaml         the resolved run config
        train_state.pt      the training state (read by the training engine only)
        manifest.json       every other file's size and SHA-256 (`verify_checkpoint`)
      latest                a one-line text file naming the newest complete checkpoint

Everything that samples, evaluates or initialises from a checkpoint reads it through here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from kvideo.registry import load_config

STEP_DIR = re.compile(r"^step_(\d{7,})$")
MANIFEST = "manifest.json"
SHARDED = "sharded"  # a sharded checkpoint's torch.distributed.checkpoint directory (kvideo/train/sharded.py)
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "config.yaml", "train_state.pt")

log = logging.getLogger(__name__)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (temporary ones are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest complete checkpoint of a run: the one `latest` names, else the highest step."""
    found = _candidates(run_dir)
    return found[0] if found else None


def _candidates(run_dir: str | Path) -> List[Path]:
    """This run's checkpoints, newest first: the one `latest` names (or the copy set aside while
    it was saved again), then the lower steps. Without a pointer, every step. Higher steps than
    the pointer's are another run's (a run started with resume=none in the same run_dir)."""
    root = Path(run_dir) / "checkpoints"
    found = list_checkpoints(run_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return found[::-1]
    name = pointer.read_text().strip()
    match = STEP_DIR.match(name)
    if match is None:
        log.warning("'%s' names '%s', not a checkpoint: using the highest step", pointer, name)
        return found[::-1]
    head = root / name
    if not head.is_dir():  # a crash while the same step was saved again (step dirs appear by rename, whole)
        aside = sorted(root.glob(f"{name}.replaced-*"))
        head = aside[0] if aside else None
    lower = [p for p in found[::-1] if int(STEP_DIR.match(p.name).group(1)) < int(match.group(1))]
    return ([head] if head is not None else []) + lower


def verify_checkpoint(ckpt_dir: str | Path) -> Optional[str]:
    """None when the checkpoint is complete and every file matches its manifest (size and
    SHA-256); else what is wrong. A checkpoint without a manifest (written before kvideo wrote
    them) is checked for its files and their readability."""
    d = Path(ckpt_dir)
    manifest = d / MANIFEST
    if not manifest.is_file():
        missing = [f for f in CHECKPOINT_FILES if not (d / f).is_file()]
        if missing:
            return f"missing {', '.join(missing)}"
        try:
            for name in ("model.safetensors", "ema.safetensors"):
                with safe_open(str(d / name), framework="pt") as f:
                    f.keys()
            torch.load(d / "train_state.pt", map_location="cpu", weights_only=True)
        except Exception as e:
            return f"unreadable ({type(e).__name__}: {e})"
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__}: {e})"
    for name, want in files.items():
        path = d / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != want["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {want['bytes']} (torn)"
        if file_digest(path) != want["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (corrupt)"
    return None


def newest_good_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The newest checkpoint of a run that `verify_checkpoint` accepts; each broken newer one is
    skipped with a warning saying what is wrong with it."""
    for candidate in _candidates(run_dir):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        log.warning("checkpoint '%s' is broken (%s): skipped, trying the one before", candidate, problem)
    return None


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file, read in 16 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint dir, a run dir (its newest) or a weights file."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        return p.parent
    if (p / "model.safetensors").is_file() or (p / SHARDED / ".metadata").is_file():
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
    """(state_dict, config) from `model` or `ema` weights of a checkpoint directory, whole or
    sharded. The `ema` state is complete: the EMA laid over the model's weights (the EMA leaves
    frozen weights out)."""
    if which not in ("model", "ema"):
        raise ValueError(f"which must be 'model' or 'ema', got '{which}'")
    if (Path(ckpt_dir) / SHARDED).is_dir():
        return _read_sharded(Path(ckpt_dir), which), read_config(ckpt_dir)
    paths = {name: Path(ckpt_dir) / f"{name}.safetensors" for name in dict.fromkeys([which, "model"])}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint '{ckpt_dir}' has no {path.name}")
    state = load_file(str(paths[which]))
    if which == "ema":  # the frozen weights, read from model.safetensors alone
        with safe_open(str(paths["model"]), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys() if k not in state})
    return state, read_config(ckpt_dir)


def _read_sharded(ckpt_dir: Path, which: str) -> Dict[str, torch.Tensor]:
    """Whole tensors of a sharded checkpoint's `model.*` (and `ema.*` laid over them), read in
    this process alone (no process group), on the CPU."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(ckpt_dir / SHARDED))
    stored = reader.read_metadata().state_dict_metadata
    prefixes = ["model."] + (["ema."] if which == "ema" else [])
    wanted = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in stored.items()
              if isinstance(m, TensorStorageMetadata) and any(k.startswith(p) for p in prefixes)}
    if not any(k.startswith("model.") for k in wanted):
        raise ValueError(f"sharded checkpoint '{ckpt_dir}' holds no model weights")
    dcp.load(wanted, storage_reader=reader, no_dist=True)
    state = {k[len("model."):]: v for k, v in wanted.items() if k.startswith("model.")}
    state.update({k[len("ema."):]: v for k, v in wanted.items() if k.startswith("ema.")})
    return state


def load_stage_weights(path: str | Path, stage: str, which: str = "ema"):
    """(state_dict, typed config) of a checkpoint of `stage`, from a checkpoint dir, a run dir
    (its newest) or a weights file; a checkpoint of another stage is a ValueError naming both."""
    ckpt_dir = resolve_checkpoint(path)
    state, stored = load_weights(ckpt_dir, which)
    if stored.get("stage") != stage:
        raise ValueError(f"checkpoint '{ckpt_dir}' is from stage '{stored.get('stage')}', expected a {stage} checkpoint")
    return state, load_config(base=stored, require_complete=False)
