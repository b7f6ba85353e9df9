"""The ShapesWorld v2 scorer: characters' identity, shots and lanes measured from the pixels.

Implements the scorer of the spec's "v2" section (/work/shared/specs/shapesworld.md) on top of
v1's (`kvideo.data.shapes_scorer`); the world it measures is `kvideo.data.characters`.

A clip is cut into parts, and each part is scored as a v1 clip by v1's ``score_clip`` with
``band_rows = BAND_HEIGHT / 2`` (0.3: the band rows, body and band colours and the band-aware
coverage of v1's module docstring):

- two characters: each lane (rows ``lane_rows``) is a part, scored against its own character;
- two shots: the cut is before the frame where the median border colour moves the most, when
  that move exceeds ``CUT_MIN_DISTANCE`` (60: the backgrounds are 220 or more apart); the shots
  before and from it are the parts. No such move: no cut (``correct["cut"]`` False) and the
  parts are the halves of the clip;
- single: the whole clip.

Per part, beside v1's attributes (``color`` is the body colour): ``band`` ('none' when body and
band colours are within ``BAND_NONE_DISTANCE``, 60, else the nearest COLORS entry);
``size_class`` (the median soft area against the midpoint of the areas, for the predicted
shape, of the two classes' middle radii 0.11 S and 0.18 S); ``identity`` (shape, body, band and
size class all right). Per clip: every part attribute (right in every part); two shots: ``cut``
and ``consistency`` (the predicted identity the same in both shots, fully measured, whatever
the truth); two characters: ``binding`` (each lane's predicted identity is its own character's
and not the other's).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from kvideo.data.characters import (BAND_HEIGHT, NO_BAND, SIZE_CLASSES, Character, character_bank, lane_rows,
                                    parse_scene_caption)
from kvideo.data.shapes_scorer import BAND_NONE_DISTANCE, border_pixels, nearest, score_clip
from kvideo.data.shapesworld import COLORS, FILL_RATIOS, UNKNOWN

CUT_MIN_DISTANCE = 60.0


def find_cut(frames: np.ndarray) -> int | None:
    """The first frame of shot 2 (see the module docstring), or None when there is no cut."""
    medians = np.median(border_pixels(frames), axis=1)  # (f, 3)
    if len(medians) < 2:
        return None
    moves = np.linalg.norm(np.diff(medians, axis=0), axis=1)  # (f - 1,)
    i = int(np.argmax(moves))
    return i + 1 if moves[i] > CUT_MIN_DISTANCE else None


def size_class_of(shape: str, area_px: float | None, width: int) -> str:
    """'small' or 'large' for a soft area of ``area_px`` px of a ``shape`` on a canvas ``width`` px
    wide ('unknown' without a shape or an area)."""
    if shape not in FILL_RATIOS or area_px is None:
        return UNKNOWN
    small, large = (FILL_RATIOS[shape] * (width * (lo + hi)) ** 2 for lo, hi in SIZE_CLASSES.values())  # 4 r^2 fill
    return "small" if area_px < 0.5 * (small + large) else "large"


def _score_part(frames: np.ndarray, fps: float, background: str, obj: Mapping, bank: Mapping[str, Character]) -> dict:
    """v1's score of one lane or shot against its character, with the v2 attributes added."""
    character = bank[obj["character"]]
    target = dict(background=background, color=character.body, shape=character.shape,
                  direction=obj["direction"], speed=obj["speed"])
    result = score_clip(frames, fps, target, band_rows=BAND_HEIGHT / 2)
    pred = result["pred"]
    if result["band_rgb"] is None:
        pred["band"] = UNKNOWN
    elif result["band_distance"] <= BAND_NONE_DISTANCE:
        pred["band"] = NO_BAND
    else:
        pred["band"] = nearest(COLORS, np.asarray(result["band_rgb"]))[0]
    pred["size_class"] = size_class_of(pred["shape"], result["area_px"], frames.shape[2])
    identity = (pred["shape"], pred["color"], pred["band"], pred["size_class"])
    result["target"].update(character=character.name, band=character.band, size_class=character.size_class)
    result["correct"].update(band=pred["band"] == character.band, size_class=pred["size_class"] == character.size_class,
                             identity=identity == character.identity())
    result.update(all_correct=all(result["correct"].values()), character=character.name, lane=obj.get("lane"),
                  identity=list(identity))
    return result


def score_character_clip(frames: np.ndarray, fps: float, prompt, bank: Mapping[str, Character] | None = None) -> dict:
    """Score a v2 clip against its prompt: a caption, a ``characters.describe`` dict or a clip's
    metadata. ``bank``: name -> Character (default the spec's bank; a dataset's
    ``characters.load_bank``).

    Returns a JSON-serialisable dict like v1's ``score_clip``: ``pred`` and ``target`` (each
    attribute -> its value in every part), ``correct`` (each attribute -> right in every part,
    plus ``cut`` and ``consistency`` for two shots, ``binding`` for two characters),
    ``all_correct``; and ``kind``, ``characters``, ``held_out`` (a held-out character is in the
    prompt), ``cut_frame`` (two shots) and ``parts`` (v1's result per lane or shot, with ``frames``,
    ``lane``, ``character`` and the predicted ``identity`` [shape, body, band, size class]).
    """
    target = parse_scene_caption(prompt) if isinstance(prompt, str) else prompt
    bank = character_bank() if bank is None else bank
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 1:
        raise ValueError(f"frames must be uint8 (f, h, w, 3), got {frames.dtype} {frames.shape}")
    missing = [o["character"] for s in target["shots"] for o in s["objects"] if o["character"] not in bank]
    if missing:
        raise ValueError(f"characters {missing} are not in the bank {list(bank)}")
    kind, shots, (n, height) = target["kind"], target["shots"], frames.shape[:2]
    cut = None
    if kind == "two_characters":  # spans: (frames, rows, background, object) of each part
        spans = [((0, n), lane_rows(o["lane"], height), shots[0]["background"], o) for o in shots[0]["objects"]]
    elif kind == "two_shots":
        if n < 2:
            raise ValueError(f"a two-shot clip has at least 2 frames, got {n}")
        cut = find_cut(frames)
        at = n // 2 if cut is None else cut
        spans = [(f, (0, height), s["background"], s["objects"][0]) for f, s in zip(((0, at), (at, n)), shots)]
    else:
        spans = [((0, n), (0, height), shots[0]["background"], shots[0]["objects"][0])]
    parts = []
    for (start, stop), (top, bottom), background, obj in spans:
        part = _score_part(frames[start:stop, top:bottom], fps, background, obj, bank)
        parts.append({**part, "frames": [start, stop]})
    correct = {k: all(p["correct"][k] for p in parts) for k in parts[0]["correct"]}
    if kind == "two_shots":
        first, second = (p["identity"] for p in parts)
        correct.update(cut=cut is not None, consistency=first == second and UNKNOWN not in first)
    if kind == "two_characters":
        own = [list(bank[p["character"]].identity()) for p in parts]
        correct["binding"] = all(p["identity"] == own[i] and p["identity"] != own[1 - i] for i, p in enumerate(parts))
    names = list(dict.fromkeys(p["character"] for p in parts))
    return dict(kind=kind, characters=names, held_out=any(bank[name].held_out for name in names),
                pred={k: [p["pred"][k] for p in parts] for k in parts[0]["pred"]},
                target={k: [p["target"][k] for p in parts] for k in parts[0]["target"]},
                correct=correct, all_correct=all(correct.values()), cut_frame=cut, parts=parts)


def aggregate_character_scores(results: Iterable[dict]) -> dict:
    """Accuracy of every attribute and the all-correct rate, overall, per kind and for prompts
    with only seen / with a held-out character."""
    results = list(results)

    def summarise(rs):
        if not rs:
            return {"n": 0}
        keys = list(dict.fromkeys(k for r in rs for k in r["correct"]))
        return {"n": len(rs), "all_correct": float(np.mean([r["all_correct"] for r in rs])),
                "accuracy": {k: float(np.mean([r["correct"][k] for r in rs if k in r["correct"]])) for k in keys}}

    out = summarise(results)
    out["by_kind"] = {kind: summarise([r for r in results if r["kind"] == kind])
                      for kind in dict.fromkeys(r["kind"] for r in results)}
    out["by_split"] = {"seen": summarise([r for r in results if not r["held_out"]]),
                       "held_out": summarise([r for r in results if r["held_out"]])}
    return out
