"""Build a training config's latent cache ahead of training (train.py builds it on start anyway).

    python tools/cache_latents.py CONFIG.yaml [MORE.yaml ...] data.latent_cache=DIR [key=value ...]

Encodes every frame of every clip of `data.shards` (centre crop at `data.size`, or at each
frame size of `data.buckets`, into data.latent_cache/HxW) with the
config's frozen `recipe.movq`, in `train.precision`, into `data.latent_cache`
(kvideo/data/latent_cache.py). Resumable: finished shards are skipped. Under torchrun the ranks
split the shards. Useful to time the cache apart from training, or to build it once on a
CPU node for several runs. Prints the wall time and the number of clips.
"""

import logging
import sys
import time


def main(argv) -> int:
    from kvideo.config import ConfigError
    from kvideo.registry import load_config
    from kvideo.data.shards import ShardIndex
    from kvideo.inference.autoencoder import load_movq
    from kvideo.data.buckets import bucket_shapes
    from kvideo.train.stages.diffusion import ensure_latent_cache
    from kvideo.train.dist import resolve_device

    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        cfg = load_config([a for a in argv if "=" not in a], [a for a in argv if "=" in a])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if not cfg.data.get("latent_cache"):
        print("error: data.latent_cache is not set: give data.latent_cache=DIR", file=sys.stderr)
        return 2
    device = resolve_device(cfg.train.device)
    t0 = time.perf_counter()
    movq = load_movq(cfg.recipe.movq, device=device)
    for shape in bucket_shapes(cfg.data, cfg.train.batch_size):  # a cache per frame size of data.buckets
        ensure_latent_cache(cfg, shape.data, movq, device)
    print(f"latent cache {cfg.data.latent_cache}: {len(ShardIndex(cfg.data.shards))} clips of {cfg.data.shards}, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
