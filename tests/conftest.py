"""Shared fixtures: tiny ShapesWorld shards rendered once per test session, tiny configs."""

from pathlib import Path

import pytest

from kvideo.data.shapesworld import write_shapesworld

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory) -> Path:
    """24 ShapesWorld clips, 32x32, 12 frames at 24 fps, in 3 shards."""
    out = tmp_path_factory.mktemp("shapes_train")
    write_shapesworld(out, 24, size=32, seed=0, num_frames=12, clips_per_shard=8, progress=False)
    return out


def tiny_movq_overrides(run_dir: Path, shards: Path, **extra) -> list:
    """key=value overrides that make configs/movq/shapes.yaml train in well under a second a step."""
    values = {
        "run_dir": str(run_dir), "data.shards": str(shards), "data.val_shards": str(shards), "train.eval_every": 2, "data.size": "[32,32]", "data.num_workers": 0,
        "model.ch": 8, "model.norm_groups": 4, "model.n_embed": 32, "train.batch_size": 4,
        "train.max_steps": 4, "train.checkpoint_every": 2, "train.log_every": 1, "train.preview_every": 0,
        "train.precision": "fp32", "recipe.disc_channels": 8, "recipe.disc_norm_groups": 4, "recipe.gan_start": 2, "recipe.dead_code_every": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
