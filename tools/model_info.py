"""Parameter counts of the model a config names, built on the meta device (no memory, no weights).

    python tools/model_info.py CONFIG.yaml [MORE.yaml ...] [key=value ...] [--json]

With --json: {"model": name, "total_params", "trainable_params", "modules": {child: count}}, plus
"temporal_params" for models that have temporal layers (a `temporal_parameters()` method).
"""

import json
import sys

from kvideo.config import ConfigError

from kvideo.registry import load_config
from kvideo.registry import model_info


def main(argv):
    as_json = "--json" in argv
    args = [a for a in argv if a != "--json"]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    try:
        cfg = load_config([a for a in args if "=" not in a], [a for a in args if "=" in a], require_complete=False)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    info = model_info(cfg)
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model {info['model']} (size {info['size']})")
    print(f"  total      {info['total_params']:>15,d}  ({info['total_params'] / 1e6:.1f}M)")
    print(f"  trainable  {info['trainable_params']:>15,d}")
    if "temporal_params" in info:
        print(f"  temporal   {info['temporal_params']:>15,d}  ({info['temporal_params'] / 1e6:.1f}M)")
    for name, n in info["modules"].items():
        print(f"  {name:<20s} {n:>12,d}  ({n / 1e6:.1f}M)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
