"""Score ShapesWorld videos against their prompts (the analytic scorer of the spec).

    python tools/score_shapes.py samples/                      # mp4s with NAME.txt / NAME.json
    python tools/score_shapes.py samples/ --prompts prompts.jsonl
    python tools/score_shapes.py data/shapes/val               # shards: every sample vs its json
    python tools/score_shapes.py clip.mp4 --json

Where the prompt of a video comes from, first match wins:
  1. --prompts FILE: JSONL lines {"path": ..., "caption" or "prompt": ...}; relative paths are
     resolved against the JSONL's folder, and a bare file name matches too.
  2. DIR/captions.jsonl (what `make_shapesworld.py --raw` writes), same format.
  3. a sidecar NAME.txt (the caption) or NAME.json ({"caption": ...} or the attribute keys).
A .tar shard, or a directory holding .tar shards, scores every sample's mp4 against its json.
A video that cannot be decoded counts as wrong on every attribute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np

from kvideo.data.shapes_scorer import aggregate_scores, score_clip
from kvideo.data.shapesworld import ATTRIBUTES, UNKNOWN, parse_caption
from kvideo.data.video_io import VideoDecodeError, probe, read_video


def _fps(times: np.ndarray, src) -> float:
    """Frame rate from the decoded timestamps (the scorer assumes even spacing)."""
    if len(times) > 1:
        step = float(np.median(np.diff(times)))
        if step > 0:
            return 1.0 / step
    return probe(src)["fps"] or 24.0


def _prompt_from_json(meta: dict):
    """Attributes if the json has them all (shard metadata), else its caption/prompt."""
    if all(k in meta for k in ATTRIBUTES):
        return {k: meta[k] for k in ATTRIBUTES}
    for key in ("caption", "prompt"):
        if key in meta:
            return meta[key]
    raise ValueError(f"json has neither the attributes {ATTRIBUTES} nor a caption: {meta}")


def _failed(name: str, prompt, reason: str) -> dict:
    target = parse_caption(prompt) if isinstance(prompt, str) else dict(prompt)
    return dict(name=name, error=reason, pred={k: UNKNOWN for k in ATTRIBUTES}, target=target,
                correct={k: False for k in ATTRIBUTES}, all_correct=False, area_cv=None,
                color_drift=None)


def score_source(name: str, src, prompt) -> dict:
    """Decode one video (path or bytes) and score it; decoding errors give a failed result."""
    try:
        frames, times = read_video(src)
    except VideoDecodeError as e:
        return _failed(name, prompt, str(e))
    return {"name": name, **score_clip(frames, _fps(times, src), prompt)}


def _load_prompt_map(path: Path) -> dict:
    """{resolved path or bare file name: prompt} from a JSONL file."""
    mapping = {}
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "path" not in row or not ({"caption", "prompt"} & row.keys()):
                raise ValueError(f"{path}:{line_no}: need 'path' and 'caption' or 'prompt': {row}")
            text = row.get("caption", row.get("prompt"))
            target = Path(row["path"])
            target = target if target.is_absolute() else path.parent / target
            mapping[str(target.resolve())] = text
            mapping.setdefault(target.name, text)
    return mapping


def _sidecar_prompt(video: Path):
    txt, js = video.with_suffix(".txt"), video.with_suffix(".json")
    if txt.exists():
        return txt.read_text().strip()
    if js.exists():
        return _prompt_from_json(json.loads(js.read_text()))
    return None


def score_videos(videos: list[Path], prompt_map: dict) -> list[dict]:
    results = []
    for video in videos:
        prompt = prompt_map.get(str(video.resolve()), prompt_map.get(video.name))
        if prompt is None:
            prompt = _sidecar_prompt(video)
        if prompt is None:
            raise SystemExit(f"no prompt for {video}: give --prompts, captions.jsonl or a sidecar "
                             f"{video.with_suffix('.txt').name} / {video.with_suffix('.json').name}")
        results.append(score_source(str(video), video, prompt))
    return results


def score_shards(shards: list[Path]) -> list[dict]:
    """Score every (KEY.mp4, KEY.json) sample of webdataset tar shards."""
    results = []
    for shard in shards:
        samples: dict[str, dict] = {}
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(member.name), key)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, sample in sorted(samples.items()):
            if "mp4" not in sample or "json" not in sample:
                print(f"warning: {shard}:{key} lacks mp4 or json, skipped", file=sys.stderr)
                continue
            prompt = _prompt_from_json(json.loads(sample["json"]))
            results.append(score_source(f"{shard.name}:{key}", sample["mp4"], prompt))
    return results


def markdown_table(summary: dict) -> str:
    header = "| split | n | " + " | ".join(ATTRIBUTES) + " | all correct |"
    lines = [header, "|" + "---|" * (len(ATTRIBUTES) + 3)]
    for name, part in [("all", summary)] + list(summary["by_split"].items()):
        if part["n"] == 0:
            continue
        accs = " | ".join(f"{100 * part['accuracy'][k]:.1f}%" for k in ATTRIBUTES)
        lines.append(f"| {name} | {part['n']} | {accs} | {100 * part['all_correct']:.1f}% |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="an mp4, a .tar shard, or a directory of either")
    p.add_argument("--prompts", help="JSONL with {path, caption|prompt} per line")
    p.add_argument("--json", action="store_true", help="print JSON (summary + per clip)")
    args = p.parse_args(argv)

    path = Path(args.path)
    if not path.exists():
        raise SystemExit(f"{path} does not exist")
    prompt_map = _load_prompt_map(Path(args.prompts)) if args.prompts else {}
    if path.is_dir() and not prompt_map and (path / "captions.jsonl").exists():
        prompt_map = _load_prompt_map(path / "captions.jsonl")
    if path.suffix == ".tar":
        results = score_shards([path])
    elif path.is_dir() and sorted(path.glob("*.tar")):
        results = score_shards(sorted(path.glob("*.tar")))
    elif path.is_dir():
        results = score_videos(sorted(path.glob("*.mp4")), prompt_map)
    else:
        results = score_videos([path], prompt_map)
    if not results:
        raise SystemExit(f"no videos found in {path}")

    summary = aggregate_scores(results)
    failed = [r["name"] for r in results if "error" in r]
    if args.json:
        print(json.dumps({"summary": summary, "failed": failed, "clips": results}, indent=2))
    else:
        print(markdown_table(summary))
        if failed:
            print(f"\n{len(failed)} video(s) failed to decode (scored wrong): {', '.join(failed)}")
    return {"summary": summary, "failed": failed, "clips": results}


if __name__ == "__main__":
    main()
