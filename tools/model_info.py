"""Parameter counts of the model a config names, built on the meta device (no memory, no weights).

    python tools/model_info.py CONFIG.yaml [MORE.yaml ...] [key=value ...] [--json] [--temporal-variants]

--temporal-variants (a video UNet): the temporal and total parameters of each temporal-layer
variant (model.temporal_placement x model.temporal_kind), the config's own marked.

With --json: {"model": name, "total_params", "trainable_params", "modules": {child: count}}, plus
"temporal_params" for models that have temporal layers (a `temporal_parameters()` method).
"""

import json
import sys

from kvideo.config import ConfigError

from kvideo.registry import load_config
from kvideo.registry import model_info


def variant_table(configs, overrides):
    """[(placement, kind, temporal_params, total_params)] for every temporal-layer variant."""
    from kvideo.models.temporal_layers import KINDS, PLACEMENTS

    rows = []
    for placement in PLACEMENTS:
        for kind in KINDS:
            cfg = load_config(configs, [*overrides, f"model.temporal_placement={placement}", f"model.temporal_kind={kind}"],
                              require_complete=False)
            info = model_info(cfg)
            rows.append((placement, kind, info["temporal_params"], info["total_params"]))
    return rows


def main(argv):
    as_json = "--json" in argv
    variants = "--temporal-variants" in argv
    args = [a for a in argv if a not in ("--json", "--temporal-variants")]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if args else 2
    try:
        cfg = load_config([a for a in args if "=" not in a], [a for a in args if "=" in a], require_complete=False)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    info = model_info(cfg)
    if variants:
        if "temporal_params" not in info or "temporal_placement" not in cfg.model:
            print(f"--temporal-variants: model {info['model']} has no temporal-layer variants (a video_unet has)",
                  file=sys.stderr)
            return 2
        rows = variant_table([a for a in args if "=" not in a], [a for a in args if "=" in a])
        if as_json:
            print(json.dumps([dict(placement=p, kind=k, temporal_params=t, total_params=n) for p, k, t, n in rows], indent=2))
            return 0
        own = (cfg.model.temporal_placement, cfg.model.temporal_kind)
        print("| placement | kind | temporal | total |\n|---|---|---|---|")
        for p, k, t, n in rows:
            print(f"| {p}{' (config)' if (p, k) == own else ''} | {k} | {t / 1e6:.2f}M | {n / 1e6:.2f}M |")
        return 0
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
