"""sample.py and load_movq on a tiny trained checkpoint; LPIPS wired into the movq stage."""

from pathlib import Path

import pytest
import torch

from kvideo.registry import load_config
from kvideo.data.video_io import read_video
from kvideo.inference.autoencoder import load_movq
from kvideo.train.engine import train

from conftest import ROOT, SHARED_DATA, tiny_movq_overrides

CONFIG = ROOT / "configs" / "movq" / "shapes.yaml"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, shapes_shards) -> Path:
    run = tmp_path_factory.mktemp("movq_run")
    train(load_config([CONFIG], tiny_movq_overrides(run, shapes_shards, **{"train.max_steps": 2})))
    return run


def test_sample_movq_reconstructs_a_real_clip(tmp_path, tiny_run):
    import sample

    out = tmp_path / "recon.mp4"
    code = sample.main(["--stage", "movq", "--checkpoint", str(tiny_run), "--input",
                        str(SHARED_DATA / "carphone_pristine.mp4"), "--out", str(out), "--max-frames", "4",
                        "--size", "32", "48", "--side-by-side"])
    assert code == 0
    frames, _ = read_video(out)
    assert frames.shape == (4, 32, 96, 3)


def test_sample_names_a_missing_checkpoint(tmp_path, capsys):
    import sample

    code = sample.main(["--stage", "movq", "--checkpoint", str(tmp_path / "nope"), "--input",
                        str(SHARED_DATA / "carphone_pristine.mp4"), "--out", str(tmp_path / "o.mp4")])
    assert code == 2 and "nope" in capsys.readouterr().err


def test_load_movq_refuses_another_stage(tmp_path, tiny_run):
    from kvideo.inference import checkpoints as ckpt

    last = ckpt.latest_checkpoint(tiny_run)
    ae = load_movq(last)
    assert not ae.training
    assert ae.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 8, 8)
    cfg_file = last / "config.yaml"
    cfg_file.write_text(cfg_file.read_text().replace("stage: movq", "stage: t2i"))
    with pytest.raises(ValueError, match="expected a movq checkpoint"):
        load_movq(last)


def test_movq_stage_uses_lpips_from_a_local_file(tmp_path, shapes_shards):
    from safetensors.torch import save_file

    from kvideo.models.lpips import expected_shapes

    weights = tmp_path / "lpips.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({k: torch.rand(shape, generator=gen) * 0.1 for k, shape in expected_shapes().items()}, str(weights))
    run = tmp_path / "run"
    train(load_config([CONFIG], tiny_movq_overrides(run, shapes_shards, **{
        "train.max_steps": 1, "recipe.lpips_weights": str(weights), "train.eval_every": 0})))
    assert '"ae/lpips"' in (run / "metrics.jsonl").read_text()
