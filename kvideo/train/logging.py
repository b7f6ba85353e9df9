"""Run logs a person can use: a text log, metrics as JSONL, TensorBoard when it is installed."""

from __future__ import annotations

import json
import logging
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
            kept = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
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
