"""ShapesWorld v2 (characters): the bank, clips, captions, writer and scorer agree with the spec
and with each other."""

import importlib.util
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from kvideo.data.characters import (
    BAND_HEIGHT, CHARACTER_NAMES, CLIP_KINDS, HELD_OUT_CHARACTERS, IDENTITY, NO_BAND, SIZE_CLASSES, TRAINING_CHARACTERS,
    Character, CharactersSpec, Scene, Shot, Track, band_stripe, character_bank, clip_kinds, describe,
    lane_rows, load_bank, make_scene, parse_scene_caption, render_reference, render_scene, sample_scene, scene_caption,
    scene_from_metadata, scene_metadata,
)
from kvideo.data.characters_scorer import aggregate_character_scores, find_cut, score_character_clip
from kvideo.data.shapesworld import BACKGROUNDS, COLORS, ClipSpec, render_clip

ROOT = Path(__file__).resolve().parents[1]
BANK = character_bank()
EVERYONE = list(BANK.values())


def scenes(kind, n, offset=0):
    """n scenes of a kind at 64 px, fixed seeds, drawn from all 16 characters."""
    return [sample_scene(10_000 * CLIP_KINDS.index(kind) + offset + i, kind, EVERYONE) for i in range(n)]


def still(character, r, center, background="black", size=64):
    clip = ClipSpec(background, character.body, character.shape, "still", None, r, center, num_frames=1,
                    canvas_size=size)
    return Scene("single", (Shot(0, (Track(character, "full", clip),)),))


# ----------------------------------------------------------------------------- the bank


def test_the_bank():
    assert list(BANK) == list(CHARACTER_NAMES) and len(BANK) == 16
    assert CHARACTER_NAMES[:4] == ("Ada", "Bix", "Cato", "Dune")
    assert HELD_OUT_CHARACTERS == ("Milo", "Nova", "Otto", "Pip")
    assert len({c.identity() for c in EVERYONE}) == 16  # no two share all four attributes
    assert sum(c.band == NO_BAND for c in EVERYONE) >= 4
    assert all(c.band != c.body and c.size_class in SIZE_CLASSES for c in EVERYONE)
    assert character_bank() == BANK  # deterministic
    assert [c.held_out for c in EVERYONE] == [False] * 12 + [True] * 4
    training = [BANK[n] for n in TRAINING_CHARACTERS]  # every value a held-out character shows is seen in training
    for attr in IDENTITY:
        assert {getattr(BANK[n], attr) for n in HELD_OUT_CHARACTERS} <= {getattr(c, attr) for c in training}
    with pytest.raises(ValueError, match="band colour 'red' is its body colour"):
        Character("Ada", "circle", "red", "red", "small")
    with pytest.raises(ValueError, match="Character.name"):
        Character("Zed", "circle", "red", NO_BAND, "small")


def test_held_out_characters_never_in_training_clips():
    def names(split):
        spec = CharactersSpec(200, split=split)
        return {c.name for i, kind in enumerate(clip_kinds(spec.kind_shares, 200))
                for c in make_scene(spec, i, kind).characters}

    assert names("train") == names("val") == set(TRAINING_CHARACTERS)
    assert names("test") == set(CHARACTER_NAMES)


def test_clip_kind_shares():
    kinds = clip_kinds((0.5, 0.25, 0.25), 400)
    assert kinds[:4] == ["single", "two_shots", "two_characters", "single"]
    for n in (4, 40, 400):  # every prefix holds the shares
        assert [kinds[:n].count(k) for k in CLIP_KINDS] == [n // 2, n // 4, n // 4]
    assert set(clip_kinds((1, 0, 3), 50)) == {"single", "two_characters"}
    with pytest.raises(ValueError, match="CharactersSpec.kind_shares"):
        CharactersSpec(4, kind_shares=(1, 1))
    with pytest.raises(ValueError, match="CharactersSpec.split"):
        CharactersSpec(4, split="holdout")
    with pytest.raises(ValueError, match="CharactersSpec.size: .* lanes"):
        CharactersSpec(4, size=16, num_frames=4)
    assert CharactersSpec(4, size=16, num_frames=4, kind_shares=(1, 1, 0)).size == 16  # no lanes: fine


# ----------------------------------------------------------------------------- geometry


def test_band_geometry_on_rendered_frames():
    squares = [c for c in EVERYONE if c.shape == "square" and c.band != NO_BAND]
    for character in squares:
        lo, hi = (64 * f for f in SIZE_CLASSES[character.size_class])
        for r, cy in ((lo, 30.0), ((lo + hi) / 2, 31.37), (hi, 33.81), (lo + 0.3, 20.5)):
            frame = render_scene(still(character, r, (32.0, cy)))[0]
            band = np.all(frame == COLORS[character.band], axis=-1)  # (S, S)
            rows = np.flatnonzero(band.any(axis=1))
            height = max(2, int(np.floor(0.6 * r + 0.5)))
            assert len(rows) == height and np.all(np.diff(rows) == 1), (character, r, rows)
            assert abs(rows.mean() + 0.5 - cy) <= 0.5  # centred on the bounding box
            inner = np.all(frame == COLORS[character.body], axis=-1) | band  # the band spans the shape's width
            assert band[rows].sum(axis=1).tolist() == [inner[rows[0] - 2].sum()] * height
            assert np.array_equal(band_stripe(r, cy, 64), band.any(axis=1))
    # never below 2 px: on a 16 px canvas a small character has r < 2, 0.6 r rounds to 1
    character = next(c for c in EVERYONE if c.band != NO_BAND and c.size_class == "small" and c.shape == "square")
    frame = render_reference(character, 0, size=16)
    assert np.any(np.all(frame == COLORS[character.band], axis=-1), axis=1).sum() == 2
    assert BAND_HEIGHT == 0.6


def test_size_classes_and_references_by_pixels():
    for character in EVERYONE:
        lo, hi = (64 * f for f in SIZE_CLASSES[character.size_class])
        for seed in range(3):
            ref = render_reference(character, seed)
            assert ref.shape == (64, 64, 3) and ref.dtype == np.uint8
            bg = next(v for v in BACKGROUNDS.values() if np.array_equal(ref[0, 0], v))
            cover = ~np.all(ref == bg, axis=-1)
            rows, cols = np.flatnonzero(cover.any(axis=1)), np.flatnonzero(cover.any(axis=0))
            assert 2 * lo - 1 <= len(rows) <= 2 * hi + 2 and 2 * lo - 1 <= len(cols) <= 2 * hi + 2, character
            assert abs((rows[0] + rows[-1] + 1) / 2 - 32) <= 1 and abs((cols[0] + cols[-1] + 1) / 2 - 32) <= 1
    backgrounds = {tuple(render_reference(BANK["Ada"], seed)[0, 0]) for seed in range(12)}
    assert len(backgrounds) == 3  # drawn independently of any clip
    small, large = (sorted(SIZE_CLASSES[k]) for k in ("small", "large"))
    assert small == [0.10, 0.12] and large == [0.17, 0.19]


def test_an_unbanded_single_character_is_a_v1_clip():
    plain = [c for c in EVERYONE if c.band == NO_BAND]
    for i, scene in enumerate(sample_scene(i, "single", plain) for i in range(6)):
        assert np.array_equal(render_scene(scene), render_clip(scene.shots[0].tracks[0].clip))


def test_lanes_and_shots():
    for scene in scenes("two_characters", 16):
        frames, shot = render_scene(scene), scene.shots[0]
        assert [t.lane for t in shot.tracks] == ["top", "bottom"]
        assert shot.tracks[0].character != shot.tracks[1].character
        for track in shot.tracks:
            top, bottom = lane_rows(track.lane, 64)
            y = track.clip.centers()[:, 1]
            assert np.all(y - track.clip.size >= top) and np.all(y + track.clip.size <= bottom)
            assert track.clip.direction in ("left", "right", "still")
        bg = np.array(BACKGROUNDS[shot.background])
        assert np.all(frames[:, [0, 31, 32, 63]] == bg)  # the lanes' border rows are background
    for scene in scenes("two_shots", 16):
        frames, (one, two) = render_scene(scene), scene.shots
        assert (one.start, one.stop, two.start, two.stop) == (0, 24, 24, 48) and len(frames) == 48
        assert one.tracks[0].character == two.tracks[0].character and one.background != two.background
        assert np.all(frames[:24, 0] == BACKGROUNDS[one.background])
        assert np.all(frames[24:, 0] == BACKGROUNDS[two.background])
        assert find_cut(frames) == 24
    assert find_cut(render_scene(scenes("single", 1)[0])) is None
    with pytest.raises(ValueError, match="leaves its lane"):
        clip = ClipSpec("black", BANK["Ada"].body, BANK["Ada"].shape, "still", None, 11.0, (32.0, 30.0))
        Track(BANK["Ada"], "top", clip)


# ----------------------------------------------------------------------------- captions and metadata


def test_captions_round_trip_for_every_kind():
    for kind in CLIP_KINDS:
        for scene in scenes(kind, 40):
            text = scene_caption(scene)
            assert parse_scene_caption(text) == describe(scene)
            assert scene_caption(parse_scene_caption(text)) == text
            assert parse_scene_caption(text.upper() + ".") == describe(scene)
    ada_left = {"character": "Ada", "lane": "full", "direction": "left", "speed": "slow"}
    assert parse_scene_caption("Ada moving left slowly on a gray background") == {
        "kind": "single", "shots": [{"background": "gray", "objects": [ada_left]}]}
    two = "Ada moving up quickly on a black background, then Ada standing still on a white background"
    assert [s["objects"][0]["direction"] for s in parse_scene_caption(two)["shots"]] == ["up", "still"]
    pair = parse_scene_caption("Bix standing still and Ada moving right quickly on a gray background")
    assert [(o["character"], o["lane"]) for o in pair["shots"][0]["objects"]] == [("Bix", "top"), ("Ada", "bottom")]


@pytest.mark.parametrize("text,problem", [
    ("Zed moving left slowly on a gray background", "unknown character 'zed'"),
    ("Ada moving left slowly on a purple background", "unknown background 'purple'"),
    ("Ada moving sideways slowly on a gray background", "unknown direction 'sideways'"),
    ("Ada moving left gently on a gray background", "unknown speed 'gently'"),
    ("Ada dancing on a gray background", "expected 'moving <direction> <slowly|quickly>' or 'standing still'"),
    ("Ada moving left slowly", "does not end in 'on a <background> background'"),
    ("Ada standing still on a gray background, then Bix standing still on a white background", "different characters"),
    ("Ada standing still on a gray background, then Ada standing still on a gray background", "share the background"),
    ("Ada standing still on a gray background, then Ada standing still on a white background, then Ada standing "
     "still on a black background", "one ', then ', this one 2"),
    ("Ada moving up slowly and Bix standing still on a gray background", "moves left or right or stands still"),
    ("Ada standing still and Ada moving left slowly on a gray background", "Ada twice"),
    ("Ada standing still and Bix standing still and Cato standing still on a gray background", "this one 3"),
    ("a red circle moving left slowly on a gray background", "unknown character 'a'"),
])
def test_bad_captions_name_the_problem(text, problem):
    with pytest.raises(ValueError, match="not a ShapesWorld characters caption") as e:
        parse_scene_caption(text)
    assert problem in str(e.value)


def test_metadata_of_every_kind():
    for kind in CLIP_KINDS:
        scene = scenes(kind, 1, offset=7)[0]
        meta = json.loads(json.dumps(scene_metadata(scene, motion_score=0.5)))
        assert meta["kind"] == kind and meta["caption"] == scene_caption(scene) == scene_caption(meta)
        assert {"fps", "num_frames", "seed", "width", "height", "motion_score"} <= set(meta)
        people = meta["characters"] if kind == "two_characters" else [meta["character"]]
        assert ("characters" in meta) == (kind == "two_characters") and ("character" in meta) != ("characters" in meta)
        for person in people:
            assert {k: person[k] for k in IDENTITY} == BANK[person["name"]].attributes()
            assert person["held_out"] == (person["name"] in HELD_OUT_CHARACTERS)
        assert [p["lane"] for p in people] == (["top", "bottom"] if kind == "two_characters" else ["full"])
        shots = meta["shots"]
        assert [s["frames"] for s in shots] == ([[0, 24], [24, 48]] if kind == "two_shots" else [[0, 48]])
        for shot in shots:
            for obj in shot["objects"]:
                assert {"character", "lane", "color", "shape", "direction", "speed", "speed_px_per_frame", "size",
                        "start_xy"} == set(obj)
                assert obj["color"] == BANK[obj["character"]].body
        assert scene_from_metadata(meta) == scene
        assert np.array_equal(render_scene(scene_from_metadata(meta)), render_scene(scene))
    assert scene_metadata(scenes("two_shots", 1)[0])["motion_score"] < 1.0  # the cut is no motion


# ----------------------------------------------------------------------------- scorer


@pytest.mark.parametrize("kind", CLIP_KINDS)
def test_scorer_agrees_with_the_renderer(kind):
    results = []
    for scene in scenes(kind, 24):
        result = score_character_clip(render_scene(scene), scene.fps, scene_caption(scene))
        results.append(result)
        assert result["all_correct"], (scene_caption(scene), {k: v for k, v in result["correct"].items() if not v},
                                       result["pred"])
        for part, shot_track in zip(result["parts"], [(s, t) for s in scene.shots for t in s.tracks]):
            shot, track = shot_track
            assert part["pred"]["background"] == shot.background and part["pred"]["direction"] == track.clip.direction
            assert part["identity"] == list(track.character.identity()) and part["lane"] == track.lane
        expected = {"single": set(), "two_shots": {"cut", "consistency"}, "two_characters": {"binding"}}[kind]
        assert set(result["correct"]) == {"background", "color", "shape", "direction", "speed", "band", "size_class",
                                          "identity"} | expected
        json.dumps(result)
    if kind == "two_shots":
        assert {r["cut_frame"] for r in results} == {24}
    summary = aggregate_character_scores(results)
    assert summary["all_correct"] == 1.0 and summary["by_kind"][kind]["n"] == 24
    assert summary["by_split"]["held_out"]["n"] + summary["by_split"]["seen"]["n"] == 24
    assert summary["by_split"]["held_out"]["n"] > 0


def test_scorer_on_references():
    for character in EVERYONE:
        ref = render_reference(character, 5)
        bg = next(name for name, v in BACKGROUNDS.items() if np.array_equal(ref[0, 0], v))
        prompt = f"{character.name} standing still on a {bg} background"
        result = score_character_clip(np.stack([ref, ref]), 24.0, prompt)
        assert result["all_correct"], (character, result["pred"])


def test_scorer_catches_wrong_identity_binding_consistency_and_missing_cuts():
    pair = scenes("two_characters", 1)[0]
    swapped = describe(pair)
    top, bottom = swapped["shots"][0]["objects"]
    top["character"], bottom["character"] = bottom["character"], top["character"]
    result = score_character_clip(render_scene(pair), 24.0, swapped)
    assert not result["correct"]["binding"] and not result["correct"]["identity"] and result["correct"]["background"]

    single = scenes("single", 1)[0]
    frames = render_scene(single)
    name = single.characters[0].name
    other = next(c for c in EVERYONE if c.shape == single.characters[0].shape and c.name != name)
    text = scene_caption(single).replace(name, other.name)
    result = score_character_clip(frames, 24.0, text)
    wrong = {k for k, ok in result["correct"].items() if not ok}
    assert "identity" in wrong and "shape" not in wrong and "direction" not in wrong

    shots = scenes("two_shots", 1)[0]
    hero = shots.characters[0]
    impostor = next(c for c in EVERYONE if c.identity()[:2] != hero.identity()[:2])  # another shape or body
    other = next(scene for scene in (sample_scene(i, "two_shots", [impostor]) for i in range(20))
                 if scene.shots[1].background != shots.shots[0].background)
    frames = np.concatenate([render_scene(shots)[:24], render_scene(other)[24:]])  # shot 2 shows the impostor
    result = score_character_clip(frames, 24.0, scene_caption(shots))
    assert not result["correct"]["consistency"] and result["correct"]["cut"] and result["cut_frame"] == 24
    no_cut = render_scene(shots)[:24].repeat(2, axis=0)
    result = score_character_clip(no_cut, 24.0, scene_caption(shots))
    assert result["cut_frame"] is None and not result["correct"]["cut"] and not result["all_correct"]


# ----------------------------------------------------------------------------- the tool


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_shards(folder):
    samples = {}
    for shard in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_make_shapesworld_characters(tmp_path):
    from kvideo.data.shards import ShardIndex
    from kvideo.data.video_io import read_video

    make = load_tool("make_shapesworld").main
    out = tmp_path / "train"
    args = ["--world", "characters", "--out", str(out), "--num-clips", "4", "--num-frames", "12",
            "--clips-per-shard", "3", "--seed", "1"]
    summary = make(args)
    assert summary["num_shards"] == 2 and summary["kind_shares"] == {"single": 0.5, "two_shots": 0.25,
                                                                      "two_characters": 0.25}
    assert load_bank(out) == BANK
    assert sorted(p.stem for p in (out / "references").glob("*.png")) == sorted(TRAINING_CHARACTERS)
    samples = read_shards(out)
    assert sorted(samples) == [f"clip_{i:07d}" for i in range(4)]
    kinds = []
    for key, members in samples.items():
        meta = json.loads(members["json"])
        kinds.append(meta["kind"])
        frames, _ = read_video(members["mp4"])
        assert frames.shape == (12, 64, 64, 3)
        people = meta.get("characters") or [meta["character"]]
        assert not any(p["held_out"] for p in people)
        assert ("ref.png" in members) == (meta["kind"] != "two_characters")
        if "ref.png" in members:
            ref = cv2.imdecode(np.frombuffer(members["ref.png"], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
            assert np.array_equal(ref, render_reference(BANK[people[0]["name"]], [meta["seed"], 1]))
        assert score_character_clip(frames, 24.0, meta["caption"])["all_correct"]
        assert score_character_clip(frames, 24.0, meta, load_bank(out))["all_correct"]  # metadata as the prompt
    assert kinds == ["single", "two_shots", "two_characters", "single"]
    assert len(ShardIndex(str(out))) == 4  # the training reader sees every sample

    # A killed run re-run: the same samples, none lost or twice.
    before = read_shards(out)
    (out / "shard-000001.tar").write_bytes((out / "shard-000001.tar").read_bytes()[:2000])
    make(args)
    assert read_shards(out) == before

    test = tmp_path / "test"
    make(["--world", "characters", "--out", str(test), "--num-clips", "2", "--num-frames", "12", "--split", "test",
          "--kinds", "single=1", "--raw"])
    assert sorted(p.stem for p in (test / "references").glob("*.png")) == sorted(CHARACTER_NAMES)
    assert sorted(p.name for p in test.glob("clip_*")) == ["clip_0000000.mp4", "clip_0000000.ref.png",
                                                           "clip_0000001.mp4", "clip_0000001.ref.png"]
    rows = [json.loads(line) for line in (test / "captions.jsonl").read_text().splitlines()]
    assert [parse_scene_caption(r["caption"])["kind"] for r in rows] == ["single", "single"]
    assert json.loads((test / "dataset.json").read_text())["held_out_characters"] == list(HELD_OUT_CHARACTERS)
    with pytest.raises(SystemExit):
        make(["--out", str(tmp_path / "v1"), "--num-clips", "1", "--split", "test"])  # v1 has no test split


def test_score_shapes_scores_v2_shards_and_captions(tmp_path, capsys):
    """tools/score_shapes.py on a v2 split (metadata as the prompt) and on mp4s with v2 captions:
    the renderer's clips score 100% with v2's table; v1 and v2 together are refused."""
    make, score = load_tool("make_shapesworld").main, load_tool("score_shapes").main
    out = tmp_path / "test"
    make(["--world", "characters", "--out", str(out), "--num-clips", "4", "--num-frames", "12", "--split", "test"])
    result = score([str(out)])
    assert result["summary"]["n"] == 4 and result["summary"]["all_correct"] == 1.0
    assert set(result["summary"]["by_kind"]) == {"single", "two_shots", "two_characters"}
    assert "| two_shots | 1 | 100.0% |" in capsys.readouterr().out
    videos = tmp_path / "videos"
    videos.mkdir()
    for key, members in read_shards(out).items():
        (videos / f"{key}.mp4").write_bytes(members["mp4"])
        (videos / f"{key}.txt").write_text(json.loads(members["json"])["caption"])
    assert score([str(videos)])["summary"]["all_correct"] == 1.0  # from the captions alone
    (videos / "v1.mp4").write_bytes(next(iter(read_shards(out).values()))["mp4"])
    (videos / "v1.txt").write_text("a red circle moving left slowly on a white background")
    with pytest.raises(SystemExit, match="mixes ShapesWorld v1 and v2"):
        score([str(videos)])
