"""Train one stage of the kvideo cascade.

    python train.py CONFIG.yaml [MORE.yaml ...] [key=value ...]
    torchrun --nproc_per_node N train.py CONFIG.yaml [...]

The config names the stage (`stage: movq | ...`); later files and `key=value` overrides win.
`resume=auto` (the default) continues from the newest checkpoint in `run_dir`. SIGTERM saves a
checkpoint and exits with 143 (not finished; the same command resumes).
"""

import sys

from kvideo.config import ConfigError

from kvideo.registry import load_config
from kvideo.train.engine import Preempted, train


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    try:
        cfg = load_config(files, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        train(cfg)
    except Preempted as e:  # not finished: a non-zero code, so no chain goes on to the next stage
        print(str(e), file=sys.stderr)
        return 128 + 15  # the shell's code for "terminated by SIGTERM"
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
