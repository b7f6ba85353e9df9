"""ShapesWorld v2, characters: the bank, clips of three kinds, captions, metadata, reference
images and the dataset writer (the scorer: characters_scorer.py).

Implements the "v2" section of /work/shared/specs/shapesworld.md on top of v1
(`kvideo.data.shapesworld`), whose geometry, motion, palette, coding and shard writer it reuses:
every object of a v2 clip is a v1 clip of its own (a `ClipSpec` whose colour is the body colour),
drawn with v1's `clip_spec_from_attributes` inside its lane and painted with v1's coverage.

Conventions (the spec leaves these to the implementation):

- Band: ``h = max(2, round(0.6 r))`` whole pixel rows starting at row ``round(cy - h / 2)``, so
  its edges fall on pixel boundaries (no pixel mixes body and band) and its centre is within
  half a pixel of the bounding box's centre ``cy``.
- Size: a character's size class is fixed; each clip (and each reference image) draws its r
  uniformly from the class's range.
- Lanes: ``top`` is rows ``[0, S // 2)``, ``bottom`` rows ``[S // 2, S)``; a single or two-shot
  clip uses the whole canvas (lane ``full``). An object keeps v1's 1 px margin from its lane's
  edges, so every lane's border is pure background (the scorer reads a lane as a v1 clip).
- Two shots: the cut is after frame ``num_frames // 2`` (frame 24 of 48); each shot is a v1 clip
  whose time restarts at 0, and the motion score pools the two shots' flow (the cut is no motion).
- Splits: ``train`` and ``val`` (disjoint seed streams) draw from the 12 training characters,
  ``test`` from all 16, so held-out characters appear only there. Every clip of one character
  (single, two shots) carries its character's reference ``KEY.ref.png`` (64 x 64 whatever the
  clip's size; a two-character clip has none: the spec's "its own character" names one); each
  split folder holds ``references/NAME.png`` for the characters the split draws from.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Mapping, Sequence

import cv2
import numpy as np

from kvideo.data.shapesworld import (ADVERBS, BACKGROUNDS, COLORS, DIRECTIONS, EDGE_MARGIN_PX, NO_SPEED, SHAPES, SPEEDS,
                                     ClipSpec, SplitSpec, clip_seed, clip_spec_from_attributes, metadata,
                                     shape_coverage, write_clips)

# ----------------------------------------------------------------------------- constants

CHARACTER_NAMES: tuple[str, ...] = ("Ada", "Bix", "Cato", "Dune", "Echo", "Fizz", "Gus", "Hana", "Iris", "Jax",
                                    "Kobi", "Luma", "Milo", "Nova", "Otto", "Pip")
TRAINING_CHARACTERS = CHARACTER_NAMES[:12]
HELD_OUT_CHARACTERS = CHARACTER_NAMES[12:]  # never in a training clip; test-time references only
NO_BAND = "none"
SIZE_CLASSES: dict[str, tuple[float, float]] = {"small": (0.10, 0.12), "large": (0.17, 0.19)}  # r / S
BAND_HEIGHT = 0.6  # of r
# The first seed whose 12 training characters show every body colour, band and (shape, size class).
BANK_SEED = 202
IDENTITY = ("shape", "body", "band", "size_class")

CLIP_KINDS = ("single", "two_shots", "two_characters")
DEFAULT_KIND_SHARES = (0.5, 0.25, 0.25)  # in CLIP_KINDS order
FULL = "full"
LANES = ("top", "bottom")  # the first named character of a two-character clip is on top
LANE_DIRECTIONS = ("left", "right", "still")
REFERENCE_SIZE = 64
CHARACTER_SPLITS = {"train": 0, "val": 1, "test": 2}


def _pick(rng: np.random.Generator, options: Sequence):
    options = list(options)
    return options[int(rng.integers(len(options)))]


# ----------------------------------------------------------------------------- characters and the bank


@dataclass(frozen=True)
class Character:
    """A named object that looks the same wherever it appears."""

    name: str
    shape: str
    body: str
    band: str  # a COLORS entry other than ``body``, or NO_BAND
    size_class: str  # 'small' | 'large'

    def __post_init__(self):
        for field, value, allowed in (("name", self.name, CHARACTER_NAMES), ("shape", self.shape, SHAPES),
                                      ("body", self.body, COLORS), ("band", self.band, (*COLORS, NO_BAND)),
                                      ("size_class", self.size_class, SIZE_CLASSES)):
            if value not in allowed:
                raise ValueError(f"Character.{field}: unknown {value!r}; expected one of {list(allowed)}")
        if self.band == self.body:
            raise ValueError(f"Character {self.name}: band colour {self.band!r} is its body colour")

    @property
    def held_out(self) -> bool:
        return self.name in HELD_OUT_CHARACTERS

    def attributes(self) -> dict:
        """The four attributes (``IDENTITY``) as a dict."""
        return {k: getattr(self, k) for k in IDENTITY}

    def identity(self) -> tuple[str, str, str, str]:
        return tuple(getattr(self, k) for k in IDENTITY)


def character_bank() -> dict[str, Character]:
    """The spec's 16 characters, name -> Character, drawn with ``BANK_SEED``: a character whose
    four attributes repeat an earlier one's is redrawn, and the whole bank is redrawn unless at
    least 4 have no band. The same on every machine."""
    rng = np.random.default_rng(BANK_SEED)
    while True:
        bank: dict[str, Character] = {}
        for name in CHARACTER_NAMES:
            taken = {c.identity() for c in bank.values()}
            while True:
                shape, body = _pick(rng, SHAPES), _pick(rng, COLORS)
                band = NO_BAND if rng.random() < 1 / 3 else _pick(rng, [c for c in COLORS if c != body])
                character = Character(name, shape, body, band, _pick(rng, SIZE_CLASSES))
                if character.identity() not in taken:
                    break
            bank[name] = character
        if sum(c.band == NO_BAND for c in bank.values()) >= 4:
            return bank


def load_bank(path: str | os.PathLike) -> dict[str, Character]:
    """The bank of a ``characters.json`` (or of the dataset folder holding one)."""
    path = Path(path) / "characters.json" if Path(path).is_dir() else Path(path)
    return {name: Character(name, **attrs) for name, attrs in json.loads(path.read_text()).items()}


def split_characters(split: str) -> tuple[str, ...]:
    """The characters a split draws from: the training ones, or all 16 for ``test``."""
    if split not in CHARACTER_SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(CHARACTER_SPLITS)}")
    return CHARACTER_NAMES if split == "test" else TRAINING_CHARACTERS


# ----------------------------------------------------------------------------- clips


def lane_rows(lane: str, size: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a lane of an ``size`` px canvas."""
    bounds = {FULL: (0, size), "top": (0, size // 2), "bottom": (size // 2, size)}
    if lane not in bounds:
        raise ValueError(f"unknown lane {lane!r}; expected one of {list(bounds)}")
    return bounds[lane]


@dataclass(frozen=True)
class Track:
    """One character in one shot: ``clip`` is the v1 clip of its object over the shot (colour =
    body colour, ``start_xy`` in canvas pixels, ``num_frames`` the shot's length)."""

    character: Character
    lane: str
    clip: ClipSpec

    def __post_init__(self):
        c, clip = self.character, self.clip
        if (clip.color, clip.shape) != (c.body, c.shape):
            raise ValueError(f"{c.name} is a {c.body} {c.shape}, its clip a {clip.color} {clip.shape}")
        lo, hi = (f * clip.canvas_size for f in SIZE_CLASSES[c.size_class])
        if not lo - 1e-9 <= clip.size <= hi + 1e-9:
            raise ValueError(f"{c.name} is {c.size_class}: r in [{lo:.2f}, {hi:.2f}] px, got {clip.size:.2f}")
        top, bottom = lane_rows(self.lane, clip.canvas_size)
        centers = clip.centers()  # (f, 2)
        if not ((centers - clip.size >= (0, top)) & (centers + clip.size <= (clip.canvas_size, bottom))).all():
            raise ValueError(f"{c.name} leaves its lane {self.lane!r} (rows {top}-{bottom})")


@dataclass(frozen=True)
class Shot:
    start: int  # the shot's first frame in the clip
    tracks: tuple[Track, ...]

    @property
    def background(self) -> str:
        return self.tracks[0].clip.background

    @property
    def num_frames(self) -> int:
        return self.tracks[0].clip.num_frames

    @property
    def stop(self) -> int:
        return self.start + self.num_frames


@dataclass(frozen=True)
class Scene:
    """A v2 clip: its kind and its shots (see the spec); raises ValueError naming what breaks it."""

    kind: str
    shots: tuple[Shot, ...]
    seed: int | None = None

    def __post_init__(self):
        if self.kind not in CLIP_KINDS:
            raise ValueError(f"unknown clip kind {self.kind!r}; expected one of {list(CLIP_KINDS)}")
        layout = [[t.lane for t in shot.tracks] for shot in self.shots]
        expected = {"single": [[FULL]], "two_shots": [[FULL], [FULL]], "two_characters": [list(LANES)]}[self.kind]
        if layout != expected:
            raise ValueError(f"a {self.kind} clip has lanes {expected} per shot, got {layout}")
        tracks = [t for shot in self.shots for t in shot.tracks]
        if len({(t.clip.fps, t.clip.canvas_size) for t in tracks}) != 1 or any(
                len({(t.clip.background, t.clip.num_frames) for t in shot.tracks}) != 1 for shot in self.shots):
            raise ValueError("a scene's objects share fps and canvas size, and a shot's their background and length")
        if [s.start for s in self.shots] != [0] + [s.stop for s in self.shots[:-1]]:
            raise ValueError(f"shots must follow each other from frame 0, got starts {[s.start for s in self.shots]}")
        names = [t.character.name for t in tracks]
        if self.kind == "two_shots" and (names[0] != names[1] or self.shots[0].background == self.shots[1].background):
            raise ValueError(f"a two-shot clip shows one character on two backgrounds, got {names} on "
                             f"{[s.background for s in self.shots]}")
        if self.kind == "two_characters" and (names[0] == names[1] or any(
                t.clip.direction not in LANE_DIRECTIONS for t in tracks)):
            raise ValueError(f"a two-character clip shows two characters moving {list(LANE_DIRECTIONS)}, got "
                             f"{[(t.character.name, t.clip.direction) for t in tracks]}")

    @property
    def fps(self) -> float:
        return self.shots[0].tracks[0].clip.fps

    @property
    def canvas_size(self) -> int:
        return self.shots[0].tracks[0].clip.canvas_size

    @property
    def num_frames(self) -> int:
        return self.shots[-1].stop

    @property
    def characters(self) -> list[Character]:
        """The scene's characters, each once, in caption order."""
        return list({t.character.name: t.character for shot in self.shots for t in shot.tracks}.values())


def _track(rng, character: Character, lane: str, background: str, directions, **timing) -> Track:
    """Draw a character's motion, r and start point in a lane (``timing``: size, fps, num_frames)."""
    size = timing["size"]
    top, bottom = lane_rows(lane, size)
    attrs = dict(background=background, color=character.body, shape=character.shape,
                 direction=_pick(rng, directions), speed=_pick(rng, SPEEDS))
    clip = clip_spec_from_attributes(attrs, rng, **timing, size_range=SIZE_CLASSES[character.size_class],
                                     box=(0, top, size, bottom))
    return Track(character, lane, clip)


def sample_scene(rng, kind: str, characters: Sequence[Character], *, size: int = 64, fps: float = 24.0,
                 num_frames: int = 48) -> Scene:
    """Draw a clip of ``kind`` from ``characters`` (uniform characters, backgrounds and motions).

    ``rng`` is a numpy Generator or an int seed (recorded as ``scene.seed``). Two shots: a
    different background in shot 2, independent motions and start points; two characters: two
    different ones, each moving left or right or standing still in its lane.
    """
    if kind not in CLIP_KINDS:
        raise ValueError(f"unknown clip kind {kind!r}; expected one of {list(CLIP_KINDS)}")
    seed = int(rng) if isinstance(rng, (int, np.integer)) else None
    rng = np.random.default_rng(rng)
    if kind == "two_characters":
        pair = [characters[int(i)] for i in rng.choice(len(characters), size=2, replace=False)]
        background = _pick(rng, BACKGROUNDS)
        tracks = tuple(_track(rng, c, lane, background, LANE_DIRECTIONS, size=size, fps=fps, num_frames=num_frames)
                       for c, lane in zip(pair, LANES))
        return Scene(kind, (Shot(0, tracks),), seed)
    character, cut = _pick(rng, characters), num_frames if kind == "single" else num_frames // 2
    backgrounds = [_pick(rng, BACKGROUNDS)]
    if kind == "two_shots":
        backgrounds.append(_pick(rng, [b for b in BACKGROUNDS if b != backgrounds[0]]))
    return Scene(kind, tuple(Shot(start, (_track(rng, character, FULL, background, DIRECTIONS, size=size, fps=fps,
                                                 num_frames=stop - start),))
                             for background, start, stop in zip(backgrounds, (0, cut), (cut, num_frames))), seed)


# ----------------------------------------------------------------------------- rendering


def band_stripe(r: float, center_y: float, size: int) -> np.ndarray:
    """Boolean ``(S,)``: the rows of the band of an object of size ``r`` centred at ``center_y``."""
    height = max(2, int(np.floor(BAND_HEIGHT * r + 0.5)))
    top = int(np.floor(center_y - height / 2 + 0.5))
    rows = np.arange(size)
    return (rows >= top) & (rows < top + height)


def render_scene(scene: Scene) -> np.ndarray:
    """Render a scene as uint8 ``(f, S, S, 3)`` RGB (an unbanded single character is exactly
    v1's ``render_clip`` of its clip)."""
    s = scene.canvas_size
    out = np.empty((scene.num_frames, s, s, 3), dtype=np.uint8)
    for shot in scene.shots:
        bg = np.asarray(BACKGROUNDS[shot.background], np.float32)
        centers = [t.clip.centers() for t in shot.tracks]  # (f, 2) each
        for i in range(shot.num_frames):
            canvas = np.broadcast_to(bg, (s, s, 3))  # (S, S, 3)
            for track, center in zip(shot.tracks, centers):
                c = track.character
                color = np.broadcast_to(np.asarray(COLORS[c.body], np.float32), (s, 3))  # per row (S, 3)
                if c.band != NO_BAND:
                    band = band_stripe(track.clip.size, center[i][1], s)
                    color = np.where(band[:, None], np.asarray(COLORS[c.band], np.float32), color)
                alpha = shape_coverage(c.shape, center[i], track.clip.size, s)  # (S, S)
                canvas = canvas + alpha[..., None] * (color[:, None, :] - canvas)
            out[shot.start + i] = np.rint(canvas).astype(np.uint8)
    return out


def render_reference(character: Character, rng, size: int = REFERENCE_SIZE) -> np.ndarray:
    """The reference image of a character: uint8 ``(size, size, 3)``, still and centred, on a
    background and with an r (in its size class) drawn from ``rng`` (a Generator or a seed)."""
    rng = np.random.default_rng(rng)
    background = _pick(rng, BACKGROUNDS)
    lo, hi = SIZE_CLASSES[character.size_class]
    clip = ClipSpec(background, character.body, character.shape, "still", None, float(rng.uniform(lo, hi) * size),
                    (size / 2, size / 2), num_frames=1, canvas_size=size)
    return render_scene(Scene("single", (Shot(0, (Track(character, FULL, clip),)),)))[0]


def png_bytes(image: np.ndarray) -> bytes:
    """PNG encoding of a uint8 RGB ``(h, w, 3)`` image."""
    ok, data = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    if not ok:
        raise ValueError(f"cannot encode an image of shape {image.shape} as PNG")
    return data.tobytes()


# ----------------------------------------------------------------------------- captions


def describe(scene: Scene) -> dict:
    """What a caption says: ``{"kind", "shots": [{"background", "objects": [{"character",
    "lane", "direction", "speed"}]}]}`` (``speed`` 'none' when still)."""
    return {"kind": scene.kind, "shots": [
        {"background": shot.background, "objects": [
            {"character": t.character.name, "lane": t.lane, "direction": t.clip.direction, "speed": t.clip.speed_name}
            for t in shot.tracks]} for shot in scene.shots]}


def _motion_phrase(obj: Mapping) -> str:
    return "standing still" if obj["direction"] == "still" else f"moving {obj['direction']} {ADVERBS[obj['speed']]}"


def scene_caption(scene_or_description) -> str:
    """The canonical caption of a Scene, of its :func:`describe` dict or of its metadata."""
    d = describe(scene_or_description) if isinstance(scene_or_description, Scene) else scene_or_description
    shots = d["shots"]
    if d["kind"] == "two_characters":
        (first, second), background = shots[0]["objects"], shots[0]["background"]
        return (f"{first['character']} {_motion_phrase(first)} and {second['character']} {_motion_phrase(second)} "
                f"on a {background} background")
    return ", then ".join(f"{s['objects'][0]['character']} {_motion_phrase(s['objects'][0])} on a {s['background']} "
                          "background" for s in shots)


def _parse_name(word: str) -> str:
    names = {n.lower(): n for n in CHARACTER_NAMES}
    if word not in names:
        raise ValueError(f"unknown character {word!r}; expected one of {list(CHARACTER_NAMES)}")
    return names[word]


def _parse_object(text: str, lane: str) -> dict:
    """``NAME standing still`` / ``NAME moving DIRECTION slowly|quickly``."""
    name, _, motion = text.partition(" ")
    obj = {"character": _parse_name(name), "lane": lane}
    words = motion.split()
    if words == ["standing", "still"]:
        return {**obj, "direction": "still", "speed": NO_SPEED}
    if len(words) != 3 or words[0] != "moving":
        raise ValueError(f"motion {motion!r} of {name}: expected 'moving <direction> <slowly|quickly>' "
                         "or 'standing still'")
    speeds = {adverb: speed for speed, adverb in ADVERBS.items()}
    if words[1] not in DIRECTIONS[:4]:
        raise ValueError(f"unknown direction {words[1]!r} of {name}; expected one of {list(DIRECTIONS[:4])}")
    if words[2] not in speeds:
        raise ValueError(f"unknown speed {words[2]!r} of {name}; expected one of {list(speeds)}")
    return {**obj, "direction": words[1], "speed": speeds[words[2]]}


def _split_background(text: str) -> tuple[str, str]:
    """``... on a BACKGROUND background`` -> (the part before, BACKGROUND)."""
    head, sep, tail = text.rpartition(" on a ")
    background = tail.removesuffix(" background")
    if not sep or background == tail:
        raise ValueError(f"{text!r} does not end in 'on a <background> background'")
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {list(BACKGROUNDS)}")
    return head, background


def _parse(text: str) -> dict:
    if ", then " in text:
        parts = text.split(", then ")
        if len(parts) != 2:
            raise ValueError(f"a two-shot caption has one ', then ', this one {len(parts) - 1}")
        shots = [{"background": bg, "objects": [_parse_object(head, FULL)]}
                 for head, bg in map(_split_background, parts)]
        (one,), (two,) = (shot["objects"] for shot in shots)
        if one["character"] != two["character"]:
            raise ValueError(f"the two shots show different characters ({one['character']}, {two['character']})")
        if shots[0]["background"] == shots[1]["background"]:
            raise ValueError(f"the two shots share the background {shots[0]['background']!r}; shot 2's must differ")
        return {"kind": "two_shots", "shots": shots}
    head, background = _split_background(text)
    if " and " not in head:
        return {"kind": "single", "shots": [{"background": background, "objects": [_parse_object(head, FULL)]}]}
    parts = head.split(" and ")
    if len(parts) != 2:
        raise ValueError(f"a two-character caption joins two characters with ' and ', this one {len(parts)}")
    objects = [_parse_object(p, lane) for p, lane in zip(parts, LANES)]
    if objects[0]["character"] == objects[1]["character"]:
        raise ValueError(f"a two-character caption names two different characters, not {objects[0]['character']} twice")
    for obj in objects:
        if obj["direction"] not in LANE_DIRECTIONS:
            raise ValueError(f"{obj['character']} moves {obj['direction']}: in a two-character clip a character "
                             "moves left or right or stands still")
    return {"kind": "two_characters", "shots": [{"background": background, "objects": objects}]}


def parse_scene_caption(text: str) -> dict:
    """The :func:`describe` dict of a v2 caption (single, two shots or two characters).

    Case (names come back capitalised), surrounding whitespace and a final period are ignored.
    Raises ValueError naming the problem (unknown character, background, direction or speed,
    a malformed motion, two shots of different characters or of one background, ...).
    """
    clean = " ".join(text.strip().rstrip(".").lower().split())
    try:
        return _parse(clean)
    except ValueError as e:
        raise ValueError(f"not a ShapesWorld characters caption: {text!r}: {e}") from None


# ----------------------------------------------------------------------------- metadata

def _v1_attributes(clip: ClipSpec) -> dict:
    """v1's metadata of an object's clip, without what the v2 clip holds once (caption, timing, ...)."""
    v1 = metadata(clip, motion_score=0.0)
    return {k: v1[k] for k in ("color", "shape", "direction", "speed", "speed_px_per_frame", "size", "start_xy")}


def scene_motion_score(frames: np.ndarray, scene: Scene) -> float:
    """The motion score (``kvideo.data.motion``) pooled over the shots, so a cut is no motion."""
    from kvideo.data.motion import flow_magnitudes

    mags = np.concatenate([flow_magnitudes(frames[s.start:s.stop], scene.fps) for s in scene.shots])
    return float(mags.mean()) if len(mags) else 0.0


def scene_metadata(scene: Scene, *, motion_score: float | None = None) -> dict:
    """The per-clip metadata (a shard's ``KEY.json``).

    ``caption``, ``world`` ('characters'), ``kind``; ``character`` (one-character clips) or
    ``characters`` (a list): name, the four attributes, ``lane`` and ``held_out``; ``shots``: each
    with ``frames`` ``[start, stop)``, ``background`` and ``objects`` (character, lane and v1's
    color, shape, direction, speed, speed_px_per_frame, size, start_xy); and like every clip
    ``fps``, ``num_frames``, ``seed``, ``width``, ``height``, ``motion_score`` (computed from the
    rendered clip when not given).
    """
    if motion_score is None:
        motion_score = scene_motion_score(render_scene(scene), scene)
    lanes = {t.character.name: t.lane for shot in scene.shots for t in shot.tracks}
    people = [{"name": c.name, **c.attributes(), "lane": lanes[c.name], "held_out": c.held_out}
              for c in scene.characters]
    shots = [{"frames": [shot.start, shot.stop], "background": shot.background, "objects": [
        {"character": t.character.name, "lane": t.lane, **_v1_attributes(t.clip)} for t in shot.tracks]}
        for shot in scene.shots]
    meta = {"caption": scene_caption(scene), "world": "characters", "kind": scene.kind}
    meta.update({"character": people[0]} if len(people) == 1 else {"characters": people})
    meta.update(shots=shots, fps=float(scene.fps), num_frames=int(scene.num_frames), seed=scene.seed,
                width=int(scene.canvas_size), height=int(scene.canvas_size), motion_score=float(motion_score))
    return meta


def scene_from_metadata(meta: Mapping) -> Scene:
    """Rebuild the Scene of a clip from its metadata (renders the identical clip)."""
    people = meta["characters"] if "characters" in meta else [meta["character"]]
    cast = {p["name"]: Character(p["name"], *(p[k] for k in IDENTITY)) for p in people}
    shots = []
    for shot in meta["shots"]:
        start, stop = shot["frames"]
        tracks = tuple(Track(cast[o["character"]], o["lane"], ClipSpec(
            shot["background"], o["color"], o["shape"], o["direction"], None if o["speed"] == NO_SPEED else o["speed"],
            float(o["size"]), tuple(o["start_xy"]), float(meta["fps"]), stop - start, int(meta["width"])))
            for o in shot["objects"])
        shots.append(Shot(start, tracks))
    return Scene(meta["kind"], tuple(shots), meta.get("seed"))


# ----------------------------------------------------------------------------- dataset writer


@dataclass(frozen=True)
class CharactersSpec(SplitSpec):
    """What a ShapesWorld v2 split holds: the fields of v1's ``SplitSpec``, with ``split`` one of
    train / val / test and ``kind_shares`` the shares of single, two-shot and two-character clips
    (any non-negative weights, normalised). Raises ValueError naming the field.
    """

    splits: ClassVar[Mapping[str, int]] = CHARACTER_SPLITS
    max_radius: ClassVar[float] = max(hi for _, hi in SIZE_CLASSES.values())

    kind_shares: tuple[float, ...] = DEFAULT_KIND_SHARES

    def __post_init__(self):
        super().__post_init__()
        shares = tuple(float(s) for s in self.kind_shares)
        if len(shares) != len(CLIP_KINDS) or min(shares) < 0 or sum(shares) <= 0:
            raise ValueError(f"CharactersSpec.kind_shares: {len(CLIP_KINDS)} non-negative weights with a positive sum "
                             f"({', '.join(CLIP_KINDS)}), got {self.kind_shares}")
        object.__setattr__(self, "kind_shares", shares)
        large = 2 * (SIZE_CLASSES["large"][1] * self.size + EDGE_MARGIN_PX)
        if shares[2] > 0 and large > self.size // 2:
            raise ValueError(f"CharactersSpec.size: a {self.size} px canvas has lanes of {self.size // 2} px, too low "
                             f"for a large character ({large:.1f} px with margins)")
        if shares[1] > 0 and self.num_frames < 2:
            raise ValueError(f"CharactersSpec.num_frames: two-shot clips need at least 2 frames, got {self.num_frames}")


def clip_kinds(shares: Sequence[float], num_clips: int) -> list[str]:
    """The kind of each clip of a split: clip ``i`` takes the kind furthest behind its share."""
    shares = np.asarray(shares, np.float64) / float(np.sum(shares))
    counts = np.zeros(len(CLIP_KINDS))
    kinds = []
    for i in range(num_clips):
        k = int(np.argmax(shares * (i + 1) - counts))
        counts[k] += 1
        kinds.append(CLIP_KINDS[k])
    return kinds


def make_scene(spec: CharactersSpec, index: int, kind: str) -> Scene:
    """The scene of clip ``index`` of the split ``spec`` (its seed from ``clip_seed``)."""
    bank = character_bank()
    seed = clip_seed(spec.seed, spec.split, index, spec.splits)
    return sample_scene(seed, kind, [bank[n] for n in split_characters(spec.split)], size=spec.size, fps=spec.fps,
                        num_frames=spec.num_frames)


def make_character_clip(spec: CharactersSpec, index: int, kind: str) -> tuple[bytes, dict, dict]:
    """Render, encode and describe clip ``index`` of a split: ``(mp4 bytes, metadata, extra)``,
    ``extra`` ``{"ref.png": ...}`` (the character's reference, background drawn independently)
    for a one-character clip, else empty."""
    from kvideo.data.video_io import encode_video_bytes

    scene = make_scene(spec, index, kind)
    frames = render_scene(scene)
    meta = scene_metadata(scene, motion_score=scene_motion_score(frames, scene))
    extra = {}
    if len(scene.characters) == 1:
        extra["ref.png"] = png_bytes(render_reference(scene.characters[0], np.random.default_rng([scene.seed, 1])))
    return encode_video_bytes(frames, spec.fps, crf=spec.crf, pix_fmt=spec.pix_fmt), meta, extra


def _make_character_job(job):
    spec, index, kind = job
    cv2.setNumThreads(1)
    return index, *make_character_clip(spec, index, kind)


def write_characters(out: str | os.PathLike, spec: CharactersSpec, *, workers: int = 1, progress: bool = True) -> dict:
    """Write the ShapesWorld v2 split ``spec`` to ``out``; deterministic given ``spec``.

    v1's layout (``shapesworld.write_clips``: shards of ``KEY.mp4`` + ``KEY.json``
    (:func:`scene_metadata`) + ``KEY.ref.png`` for one-character clips, or raw files), plus
    ``characters.json`` (the bank: name -> attributes), ``references/NAME.png`` for the split's
    characters and ``dataset.json`` (the fields of ``spec``, ``num_shards``, the split's and the
    held-out characters). Train and val never show a held-out character. Returns ``dataset.json``.
    """
    bank, out, names = character_bank(), Path(out), split_characters(spec.split)
    (out / "references").mkdir(parents=True, exist_ok=True)
    (out / "characters.json").write_text(json.dumps({name: c.attributes() for name, c in bank.items()}, indent=2))
    for name in names:
        image = render_reference(bank[name], np.random.default_rng([spec.seed, 2, CHARACTER_NAMES.index(name)]))
        (out / "references" / f"{name}.png").write_bytes(png_bytes(image))
    jobs = [(spec, i, kind) for i, kind in enumerate(clip_kinds(spec.kind_shares, spec.num_clips))]
    num_shards = write_clips(out, jobs, _make_character_job, raw=spec.raw, clips_per_shard=spec.clips_per_shard,
                             workers=workers, progress=progress, desc=f"characters {spec.split}")
    summary = dict(name="shapesworld-v2-characters", **asdict(spec), num_shards=num_shards, characters=list(names),
                   held_out_characters=list(HELD_OUT_CHARACTERS))
    summary["kind_shares"] = dict(zip(CLIP_KINDS, spec.kind_shares))
    (out / "dataset.json").write_text(json.dumps(summary, indent=2))
    return summary
