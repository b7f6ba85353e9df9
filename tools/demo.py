"""`make demo`: render ShapesWorld, train every stage of the cascade, sample and score videos.

    python tools/demo.py [--out out/demo] [--budget configs/demo/shapes.yaml] [--skip-train]
        [--arms A,B] [--until STAGE] [--every-stage KEY=VALUE ...]

The budget file names the data size, each stage's config with the overrides that fit the demo
in about an hour on 2 CPU cores, and how many canonical prompts of each split to sample. In
order: the ShapesWorld train and val splits are rendered into OUT/data; movq, t2i, keyframe,
interpolation and video_decoder are trained with train.py into OUT/runs/STAGE (each with its own
progress bar and ETA); OUT/pipeline.yaml names the five runs; the canonical prompts (seen and
held-out pairs) go through the whole cascade into OUT/samples/videos/*.mp4 (and a contact
sheet), scored by tools/evaluate_shapes.py. Re-running reuses what is finished: rendered data is
kept and train.py resumes each run (a finished run returns at once).

An experiment is a budget with `arms` (usually `extends: configs/demo/shapes.yaml`, whose values
it changes; a stage's `overrides` list is replaced whole): each arm adds overrides to some stages,

    arms:
      fast_temporal:
        keyframe: [train.lr=1.0e-3, recipe.spatial_lr_scale=0.3]

and is trained, sampled and scored in OUT/arms/ARM/ beside the base budget (arm "base", in OUT/);
an arm's `pipeline` map changes the cascade's pipeline settings only (e.g.
`pipeline: {sampling: {keyframe: {motion_guidance: 2.0}}}`, or `first_frame_model: keyframe`),
so an arm that changes nothing else samples the base's runs. Each arm's cascade is
OUT/pipelines/ARM.yaml. `runs_of: OTHER` makes an arm a sampling variant of arm OTHER (its runs,
the arm's own pipeline settings). In a stage override, `{out}` is OUT (an arm can start from another arm's
run: recipe.lora.base={out}/runs/keyframe).
An arm trains only the stages it changes and those that depend on them (keyframe and
interpolation start from the t2i run, every stage but the MoVQ from the MoVQ); the others are the
base's runs, trained once. `evaluate` names per-stage evaluations (the stage's tools/evaluate_*.py
with the given arguments), whose results.json lands in ARM_DIR/eval/STAGE. `--until STAGE` trains up to STAGE (and evaluates) without sampling the
cascade. The last lines are a table: per arm, the minutes of each stage, the parameters of each
stage's model and the scores.

`data.world: characters` renders ShapesWorld v2 (train, val and a test split with the held-out
characters, `data.test_clips`) and `samples.evaluator: characters` scores each arm with
tools/evaluate_characters.py on the test split, with the arm's `sample_args` (e.g.
[--identity, reference]). `prepare` lists commands run once after rendering, each skipped when
its `creates` file exists (e.g. training the identity loss's encoder on OUT/data).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("movq", "t2i", "keyframe", "interpolation", "video_decoder")
ARM_SETTINGS = ("pipeline", "runs_of", "sample_args")  # what an arm may set beside its stages' overrides
CASCADE_EVALUATORS = {"shapes": "evaluate_shapes", "characters": "evaluate_characters"}
DEPENDS = {"t2i": ("movq",), "keyframe": ("movq", "t2i"), "interpolation": ("movq", "t2i"), "video_decoder": ("movq",)}


WORLDS = ("shapes", "characters")  # budget data.world: ShapesWorld v1, or v2 with characters


def render(out: Path, num_clips: int, split: str, data: dict) -> None:
    """Render a ShapesWorld split of the budget's `data` section (world, size, num_frames) into `out`."""
    from kvideo.data.characters import CharactersSpec, write_characters
    from kvideo.data.shapesworld import ShapesWorldSpec, write_shapesworld

    world = data.get("world", "shapes")
    spec = dict(size=int(data.get("size", 64)), num_frames=int(data.get("num_frames", 48)), seed=0, split=split)
    if (out / "dataset.json").is_file():
        print(f"reusing ShapesWorld {split} split in {out}")
        return
    print(f"rendering {num_clips} ShapesWorld {'v2 ' if world == 'characters' else ''}clips ({split}) into {out}",
          flush=True)
    if world == "characters":
        write_characters(out, CharactersSpec(num_clips, **spec), workers=2)
    else:
        write_shapesworld(out, ShapesWorldSpec(num_clips, **spec), workers=2)


def prepare(budget: dict, out: Path) -> None:
    """Run the budget's `prepare` commands after the data is rendered, each once: a command whose
    `creates` file exists is skipped (e.g. training the identity loss's encoder on OUT/data)."""
    for step in budget.get("prepare") or []:
        creates = Path(str(step["creates"]).replace("{out}", str(out)))
        if creates.exists():
            print(f"reusing {creates}")
            continue
        script, *rest = [str(a).replace("{out}", str(out)) for a in step["run"]]
        cmd = [sys.executable, str(ROOT / script), *rest]
        print(f"\n== prepare\n+ {' '.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)


def read_budget(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"demo budget '{path}' does not exist")
    raw = OmegaConf.load(path)
    if raw.get("extends"):  # an experiment on top of another budget: its values under this one's
        parent = Path(raw.extends) if Path(raw.extends).is_absolute() else ROOT / raw.extends
        raw = OmegaConf.merge(OmegaConf.create(read_budget(parent)), raw)
        raw.pop("extends")
    budget = OmegaConf.to_container(raw)
    missing = [s for s in ORDER if s not in budget.get("stages", {})]
    if missing:
        raise ValueError(f"demo budget '{path}': stages.{missing[0]} is missing (every stage of {ORDER} is trained)")
    for arm, changes in (budget.get("arms") or {}).items():
        if arm == "base" or not isinstance(changes, dict):
            raise ValueError(f"demo budget '{path}': arms.{arm} must be a map of stage -> overrides (and not named base)")
        unknown = sorted(set(changes) - set(ORDER) - set(ARM_SETTINGS))
        if unknown:
            raise ValueError(f"demo budget '{path}': arms.{arm}.{unknown[0]} is not a stage ({', '.join(ORDER)}), "
                             f"{', '.join(ARM_SETTINGS)}")
        other = changes.get("runs_of")
        if other is not None and (other not in budget["arms"] or set(changes) - set(ARM_SETTINGS)
                                  or budget["arms"][other].get("runs_of")):
            raise ValueError(f"demo budget '{path}': arms.{arm}.runs_of must name another arm that trains its own "
                             f"runs ({other!r}), and the arm may then change only its pipeline and sample_args")
        if not isinstance(changes.get("pipeline", {}), dict):
            raise ValueError(f"demo budget '{path}': arms.{arm}.pipeline must be a map of pipeline settings")
    for i, step in enumerate(budget.get("prepare") or []):
        if not isinstance(step, dict) or not step.get("run") or not step.get("creates"):
            raise ValueError(f"demo budget '{path}': prepare[{i}] needs run (a script under the repository and its "
                             "arguments) and creates (the file it writes; it runs once)")
    world = budget.get("data", {}).get("world", "shapes")
    evaluator = budget.get("samples", {}).get("evaluator", "shapes")
    if world not in WORLDS or evaluator not in CASCADE_EVALUATORS or (evaluator == "characters") != (world == "characters"):
        raise ValueError(f"demo budget '{path}': data.world {world!r} and samples.evaluator {evaluator!r}: the world "
                         f"is one of {', '.join(WORLDS)}, scored by its own evaluator ({', '.join(CASCADE_EVALUATORS)})")
    unknown = sorted(set(budget.get("evaluate") or {}) - set(EVALUATORS))
    if unknown:
        raise ValueError(f"demo budget '{path}': evaluate.{unknown[0]}: no evaluation tool for it "
                         f"(stages with one: {', '.join(EVALUATORS)}; the MoVQ's held-out PSNR is read from its log)")
    return budget


def arm_runs(budget: dict, arm: str, out: Path) -> Dict[str, Path]:
    """stage -> its run directory for `arm`: the arm's own for the stages it changes and the
    stages that depend on them, the base's for the rest."""
    spec = (budget.get("arms") or {}).get(arm, {}) if arm != "base" else {}
    if spec.get("runs_of"):  # a sampling variant of another arm: that arm's runs
        return arm_runs(budget, spec["runs_of"], out)
    changed = set(spec) - set(ARM_SETTINGS)
    for stage in ORDER:  # in order, so a dependency's change reaches its dependants
        if any(d in changed for d in DEPENDS.get(stage, ())):
            changed.add(stage)
    home = out if arm == "base" else out / "arms" / arm
    return {stage: (home if stage in changed else out) / "runs" / stage for stage in ORDER}


def stage_command(stage: str, spec: dict, out: Path, runs: Dict[str, Path] | None = None,
                  extra: List[str] = ()) -> list:
    runs = runs or {s: out / "runs" / s for s in ORDER}
    data = out / "data"
    args = [f"run_dir={runs[stage]}", f"data.shards={data / 'train'}"]
    if stage in ("movq", "video_decoder"):  # the pixel stages evaluate on held-out clips
        args.append(f"data.val_shards={data / 'val'}")
    if stage != "movq":
        args.append(f"recipe.movq={runs['movq']}")
    if stage in ("keyframe", "interpolation"):
        args.append(f"recipe.init_from={runs['t2i']}")
    config = Path(spec["config"])
    # "{out}" in an override is the experiment's directory (e.g. recipe.lora.base={out}/runs/keyframe)
    overrides = [str(o).replace("{out}", str(out)) for o in (*spec.get("overrides", []), *extra)]
    return [sys.executable, str(ROOT / "train.py"), str(config if config.is_absolute() else ROOT / config),
            *args, *overrides]


EVALUATORS = {"t2i": "evaluate_t2i.py", "keyframe": "evaluate_keyframes.py",
              "interpolation": "evaluate_interpolation.py", "video_decoder": "evaluate_video_decoder.py"}


def evaluate_stage(stage: str, run: Path, args: List[str], out: Path) -> list:
    """The stage's evaluation tool (EVALUATORS) on `run` with `args` (e.g. --all-checkpoints); its
    results.json (one result per checkpoint), or [] when it failed."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "tools" / EVALUATORS[stage]), "--checkpoint", str(run),
           *[str(a) for a in args], "--out", str(out)]
    print(f"+ {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd).returncode != 0 or not (out / "results.json").is_file():
        print(f"warning: the {stage} evaluation of {run} failed", file=sys.stderr)
        return []
    return json.loads((out / "results.json").read_text())


def run_minutes(run: Path, this_call: float) -> float:
    """A run's training minutes from its log (first to last step, stops left out), so a run this
    call only resumed counts what it took; `this_call` (wall clock) when nothing was logged."""
    from kvideo.train.logging import training_minutes

    logged = training_minutes(run)
    return max(logged.values()) if logged else this_call


def logged_eval(run: Path) -> str:
    """The last held-out evaluation a run logged while training (`train.eval_every`), e.g. the
    MoVQ's PSNR: "step N: eval/psnr 31.2, ..."; "" when it logged none."""
    from kvideo.train.logging import read_metrics

    path = run / "metrics.jsonl"
    rows = [r for r in read_metrics(path) if any(k.startswith("eval/") for k in r)] if path.is_file() else []
    if not rows:
        return ""
    last = rows[-1]
    return f"step {last['step']}: " + ", ".join(f"{k} {v:.2f}" for k, v in last.items() if k.startswith("eval/"))


SCORE_KEYS = ("all_correct", "direction", "speed", "shape", "color", "background", "frame0_psnr", "psnr")


def score_text(result: dict) -> str:
    """The headline numbers of one evaluation result (a checkpoint's, or the cascade's summary)."""
    parts = [f"step {result['step']}"] if "step" in result else []
    for split in ("seen", "held_out"):
        summary = result.get(split)
        if isinstance(summary, dict):
            summary = {**summary, **(summary.get("accuracy") or {})}  # the cascade's attributes are nested
            values = [f"{k} {summary[k]:.0%}" if k not in ("frame0_psnr", "psnr") else f"{k} {summary[k]:.1f}"
                      for k in SCORE_KEYS if isinstance(summary.get(k), (int, float))]
            parts.append(f"{split}: " + ", ".join(values))
    if "seconds" in result and result.get("prompts"):  # the cascade's sampling cost
        parts.append(f"{result['seconds'] / result['prompts']:.1f} s/video")
    return "; ".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/demo")
    ap.add_argument("--budget", default=str(ROOT / "configs" / "demo" / "shapes.yaml"))
    ap.add_argument("--skip-train", action="store_true", help="sample and score the runs already in OUT/runs")
    ap.add_argument("--arms", help="comma-separated arms of the budget to run (default: base and every arm)")
    ap.add_argument("--until", choices=ORDER, help="train up to this stage, evaluate, and do not sample the cascade")
    ap.add_argument("--every-stage", action="append", default=[], metavar="KEY=VALUE",
                    help="an override added to every stage's training (after the budget's and the arm's), for a "
                         "setting of this host rather than of the experiment, e.g. train.channels_last=true; repeatable")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        budget = read_budget(Path(args.budget))
        arms = ["base", *(budget.get("arms") or {})]
        if args.arms:
            unknown = [a for a in args.arms.split(",") if a not in arms]
            if unknown:
                raise ValueError(f"--arms: '{unknown[0]}' is not an arm of the budget ({', '.join(arms)})")
            arms = args.arms.split(",")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = budget.get("data", {})
    t0 = time.perf_counter()
    render(out / "data" / "train", int(data.get("train_clips", 600)), "train", data)
    render(out / "data" / "val", int(data.get("val_clips", 16)), "val", data)
    if data.get("world") == "characters":  # the held-out characters are in the test split only
        render(out / "data" / "test", int(data.get("test_clips", 64)), "test", data)
    prepare(budget, out)
    data_minutes = (time.perf_counter() - t0) / 60
    stages = ORDER[: ORDER.index(args.until) + 1] if args.until else ORDER
    trained: Dict[Path, float] = {}  # run dir -> minutes this invocation spent on it
    report = {}
    for arm in arms:
        runs = arm_runs(budget, arm, out)
        home = out if arm == "base" else out / "arms" / arm
        extra = (budget.get("arms") or {}).get(arm, {}) if arm != "base" else {}
        trains = budget["arms"][extra["runs_of"]] if extra.get("runs_of") else extra  # whose runs these are
        minutes = {"data": data_minutes}
        for stage in stages:
            if not args.skip_train and runs[stage] not in trained:
                cmd = stage_command(stage, budget["stages"][stage], out, runs,
                                    [*trains.get(stage, []), *args.every_stage])
                print(f"\n== {arm}: stage {stage}\n+ {' '.join(cmd)}", flush=True)
                t0 = time.perf_counter()
                code = subprocess.run(cmd).returncode
                if code != 0:  # 143: stopped by SIGTERM with a checkpoint; nothing later may use it
                    print(f"error: {arm}'s stage {stage} stopped with exit code {code} ({runs[stage]}); the same "
                          "command resumes it", file=sys.stderr)
                    return code
                trained[runs[stage]] = (time.perf_counter() - t0) / 60
            minutes[stage] = run_minutes(runs[stage], trained.get(runs[stage], 0.0))
        scores = {stage: [line] for stage in stages if (line := logged_eval(runs[stage]))}
        for stage, eval_args in (budget.get("evaluate") or {}).items():
            if stage in stages:
                results = evaluate_stage(stage, runs[stage], eval_args, home / "eval" / stage)
                scores.setdefault(stage, []).extend(score_text(r) for r in results)
        if args.until is None:
            code, scores["cascade"] = sample_cascade(budget, runs, home, minutes, extra)
            if code != 0:
                return code
            (out / "pipelines").mkdir(exist_ok=True)
            (out / "pipelines" / f"{arm}.yaml").write_text((home / "pipeline.yaml").read_text())
        report[arm] = {"minutes": minutes, "scores": scores, "runs": {s: str(r) for s, r in runs.items()},
                       "params": stage_params({s: runs[s] for s in stages})}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    return 0


def stage_params(runs: Dict[str, Path]) -> Dict[str, dict]:
    """stage -> {"total": M, "temporal": M} parameters of the model each run's config builds."""
    from kvideo.registry import load_config, model_info

    params = {}
    for stage, run in runs.items():
        if (run / "config.yaml").is_file():
            cfg = load_config([run / "config.yaml"], require_complete=False)
            info = model_info(cfg)
            params[stage] = {k: round(info[f"{k}_params"] / 1e6, 3) for k in ("total", "temporal") if f"{k}_params" in info}
            lora = cfg.recipe.get("lora")
            if lora is not None and lora.enabled:  # the adapters, what such a run trains
                params[stage]["lora"] = round(lora_params(cfg) / 1e6, 4)
    return params


def lora_params(cfg) -> int:
    """The LoRA adapters' parameters of a recipe.lora run's UNet, built on the meta device."""
    import torch

    from kvideo.inference.lora import LoraSpec, add_lora
    from kvideo.registry import build_model

    with torch.device("meta"):
        unet = build_model(cfg)
    add_lora(unet, LoraSpec.from_config(cfg.recipe.lora))
    return sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)


def sample_cascade(budget: dict, runs: Dict[str, Path], home: Path, minutes: dict, arm: dict | None = None):
    """Sample and score the budget's canonical prompts through the arm's cascade (the budget's
    pipeline settings merged with the arm's `pipeline`), or, for a v2 world, the test split's
    prompts with tools/evaluate_characters.py (and the arm's `sample_args`); (code, [score])."""
    arm = arm or {}
    settings = OmegaConf.merge(OmegaConf.create(budget.get("pipeline", {})), OmegaConf.create(arm.get("pipeline", {})))
    pipeline = {**OmegaConf.to_container(settings), **{s: str(runs[s]) for s in ORDER if s != "movq"}}
    if pipeline.get("first_frame_model") in ("keyframe", "none"):  # no t2i in the cascade
        pipeline.pop("t2i")
    home.mkdir(parents=True, exist_ok=True)
    (home / "pipeline.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(pipeline)))
    per_split = int(budget.get("samples", {}).get("per_split", 3))
    sys.path.insert(0, str(ROOT))  # run as a script, `tools` is not yet importable
    if budget.get("samples", {}).get("evaluator") == "characters":
        return sample_characters(home, per_split, minutes, arm.get("sample_args", []))
    from tools import evaluate_shapes

    print(f"\n== sampling {2 * per_split} canonical prompts through the cascade", flush=True)
    t0 = time.perf_counter()
    samples = home / "samples"
    code = evaluate_shapes.main(["--pipeline", str(home / "pipeline.yaml"), "--limit", str(per_split),
                                 "--save-videos", str(2 * per_split), "--out", str(samples)])
    minutes["samples"] = (time.perf_counter() - t0) / 60
    if code != 0:
        return code, []
    result = json.loads((samples / "results.json").read_text())
    print("\nkvideo demo: ShapesWorld text-to-video, every stage trained here")
    print(f"  videos:        {samples / 'videos'}/*.mp4 (prompts and scores in {samples / 'results.json'})")
    print(f"  contact sheet: {samples / 'sheet.png'}")
    print(f"  pipeline:      {home / 'pipeline.yaml'}  (python sample.py --pipeline {home / 'pipeline.yaml'} "
          "--prompt \"...\" --out video.mp4)")
    return 0, [score_text(result)]


def sample_characters(home: Path, per_group: int, minutes: dict, sample_args: List[str]):
    """Score the arm's cascade on the v2 test split's prompts (tools/evaluate_characters.py with
    the arm's arguments, e.g. --identity reference); (code, [score])."""
    from tools import evaluate_characters

    print(f"\n== sampling {per_group} prompts of each v2 group through the cascade", flush=True)
    t0 = time.perf_counter()
    samples = home / "samples"
    code = evaluate_characters.main(["--pipeline", str(home / "pipeline.yaml"), "--test", str(home_data(home) / "test"),
                                     "--limit", str(per_group), "--out", str(samples), *map(str, sample_args)])
    minutes["samples"] = (time.perf_counter() - t0) / 60
    if code != 0:
        return code, []
    result = json.loads((samples / "results.json").read_text())
    return 0, [evaluate_characters.summary_line(result)]


def home_data(home: Path) -> Path:
    """OUT/data of an arm's directory (OUT itself, or OUT/arms/ARM)."""
    return home / "data" if home.parent.name != "arms" else home.parent.parent / "data"


def print_report(report: dict) -> None:
    """Per arm: the minutes of each stage of its cascade (a shared run counts in every arm that uses
    it, so each row is the whole cost of its cascade) and the scores."""
    print("\n| arm | minutes | parameters (M) | scores |\n|---|---|---|---|")
    for arm, r in report.items():
        mins = ", ".join(f"{k} {v:.1f}" for k, v in r["minutes"].items())
        params = ", ".join(f"{k} {v['total']:.2f}" + (f" ({v['temporal']:.2f} temporal)" if "temporal" in v else "")
                           + (f" + LoRA {v['lora']:.3f}" if "lora" in v else "")
                           for k, v in r.get("params", {}).items()) or "-"
        scores = "<br>".join(f"{stage}: {s}" for stage, lines in r["scores"].items() for s in lines) or "-"
        print(f"| {arm} | {mins} | {params} | {scores} |")
    print("  minutes: " + ", ".join(f"{k} {v:.1f}" for k, v in report[next(iter(report))]["minutes"].items()))


if __name__ == "__main__":
    sys.exit(main())
