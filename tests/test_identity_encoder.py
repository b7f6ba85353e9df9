"""The identity encoder (kvideo/models/identity_encoder.py), its file (kvideo.weights) and its
training tool (tools/train_identity_encoder.py) on tiny ShapesWorld v2 splits."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from kvideo.data.characters import (IDENTITY, NO_BAND, SIZE_CLASSES, CharactersSpec, Scene, character_bank,
                                    render_reference, render_scene, sample_scene, write_characters)
from kvideo.data.shapesworld import BACKGROUNDS, COLORS, SHAPES
from kvideo.models.identity_encoder import IdentityEncoder, IdentityEncoderConfig
from kvideo.weights import load_identity_encoder, safetensors_metadata, save_identity_encoder
from tools import train_identity_encoder as tool

from conftest import ROOT

REPORT_KEYS = {"command", "date", "config", "params", "training", "data", "accuracy", "retrieval"}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """Tiny v2 splits at 32 px, 8 frames: train (8 clips, 12 characters' references) and test
    (8 clips, all 16 characters' references)."""
    root = tmp_path_factory.mktemp("identity")
    for split in ("train", "test"):
        write_characters(root / split, CharactersSpec(8, size=32, num_frames=8, clips_per_shard=4, split=split),
                         progress=False)
    return root


def images(n, size, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- the network


def test_config_holds_the_vocabularies():
    cfg = IdentityEncoderConfig()
    assert cfg.classes() == {"shape": SHAPES, "body": tuple(COLORS), "band": (*COLORS, NO_BAND),
                             "size_class": tuple(SIZE_CLASSES)}
    assert list(cfg.classes()) == list(IDENTITY)
    assert IdentityEncoderConfig(shape=["a", "b"]).shape == ("a", "b")  # JSON lists become tuples
    with pytest.raises(ValueError, match="groups"):
        IdentityEncoderConfig(width=12, groups=8)
    with pytest.raises(ValueError, match="band"):
        IdentityEncoderConfig(band=("red", "red"))


@pytest.mark.parametrize("size", [16, 32, 64])
def test_shapes_and_unit_embeddings(size):
    model = IdentityEncoder(IdentityEncoderConfig())
    assert 0.1e6 <= sum(p.numel() for p in model.parameters()) <= 0.5e6
    e = model.embed(images(3, size))
    assert e.shape == (3, 64)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    logits = model(images(3, size))
    assert {k: tuple(v.shape) for k, v in logits.items()} == {k: (3, len(v)) for k, v in model.cfg.classes().items()}
    predicted = model.predict(images(2, size))
    assert all(p in model.cfg.classes()[k] for k, names in predicted.items() for p in names)


def test_rejects_wrong_inputs():
    model = IdentityEncoder(IdentityEncoderConfig())
    for bad in (torch.zeros(2, 1, 32, 32), torch.zeros(2, 3, 8, 32), torch.zeros(3, 32, 32)):
        with pytest.raises(ValueError, match="IdentityEncoder takes"):
            model.embed(bad)


def test_frozen_encoder_passes_gradients_to_its_input():
    model = IdentityEncoder(IdentityEncoderConfig()).eval().requires_grad_(False)
    x = images(2, 32).requires_grad_(True)
    reference = images(2, 32, seed=1)
    loss = 1 - F.cosine_similarity(model.embed(x), model.embed(reference)).mean()
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------- the file


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = IdentityEncoder(IdentityEncoderConfig(width=8, depth=3, embed_dim=16, image_size=32, groups=4))
    path = save_identity_encoder(model, tmp_path / "enc.safetensors", {"accuracy": {"all": 0.5}})
    loaded = load_identity_encoder(path)
    assert loaded.cfg == model.cfg and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    x = images(4, 32)
    assert torch.equal(loaded.embed(x), model.embed(x))
    assert all(torch.equal(loaded(x)[k], v) for k, v in model(x).items())
    assert json.loads(safetensors_metadata(path, "identity encoder")["report"]) == {"accuracy": {"all": 0.5}}


def test_load_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_identity_encoder(missing)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="junk.safetensors.*not a safetensors"):
        load_identity_encoder(junk)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "kvideo.identity_bank"})
    with pytest.raises(ValueError, match="other.safetensors.*not an identity encoder"):
        load_identity_encoder(other)
    broken = tmp_path / "broken.safetensors"
    model = IdentityEncoder(IdentityEncoderConfig(width=8, depth=2, groups=4))
    save_identity_encoder(model, broken)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.band")}
    metadata = safetensors_metadata(broken, "identity encoder")
    save_file(state, str(broken), metadata=metadata)
    with pytest.raises(ValueError, match="broken.safetensors.*do not fit"):
        load_identity_encoder(broken)


# ----------------------------------------------------------------------------- the tool


def test_lane_crop_keeps_each_character_whole_and_its_size():
    bank = character_bank()
    scene = sample_scene(5, "two_characters", [bank["Ada"], bank["Kobi"]], size=32, fps=24.0, num_frames=2)
    assert isinstance(scene, Scene)
    frames = render_scene(scene)  # (f, 32, 32, 3)
    background = np.asarray(BACKGROUNDS[scene.shots[0].background], np.uint8)
    for lane, rows in (("top", slice(0, 16)), ("bottom", slice(16, 32))):
        square = tool.lane_square(frames, lane)
        assert square.shape == frames.shape
        object_pixels = (square != background).any(-1).sum(axis=(1, 2))
        np.testing.assert_array_equal(object_pixels, (frames[:, rows] != background).any(-1).sum(axis=(1, 2)))
        assert (square[:, :8] == background).all() and (square[:, -8:] == background).all()  # the padding


def test_recolour_paints_the_character_of_the_new_colours():
    """A recoloured render equals the render of the character in the new colours (same
    background and r), to rounding, and its labels name those colours: a permutation of the
    palette, and a band painted in the body's colour (band none)."""
    names, cfg = list(COLORS), IdentityEncoderConfig()
    perm = [3, 5, 0, 1, 2, 4]  # red -> yellow, green -> cyan, blue -> red, ...
    for character in character_bank().values():
        band = NO_BAND if character.band == NO_BAND else names[perm[names.index(character.band)]]
        cases = [(perm, replace(character, body=names[perm[names.index(character.body)]], band=band))]
        if character.band != NO_BAND:
            unband = list(range(len(names)))
            unband[names.index(character.band)] = names.index(character.body)
            cases.append((unband, replace(character, band=NO_BAND)))
        image = torch.from_numpy(render_reference(character, 7)).permute(2, 0, 1)[None]  # (1, 3, 64, 64)
        label = torch.tensor([[cfg.classes()[a].index(getattr(character, a)) for a in IDENTITY]])
        for colour_map, recoloured in cases:
            colour_map = torch.tensor([colour_map])
            want = torch.from_numpy(render_reference(recoloured, 7)).permute(2, 0, 1)[None].float()
            assert (tool.recolour(image, colour_map) - want).abs().max() <= 1.0, (character, recoloured)
            assert tool.recolour_labels(label, colour_map).tolist() == [
                [cfg.classes()[a].index(getattr(recoloured, a)) for a in IDENTITY]]


def test_tool_runs_end_to_end(splits, tmp_path):
    out = tmp_path / "enc.safetensors"
    report = tool.main(["--train", str(splits / "train"), "--test", str(splits / "test"), "--out", str(out),
                        "--size", "32", "--steps", "3", "--batch-size", "8", "--workers", "2"])
    assert REPORT_KEYS <= set(report)
    on_disk = json.loads(out.with_suffix(".json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert json.loads(safetensors_metadata(out, "identity encoder")["report"]) == on_disk
    assert set(report["accuracy"]) == {"held_out", "all", "train"}
    for group in ("held_out", "all"):
        for kind in ("frames", "references"):
            assert set(report["accuracy"][group][kind]) == {*IDENTITY, "all", "n"}
    assert report["accuracy"]["held_out"]["references"]["n"] >= 4  # the 4 references/NAME.png at least
    assert report["data"]["train"]["images"]["references"] == 12
    assert report["data"]["test"]["images"]["references"] == 16
    assert sum(report["data"]["train"]["clips"].values()) == 8
    assert report["command"].startswith("python tools/train_identity_encoder.py --train")
    model = load_identity_encoder(out)
    assert model.cfg.image_size == 32 and model.embed(images(1, 32)).shape == (1, 64)


def test_tool_learns_the_training_characters(tmp_path):
    """300 steps (recoloured images, the default) on the images of 48 clips read body colour and
    shape far better than always answering the most common class could (measured: body 0.94,
    shape 0.72; the most common class 0.3-0.5; the untrained net ~0.3-0.6)."""
    for split, n in (("train", 48), ("test", 4)):
        write_characters(tmp_path / split, CharactersSpec(n, size=32, num_frames=8, clips_per_shard=16, split=split),
                         progress=False)
    report = tool.main(["--train", str(tmp_path / "train"), "--test", str(tmp_path / "test"),
                        "--out", str(tmp_path / "e.safetensors"), "--size", "32", "--steps", "300",
                        "--batch-size", "32", "--frames-per-clip", "2"])
    measured = report["accuracy"]["train"]["images"]
    data, _ = tool.read_split(tmp_path / "train", IdentityEncoderConfig(image_size=32), 2, 0)
    for name, threshold in (("body", 0.8), ("shape", 0.6)):
        k = IDENTITY.index(name)
        majority = data.labels[:, k].bincount().max().item() / len(data)
        assert majority < 0.5 and measured[name] >= threshold, (name, measured[name], majority)


def test_tool_decodes_both_splits_with_worker_processes(splits, tmp_path):
    """--workers 2: the test split is decoded by a second pool after torch has started its threads,
    which hung with forked workers; spawned workers finish (a subprocess, so a hang fails the test)."""
    import subprocess
    import sys

    out = tmp_path / "enc.safetensors"
    cmd = [sys.executable, str(ROOT / "tools" / "train_identity_encoder.py"), "--train", str(splits / "train"),
           "--test", str(splits / "test"), "--out", str(out), "--size", "32", "--steps", "2", "--batch-size", "4",
           "--threads", "2", "--workers", "2"]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    assert out.is_file() and out.with_suffix(".json").is_file()
