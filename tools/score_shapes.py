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

ShapesWorld v2 (characters) is scored by its own scorer (kvideo/data/characters_scorer.py):
a v2 sample's metadata (`world: characters`), or a caption naming characters, gets identity,
cross-shot consistency and binding; the summary is then v2's (per kind, seen and held-out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np

from kvideo.data.characters import parse_scene_caption
from kvideo.data.characters_scorer import aggregate_character_scores, score_character_clip
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
    """A v2 clip's metadata as it is; attributes if the json has them all (shard metadata), else
    its caption/prompt."""
    if meta.get("world") == "characters":
        return meta
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


def is_characters(prompt) -> bool:
    """Whether a prompt is ShapesWorld v2's: v2 metadata, or a caption that names characters."""
    if isinstance(prompt, dict):
        return prompt.get("world") == "characters"
    try:
        parse_caption(prompt)
        return False
    except ValueError:
        parse_scene_caption(prompt)  # neither v1 nor v2: its error names the caption
        return True


def score_source(name: str, src, prompt) -> dict:
    """Decode one video (path or bytes) and score it with v1's or v2's scorer; decoding errors give
    a failed result."""
    v2 = is_characters(prompt)
    try:
        frames, times = read_video(src)
    except VideoDecodeError as e:
        if v2:
            return {"name": name, "error": str(e), "kind": "unknown", "held_out": False, "correct": {"identity": False},
                    "all_correct": False}
        return _failed(name, prompt, str(e))
    score = score_character_clip if v2 else score_clip
    return {"name": name, **score(frames, _fps(times, src), prompt)}


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


def characters_table(summary: dict) -> str:
    """v2's summary: all-correct and every attribute's accuracy, overall, per kind and split."""
    keys = list(summary.get("accuracy", {}))
    lines = ["| clips | n | all correct | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 3)]
    parts = [("all", summary), *summary["by_kind"].items(), *summary["by_split"].items()]
    for name, part in parts:
        if part["n"]:
            accs = " | ".join(f"{100 * part['accuracy'][k]:.1f}%" if k in part["accuracy"] else "-" for k in keys)
            lines.append(f"| {name} | {part['n']} | {100 * part['all_correct']:.1f}% | {accs} |")
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

    v2 = ["kind" in r for r in results]
    if any(v2) and not all(v2):
        raise SystemExit(f"{path} mixes ShapesWorld v1 and v2 prompts: score them apart")
    summary = aggregate_character_scores(results) if all(v2) else aggregate_scores(results)
    failed = [r["name"] for r in results if "error" in r]
    if args.json:
        print(json.dumps({"summary": summary, "failed": failed, "clips": results}, indent=2))
    else:
        print(characters_table(summary) if all(v2) else markdown_table(summary))
        if failed:
            print(f"\n{len(failed)} video(s) failed to decode (scored wrong): {', '.join(failed)}")
    return {"summary": summary, "failed": failed, "clips": results}


if __name__ == "__main__":
    main()
