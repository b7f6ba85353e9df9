"""Faults of a training run: SIGKILL while checkpointing, a corrupt newest checkpoint, a full
disk, and a resume under settings that would read the data in another order.

The kill trials fork the test process (no interpreter start-up per trial) and kill the child with
SIGKILL at the K-th file operation of its checkpoint writer, K drawn at random over all the
operations a straight run makes (write a weights file, the training state, the manifest, fsync,
rename, delete, point `latest`), before or after the operation, a weights file sometimes torn
halfway. Then the run is resumed to its end in this process: it must end with exactly the
weights of a straight run and leave no temporary behind.
"""

import errno
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kvideo.train.checkpoint as ckpt_writer
from conftest import ROOT, tiny_movq_overrides
from kvideo.inference.checkpoints import list_checkpoints, newest_good_checkpoint, verify_checkpoint
from kvideo.registry import load_config
from kvideo.train.checkpoint import CheckpointWriteError
from kvideo.train.engine import resume_changes, train
from kvideo.train.logging import read_metrics

CONFIG = ROOT / "configs" / "movq" / "shapes.yaml"
STEPS = 3


def _cfg(run_dir, shards, **extra):
    values = {"train.max_steps": STEPS, "train.checkpoint_every": 1, "train.keep_checkpoints": 2,
              "train.eval_every": 0, "recipe.gan_start": 1, **extra}
    return load_config([CONFIG], tiny_movq_overrides(run_dir, shards, **values))


def _weights(ckpt_dir):
    return {which: load_file(str(Path(ckpt_dir) / f"{which}.safetensors")) for which in ("model", "ema")}


def _assert_same(a, b):
    for which in a:
        assert a[which].keys() == b[which].keys()
        for k in a[which]:
            assert torch.equal(a[which][k], b[which][k]), f"{which} weight {k} differs from the straight run"


def _leftovers(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name != "latest" and "." in p.name)


class KillSwitch:
    """Counts the checkpoint writer's file operations; SIGKILLs this process at the `kill_at`-th."""

    OPS = [(ckpt_writer, "save_weights"), (ckpt_writer, "write_manifest"), (ckpt_writer, "_fsync"),
           (ckpt_writer, "_write_atomic_text"), (ckpt_writer, "_remove"), (ckpt_writer, "reinstate"),
           (os, "replace"), (shutil, "rmtree"), (torch, "save")]

    def __init__(self, kill_at=None, after=False, torn=False):
        self.kill_at, self.after, self.torn = kill_at, after, torn
        self.count, self.inside = 0, False

    def install(self, monkeypatch):
        for owner, name in self.OPS:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))
        save = ckpt_writer.save_checkpoint

        def saving(*args, **kwargs):
            self.inside = True
            try:
                return save(*args, **kwargs)
            finally:
                self.inside = False
        monkeypatch.setattr(ckpt_writer, "save_checkpoint", saving)

    def _wrap(self, fn):
        def op(*args, **kwargs):
            if not self.inside:
                return fn(*args, **kwargs)
            self.count += 1
            if self.count != self.kill_at:
                return fn(*args, **kwargs)
            if self.after or self.torn:
                out = fn(*args, **kwargs)
                if self.torn and fn.__name__ in ("save_weights", "save"):
                    path = Path(args[0] if fn.__name__ == "save_weights" else args[1])
                    os.truncate(path, path.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
            return out
        return op


def _run_killed(cfg, switch):
    """Train `cfg` in a forked child that `switch` kills; True if it was killed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            torch.set_num_threads(1)
            mp = pytest.MonkeyPatch()
            switch.install(mp)
            train(cfg)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0, f"the child failed (status {status})"
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.fixture
def one_thread():
    """Every part of a trial on one thread (a forked child cannot use the parent's thread pool, and
    sums over other thread counts differ in the last bit)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_sigkill_while_checkpointing_loses_nothing(tmp_path, shapes_shards, monkeypatch, one_thread):
    with monkeypatch.context() as mp:  # the straight run, counting the writer's operations
        counter = KillSwitch()
        counter.install(mp)
        straight = _weights(train(_cfg(tmp_path / "straight", shapes_shards)))
    total = counter.count
    assert total >= 40  # 3 checkpoints of about 20 operations each
    rng = random.Random(0)
    trials = [(k, rng.random() < 0.5, rng.random() < 0.3) for k in rng.sample(range(1, total + 1), 24)]
    killed = 0
    for n, (kill_at, after, torn) in enumerate(trials):
        run = tmp_path / f"trial{n}"
        killed += _run_killed(_cfg(run, shapes_shards), KillSwitch(kill_at, after, torn))
        for c in list_checkpoints(run):  # a step directory is complete or absent, never in between
            assert verify_checkpoint(c) is None, (n, kill_at, c)
        start = newest_good_checkpoint(run)
        last = train(_cfg(run, shapes_shards))
        _assert_same(_weights(last), straight)
        assert last.name == f"step_{STEPS:07d}" and _leftovers(run) == [], (n, kill_at, _leftovers(run))
        resumed = [ln for ln in (run / "train.log").read_text().splitlines() if "resumed from" in ln]
        if start is None:
            assert not resumed, (n, kill_at, resumed)
        else:  # a copy set aside while its step was saved again is first moved back into place
            assert f"checkpoints/{start.name.partition('.replaced-')[0]} at step" in resumed[-1], (n, kill_at, start)
        logged = [row["step"] for row in read_metrics(run / "metrics.jsonl") if "ae/loss" in row]
        assert logged == list(range(1, STEPS + 1)), (n, kill_at, logged)
    assert killed == len(trials)


@pytest.mark.parametrize("damage", ["truncate_weights", "flip_state_byte", "delete_manifest_and_ema"])
def test_a_broken_newest_checkpoint_is_skipped_on_resume(tmp_path, shapes_shards, caplog, damage):
    run = tmp_path / "run"
    train(_cfg(run, shapes_shards, **{"train.keep_checkpoints": 0}))
    newest = run / "checkpoints" / f"step_{STEPS:07d}"
    if damage == "truncate_weights":
        os.truncate(newest / "model.safetensors", 1000)
    elif damage == "flip_state_byte":
        data = bytearray((newest / "train_state.pt").read_bytes())
        data[len(data) // 2] ^= 0xFF
        (newest / "train_state.pt").write_bytes(bytes(data))
    else:
        (newest / "manifest.json").unlink()
        (newest / "ema.safetensors").unlink()
    assert verify_checkpoint(newest) is not None
    assert newest_good_checkpoint(run).name == f"step_{STEPS - 1:07d}"
    train(_cfg(run, shapes_shards, **{"train.max_steps": STEPS + 1}))
    log = (run / "train.log").read_text()
    assert f"checkpoint '{newest}' is broken" in log
    assert f"resumed from {run / 'checkpoints' / f'step_{STEPS - 1:07d}'} at step {STEPS - 1}" in log


def test_no_intact_checkpoint_or_a_broken_named_one_is_an_error(tmp_path, shapes_shards):
    run = tmp_path / "run"
    train(_cfg(run, shapes_shards))
    for c in list_checkpoints(run):
        os.truncate(c / "model.safetensors", 10)
    with pytest.raises(ValueError, match="holds checkpoints but none is intact"):
        train(_cfg(run, shapes_shards, **{"train.max_steps": STEPS + 1}))
    with pytest.raises(ValueError, match=r"resume: checkpoint .*step_0000003' is broken \(model.safetensors has 10 bytes"):
        train(_cfg(tmp_path / "other", shapes_shards, resume=str(run / "checkpoints" / "step_0000003")))


@pytest.mark.parametrize("where", ["save_weights", "torch.save", "write_manifest", "_write_atomic_text"])
def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, shapes_shards, monkeypatch, where):
    straight = _weights(train(_cfg(tmp_path / "straight", shapes_shards)))
    run = tmp_path / "run"
    owner, name = (torch, "save") if where == "torch.save" else (ckpt_writer, where)
    real, calls = getattr(owner, name), []

    def full(*args, **kwargs):
        calls.append(1)
        if len(calls) > {"save_weights": 2, "torch.save": 1, "write_manifest": 1, "_write_atomic_text": 1}[where]:
            if where in ("save_weights", "torch.save"):  # the disk filled up halfway through the file
                Path(args[0] if where == "save_weights" else args[1]).write_bytes(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(owner, name, full)  # the first checkpoint goes in, the second meets a full disk
        with pytest.raises(CheckpointWriteError, match="No space left on device") as err:
            train(_cfg(run, shapes_shards))
    if where == "_write_atomic_text":  # the new checkpoint is whole; `latest` still names the one before
        assert "is complete" in str(err.value) and "'step_0000001'" in str(err.value)
    else:
        assert "nothing of it is left and the previous checkpoint 'step_0000001' is intact" in str(err.value)
        assert [c.name for c in list_checkpoints(run)] == ["step_0000001"]
    assert newest_good_checkpoint(run).name == "step_0000001" and _leftovers(run) == []
    _assert_same(_weights(train(_cfg(run, shapes_shards))), straight)  # space freed: resume, same end


def test_resume_refuses_another_data_order_unless_allowed(tmp_path, shapes_shards):
    run = tmp_path / "run"
    train(_cfg(run, shapes_shards, **{"train.max_steps": 1}))
    with pytest.raises(ValueError, match=r"train.batch_size: 4 -> 2.*resume_allow_changes=true"):
        train(_cfg(run, shapes_shards, **{"train.batch_size": 2}))
    with pytest.raises(ValueError, match=r"seed: 0 -> 1"):
        train(_cfg(run, shapes_shards, seed=1))
    more = tmp_path / "more"
    shutil.copytree(shapes_shards, more)
    shutil.copy(next(more.glob("*.tar")), more / "zz-extra.tar")
    with pytest.raises(ValueError, match=r"data.shards: other data \(24 -> 32 samples"):
        train(_cfg(run, shapes_shards, **{"data.shards": str(more)}))
    moved = tmp_path / "moved"  # the same shards under another path are the same data
    shutil.copytree(shapes_shards, moved)
    train(_cfg(run, shapes_shards, **{"data.shards": str(moved), "train.max_steps": 2}))
    last = train(_cfg(run, shapes_shards, **{"train.batch_size": 2, "resume_allow_changes": "true"}))
    assert last.name == f"step_{STEPS:07d}"
    assert "resuming under changed data settings" in (run / "train.log").read_text()


def test_resume_changes_names_a_changed_world_size():
    cfg = load_config([CONFIG], ["run_dir=x", "data.shards=x"])
    then = {"seed": 0, "train": {"batch_size": cfg.train.batch_size}, "data": {"shuffle": True}}
    state = {"data": [{}, {}]}
    assert resume_changes(then, state, cfg, 2, {}) == []
    assert resume_changes(then, state, cfg, 1, {}) == ["world size: 2 -> 1"]
