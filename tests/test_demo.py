"""`make demo` end to end on a tiny budget: renders, trains all five stages, samples, scores,
and a second run reuses everything."""

import json

from omegaconf import OmegaConf

from conftest import tiny_movq_overrides, tiny_t2i_overrides
from test_interpolation import tiny_interpolation_overrides
from test_keyframe import tiny_keyframe_overrides
from test_video_decoder import overrides as video_decoder_overrides

OWN = ("run_dir", "data.shards", "data.val_shards", "recipe.movq", "recipe.init_from")  # the demo sets these


def tiny(overrides: list) -> list:
    return [o for o in overrides if o.split("=", 1)[0] not in OWN]


def test_demo_trains_every_stage_and_scores_videos(tmp_path, capsys):
    from tools import demo

    x = tmp_path / "unused"
    budget = {
        "data": {"train_clips": 16, "val_clips": 4, "size": 32},
        "stages": {
            "movq": {"config": "configs/movq/shapes.yaml",
                     "overrides": tiny(tiny_movq_overrides(x, x, **{"train.max_steps": 2}))},
            "t2i": {"config": "configs/t2i/shapes.yaml", "overrides": tiny(tiny_t2i_overrides(x, x, x))},
            "keyframe": {"config": "configs/keyframe/shapes.yaml",
                         "overrides": tiny(tiny_keyframe_overrides(x, x, x, x))},
            "interpolation": {"config": "configs/interpolation/shapes.yaml",
                              "overrides": tiny(tiny_interpolation_overrides(x, x, x, x))},
            "video_decoder": {"config": "configs/video_decoder/shapes.yaml",
                              "overrides": tiny(video_decoder_overrides(x, x, x, **{"train.preview_every": 0}))},
        },
        "pipeline": {"first_frame_scale": 1, "decode_window": 8, "decode_overlap": 2},
        "samples": {"per_split": 1},
    }
    path = tmp_path / "budget.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(budget)))
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--budget", str(path)]) == 0
    for stage in demo.ORDER:
        assert (out / "runs" / stage / "checkpoints" / "latest").is_file(), stage
    result = json.loads((out / "samples" / "results.json").read_text())
    assert result["prompts"] == 2 and sorted((out / "samples" / "videos").glob("*.mp4"))
    printed = capsys.readouterr().out
    assert "| seen | 1 |" in printed and "contact sheet" in printed
    # a second run reuses the data and the finished runs
    assert demo.main(["--out", str(out), "--budget", str(path)]) == 0
    assert "reusing ShapesWorld train split" in capsys.readouterr().out


def test_demo_budget_errors(tmp_path, capsys):
    from tools import demo

    path = tmp_path / "budget.yaml"
    path.write_text("stages: {movq: {config: configs/movq/shapes.yaml}}\n")
    assert demo.main(["--out", str(tmp_path / "d"), "--budget", str(path)]) == 2
    assert "stages.t2i is missing" in capsys.readouterr().err


def test_the_shipped_demo_budget_names_real_configs():
    from tools import demo

    budget = demo.read_budget(demo.ROOT / "configs" / "demo" / "shapes.yaml")
    for stage in demo.ORDER:
        assert (demo.ROOT / budget["stages"][stage]["config"]).is_file(), stage
