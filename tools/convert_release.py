"""The released Kandinsky Video 1.1 weights -> kvideo checkpoints and a pipeline config.

    python tools/convert_release.py --release DIR --text-encoder DIR --out DIR
    python sample.py --pipeline DIR/pipeline.yaml --prompt "a red car driving on a mountain road"

    python tools/convert_release.py --coverage [--release DIR]

--release holds the files of Hugging Face `ai-forever/KandinskyVideo_1_1` (t2v.pt,
interpolation.pt, movq.pt, video_movq.pt, t5_projections.pt); --text-encoder is a local
directory holding the T5 encoder `google/flan-ul2` (config.json, tokenizer, weights), which the
checkpoints name rather than copy. --out gets t2i/ (the first-frame model: the t2v UNet's image
mode), keyframe/, interpolation/, movq/, video_decoder/ and pipeline.yaml.

Each stage is built from its full-size config (configs/STAGE/kandinsky.yaml; `--config
STAGE=FILE` replaces it, `STAGE.key=value` overrides a key) with the release's model options and
sampling settings (kvideo/release/convert.py, docs/RELEASE.md), so a release-layout checkpoint
of another size converts with configs of that size. Every release key must map onto a kvideo
parameter of the same shape and every kvideo parameter be filled, or nothing is written.

--coverage needs no weights: it builds the full-size networks on the meta device and checks the
release's key names and shapes against them (those of --release's files, or the recorded list in
kvideo/release/inventory.json.gz), printing one row per network. It exits 1 when a key is left.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]


def parse_stage_args(config_items: List[str], overrides: List[str], stages: List[str]):
    """--config STAGE=FILE items and STAGE.key=value overrides -> ({stage: [files]}, {stage: [key=value]})."""
    configs: Dict[str, List[Path]] = {s: [ROOT / "configs" / s / "kandinsky.yaml"] for s in stages}
    for item in config_items:
        stage, sep, file = item.partition("=")
        if not sep or stage not in configs:
            raise ValueError(f"--config {item!r}: expected STAGE=FILE with STAGE one of {', '.join(configs)}")
        configs[stage] = [Path(file)]
    per_stage: Dict[str, List[str]] = {s: [] for s in stages}
    for item in overrides:
        stage, dot, rest = item.partition(".")
        if not dot or stage not in per_stage or "=" not in rest:
            raise ValueError(f"override {item!r}: expected STAGE.key=value with STAGE one of {', '.join(per_stage)}")
        per_stage[stage].append(rest)
    return configs, per_stage


def main(argv=None) -> int:
    from kvideo.release.convert import STAGE_SOURCES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--release", type=Path, help="the directory of the released files")
    ap.add_argument("--text-encoder", help="a local T5 (flan-ul2) directory: recipe.text_encoder.weights")
    ap.add_argument("--out", type=Path, help="the directory to write the checkpoints and pipeline.yaml to")
    ap.add_argument("--coverage", action="store_true", help="print the key coverage of the full-size networks")
    ap.add_argument("--stages", default=",".join(STAGE_SOURCES), help="comma-separated stages to convert")
    ap.add_argument("--config", action="append", default=[], metavar="STAGE=FILE", help="a stage's kvideo config")
    ap.add_argument("--trust-pickle", action="store_true",
                    help="read files that torch.load(weights_only=True) refuses (only from a source you trust)")
    ap.add_argument("overrides", nargs="*", metavar="STAGE.key=value")
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in stages if s not in STAGE_SOURCES]
    if unknown:
        ap.error(f"--stages: unknown {unknown}; expected some of {', '.join(STAGE_SOURCES)}")
    try:
        configs, overrides = parse_stage_args(args.config, args.overrides, stages)
    except ValueError as e:
        ap.error(str(e))
    if args.coverage:
        return run_coverage(args.release, configs, overrides, args.trust_pickle)
    if args.release is None or args.out is None:
        ap.error("--release and --out are needed (or --coverage)")
    if args.text_encoder is None and any(s in ("t2i", "keyframe", "interpolation") for s in stages):
        ap.error("--text-encoder is needed for the diffusion stages: a local T5 (flan-ul2) directory")
    from kvideo.release.convert import Release, convert_release

    try:
        convert_release(Release(args.release, args.trust_pickle), args.out, configs, args.text_encoder, overrides)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(stages)} under {args.out}"
          + (f"; sample with: python sample.py --pipeline {args.out / 'pipeline.yaml'} --prompt '...'"
             if (args.out / "pipeline.yaml").is_file() else ""))
    return 0


def run_coverage(release_dir, configs, overrides, trust_pickle: bool) -> int:
    """The coverage table of `configs` against the files in `release_dir` (names and shapes only)
    or the recorded inventory."""
    from kvideo.release.convert import RELEASE_FILES, Release, coverage, coverage_table, meta_state

    release = None
    if release_dir is not None:
        files = Release(release_dir, trust_pickle)
        release = {model: meta_state({k: v.shape for k, v in files.state(model).items()})
                   for model in RELEASE_FILES if (release_dir / RELEASE_FILES[model].name).is_file()}
    rows = coverage(configs, release, overrides)
    print(f"key coverage against {release_dir or 'kvideo/release/inventory.json.gz'} (full-size networks, meta device)\n")
    print(coverage_table(rows))
    complete = all(r.complete for r in rows)
    print("\nevery release key mapped, every kvideo parameter filled, shapes equal" if complete
          else "\nINCOMPLETE: keys are left (listed above)")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
