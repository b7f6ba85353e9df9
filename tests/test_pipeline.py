"""The whole cascade on tiny trained stages: shapes, fps, determinism, image-to-video, the
negative prompt, outputs that decode back, and clear errors for wrong checkpoints."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kvideo.registry import load_config
from kvideo.data.video_io import probe, read_video
from kvideo.pipeline import Pipeline, load_pipeline_config, write_outputs
from kvideo.train.engine import train

from conftest import ROOT
from test_interpolation import CONFIG as INTERPOLATION_CONFIG, tiny_interpolation_overrides
from test_keyframe import KEYFRAME_CONFIG, tiny_keyframe_overrides
from test_video_decoder import CONFIG as VIDEO_DECODER_CONFIG, overrides as video_decoder_overrides

PROMPTS = ["a red circle moving left quickly on a black background", "a blue square moving up slowly on a gray background"]


@pytest.fixture(scope="module")
def cascade(tmp_path_factory, shapes_shards, movq_run, t2i_run) -> Path:
    """A pipeline YAML naming tiny trained runs of every stage."""
    root = tmp_path_factory.mktemp("cascade")
    runs = {"keyframe": root / "keyframe", "interpolation": root / "interpolation", "video_decoder": root / "vdec"}
    train(load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(runs["keyframe"], shapes_shards, movq_run, t2i_run)))
    train(load_config([INTERPOLATION_CONFIG], tiny_interpolation_overrides(runs["interpolation"], shapes_shards,
                                                                           movq_run, t2i_run)))
    train(load_config([VIDEO_DECODER_CONFIG], video_decoder_overrides(runs["video_decoder"], shapes_shards, movq_run,
                                                                      **{"train.preview_every": 0})))
    yaml = root / "pipeline.yaml"
    yaml.write_text("\n".join([f"t2i: {t2i_run}"] + [f"{k}: {v}" for k, v in runs.items()]
                              + ["first_frame_scale: 2", "decode_window: 8", "decode_overlap: 2"]) + "\n")
    return yaml


def test_cascade_shapes_fps_determinism_and_timings(cascade):
    pipe = Pipeline.from_config(cascade)
    out = pipe(PROMPTS, seed=3, fps_preset="medium", progress=False)
    assert out.frames.shape == (2, 3, 13, 32, 32)  # 4 keyframes -> 4 * 4 - 3 frames, one pass
    assert out.fps == 48.0  # 12-fps keyframes, 3 new frames per gap
    assert out.frames.abs().max() <= 1.0
    assert out.keyframes.shape == (2, 3, 4, 32, 32) and out.first_frames.shape == (2, 3, 32, 32)
    assert set(out.timings) == {"first frame", "keyframes", "interpolation", "decode"}
    assert out.settings["first_frame"]["size"] == [64, 64]  # the t2i image at 2x, then fitted
    again = pipe(PROMPTS, seed=3, fps_preset="medium", progress=False)
    assert torch.equal(out.frames, again.frames)
    assert not torch.equal(out.frames, pipe(PROMPTS, seed=4, fps_preset="medium", progress=False).frames)
    low = pipe(PROMPTS[:1], seed=3, fps_preset="low", progress=False)
    assert low.frames.shape[2] == 4 and low.fps == 12.0 and "interpolation" not in low.timings
    assert pipe(PROMPTS[:1], seed=3, num_keyframes=3, progress=False).frames.shape[2] == 9
    with pytest.raises(ValueError, match="trained for 1 pass"):
        pipe(PROMPTS[:1], fps_preset="high", progress=False)
    with pytest.raises(ValueError, match="argument 'fps' is now 'fps_preset'"):
        pipe(PROMPTS[:1], fps="high", progress=False)
    with pytest.raises(ValueError, match="unknown motion preset 'normal'"):
        pipe(PROMPTS[:1], motion_score="normal", progress=False)
    per_prompt = pipe(PROMPTS, seed=3, motion_score=["fast", 0.0], progress=False)
    assert per_prompt.settings["keyframes"]["motion_score"][1] == 0.0
    assert pipe.settings(motion_score=["fast", 0.0], seed=3) == per_prompt.settings  # what the call ran, unsampled
    with pytest.raises(ValueError, match="2 motion scores for 1 prompts"):
        pipe(PROMPTS[:1], motion_score=["fast", "slow"], progress=False)
    t2v = pipe(PROMPTS, seed=3, first_frame=False, progress=False)  # plain text-to-video keyframes
    assert "first frame" not in t2v.timings and t2v.settings["first_frame"] == {"source": "none"}
    assert torch.equal(t2v.first_frames, t2v.keyframes[:, :, 0])


def test_image_to_video_and_the_negative_prompt(cascade):
    pipe = Pipeline.from_config(cascade, ["t2i=null"])
    image = torch.linspace(-1, 1, 3 * 48 * 64).reshape(1, 3, 48, 64)
    out = pipe(PROMPTS[:1], image=image, seed=0, progress=False)
    assert out.first_frames.shape == (1, 3, 32, 32) and out.settings["first_frame"] == {"source": "image"}
    with pytest.raises(ValueError, match="no t2i checkpoint"):
        pipe(PROMPTS[:1], progress=False)
    plain = pipe(PROMPTS[:1], image=image, seed=0, progress=False).frames
    negative = pipe(PROMPTS[:1], image=image, seed=0, negative_prompt="a green triangle", progress=False).frames
    assert not torch.equal(plain, negative)  # the negative prompt is used


def test_outputs_decode_back(cascade, tmp_path):
    out = Pipeline.from_config(cascade)(PROMPTS, seed=0, progress=False)
    paths = write_outputs(out, [tmp_path / "a.mp4", tmp_path / "b.mp4"], gif=True, sheet=True)
    assert {p.suffix for p in paths} == {".mp4", ".gif", ".png"} and all(p.is_file() for p in paths)
    frames, _ = read_video(tmp_path / "a.mp4")
    assert frames.shape == (13, 32, 32, 3) and abs(probe(tmp_path / "a.mp4")["fps"] - 48.0) < 1e-6
    gif = Image.open(tmp_path / "a.gif")  # Pillow merges identical neighbours: count the time
    durations = []
    for i in range(gif.n_frames):
        gif.seek(i)
        durations.append(gif.info["duration"])
    assert sum(durations) == 13 * 20  # 48 fps -> 2 centiseconds a frame


def test_sample_py_pipeline_prompts_file(cascade, tmp_path, capsys):
    import sample

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    code = sample.main(["--pipeline", str(cascade), "--prompts-file", str(prompts), "--out-dir", str(tmp_path / "v"),
                        "--seed", "1", "--motion-score", "fast", "--fps-preset", "low", "--sheet", "--frames", "3",
                        "--call", "keyframe_steps=1", "--call", "text_guidance=9", "--text-guidance", "3"])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == ["000.json", "000.mp4", "000.png", "001.json",
                                                                  "001.mp4", "001.png"]
    assert "keyframes" in capsys.readouterr().out
    record = json.loads((tmp_path / "v" / "001.json").read_text())
    assert record["prompt"] == PROMPTS[1] and record["frames"] == 3 == probe(tmp_path / "v" / "001.mp4")["num_frames"]
    kf = record["settings"]["keyframes"]
    assert (kf["steps"], kf["text_guidance"], kf["num_keyframes"]) == (1, 3, 3)  # the flag wins over --call
    assert record["settings"]["interpolation"] == {"passes": 0}
    assert sample.main(["--pipeline", str(cascade), "--prompt", "x", "--out", str(tmp_path / "c.mp4"),
                        "--call", "keyframe_stepz=3"]) == 2
    assert "--call keyframe_stepz: not a pipeline argument" in capsys.readouterr().err
    image = tmp_path / "first.png"
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(image)
    assert sample.main(["--pipeline", str(cascade), "--prompt", PROMPTS[0], "--out", str(tmp_path / "i.mp4"),
                        "--image", str(image), "t2i=null"]) == 0
    assert sample.main(["--pipeline", str(tmp_path / "missing.yaml"), "--prompt", "x", "--out", "y.mp4"]) == 2
    assert "missing.yaml" in capsys.readouterr().err


def test_wrong_checkpoints_are_named(cascade, t2i_run, movq_run):
    with pytest.raises(ValueError, match=f"'{t2i_run}.*from stage 't2i', expected a keyframe checkpoint"):
        Pipeline.from_config(cascade, [f"keyframe={t2i_run}"])
    with pytest.raises(ValueError, match="expected a video_decoder checkpoint"):
        Pipeline.from_config(cascade, [f"video_decoder={movq_run}"])
    with pytest.raises(ValueError, match="fps_preset must be one of"):
        load_pipeline_config(cascade, ["fps_preset=fast"])
    with pytest.raises(ValueError, match="key 'fps' is now 'fps_preset'"):  # the renamed key is named
        load_pipeline_config(cascade, ["fps=low"])


def test_pipeline_config_overrides_a_stage_sampling(cascade):
    pipe = Pipeline.from_config(cascade, ["sampling.keyframe.steps=1", "sampling.keyframe.text_guidance=2.5",
                                          "sampling.keyframe.timestep_shift=2"])
    out = pipe(PROMPTS[:1], seed=3, fps_preset="low", progress=False)
    assert out.settings["keyframes"]["steps"] == 1 and out.settings["keyframes"]["text_guidance"] == 2.5
    assert out.settings["keyframes"]["timestep_shift"] == 2
    assert out.settings["first_frame"]["steps"] == pipe.t2i.cfg.recipe.sampling.steps  # other stages untouched
    # the tiny keyframe model predicts eps, which cannot start at the zero-SNR timestep
    with pytest.raises(ValueError, match="start at the zero-SNR timestep 999"):
        Pipeline.from_config(cascade, ["sampling.keyframe.spacing=trailing"])(PROMPTS[:1], fps_preset="low", progress=False)
    with pytest.raises(ValueError, match="sampling.keyframe.spacin is not a sampling setting"):
        Pipeline.from_config(cascade, ["sampling.keyframe.spacin=trailing"])
    with pytest.raises(ValueError, match="sampling.keyframe.steps = 'many'"):
        Pipeline.from_config(cascade, ["sampling.keyframe.steps=many"])
    with pytest.raises(ValueError, match="sampling.video_decoder is not a stage"):
        load_pipeline_config(cascade, ["sampling.video_decoder.steps=2"])


def test_compile_compiles_each_network_once(cascade, monkeypatch):
    """`compile: true` hands every network of the cascade to compile_blocks once (that compiled
    blocks compute what eager ones do: tests/test_compile.py)."""
    import kvideo.pipeline as pipeline

    compiled = []
    monkeypatch.setattr(pipeline, "compile_blocks", lambda net: compiled.append(net) or 0)
    Pipeline.from_config(cascade)
    assert compiled == []
    pipe = Pipeline.from_config(cascade, ["compile=true"])
    networks = [pipe.t2i.denoiser, pipe.t2i.movq, pipe.keyframe.denoiser, pipe.movq, pipe.interpolation.denoiser,
                pipe.interpolation.movq, pipe.decoder]
    assert {id(n) for n in compiled} == {id(n) for n in networks}
    assert len(compiled) == len({id(n) for n in compiled})


def test_the_shipped_pipeline_configs_load():
    for name in ("shapes", "kandinsky"):
        cfg = load_pipeline_config(ROOT / "configs" / "pipeline" / f"{name}.yaml")
        assert cfg.keyframe and cfg.interpolation and cfg.video_decoder and cfg.t2i


def test_evaluate_shapes_scores_the_cascade(cascade, tmp_path, capsys):
    import json

    from tools import evaluate_shapes

    out = tmp_path / "eval"
    assert evaluate_shapes.main(["--pipeline", str(cascade), "--limit", "1", "--batch", "2", "--save-videos", "1",
                                 "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["prompts"] == 2 and result["seen"]["n"] == 1 and result["held_out"]["n"] == 1
    assert set(result["seen"]["accuracy"]) == {"background", "color", "shape", "direction", "speed"}
    assert result["frames"] == 13 and result["video_fps"] == 48.0
    assert {v["requested"] for v in result["videos"]} <= {"still", "slow", "fast"}
    assert (out / "sheet.png").is_file() and (out / "videos" / "000.mp4").is_file()
    assert "| seen | 1 |" in capsys.readouterr().out
    assert evaluate_shapes.main(["--pipeline", str(cascade), "--limit", "1", "--save-videos", "0", "--out",
                                 str(tmp_path / "t2v"), "--call", "first_frame=false", "--call", "image_guidance=3"]) == 0
    result = json.loads((tmp_path / "t2v" / "results.json").read_text())
    assert result["call"] == {"first_frame": False, "image_guidance": 3} and result["all"]["frame0_psnr"] is None
    assert all(v["first_frame_fits"] is None for v in result["videos"]) and result["all"]["first_frame_fits"] is None
    assert evaluate_shapes.main(["--pipeline", str(cascade), "--call", "seed=3", "--out", str(out)]) == 2
    assert "not a pipeline argument here" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("a purple hexagon\n")
    assert evaluate_shapes.main(["--pipeline", str(cascade), "--prompts", str(bad), "--out", str(out)]) == 2
    assert "line 1" in capsys.readouterr().err


def test_evaluate_shapes_adds_the_fields_metrics_when_weights_are_given(cascade, tmp_path):
    import json

    import torch
    from torchvision.models.optical_flow import raft_small

    from tools import evaluate_shapes

    torch.manual_seed(0)
    torch.save(raft_small(weights=None).state_dict(), tmp_path / "raft.pth")
    out = tmp_path / "eval"
    assert evaluate_shapes.main(["--pipeline", str(cascade), "--limit", "1", "--save-videos", "0",
                                 "--raft", str(tmp_path / "raft.pth"), "--out", str(out)]) == 0
    result = json.loads((out / "results.json").read_text())
    metrics = result["metrics"]
    assert set(metrics["settings"]["metrics"]) == {"flow", "warp"} and metrics["settings"]["videos"] == 2
    assert metrics["flow_score"] >= 0 and set(metrics["per_video"]) == {"000.mp4", "001.mp4"}
    assert json.loads((out / "videos" / "001.json").read_text())["prompt"] == result["videos"][1]["prompt"]
    assert "flow_score" in (out / "results.md").read_text()
    # a missing weights file fails before any video is sampled
    assert evaluate_shapes.main(["--pipeline", str(cascade), "--raft", str(tmp_path / "nope.pth"),
                                 "--out", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none" / "videos").exists()


def test_evaluate_shapes_splits_direction_by_first_frame_room():
    from tools.evaluate_shapes import markdown, summarise

    def video(fits, direction_ok, requested="fast"):
        correct = {a: True for a in ("background", "color", "shape", "speed")}
        return {"correct": {**correct, "direction": direction_ok}, "all_correct": direction_ok, "area_cv": 0.1,
                "color_drift": 1.0, "background_flicker": 0.5, "frame0_psnr": 30.0, "requested": requested, "speed_px_per_24fps_frame": 0.8,
                "first_frame_fits": fits}

    rows = [video(True, True), video(True, True), video(True, False), video(False, False), video(None, True, "still")]
    s = summarise(rows)
    assert s["first_frame_fits"] == 0.75  # the still prompt is not judged
    assert s["direction_if_first_frame_fits"] == {"n": 3, "accuracy": 2 / 3}
    assert s["direction_if_first_frame_not"] == {"n": 1, "accuracy": 0.0}
    assert "| 75% | 67% (3) / 0% (1) |" in markdown({"seen": s})


def test_run_ablations_table_with_a_training_ablation(cascade, tmp_path, capsys):
    import json

    from tools import run_ablations

    ablations = ROOT / "configs" / "ablations"
    files = [ablations / "first_frame_none.yaml", ablations / "image_guidance_3.yaml", ablations / "noise_aug_off.yaml",
             ablations / "motion_still.yaml", ablations / "first_frame_generated.yaml", ablations / "noise_aug_on.yaml",
             ablations / "image_guidance_2.yaml"]
    out = tmp_path / "abl"
    assert run_ablations.main(["--pipeline", str(cascade), "--ablations", *map(str, files), "--limit", "1",
                               "--out", str(out)]) == 0
    rows = json.loads((out / "ablations.json").read_text())
    assert [r["name"] for r in rows] == ["generated first frame", "no first frame (text-to-video)", "w_I = 2",
                                         "w_I = 3", "still", "off", "on"]
    # the default cascade is the reference of three groups: sampled once, for the first; w_I = 2 is
    # the keyframe default, so its call resolves to the default cascade too
    assert rows[-1]["videos_of"] == rows[2]["videos_of"] == "first_frame_generated"
    assert not (out / "noise_aug_on").exists() and not (out / "image_guidance_2").exists()
    assert rows[3]["videos_of"] == "image_guidance_3"
    assert (out / "runs" / "noise_aug_off" / "checkpoints" / "latest").is_file()  # trained, then sampled
    variant = load_config([out / "runs" / "noise_aug_off" / "config.yaml"], require_complete=False)
    assert variant.recipe.noise_aug.enabled is False
    assert json.loads((out / "noise_aug_off" / "results.json").read_text())["overrides"][-1].startswith("keyframe=")
    assert "| first frame | no first frame" in (out / "ablations.md").read_text()
    capsys.readouterr()
    bad = tmp_path / "bad.yaml"
    bad.write_text("group: x\nname: y\ncolour: red\n")
    assert run_ablations.main(["--pipeline", str(cascade), "--ablations", str(bad), "--out", str(out)]) == 2
    assert "unknown keys ['colour']" in capsys.readouterr().err
    bad.write_text("group: x\nname: y\ncall: {keyframe_sampler: ddpm, fps: high}\n")
    assert run_ablations.main(["--pipeline", str(cascade), "--ablations", str(bad), "--out", str(out)]) == 2
    assert f"ablation '{bad}': --call fps: not a pipeline argument" in capsys.readouterr().err
    bad.write_text("group: x\nname: y\ncall: {passes: 2}\n")
    assert run_ablations.main(["--pipeline", str(cascade), "--ablations", str(bad), "--out", str(out)]) == 2
    assert f"ablation '{bad}': 2 interpolation pass(es) requested" in capsys.readouterr().err


def test_run_ablations_rows_gain_the_fields_metrics(cascade, tmp_path):
    import json

    import torch
    from torchvision.models.optical_flow import raft_small

    from tools import run_ablations

    torch.manual_seed(0)
    torch.save(raft_small(weights=None).state_dict(), tmp_path / "raft.pth")
    ablations = ROOT / "configs" / "ablations"
    out = tmp_path / "abl"
    assert run_ablations.main(["--pipeline", str(cascade), "--ablations", str(ablations / "image_guidance_3.yaml"),
                               str(ablations / "motion_still.yaml"), "--limit", "1", "--raft", str(tmp_path / "raft.pth"),
                               "--out", str(out)]) == 0
    rows = json.loads((out / "ablations.json").read_text())
    assert all(r["flow_score"] is not None and r["fvd"] is None for r in rows)
    assert " flow_score | warping_error |" in (out / "ablations.md").read_text().splitlines()[0]
    # one cache for every ablation's videos, by content: identical videos are computed once
    from kvideo.metrics.suite import sha256
    videos = {sha256(v)[:16] for v in out.glob("*/videos/*.mp4")}
    assert len(list(out.glob("*/videos/*.mp4"))) == 4
    assert {f.stem for f in (out / "features").glob("raft-*/*.npy")} == videos


def test_every_shipped_ablation_config_is_valid():
    from tools.run_ablations import read_ablation

    specs = [read_ablation(f) for f in sorted((ROOT / "configs" / "ablations").glob("*.yaml"))]
    assert {s["group"] for s in specs} == {"first frame", "noise augmentation (training)", "image guidance", "sampler",
                                           "motion score"}
