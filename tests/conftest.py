"""Shared fixtures: tiny ShapesWorld shards rendered once per test session, tiny configs."""

from pathlib import Path

import pytest

from kvideo.registry import load_config
from kvideo.data.shapesworld import ShapesWorldSpec, write_shapesworld
from kvideo.train.engine import train

ROOT = Path(__file__).resolve().parents[1]
MOVQ_CONFIG = ROOT / "configs" / "movq" / "shapes.yaml"
T2I_CONFIG = ROOT / "configs" / "t2i" / "shapes.yaml"
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory) -> Path:
    """24 ShapesWorld clips, 32x32, 12 frames at 24 fps, in 3 shards."""
    out = tmp_path_factory.mktemp("shapes_train")
    write_shapesworld(out, ShapesWorldSpec(24, size=32, seed=0, num_frames=12, clips_per_shard=8), progress=False)
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


def tiny_t2i_overrides(run_dir, shards, movq_run, **extra):
    values = {
        "run_dir": str(run_dir), "data.shards": str(shards), "data.size": "[32,32]", "data.num_workers": 0,
        "recipe.movq": str(movq_run), "model.model_channels": 16, "model.init_channels": 8,
        "model.time_embed_dim": 32, "model.context_dim": 16, "model.groups": 4, "model.head_dim": 8,
        "model.dim_mult": "[1,2]", "model.num_blocks": "[1,1]", "model.add_cross_attention": "[false,true]",
        "model.add_self_attention": "[false,true]", "recipe.text_encoder.out_dim": 16,
        "recipe.text_encoder.context_length": 16, "recipe.preview_steps": 2, "recipe.sampling.steps": 3,
        "train.batch_size": 4, "train.max_steps": 3, "train.checkpoint_every": 3, "train.log_every": 1,
        "train.preview_every": 3, "train.precision": "fp32",
        "data.latent_cache": "null",  # frames encoded every step; tests/test_latent_cache.py covers the cache
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def movq_run(tmp_path_factory, shapes_shards) -> Path:
    run = tmp_path_factory.mktemp("movq_for_t2i")
    train(load_config([MOVQ_CONFIG], tiny_movq_overrides(run, shapes_shards, **{"train.max_steps": 1,
                                                                               "train.eval_every": 0})))
    return run


@pytest.fixture(scope="session")
def t2i_run(tmp_path_factory, shapes_shards, movq_run) -> Path:
    run = tmp_path_factory.mktemp("t2i")
    train(load_config([T2I_CONFIG], tiny_t2i_overrides(run, shapes_shards, movq_run)))
    return run
