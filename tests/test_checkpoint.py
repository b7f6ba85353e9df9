"""Run state written under faults: checkpoint retention touches only this run's lower steps, dead
writers' temporaries are removed, saving a step again never leaves the run without a complete
checkpoint, and a torn metrics.jsonl line is dropped on resume."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from kvideo.inference.checkpoints import latest_checkpoint, list_checkpoints
from kvideo.train.checkpoint import save_checkpoint
from kvideo.train.logging import MetricsWriter, training_minutes


def save(run, step, keep=0, value=0.0):
    state = {"w": torch.full((2,), float(value))}
    return save_checkpoint(run, step, state, state, {"step": step}, {"stage": "movq"}, keep=keep)


def steps(run):
    return [int(p.name.split("_")[1]) for p in list_checkpoints(run)]


def test_retention_keeps_the_new_checkpoint_and_other_runs_higher_steps(tmp_path):
    old_run = save(tmp_path, 5000)  # a run_dir holding a higher step, then a new run with resume=none
    for step in (100, 200, 300):
        written = save(tmp_path, step, keep=2)
        assert written.is_dir() and latest_checkpoint(tmp_path) == written
    assert steps(tmp_path) == [200, 300, 5000] and old_run.is_dir()


def test_dead_writers_temporaries_are_removed_live_ones_kept(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (root / f"step_0000007.tmp-{dead.pid}").mkdir()
    live = root / f"step_0000008.tmp-{os.getppid()}"
    live.mkdir()
    save(tmp_path, 10)
    assert not (root / f"step_0000007.tmp-{dead.pid}").exists() and live.exists()
    assert steps(tmp_path) == [10]


def test_saving_a_step_again_replaces_it_and_a_crash_in_between_loses_nothing(tmp_path):
    save(tmp_path, 3, value=1.0)
    final = save(tmp_path, 3, value=2.0)
    from safetensors.torch import load_file

    assert load_file(str(final / "model.safetensors"))["w"][0] == 2.0
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()] == ["step_0000003"]
    # the moment between moving the old copy aside and renaming the new one in
    aside = final.with_name(f"{final.name}.replaced-12345")
    os.replace(final, aside)
    assert latest_checkpoint(tmp_path) == aside
    save(tmp_path, 4)  # a later save leaves that copy alone only while it is the only one of its step
    assert aside.is_dir()


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, caplog):
    writer = MetricsWriter(tmp_path, enabled=True)
    for step in (10, 20, 30):
        writer.write(step, {"loss": 1.0 / step, "steps_per_s": 2.0})
    writer.close()
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 40, "loss": 0.0')  # killed while appending
    assert set(training_minutes(tmp_path)) == {10, 20, 30}
    log = logging.getLogger("kvideo")  # the run logger does not propagate to the root (train.logging)
    log.addHandler(caplog.handler)
    try:
        resumed = MetricsWriter(tmp_path, enabled=True, resume_step=20)  # back to the checkpoint of step 20
        resumed.close()
    finally:
        log.removeHandler(caplog.handler)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [10, 20]
    assert "not a JSON record (torn?)" in caplog.text


def test_a_checkpoint_config_is_not_resolved_against_the_environment(tmp_path, monkeypatch):
    from kvideo.inference.checkpoints import load_stage_weights, read_config

    monkeypatch.setenv("KVIDEO_SECRET", "leaked")
    ckpt = save(tmp_path, 1)
    assert read_config(ckpt) == {"stage": "movq"}
    (ckpt / "config.yaml").write_text("stage: movq\nrun_dir: ${oc.env:KVIDEO_SECRET}\n")
    with pytest.raises(ValueError, match="key 'run_dir' holds an interpolation"):
        load_stage_weights(ckpt, "movq")
