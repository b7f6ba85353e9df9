"""`make demo` end to end on a tiny budget: renders, trains all five stages, samples, scores,
and a second run reuses everything."""

import json
from types import SimpleNamespace

import pytest

from omegaconf import OmegaConf

from kvideo.inference.checkpoints import latest_checkpoint, read_config
from kvideo.pipeline import PipelineConfig
from kvideo.registry import load_config

from conftest import tiny_movq_overrides, tiny_t2i_overrides
from test_interpolation import tiny_interpolation_overrides
from test_keyframe import tiny_keyframe_overrides
from test_video_decoder import overrides as video_decoder_overrides

OWN = ("run_dir", "data.shards", "data.val_shards", "recipe.movq", "recipe.init_from")  # the demo sets these


def tiny(overrides: list) -> list:
    return [o for o in overrides if o.split("=", 1)[0] not in OWN]


def tiny_budget(tmp_path) -> dict:
    x = tmp_path / "unused"
    return {
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


@pytest.mark.slow
def test_demo_trains_every_stage_and_scores_videos(tmp_path, capsys):
    from tools import demo

    budget = tiny_budget(tmp_path)
    # an arm that changes only the cascade's settings samples the base's runs
    budget["arms"] = {"mg": {"pipeline": {"sampling": {"keyframe": {"motion_guidance": 1.0}}}}}
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
    assert not (out / "arms" / "mg" / "runs").exists() and (out / "arms" / "mg" / "samples" / "results.json").is_file()
    base, mg = (OmegaConf.load(out / "pipelines" / f"{arm}.yaml") for arm in ("base", "mg"))
    assert base.keyframe == mg.keyframe and mg.sampling.keyframe.motion_guidance == 1.0 and "sampling" not in base
    report = json.loads((out / "report.json").read_text())
    params = report["mg"]["params"]
    assert params == report["base"]["params"] and 0 < params["keyframe"]["temporal"] < params["keyframe"]["total"]
    assert "temporal)" in printed  # the parameters column
    # a second run reuses the data and the finished runs
    assert demo.main(["--out", str(out), "--budget", str(path)]) == 0
    assert "reusing ShapesWorld train split" in capsys.readouterr().out


def test_arms_train_what_they_change_and_what_depends_on_it(tmp_path):
    from tools import demo

    budget = {"arms": {"kf": {"keyframe": ["train.lr=1e-3"]}, "img": {"t2i": ["train.lr=1e-3"]},
                       "ae": {"movq": ["train.lr=1e-3"]}}}
    out = tmp_path / "out"
    own = {arm: sorted(s for s, run in demo.arm_runs(budget, arm, out).items() if "arms" in run.parts)
           for arm in ("base", "kf", "img", "ae")}
    assert own == {"base": [], "kf": ["keyframe"], "img": ["interpolation", "keyframe", "t2i"],
                   "ae": sorted(demo.ORDER)}
    assert demo.arm_runs(budget, "kf", out)["t2i"] == out / "runs" / "t2i"


def test_every_stage_overrides_follow_the_budget_and_the_arm_in_every_training_command(tmp_path, monkeypatch):
    from tools import demo

    budget = tiny_budget(tmp_path)
    budget["arms"] = {"lr_hi": {"t2i": ["train.lr=1.0e-3"]}}
    path = tmp_path / "budget.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(budget)))
    commands = []
    monkeypatch.setattr(demo, "render", lambda split_dir, *args: split_dir.mkdir(parents=True, exist_ok=True))
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd: commands.append(cmd) or SimpleNamespace(returncode=0))
    monkeypatch.setattr(demo, "stage_params", lambda runs: {})
    assert demo.main(["--out", str(tmp_path / "exp"), "--budget", str(path), "--until", "t2i",
                      "--every-stage", "train.channels_last=true", "--every-stage", "train.lr=2e-4"]) == 0
    assert len(commands) == 3  # movq and t2i of the base, the arm's t2i
    for cmd in commands:
        assert cmd[-2:] == ["train.channels_last=true", "train.lr=2e-4"]  # last: they win over the budget's
    assert "train.lr=1.0e-3" in commands[2]


def test_a_stage_that_stops_unfinished_stops_the_demo(tmp_path, monkeypatch, capsys):
    # train.py exits 143 after SIGTERM (a checkpoint, not finished): the next stage must not
    # start from it, as t2i did from a MoVQ stopped at step 320 of 1000 while the code exited 0
    from tools import demo

    path = tmp_path / "budget.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(tiny_budget(tmp_path))))
    commands = []
    monkeypatch.setattr(demo, "render", lambda split_dir, *args: split_dir.mkdir(parents=True, exist_ok=True))
    monkeypatch.setattr(demo.subprocess, "run", lambda cmd: commands.append(cmd) or SimpleNamespace(returncode=143))
    assert demo.main(["--out", str(tmp_path / "exp"), "--budget", str(path), "--until", "t2i"]) == 143
    assert len(commands) == 1 and "configs/movq" in commands[0][2]
    assert "stage movq stopped with exit code 143" in capsys.readouterr().err


@pytest.mark.slow
def test_an_experiment_runs_its_arms_on_shared_stages_and_evaluates_them(tmp_path, capsys):
    from tools import demo

    budget = tiny_budget(tmp_path)
    budget["arms"] = {"lr_hi": {"t2i": ["train.lr=1.0e-3"]}}
    budget["evaluate"] = {"t2i": ["--all-checkpoints", "--per-prompt", "1", "--steps", "1"]}
    path = tmp_path / "budget.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(budget)))
    out = tmp_path / "exp"
    assert demo.main(["--out", str(out), "--budget", str(path), "--until", "t2i"]) == 0
    assert (out / "runs" / "movq" / "checkpoints" / "latest").is_file()
    assert not (out / "arms" / "lr_hi" / "runs" / "movq").exists()  # shared, trained once
    for home in (out, out / "arms" / "lr_hi"):
        assert (home / "runs" / "t2i" / "checkpoints" / "latest").is_file()
        assert json.loads((home / "eval" / "t2i" / "results.json").read_text())[-1]["step"] == 3
        assert not (home / "samples").exists()  # --until: no cascade
    lrs = [read_config(latest_checkpoint(home / "runs" / "t2i"))["train"]["lr"] for home in (out, out / "arms" / "lr_hi")]
    assert lrs == [5.0e-4, 1.0e-3]
    report = json.loads((out / "report.json").read_text())
    assert report["base"]["scores"]["movq"][0].startswith("step 2: eval/psnr ")  # logged while training
    assert report["lr_hi"]["minutes"]["movq"] == report["base"]["minutes"]["movq"] > 0  # one run, counted in both
    assert report["lr_hi"]["scores"]["t2i"][-1].startswith("step 3; seen:")
    printed = capsys.readouterr().out
    assert "| lr_hi |" in printed and "| base |" in printed
    assert demo.main(["--out", str(out), "--budget", str(path), "--arms", "nope"]) == 2


def test_an_experiment_extends_a_budget(tmp_path):
    from tools import demo

    child = tmp_path / "exp.yaml"
    child.write_text("extends: configs/demo/shapes.yaml\nstages:\n  keyframe:\n    overrides: [train.max_steps=7]\n"
                     "arms:\n  a: {keyframe: [train.lr=1.0e-3]}\n")
    budget = demo.read_budget(child)
    parent = demo.read_budget(demo.ROOT / "configs" / "demo" / "shapes.yaml")
    assert budget["stages"]["keyframe"] == {"config": parent["stages"]["keyframe"]["config"],
                                            "overrides": ["train.max_steps=7"]}  # a list is replaced whole
    assert budget["stages"]["movq"] == parent["stages"]["movq"] and budget["data"] == parent["data"]
    assert budget["arms"] == {"a": {"keyframe": ["train.lr=1.0e-3"]}} and "extends" not in budget
    child.write_text("extends: configs/demo/shapes.yaml\narms:\n  a: {keyframes: [x=1]}\n")
    with pytest.raises(ValueError, match="arms.a.keyframes is not a stage"):
        demo.read_budget(child)
    child.write_text("extends: configs/demo/shapes.yaml\narms:\n  a: {keyframe: [x=1]}\n  b: {runs_of: a}\n"
                     "  c: {runs_of: b}\n")
    with pytest.raises(ValueError, match="arms.c.runs_of"):
        demo.read_budget(child)
    child.write_text("extends: configs/demo/shapes.yaml\narms:\n  a: {keyframe: [x=1]}\n  b: {runs_of: a}\n")
    budget = demo.read_budget(child)
    assert demo.arm_runs(budget, "b", tmp_path) == demo.arm_runs(budget, "a", tmp_path)  # a sampling variant
    assert demo.stage_command("keyframe", {"config": "c.yaml", "overrides": ["recipe.lora.base={out}/runs/keyframe"]},
                              tmp_path)[-1] == f"recipe.lora.base={tmp_path}/runs/keyframe"
    child.write_text("extends: configs/demo/shapes.yaml\nevaluate: {movq: [--x]}\n")
    with pytest.raises(ValueError, match="evaluate.movq: no evaluation tool"):
        demo.read_budget(child)
    for tool in demo.EVALUATORS.values():
        assert (demo.ROOT / "tools" / tool).is_file(), tool


def test_demo_budget_errors(tmp_path, capsys):
    from tools import demo

    path = tmp_path / "budget.yaml"
    path.write_text("stages: {movq: {config: configs/movq/shapes.yaml}}\n")
    assert demo.main(["--out", str(tmp_path / "d"), "--budget", str(path)]) == 2
    assert "stages.t2i is missing" in capsys.readouterr().err


def test_the_shipped_budgets_name_real_configs():
    from tools import demo

    budgets = [*(demo.ROOT / "configs" / "demo").glob("*.yaml"), *(demo.ROOT / "configs" / "experiments").glob("*.yaml")]
    assert len(budgets) >= 3
    for path in sorted(budgets):
        budget = demo.read_budget(path)
        for stage in demo.ORDER:
            assert (demo.ROOT / budget["stages"][stage]["config"]).is_file(), (path, stage)
        # every override of every stage and arm is a key its config schema knows (load_config refuses others)
        for arm, changes in {"base": {}, **(budget.get("arms") or {})}.items():
            for stage in demo.ORDER:
                spec = budget["stages"][stage]
                stage_overrides = [*spec.get("overrides", []), *changes.get(stage, [])]
                load_config([demo.ROOT / spec["config"]], [o.replace("{out}", "OUT") for o in stage_overrides],
                            require_complete=False)
            if "pipeline" in changes:
                PipelineConfig(**{**budget.get("pipeline", {}), **changes["pipeline"], "keyframe": "x"})


@pytest.mark.slow
def test_a_factorized_experiment_trains_lora_on_the_base_run_and_samples_it_twice(tmp_path, capsys):
    """configs/experiments/fvg.yaml's machinery on a tiny budget: a text-to-video base without
    first frames, a LoRA arm over the base's own keyframe run ({out}), and a sampling variant of
    that arm (runs_of) that trains nothing."""
    from tools import demo

    budget = tiny_budget(tmp_path)
    budget["stages"]["keyframe"]["config"] = "configs/keyframe/shapes_t2v.yaml"
    budget["pipeline"]["first_frame_model"] = "none"
    lora = ["recipe.init_from=null", "recipe.lora.base={out}/runs/keyframe", "recipe.lora.enabled=true",
            "recipe.lora.rank=2", "recipe.anchor.enabled=true", "recipe.anchor.timestep=true"]
    budget["arms"] = {"fvg": {"keyframe": lora, "pipeline": {"first_frame_model": "t2i", "rewriter": "shapesworld"}},
                      "fvg_fast": {"runs_of": "fvg", "pipeline": {"first_frame_model": "t2i",
                                                                  "sampling": {"keyframe": {"sampler": "ddim"}}}}}
    path = tmp_path / "budget.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(budget)))
    out = tmp_path / "exp"
    assert demo.main(["--out", str(out), "--budget", str(path)]) == 0
    assert read_config(latest_checkpoint(out / "arms" / "fvg" / "runs" / "keyframe"))["recipe"]["lora"]["base"] \
        == str(out / "runs" / "keyframe")
    assert not (out / "arms" / "fvg_fast" / "runs").exists()  # fvg's runs, sampled with other settings
    pipelines = {arm: OmegaConf.load(out / "pipelines" / f"{arm}.yaml") for arm in ("base", "fvg", "fvg_fast")}
    assert "t2i" not in pipelines["base"] and pipelines["fvg"].t2i == pipelines["fvg_fast"].t2i
    assert pipelines["fvg"].keyframe == pipelines["fvg_fast"].keyframe == str(out / "arms" / "fvg" / "runs" / "keyframe")
    for arm in ("fvg", "fvg_fast"):
        assert json.loads((out / "arms" / arm / "samples" / "results.json").read_text())["prompts"] == 2
    report = json.loads((out / "report.json").read_text())
    assert report["fvg_fast"]["minutes"]["keyframe"] == report["fvg"]["minutes"]["keyframe"]
    assert 0 < report["fvg"]["params"]["keyframe"]["lora"] < report["fvg"]["params"]["keyframe"]["total"] / 10
    assert "lora" not in report["base"]["params"]["keyframe"] and "s/video" in report["fvg"]["scores"]["cascade"][0]


def test_a_world_is_scored_by_its_own_evaluator_and_prepare_steps_are_checked(tmp_path):
    from tools import demo

    child = tmp_path / "child.yaml"
    for text, match in [("data: {world: characters}", "scored by its own evaluator"),
                        ("samples: {evaluator: characters}", "scored by its own evaluator"),
                        ("data: {world: v3}", "one of shapes, characters"),
                        ("prepare: [{run: [tools/x.py]}]", r"prepare\[0\] needs run"),
                        ("arms: {a: {sample_arguments: [--x]}}", "arms.a.sample_arguments is not a stage")]:
        child.write_text(f"extends: configs/demo/shapes.yaml\n{text}\n")
        with pytest.raises(ValueError, match=match):
            demo.read_budget(child)
    child.write_text("extends: configs/demo/shapes.yaml\ndata: {world: characters}\nsamples: {evaluator: characters}\n"
                     "arms: {refs: {sample_args: [--identity, reference]}}\n")
    budget = demo.read_budget(child)
    assert demo.arm_runs(budget, "refs", tmp_path) == demo.arm_runs(budget, "base", tmp_path)  # sampling only
    # a prepare step runs once: its `creates` file marks it done
    budget = {"prepare": [{"run": ["tools/nonexistent.py"], "creates": "{out}/done.txt"}]}
    (tmp_path / "done.txt").write_text("")
    demo.prepare(budget, tmp_path)  # skipped: the script would fail


@pytest.mark.slow
def test_an_identity_experiment_renders_v2_prepares_its_encoder_and_scores_each_arm(tmp_path, capsys):
    """configs/experiments/identity.yaml's machinery on a tiny budget: a v2 world (train, val and
    test splits), the identity encoder trained once by a prepare step, an identity-attention arm
    with the identity loss scored with references, and a base-runs arm scored with composed first
    frames."""
    from tools import demo

    budget = tiny_budget(tmp_path)
    budget["data"] = {"world": "characters", "train_clips": 12, "val_clips": 4, "test_clips": 24, "size": 32,
                      "num_frames": 16}
    budget["samples"] = {"evaluator": "characters", "per_split": 1}
    budget["pipeline"]["fps_preset"] = "low"
    budget["prepare"] = [{"run": ["tools/train_identity_encoder.py", "--train", "{out}/data/train", "--test",
                                  "{out}/data/test", "--out", "{out}/encoder.safetensors", "--size", "32",
                                  "--steps", "3", "--batch-size", "8"],
                          "creates": "{out}/encoder.safetensors"}]
    references = "data.references={out}/data/train/references"
    for stage in ("t2i", "keyframe"):
        budget["stages"][stage]["overrides"] = [*budget["stages"][stage]["overrides"], references]
    identity = ["model.identity_attention=[false,true]"]
    budget["arms"] = {"loss": {"t2i": [*identity, "recipe.identity.loss_weight=0.1", "recipe.identity.loss_max_t=1000",
                                       "recipe.identity.encoder_weights={out}/encoder.safetensors"],
                               "keyframe": identity, "sample_args": ["--identity", "reference"]},
                      "composed": {"sample_args": ["--first-frame", "reference"]}}
    path = tmp_path / "budget.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(budget)))
    out = tmp_path / "exp"
    assert demo.main(["--out", str(out), "--budget", str(path)]) == 0
    assert (out / "data" / "test" / "references" / "Pip.png").is_file() and (out / "encoder.safetensors").is_file()
    results = {arm: json.loads((home / "samples" / "results.json").read_text())
               for arm, home in (("base", out), ("loss", out / "arms" / "loss"), ("composed", out / "arms" / "composed"))}
    assert [r["identity"] for r in results.values()] == ["none", "reference", "none"]
    assert results["composed"]["first_frame"] == "reference" and not (out / "arms" / "composed" / "runs").exists()
    assert '"t2i/identity_loss"' in (out / "arms" / "loss" / "runs" / "t2i" / "metrics.jsonl").read_text()
    assert "single_held_out: identity" in capsys.readouterr().out  # the table's cascade scores
