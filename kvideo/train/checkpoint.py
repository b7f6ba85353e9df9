"""Writing checkpoints: self-describing directories, written atomically, found without guesswork.
(Reading them is `kvideo.inference.checkpoints`'.)

    run_dir/checkpoints/
      step_0001000/
        model.safetensors   weights of the unwrapped model (no `module.` / `_orig_mod.`)
        ema.safetensors     EMA of the trainable weights and the buffers, same keys (frozen
                            weights are model.safetensors', not written twice)
        config.yaml         the resolved run config (also inside both .safetensors as metadata)
        train_state.pt      optimizer and scheduler states, RNG states of every rank, step,
                            data position; plain tensors and containers, loadable with
                            torch.load(weights_only=True)
        manifest.json       size and SHA-256 of each file above, checked before a resume
      latest                a one-line text file naming the newest complete checkpoint

A checkpoint is written to `step_NNNNNNN.tmp-<pid>` and renamed into place, then `latest` is
replaced atomically, so a crash at any moment leaves either the previous state or the new one.
A write that fails (a full disk) removes its temporary directory and raises
CheckpointWriteError; the previous checkpoint is untouched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Dict

import torch
from safetensors.torch import save_file

from kvideo.config import to_yaml
from kvideo.inference.checkpoints import MANIFEST, STEP_DIR, file_digest, list_checkpoints


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (e.g. the disk is full); the previous one is intact."""


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
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
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

    The files and the directory are fsynced before the rename, the rename before `latest`. `keep`
    > 0 keeps the newest `keep` checkpoints up to this step: only lower steps are deleted, never
    the one just written and never a higher step (another run's, e.g. under `resume=none`).
    Temporary directories of writers that died are removed. A step saved again is moved aside
    (`step_N.replaced-PID`) before the new one is renamed in, so a crash between the two leaves a
    complete checkpoint that `latest_checkpoint` finds.
    """
    tmp = begin_checkpoint(run_dir, step)
    return finish_checkpoint(run_dir, step, tmp, lambda d: _write_files(d, model_state, ema_state, train_state,
                                                                        config_plain), keep)


def begin_checkpoint(run_dir: str | Path, step: int) -> Path:
    """The empty temporary directory the checkpoint of `step` is written into (a sharded
    checkpoint's ranks all write their shards there before `finish_checkpoint`)."""
    root = Path(run_dir) / "checkpoints"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(root)
        tmp = root / f"step_{step:07d}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise CheckpointWriteError(f"cannot create the checkpoint of step {step} in '{root}' ({_reason(e)})") from e
    return tmp


def finish_checkpoint(run_dir: str | Path, step: int, tmp: Path, write: Callable[[Path], None], keep: int = 0) -> Path:
    """`write(tmp)` the rest of the checkpoint's files, then the manifest, fsync, the rename to
    `step_NNNNNNN` and `latest` (see `save_checkpoint`). A failure removes `tmp` and raises
    CheckpointWriteError; the previous checkpoint is untouched."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:07d}"
    previous = (root / "latest").read_text().strip() if (root / "latest").is_file() else None
    kept = f"the previous checkpoint '{previous}' is intact" if previous else "there is no earlier checkpoint"
    try:
        write(tmp)
        write_manifest(tmp)
        for path in tmp.rglob("*"):
            _fsync(path)
        _fsync(tmp)
    except Exception as e:  # OSError, or the writers' own errors around one (safetensors, torch.save)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"writing the checkpoint of step {step} in '{root}' failed ({_reason(e)}); "
                                   f"nothing of it is left and {kept}") from e
    aside = None
    if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save)
        aside = root / f"{final.name}.replaced-{os.getpid()}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync(root)
    try:
        _write_atomic_text(root / "latest", final.name + "\n")
    except OSError as e:
        (root / f".latest.tmp-{os.getpid()}").unlink(missing_ok=True)
        raise CheckpointWriteError(f"the checkpoint of step {step} is complete in '{final}', but pointing "
                                   f"'latest' at it failed ({_reason(e)}); 'latest' still names "
                                   f"{previous!r}, which a resume reads") from e
    _fsync(root)
    if aside is not None:
        _remove(aside)
    if keep > 0:
        mine = [p for p in list_checkpoints(run_dir) if _step_of(p) <= step]
        for old in mine[:-keep]:
            if old != final:
                _remove(old)
    remove_stale_temporaries(root)  # e.g. a dead writer's copy set aside for this very step
    return final


def _reason(e: Exception) -> str:
    return f"{e.strerror}" if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"


def _write_files(tmp: Path, model_state, ema_state, train_state: dict, config_plain: dict) -> None:
    """The files of a whole (unsharded) checkpoint into `tmp`."""
    save_weights(tmp / "model.safetensors", model_state, config_plain, "model")
    save_weights(tmp / "ema.safetensors", ema_state, config_plain, "ema")
    write_train_files(tmp, train_state, config_plain)


def write_train_files(tmp: Path, train_state: dict, config_plain: dict) -> None:
    """config.yaml and train_state.pt, which every checkpoint has."""
    (tmp / "config.yaml").write_text(to_yaml(config_plain))
    torch.save(train_state, tmp / "train_state.pt")


def write_manifest(ckpt_dir: Path) -> None:
    """manifest.json: the size and SHA-256 of every other file of a checkpoint directory (the
    shards of a sharded checkpoint by their path under it, `sharded/__0_0.distcp`)."""
    files = {p.relative_to(ckpt_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(ckpt_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (ckpt_dir / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _remove(path: Path) -> None:
    """Delete a checkpoint directory: renamed out of the listing first (atomic), so a crash
    midway never leaves a half-deleted directory that looks like a checkpoint."""
    gone = path.with_name(f"{path.name}.deleted-{os.getpid()}")
    os.replace(path, gone)
    shutil.rmtree(gone, ignore_errors=True)


def reinstate(ckpt_dir: Path) -> Path:
    """A checkpoint set aside while its step was saved again (`step_N.replaced-PID`, the writer
    killed before the new copy went in) moved back to `step_N`; any other path as it is."""
    name, sep, _ = ckpt_dir.name.partition(".replaced-")
    if not sep or not STEP_DIR.match(name) or (ckpt_dir.parent / name).exists():
        return ckpt_dir
    os.replace(ckpt_dir, ckpt_dir.parent / name)
    _fsync(ckpt_dir.parent)
    return ckpt_dir.parent / name


def remove_stale_temporaries(root: Path) -> None:
    """Remove what writers that are no longer running left: `step_N.tmp-PID` (a checkpoint being
    written), `step_N.deleted-PID` (one being deleted), `.latest.tmp-PID` (the pointer being
    replaced), and `step_N.replaced-PID` (the old copy of a step saved again) once its step
    directory is back in place."""
    for path in [*root.glob("step_*.*-*"), *root.glob(".latest.tmp-*")]:
        name, _, pid = path.name.rpartition("-")
        kind = name.rsplit(".", 1)[-1]
        if kind not in ("tmp", "replaced", "deleted") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "replaced" and not (root / name.rsplit(".", 1)[0]).is_dir():
            continue  # the only complete copy of that step: latest_checkpoint reads it
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's contents to disk (best effort where the OS refuses a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_train_state(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / "train_state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{ckpt_dir}' has no train_state.pt (not a training checkpoint)")
    return torch.load(path, map_location="cpu", weights_only=True)
