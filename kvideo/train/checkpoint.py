"""Checkpoints: self-describing directories, written atomically, found without guesswork.

    run_dir/checkpoints/
      step_0001000/
        model.safetensors   weights of the unwrapped model (no `module.` / `_orig_mod.`)
        ema.safetensors     EMA of the trainable weights and the buffers, same keys (frozen
                            weights are model.safetensors', not written twice)
        config.yaml         the resolved run config (also inside both .safetensors as metadata)
        train_state.pt      optimizer and scheduler states, RNG states of every rank, step,
                            data position; plain tensors and containers, loadable with
                            torch.load(weights_only=True)
      latest                a one-line text file naming the newest complete checkpoint

A checkpoint is written to `step_NNNNNNN.tmp-<pid>` and renamed into place, then `latest` is
replaced atomically, so a crash at any moment leaves either the previous state or the new one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kvideo.config import to_yaml

STEP_DIR = re.compile(r"^step_(\d{7,})$")
WEIGHT_FILES = ("model.safetensors", "ema.safetensors")


def clean_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip wrapper prefixes (`module.` from DDP, `_orig_mod.` from torch.compile)."""
    out = {}
    for key, value in state.items():
        key = key.replace("_orig_mod.", "")
        while key.startswith("module."):
            key = key[len("module."):]
        out[key] = value
    return out


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights(path: Path, state: Dict[str, torch.Tensor], config_plain: dict, kind: str) -> None:
    """Write a safetensors file whose metadata carries the run config as JSON."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in clean_state_dict(state).items()}
    save_file(tensors, str(path), metadata={"kvideo_config": json.dumps(config_plain), "kind": kind})


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model_state: Dict[str, torch.Tensor],
    ema_state: Dict[str, torch.Tensor],
    train_state: dict,
    config_plain: dict,
    keep: int = 0,
) -> Path:
    """Write `run_dir/checkpoints/step_NNNNNNN/` atomically and point `latest` at it.

    `keep` > 0 deletes all but the newest `keep` checkpoints after the new one is in place.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f"{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(tmp / "model.safetensors", model_state, config_plain, "model")
    save_weights(tmp / "ema.safetensors", ema_state, config_plain, "ema")
    (tmp / "config.yaml").write_text(to_yaml(config_plain))
    torch.save(train_state, tmp / "train_state.pt")
    if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic_text(root / "latest", final.name + "\n")
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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
    """The run config stored in a checkpoint, as plain data."""
    from omegaconf import OmegaConf

    path = Path(ckpt_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{ckpt_dir}' has no config.yaml")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


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
    from kvideo.config import load_config

    ckpt_dir = resolve_checkpoint(path)
    state, stored = load_weights(ckpt_dir, which)
    if stored.get("stage") != stage:
        raise ValueError(f"checkpoint '{ckpt_dir}' is from stage '{stored.get('stage')}', expected a {stage} checkpoint")
    return state, load_config(base=stored, require_complete=False)


def load_train_state(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / "train_state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{ckpt_dir}' has no train_state.pt (not a training checkpoint)")
    return torch.load(path, map_location="cpu", weights_only=True)
