"""Run logs a person can use: a text log, metrics as JSONL, TensorBoard when it is installed."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Dict, Optional


def setup_text_logging(run_dir: Optional[Path], is_main: bool) -> logging.Logger:
    """Log to stderr and to run_dir/train.log on rank 0; warnings and errors only elsewhere."""
    logger = logging.getLogger("kvideo")
    logger.handlers.clear()
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    logger.addHandler(stream)
    if is_main and run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(run_dir / "train.log")
        file.setFormatter(fmt)
        logger.addHandler(file)
    logger.propagate = False
    return logger


class MetricsWriter:
    """Appends one JSON object per logged step to run_dir/metrics.jsonl (rank 0 only).

    On resume, lines for steps after the checkpoint (written before a crash) are dropped so the
    file never holds two values for one step.
    """

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        if self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)  # a crash while rewriting leaves the old file whole
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
        except ImportError:
            self.tb = None

    def write(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list:
    """The records of a metrics.jsonl. A line that is not a JSON object (torn by a kill or a full
    disk while it was appended) is dropped with a warning naming the file and the line."""
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            logging.getLogger("kvideo").warning("%s: line %d is not a JSON record (torn?); dropped", path, number)
            continue
        records.append(record)
    return records


def training_minutes(run_dir: str | Path) -> Dict[int, float]:
    """step -> minutes of training when it was logged, from a run's metrics.jsonl (empty if none).

    Each row's `steps_per_s` covers the steps since the previous row of the same process, so a
    stop and resume shows as a wall-clock gap far longer than those steps took: such a gap counts
    only the time its steps took. Rows a resumed run logs again (it restarts from its last
    checkpoint, before the stop) replace the earlier ones. Approximate: the clock starts at the
    first logged step minus the time its logged rate implies. Evaluation tools use it to put
    checkpoints on a training-time axis.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [r for r in read_metrics(path) if r.get("steps_per_s")]
    seconds: Dict[int, float] = {}
    prev, total = None, 0.0
    for r in rows:
        if prev is None or r["step"] <= prev["step"]:  # the first row, or a resumed run's first row
            done = [s for s in seconds if s < r["step"]]
            base = max(done, default=0)
            total = (seconds[base] if done else 0.0) + (r["step"] - base) / r["steps_per_s"]
        else:
            took = (r["step"] - prev["step"]) / r["steps_per_s"]
            wall = r["time"] - prev["time"]
            total += wall if wall <= 3 * took + 60 else took  # a longer gap: the run was stopped
        seconds[r["step"]] = total
        prev = r
    return {step: sec / 60 for step, sec in seconds.items()}


def checkpoints_on_time_axis(path: str | Path, every: bool, at_minutes: Optional[list] = None) -> list:
    """[(checkpoint dir, step, training minutes or None)] for evaluation tools.

    `every`: all checkpoints of the run directory `path`; otherwise the one `path` resolves to
    (a run's newest, a checkpoint directory or a weights file). `at_minutes` (with `every`)
    keeps, for each budget, the last checkpoint written within that many training minutes.
    Raises FileNotFoundError when there is none.
    """
    from kvideo.inference.checkpoints import list_checkpoints, resolve_checkpoint

    path = Path(path)
    ckpts = list_checkpoints(path) if every else [resolve_checkpoint(path)]
    if not ckpts:
        raise FileNotFoundError(f"no checkpoints under {path}")
    minutes = training_minutes(path if every else ckpts[0].parent.parent)
    steps = [int(c.name.split("_")[1]) if c.name.startswith("step_") else None for c in ckpts]
    rows = [(c, s, minutes.get(s)) for c, s in zip(ckpts, steps)]
    if every and at_minutes:
        picked = []
        for budget in sorted(at_minutes):
            within = [r for r in rows if r[2] is not None and r[2] <= budget]
            if within and within[-1] not in picked:
                picked.append(within[-1])
        rows = picked
    return rows
