"""ShapesWorld v1: renderer, captions, test prompts and dataset writer (the scorer: shapes_scorer.py).

Implements /work/shared/specs/shapesworld.md. One clip is a square canvas of side ``S`` with a
uniform background and one anti-aliased filled shape moving in a straight line at constant
speed (or standing still), fully inside the canvas in every frame.

Conventions (the spec leaves these to the implementation):

- Continuous image coordinates: pixel ``(row i, column j)`` covers ``[j, j+1) x [i, i+1)``;
  ``x`` grows to the right (columns), ``y`` grows down (rows). "up" is decreasing ``y``.
- An object's position is the **centre of its bounding box**: every shape's bounding box is
  ``[x-r, x+r] x [y-r, y+r]`` (circle radius r, square side 2r, triangle base 2r at
  ``y+r`` with apex at ``(x, y-r)``).
- Anti-aliasing is coverage by 4x4 supersampling per pixel.
- A still clip has ``direction='still'`` and speed name ``'none'`` (``ClipSpec.speed`` is
  ``None``); ``speed_px_per_frame`` is 0.0. The scorer predicts the same names, and
  ``'unknown'`` for an attribute it cannot measure (the spec's "none (wrong)" background).
- Objects keep a 1 pixel margin from the canvas edge, so the border pixels (which the scorer
  uses to find the background) are pure background.

Datasets are written as H.264 with ``yuv444p`` at crf 14 (the defaults of ``ShapesWorldSpec``): full
chroma resolution keeps small, nearly isoluminant shapes (green or magenta on gray) sharp.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import re
from dataclasses import asdict, dataclass
from typing import ClassVar, Mapping

import cv2
import numpy as np
from einops import reduce

# ----------------------------------------------------------------------------- constants

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
}
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (25, 200, 25),
    "blue": (25, 25, 230),
    "yellow": (235, 220, 25),
    "magenta": (220, 25, 220),
    "cyan": (25, 210, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down", "still")
SPEEDS: dict[str, float] = {"slow": 0.1, "fast": 0.3}  # fractions of S per second
NO_SPEED = "none"  # speed name of a still clip
UNKNOWN = "unknown"  # scorer prediction when an attribute cannot be measured
# The H.264 coding of the datasets (see make_clip on yuv444p).
CRF = 14
PIX_FMT = "yuv444p"

HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))

SIZE_RANGE = (0.12, 0.16)  # r as fractions of S
FILL_RATIOS = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
EDGE_MARGIN_PX = 1.0
SUPERSAMPLE = 4
ATTRIBUTES = ("background", "color", "shape", "direction", "speed")
SPLIT_IDS = {"train": 0, "val": 1}

_UNIT = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0)}
ADVERBS = {"slow": "slowly", "fast": "quickly"}


# ----------------------------------------------------------------------------- clip spec


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to render one clip; ``start_xy`` is the bounding-box centre at t=0."""

    background: str
    color: str
    shape: str
    direction: str
    speed: str | None  # 'slow' | 'fast' | None (still)
    size: float  # r in pixels
    start_xy: tuple[float, float]
    fps: float = 24.0
    num_frames: int = 48
    canvas_size: int = 64
    seed: int | None = None

    def __post_init__(self):
        for name, value, allowed in (
            ("background", self.background, BACKGROUNDS),
            ("color", self.color, COLORS),
            ("shape", self.shape, SHAPES),
            ("direction", self.direction, DIRECTIONS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")
        if (self.direction == "still") != (self.speed is None):
            raise ValueError(f"direction {self.direction!r} with speed {self.speed!r}: still clips "
                             "have speed None and moving clips 'slow' or 'fast'")
        if self.speed is not None and self.speed not in SPEEDS:
            raise ValueError(f"unknown speed {self.speed!r}; expected one of {list(SPEEDS)} or None")
        if self.fps <= 0 or self.num_frames < 1 or self.canvas_size < 8 or self.size <= 0:
            raise ValueError(f"invalid clip geometry/timing: {self}")

    @property
    def speed_name(self) -> str:
        return self.speed or NO_SPEED

    @property
    def speed_px_per_second(self) -> float:
        return 0.0 if self.speed is None else SPEEDS[self.speed] * self.canvas_size

    @property
    def speed_px_per_frame(self) -> float:
        return self.speed_px_per_second / self.fps

    def centers(self) -> np.ndarray:
        """Bounding-box centre of the object in every frame, float64 ``(f, 2)`` as (x, y)."""
        t = np.arange(self.num_frames, dtype=np.float64) / self.fps  # seconds
        velocity = np.asarray(_UNIT[self.direction]) * self.speed_px_per_second
        return np.asarray(self.start_xy, dtype=np.float64)[None] + t[:, None] * velocity[None]


def allowed_pairs(exclude_held_out: bool = True) -> list[tuple[str, str]]:
    """(color, shape) pairs in a fixed order, optionally without HELD_OUT_PAIRS."""
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    return [p for p in pairs if not (exclude_held_out and p in HELD_OUT_PAIRS)]


def check_motion_fits(*, size: int, fps: float, num_frames: int, speed: str | None = "fast",
                      max_radius: float = SIZE_RANGE[1]) -> None:
    """Raise ValueError unless an object of the largest size (``max_radius`` * S) can make the whole trip."""
    if speed is None:
        return
    travel = SPEEDS[speed] * size * (num_frames - 1) / fps
    free = size - 2 * (max_radius * size + EDGE_MARGIN_PX)
    if travel > free:
        raise ValueError(f"a {speed} object travels {travel:.1f} px in {num_frames} frames at "
                         f"{fps} fps, more than the {free:.1f} px free on a {size} px canvas; "
                         "use fewer frames or a higher fps")


def clip_spec_from_attributes(
    attrs: Mapping[str, str], rng, *, size: int = 64, fps: float = 24.0, num_frames: int = 48,
    size_range: tuple[float, float] = SIZE_RANGE, box: tuple[float, float, float, float] | None = None,
) -> ClipSpec:
    """Draw size and start point for given attributes so the whole trajectory fits.

    ``attrs`` has background, color, shape, direction and speed (``'none'``/None if still).
    ``r`` is drawn from ``size_range`` (fractions of ``size``); the object stays inside ``box``
    ``(x0, y0, x1, y1)`` (px, default the canvas) with ``EDGE_MARGIN_PX`` to spare.
    Raises ValueError when the motion is too long for the canvas (e.g. fast over 4 s).
    """
    rng = np.random.default_rng(rng)
    direction = attrs["direction"]
    speed = None if direction == "still" else attrs["speed"]
    check_motion_fits(size=size, fps=fps, num_frames=num_frames, speed=speed, max_radius=size_range[1])
    r = float(rng.uniform(size_range[0] * size, size_range[1] * size))
    box = np.asarray((0, 0, size, size) if box is None else box, dtype=np.float64)
    lo, hi = box[:2] + r + EDGE_MARGIN_PX, box[2:] - r - EDGE_MARGIN_PX  # (x, y) each
    travel = (0.0 if speed is None else SPEEDS[speed] * size) * (num_frames - 1) / fps
    start = rng.uniform(lo, hi, size=2)
    ux, uy = _UNIT[direction]
    for axis, u in ((0, ux), (1, uy)):
        if u > 0:
            start[axis] = rng.uniform(lo[axis], hi[axis] - travel)
        elif u < 0:
            start[axis] = rng.uniform(lo[axis] + travel, hi[axis])
    return ClipSpec(attrs["background"], attrs["color"], attrs["shape"], direction, speed, r,
                    (float(start[0]), float(start[1])), float(fps), int(num_frames), int(size))


def sample_clip_spec(rng, *, size: int = 64, fps: float = 24.0, num_frames: int = 48,
                     exclude_held_out: bool = True) -> ClipSpec:
    """Draw a random clip: uniform (color, shape) pair, background, direction and speed.

    ``rng`` is a ``numpy.random.Generator`` or an int seed; with a seed the spec records it
    (``spec.seed``) and the same seed always gives the same spec.
    """
    seed = int(rng) if isinstance(rng, (int, np.integer)) else None
    rng = np.random.default_rng(rng)
    pairs = allowed_pairs(exclude_held_out)
    color, shape = pairs[int(rng.integers(len(pairs)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    direction = DIRECTIONS[int(rng.integers(len(DIRECTIONS)))]
    speed = list(SPEEDS)[int(rng.integers(len(SPEEDS)))]
    attrs = dict(background=background, color=color, shape=shape, direction=direction, speed=speed)
    spec = clip_spec_from_attributes(attrs, rng, size=size, fps=fps, num_frames=num_frames)
    return ClipSpec(**{**asdict(spec), "seed": seed})


# ----------------------------------------------------------------------------- rendering


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean coverage of a shape centred at 0 (bounding-box centre) at offsets (dx, dy)."""
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # Triangle: apex (0, -r), base from (-r, r) to (r, r); half-width (dy + r) / 2.
    return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def shape_coverage(shape: str, center_xy, r: float, size: int) -> np.ndarray:
    """Anti-aliased coverage, float32 ``(S, S)`` in [0, 1], of a shape of size ``r`` whose
    bounding box is centred at ``center_xy`` (x, y), by ``SUPERSAMPLE`` x ``SUPERSAMPLE``
    samples per pixel."""
    k = SUPERSAMPLE
    samples = (np.arange(size * k, dtype=np.float64) + 0.5) / k  # sub-pixel sample positions
    cx, cy = center_xy
    inside = _inside(shape, samples[None, :] - cx, samples[:, None] - cy, r)
    return reduce(inside.astype(np.float32), "(h a) (w b) -> h w", "mean", a=k, b=k)  # (S, S)


def render_clip(spec: ClipSpec, *, background_rgb=None, color_rgb=None) -> np.ndarray:
    """Render a clip as uint8 ``(f, S, S, 3)`` RGB.

    ``background_rgb`` / ``color_rgb`` override the palette colours (for tests of the scorer
    and off-palette experiments); the geometry and motion always follow ``spec``.
    """
    s = spec.canvas_size
    bg = np.asarray(BACKGROUNDS[spec.background] if background_rgb is None else background_rgb, np.float32)
    fg = np.asarray(COLORS[spec.color] if color_rgb is None else color_rgb, np.float32)
    out = np.empty((spec.num_frames, s, s, 3), dtype=np.uint8)
    for i, center in enumerate(spec.centers()):
        alpha = shape_coverage(spec.shape, center, spec.size, s)
        out[i] = np.rint(bg + alpha[..., None] * (fg - bg)).astype(np.uint8)
    return out


# ----------------------------------------------------------------------------- captions

_MOVING_TEMPLATES = (
    "a {color} {shape} moving {direction} {adverb} on a {background} background",  # canonical
    "a {background} background with a {color} {shape} drifting {direction} {adverb}",
    "on a {background} background, a {color} {shape} travels {direction} {adverb}",
    "a {color} {shape} sliding {direction} {adverb} across a {background} background",
)
_STILL_TEMPLATES = (
    "a {color} {shape} standing still on a {background} background",  # canonical
    "a {background} background with a motionless {color} {shape}",
    "on a {background} background, a {color} {shape} stays still",
    "a {color} {shape} resting in place on a {background} background",
)


def attributes_of(spec_or_attrs) -> dict:
    if isinstance(spec_or_attrs, ClipSpec):
        s = spec_or_attrs
        return dict(background=s.background, color=s.color, shape=s.shape,
                    direction=s.direction, speed=s.speed_name)
    return dict(spec_or_attrs)


def caption(spec_or_attrs, paraphrase_rng=None) -> str:
    """The canonical caption of a clip (or of an attribute dict).

    With ``paraphrase_rng`` (a numpy Generator or seed), half of the time a paraphrase drawn
    uniformly from three alternative templates is returned instead; every paraphrase keeps
    all five attributes and is understood by :func:`parse_caption`.
    """
    a = attributes_of(spec_or_attrs)
    still = a["direction"] == "still"
    templates = _STILL_TEMPLATES if still else _MOVING_TEMPLATES
    index = 0
    if paraphrase_rng is not None:
        rng = np.random.default_rng(paraphrase_rng)
        if rng.random() < 0.5:
            index = 1 + int(rng.integers(len(templates) - 1))
    adverb = None if still else ADVERBS[a["speed"]]
    return templates[index].format(color=a["color"], shape=a["shape"], direction=a["direction"],
                                   adverb=adverb, background=a["background"])


def _template_regex(template: str) -> re.Pattern:
    alternatives = dict(color=COLORS, shape=SHAPES, direction=DIRECTIONS[:4],
                        adverb=ADVERBS.values(), background=BACKGROUNDS)
    parts = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    pattern = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{'|'.join(alternatives[p])})"
                      for i, p in enumerate(parts))
    return re.compile(rf"^{pattern}$")


_CAPTION_REGEXES = [(_template_regex(t), False) for t in _MOVING_TEMPLATES] + [
    (_template_regex(t), True) for t in _STILL_TEMPLATES]


def parse_caption(text: str) -> dict:
    """Attributes of a canonical caption (or one of the paraphrases :func:`caption` emits).

    Returns ``{background, color, shape, direction, speed}`` with ``speed='none'`` for a
    still object. Case, surrounding whitespace and a final period are ignored.
    Raises ValueError for any other text.
    """
    clean = " ".join(text.strip().lower().rstrip(".").split())
    for regex, still in _CAPTION_REGEXES:
        m = regex.match(clean)
        if m:
            g = m.groupdict()
            speed = NO_SPEED if still else {v: k for k, v in ADVERBS.items()}[g["adverb"]]
            return dict(background=g["background"], color=g["color"], shape=g["shape"],
                        direction="still" if still else g["direction"], speed=speed)
    raise ValueError(f"not a ShapesWorld caption: {text!r}")


# ----------------------------------------------------------------------------- metadata


def metadata(spec: ClipSpec, *, motion_score: float | None = None, caption_text: str | None = None) -> dict:
    """The flat per-clip metadata of the spec (the shard's ``KEY.json``).

    ``speed`` is 'slow', 'fast' or 'none' (still). ``motion_score`` is computed from the
    rendered clip with :func:`kvideo.data.motion.motion_score` when not given.
    """
    if motion_score is None:
        from kvideo.data.motion import motion_score as compute_motion

        motion_score = compute_motion(render_clip(spec), spec.fps)
    return {
        "caption": caption(spec) if caption_text is None else caption_text,
        "background": spec.background, "color": spec.color, "shape": spec.shape,
        "direction": spec.direction, "speed": spec.speed_name,
        "speed_px_per_frame": spec.speed_px_per_frame, "size": spec.size,
        "start_xy": [float(v) for v in spec.start_xy], "fps": float(spec.fps),
        "num_frames": int(spec.num_frames), "seed": spec.seed,
        "width": int(spec.canvas_size), "height": int(spec.canvas_size),
        "motion_score": float(motion_score),
    }


def spec_from_metadata(meta: Mapping) -> ClipSpec:
    """Rebuild the ClipSpec of a clip from its metadata (renders the identical clip)."""
    return ClipSpec(meta["background"], meta["color"], meta["shape"], meta["direction"],
                    None if meta["speed"] == NO_SPEED else meta["speed"], float(meta["size"]),
                    tuple(meta["start_xy"]), float(meta["fps"]), int(meta["num_frames"]),
                    int(meta["width"]), meta.get("seed"))


# ----------------------------------------------------------------------------- test prompts


def canonical_test_prompts(held_out_per_pair: int = 10, seen_per_pair: int = 2) -> list[dict]:
    """A fixed list of canonical test prompts, ``{"prompt": ..., "split": "seen"|"held_out"}``.

    For every (color, shape) pair, all 27 combinations of background x motion (4 directions
    x 2 speeds + still) are ordered by the SHA-256 of their caption and the first ``k`` are
    taken: ``seen_per_pair`` for the 15 training pairs, ``held_out_per_pair`` for the 3
    held-out ones. Deterministic across machines and library versions.
    """
    motions = [(d, s) for d in DIRECTIONS[:4] for s in SPEEDS] + [("still", NO_SPEED)]
    prompts = []
    for split, pairs, k in (("seen", allowed_pairs(True), seen_per_pair),
                            ("held_out", list(HELD_OUT_PAIRS), held_out_per_pair)):
        for color, shape in pairs:
            texts = [caption(dict(background=b, color=color, shape=shape, direction=d, speed=s))
                     for b in BACKGROUNDS for d, s in motions]
            texts.sort(key=lambda t: hashlib.sha256(t.encode()).hexdigest())
            prompts += [{"prompt": t, "split": split} for t in texts[:k]]
    return prompts


# ----------------------------------------------------------------------------- dataset writer


def prompt_clip(prompt: str, index: int, size: int = 64, coded: bool = False,
                pix_fmt: str = PIX_FMT) -> np.ndarray:
    """A ground-truth clip (48 frames at 24 fps, uint8 (f, h, w, 3)) showing a canonical
    `prompt`, seeded by the prompt and its position `index` in a prompt set (the evaluators'
    reference clips: first frames to condition on, keyframes to interpolate between).

    `coded`: passed through the datasets' H.264 coding (crf `CRF`, `pix_fmt`: give the training
    shards' own, see `kvideo.evaluation.shards_pix_fmt`), so the clip is what a model trained on
    the shards saw rather than the sharper raw render."""
    seed = int(hashlib.sha256(f"{index}:{prompt}".encode()).hexdigest()[:8], 16)
    frames = render_clip(clip_spec_from_attributes(parse_caption(prompt), seed, size=size))
    if not coded:
        return frames
    from kvideo.data.video_io import encode_video_bytes, read_video

    return read_video(encode_video_bytes(frames, 24.0, crf=CRF, pix_fmt=pix_fmt))[0]


def clip_seed(seed: int, split: str, index: int, splits: Mapping[str, int] = SPLIT_IDS) -> int:
    """The seed of clip ``index`` of a split, derived from (seed, ``splits[split]``, index)."""
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; expected one of {list(splits)}")
    return int(np.random.SeedSequence([seed, splits[split], index]).generate_state(1)[0])


def make_clip(seed: int, *, size: int = 64, fps: float = 24.0, num_frames: int = 48, crf: int = CRF,
              pix_fmt: str = PIX_FMT, paraphrase: bool = False) -> tuple[bytes, dict]:
    """Render, encode (H.264 mp4 bytes) and describe (metadata dict) the clip of ``seed``.

    The default ``yuv444p`` keeps chroma at full resolution: with 4:2:0 a green or magenta
    shape on gray (nearly the same luma) is drawn in 2x2 chroma blocks at 64x64, which
    blurs small shapes (the scorer then misreads ~1% of triangles).
    """
    from kvideo.data.motion import motion_score
    from kvideo.data.video_io import encode_video_bytes

    spec = sample_clip_spec(seed, size=size, fps=fps, num_frames=num_frames)
    frames = render_clip(spec)
    text = caption(spec, np.random.default_rng([seed, 1]) if paraphrase else None)
    meta = metadata(spec, motion_score=motion_score(frames, fps), caption_text=text)
    return encode_video_bytes(frames, fps, crf=crf, pix_fmt=pix_fmt), meta


def _make_clip_job(job):
    index, seed, kwargs = job
    cv2.setNumThreads(1)
    return index, *make_clip(seed, **kwargs), {}




@dataclass(frozen=True)
class SplitSpec:
    """The fields of a ShapesWorld split that every world (v1 :class:`ShapesWorldSpec`, v2
    ``characters.CharactersSpec``) shares; the split is deterministic given them.

    ``num_clips`` clips of ``num_frames`` frames at ``fps`` on a ``size`` px canvas, clip ``i``
    seeded by :func:`clip_seed` (``seed``, ``split``, i, ``splits``); ``split='val'`` draws a
    disjoint stream with the same distribution. Coded as H.264 at ``crf`` in ``pix_fmt``,
    ``clips_per_shard`` clips per webdataset shard, or plain mp4 files with ``raw=True``.
    Raises ValueError naming the field when a value is out of range, or when the fastest motion
    of the world's largest object (``max_radius`` * size) does not fit the canvas.
    """

    splits: ClassVar[Mapping[str, int]] = SPLIT_IDS  # the world's split names
    max_radius: ClassVar[float] = SIZE_RANGE[1]  # the world's largest r, a fraction of size

    num_clips: int
    size: int = 64
    seed: int = 0
    fps: float = 24.0
    num_frames: int = 48
    split: str = "train"
    raw: bool = False
    clips_per_shard: int = 256
    crf: int = CRF
    pix_fmt: str = PIX_FMT

    def __post_init__(self):
        name = type(self).__name__
        if self.num_clips < 0:
            raise ValueError(f"{name}.num_clips must be >= 0, got {self.num_clips}")
        for field in ("size", "fps", "num_frames", "clips_per_shard"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{name}.{field} must be > 0, got {getattr(self, field)}")
        if self.split not in self.splits:
            raise ValueError(f"{name}.split: unknown split {self.split!r}; expected one of {list(self.splits)}")
        try:
            check_motion_fits(size=self.size, fps=self.fps, num_frames=self.num_frames, max_radius=self.max_radius)
        except ValueError as e:
            raise ValueError(f"{name} (size, fps, num_frames): {e}") from None


@dataclass(frozen=True)
class ShapesWorldSpec(SplitSpec):
    """What a ShapesWorld v1 split holds (the fields of :class:`SplitSpec`, splits train and val).
    ``paraphrase``: captions are sometimes paraphrases (the attributes in the metadata stay exact).
    """

    paraphrase: bool = False


def write_clips(out: str | os.PathLike, jobs: list, make_job, *, raw: bool = False, clips_per_shard: int = 256,
                workers: int = 1, progress: bool = True, desc: str = "shapesworld") -> int:
    """Write the clips of ``jobs`` (in order) to ``out``; returns the number of shards.

    ``make_job(job)`` (a module-level function, for the worker processes) returns ``(index,
    mp4 bytes, metadata, extra)``, ``extra`` mapping further member extensions to bytes (e.g.
    ``{"ref.png": ...}``). Shards: ``out/shard-000000.tar``... with samples ``clip_0000000.mp4``
    + ``.json`` (+ extras), ``clips_per_shard`` per tar. ``raw``: ``out/clip_0000000.mp4`` (+
    ``clip_0000000.EXT`` extras) and ``out/captions.jsonl`` (``{"path", "caption"}``).
    Every file is rewritten from its jobs, so re-running a killed run with the same jobs
    leaves exactly the output of an uninterrupted one (nothing lost, nothing twice).
    """
    from tqdm import tqdm

    os.makedirs(out, exist_ok=True)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    results = pool.imap(make_job, jobs, chunksize=4) if pool else map(make_job, jobs)
    writer = captions = None
    try:
        if raw:
            captions = open(os.path.join(out, "captions.jsonl"), "w")
        else:
            import webdataset as wds

            writer = wds.ShardWriter(os.path.join(os.fspath(out), "shard-%06d.tar"), maxcount=clips_per_shard,
                                     verbose=0)
        for index, mp4, meta, extra in tqdm(results, total=len(jobs), disable=not progress, desc=desc):
            key = f"clip_{index:07d}"
            if raw:
                for ext, data in {"mp4": mp4, **extra}.items():
                    with open(os.path.join(out, f"{key}.{ext}"), "wb") as f:
                        f.write(data)
                captions.write(json.dumps({"path": f"{key}.mp4", "caption": meta["caption"]}) + "\n")
            else:
                writer.write({"__key__": key, "mp4": mp4, "json": json.dumps(meta, sort_keys=True).encode(), **extra})
    finally:
        if pool:
            pool.close()
            pool.join()
        if writer:
            writer.close()
        if captions:
            captions.close()
    return 0 if raw else math.ceil(len(jobs) / clips_per_shard)


def write_shapesworld(out: str | os.PathLike, spec: ShapesWorldSpec, *, workers: int = 1,
                      progress: bool = True) -> dict:
    """Write the ShapesWorld split ``spec`` to ``out``; deterministic given ``spec``.

    Default: webdataset shards ``out/shard-000000.tar``... with samples ``clip_0000000.mp4``
    + ``clip_0000000.json`` (:func:`metadata`). ``spec.raw``: ``out/clip_0000000.mp4`` files
    and ``out/captions.jsonl`` (``{"path", "caption"}``, paths relative to ``out``); see
    :func:`write_clips`. Always writes ``out/test_prompts.jsonl`` (:func:`canonical_test_prompts`)
    and ``out/dataset.json`` (the fields of ``spec``, ``num_shards``, the held-out pairs). Held-out
    pairs are never rendered. ``workers`` render/encode processes and ``progress`` (a bar)
    change nothing in the output. Returns the contents of ``dataset.json``.
    """
    kwargs = dict(size=spec.size, fps=spec.fps, num_frames=spec.num_frames, crf=spec.crf, pix_fmt=spec.pix_fmt,
                  paraphrase=spec.paraphrase)
    jobs = [(i, clip_seed(spec.seed, spec.split, i), kwargs) for i in range(spec.num_clips)]
    num_shards = write_clips(out, jobs, _make_clip_job, raw=spec.raw, clips_per_shard=spec.clips_per_shard,
                             workers=workers, progress=progress, desc=f"shapesworld {spec.split}")
    with open(os.path.join(out, "test_prompts.jsonl"), "w") as f:
        for p in canonical_test_prompts():
            f.write(json.dumps(p) + "\n")
    summary = dict(name="shapesworld-v1", split=spec.split, num_clips=spec.num_clips, size=spec.size,
                   seed=spec.seed, fps=spec.fps, num_frames=spec.num_frames, raw=spec.raw,
                   clips_per_shard=spec.clips_per_shard, crf=spec.crf, pix_fmt=spec.pix_fmt,
                   paraphrase=spec.paraphrase, num_shards=num_shards,
                   held_out_pairs=[list(p) for p in HELD_OUT_PAIRS])
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
