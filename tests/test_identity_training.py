"""Reference conditioning in training (issue 28): the t2i and keyframe stages train with each
clip's reference images on a ShapesWorld v2 split, the reference encoder is checkpointed and
carried from t2i to keyframes, the identity layers are new layers, and a trained checkpoint
samples with a bank's references."""

from pathlib import Path

import pytest
import torch

from kvideo.data.characters import CharactersSpec, write_characters
from kvideo.inference.identity import IdentityBank
from kvideo.inference.loading import build_stage_denoiser, load_bundle
from kvideo.inference.sampling import KeyframeOptions, sample_keyframes
from kvideo.registry import load_config
from kvideo.inference import checkpoints as ckpt
from kvideo.train.engine import train
from kvideo.train.stages.diffusion import init_from_t2i, video_phase
from kvideo.train.stages.keyframe import freeze_untrained

from conftest import T2I_CONFIG, tiny_t2i_overrides
from test_keyframe import KEYFRAME_CONFIG, tiny_keyframe_overrides

IDENTITY = {"model.identity_attention": "[false,true]", "recipe.identity.dropout": 0.25}


@pytest.fixture(scope="module")
def characters(tmp_path_factory) -> Path:
    """A tiny ShapesWorld v2 split: 8 clips of every kind, 8 frames of 32 px, with references/."""
    out = tmp_path_factory.mktemp("characters_train")
    write_characters(out, CharactersSpec(8, size=32, num_frames=8, clips_per_shard=4), progress=False)
    return out


def data_overrides(split: Path) -> dict:
    return {"data.references": str(split / "references"), "data.fps": 12.0, **IDENTITY}


@pytest.fixture(scope="module")
def t2i_identity_run(tmp_path_factory, characters, movq_run) -> Path:
    run = tmp_path_factory.mktemp("t2i_identity")
    train(load_config([T2I_CONFIG], tiny_t2i_overrides(run, characters, movq_run, **data_overrides(characters))))
    return run


@pytest.fixture(scope="module")
def keyframe_identity_run(tmp_path_factory, characters, movq_run, t2i_identity_run) -> Path:
    run = tmp_path_factory.mktemp("keyframe_identity")
    train(load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(run, characters, movq_run, t2i_identity_run,
                                                                 **data_overrides(characters))))
    return run


def gates(weights: dict) -> list:
    return [float(v) for k, v in weights.items() if k.endswith("identity_attention.gate")]


def test_t2i_trains_the_reference_encoder_and_the_identity_gates(t2i_identity_run):
    weights = ckpt.load_weights(ckpt.latest_checkpoint(t2i_identity_run), "model")[0]
    assert any(k.startswith("reference.patch_embed") for k in weights)
    assert any(k.startswith("reference.name_proj") for k in weights)
    assert gates(weights) and all(g != 0 for g in gates(weights))  # the gates get a gradient from the first step
    assert weights["reference.name_proj.weight"].abs().sum() > 0
    assert '"t2i/mse"' in (t2i_identity_run / "metrics.jsonl").read_text()


def test_keyframe_takes_the_t2i_reference_encoder_and_trains_it(keyframe_identity_run, t2i_identity_run,
                                                                 characters, movq_run):
    t2i = ckpt.load_weights(ckpt.latest_checkpoint(t2i_identity_run), "ema")[0]  # what init_from reads
    cfg = load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides("/tmp/unused", characters, movq_run, t2i_identity_run,
                                                                 **data_overrides(characters)))
    model = build_stage_denoiser(cfg)
    init_from_t2i(model, cfg)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in t2i.items() if k.startswith("reference."))
    assert all(torch.equal(own["unet." + k[len("unet."):]], v) for k, v in t2i.items() if "identity_attention" in k)
    trained = ckpt.load_weights(ckpt.latest_checkpoint(keyframe_identity_run), "model")[0]
    assert len([k for k in t2i if k.startswith("reference.")]) > 4
    assert not torch.equal(trained["reference.proj.weight"], t2i["reference.proj.weight"])


def test_identity_layers_are_new_layers(characters, movq_run, t2i_identity_run):
    cfg = load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides("/tmp/unused", characters, movq_run, t2i_identity_run,
                                                                 **{**data_overrides(characters),
                                                                    "recipe.train_spatial": "false",
                                                                    "recipe.spatial_lr_scale": 0.1}))
    model = build_stage_denoiser(cfg)
    identity = {id(p) for p in model.identity_parameters()}
    assert len(identity) > 0
    phase = video_phase(model, 0.1)
    (name, slow, scale), = phase.lr_scales
    assert name == "spatial" and scale == 0.1 and not identity & {id(p) for p in slow}
    freeze_untrained(model, cfg.recipe)
    assert all(p.requires_grad for p in model.identity_parameters())
    assert not all(p.requires_grad for p in model.text.parameters())


def test_a_trained_identity_checkpoint_samples_with_a_banks_references(keyframe_identity_run, characters):
    bundle = load_bundle(keyframe_identity_run, "keyframe")
    bank = IdentityBank.from_images({name: characters / "references" / f"{name}.png" for name in ("Ada", "Bix")})
    prompts = ["Ada moves left on a white background", "Bix and Ada on a black background"]
    refs = bank.references_for(prompts, max_entries=2)
    first = torch.randn(2, 4, 8, 8)
    options = KeyframeOptions.from_recipe(bundle.cfg, steps=2, num_frames=3, reference_guidance=1.0)
    out = sample_keyframes(bundle, prompts, first, 1.0, options, generator=torch.Generator().manual_seed(0),
                           references=refs)
    assert out.shape == (2, 4, 3, 8, 8) and torch.isfinite(out).all()


def test_sample_py_two_shots_enter_shot_ones_character_in_the_bank(t2i_identity_run, keyframe_identity_run,
                                                                    characters, tmp_path):
    import json

    import sample

    yaml = tmp_path / "pipeline.yaml"
    yaml.write_text(f"t2i: {t2i_identity_run}\nkeyframe: {keyframe_identity_run}\nfirst_frame_scale: 1\n")
    common = ["--pipeline", str(yaml), "--call", "t2i_steps=2", "--call", "keyframe_steps=2", "--frames", "3",
              "--passes", "0"]
    assert sample.main(common + ["--prompt", "Ada moves left on a white background", "--out", str(tmp_path / "a.mp4"),
                                 "--shot2", "Ada moves right on a black background", "--shot2-out",
                                 str(tmp_path / "b.mp4"), "--name", "Ada", "--save-bank", str(tmp_path / "bank.st"),
                                 "--reference-guidance", "1.5"]) == 0
    shot1, shot2 = (json.loads((tmp_path / f"{k}.json").read_text()) for k in "ab")
    assert "identity" not in shot1["settings"]  # the bank was empty: shot 1 has no references
    assert shot2["settings"]["identity"] == {"stages": ["first_frame", "keyframes"], "names": [["Ada", ""]]}
    assert shot2["settings"]["keyframes"]["reference_guidance"] == 1.5
    bank = IdentityBank.load(tmp_path / "bank.st")
    assert bank.names == ["Ada"] and bank.entries["Ada"].shape == (3, 32, 32)
    # a reference image and a saved bank condition a batch of prompts, each on the names it mentions
    assert sample.main(common + ["--prompt", "Bix and Ada on a white background", "--out", str(tmp_path / "c.mp4"),
                                 "--bank", str(tmp_path / "bank.st"), "--reference",
                                 f"Bix={characters / 'references' / 'Bix.png'}"]) == 0
    record = json.loads((tmp_path / "c.json").read_text())
    assert record["settings"]["identity"]["names"] == [["Bix", "Ada"]]


@pytest.fixture(scope="module")
def test_split(tmp_path_factory) -> Path:
    """A tiny v2 test split (held-out characters included): 24 clips of 8 frames at 32 px."""
    out = tmp_path_factory.mktemp("characters_test")
    write_characters(out, CharactersSpec(24, size=32, num_frames=8, clips_per_shard=12, split="test"), progress=False)
    return out


@pytest.mark.parametrize("identity, first_frame", [("shot", "generated"),
                                                   ("reference", "reference")])
def test_evaluate_characters_scores_every_group(t2i_identity_run, keyframe_identity_run, test_split, tmp_path,
                                                identity, first_frame):
    import json

    from tools import evaluate_characters

    yaml = tmp_path / "pipeline.yaml"
    yaml.write_text(f"t2i: {t2i_identity_run}\nkeyframe: {keyframe_identity_run}\nfirst_frame_scale: 1\n"
                    "fps_preset: low\n")
    out = tmp_path / "eval"
    assert evaluate_characters.main(["--pipeline", str(yaml), "--test", str(test_split), "--out", str(out),
                                     "--limit", "1", "--identity", identity, "--first-frame", first_frame,
                                     "--call", "t2i_steps=2", "--call", "keyframe_steps=2", "--call",
                                     "num_keyframes=4", "--save-videos", "1"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [v["group"] for v in result["videos"]] == list(evaluate_characters.GROUPS)
    shots = next(v for v in result["videos"] if v["kind"] == "two_shots")
    assert "consistency" in shots["correct"] and "binding" in result["groups"]["two_characters"]["accuracy"]
    assert result["videos"][1]["held_out"] and (out / "videos" / "000.mp4").is_file()


def test_a_composed_first_frame_places_the_reference_character_on_the_shots_background():
    import numpy as np

    from kvideo.data.characters import character_bank, render_reference
    from kvideo.data.characters_scorer import score_character_clip
    from tools.evaluate_characters import compose_first_frame

    ada = character_bank()["Ada"]
    reference = render_reference(ada, 3, size=64)
    shot = {"background": "black", "objects": [{"character": "Ada", "start_xy": [20.0, 40.0]}]}
    frame = compose_first_frame({"Ada": reference}, shot, 64, placement="true")
    meta = {"kind": "single", "shots": [{"background": "black", "objects": [
        {"character": "Ada", "lane": "full", "direction": "still", "speed": "none"}]}]}
    score = score_character_clip(np.repeat(frame[None], 4, axis=0), 24.0, meta)
    assert score["correct"]["identity"] and score["correct"]["background"]
    ys, xs = np.nonzero(np.abs(frame.astype(int) - frame[0, 0]).sum(-1) > 60)
    assert abs(xs.mean() - 20) < 1.5 and abs(ys.mean() - 40) < 1.5
    # from the caption alone: the lane's centre, a quarter of the canvas against the direction
    expected = [({"lane": "full", "direction": "right"}, (16, 32)), ({"lane": "full", "direction": "up"}, (32, 48)),
                ({"lane": "top", "direction": "left"}, (48, 16)), ({"lane": "bottom", "direction": "still"}, (32, 48))]
    for obj, (x, y) in expected:
        shot = {"background": "black", "objects": [{"character": "Ada", "start_xy": [20.0, 40.0], **obj}]}
        frame = compose_first_frame({"Ada": reference}, shot, 64)
        ys, xs = np.nonzero(np.abs(frame.astype(int) - frame[0, 0]).sum(-1) > 60)
        assert abs(xs.mean() - x) < 1.5 and abs(ys.mean() - y) < 1.5, obj


def test_t2i_trains_with_the_identity_loss(tmp_path, characters, movq_run):
    import json

    from kvideo.models.identity_encoder import IdentityEncoder, IdentityEncoderConfig
    from kvideo.weights import save_identity_encoder

    torch.manual_seed(0)
    weights = save_identity_encoder(IdentityEncoder(IdentityEncoderConfig()), tmp_path / "encoder.safetensors")
    loss = {"recipe.identity.loss_weight": 0.5, "recipe.identity.loss_max_t": 1000,
            "recipe.identity.encoder_weights": str(weights), "train.max_steps": 2}
    run = tmp_path / "run"
    train(load_config([T2I_CONFIG], tiny_t2i_overrides(run, characters, movq_run,
                                                       **{**data_overrides(characters), **loss})))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "t2i/identity_loss" in r]
    assert logged and all(0 <= r["t2i/identity_loss"] <= 2 for r in logged)
    assert sum(r["t2i/identity_samples"] for r in logged) > 0
    for extra, match in [({"model.identity_attention": "null"}, "needs reference conditioning"),
                         ({"recipe.identity.encoder_weights": "null"}, "recipe.identity.encoder_weights")]:
        cfg = load_config([T2I_CONFIG], tiny_t2i_overrides(tmp_path / "bad", characters, movq_run,
                                                           **{**data_overrides(characters), **loss, **extra}))
        with pytest.raises(ValueError, match=match):
            train(cfg)


def test_both_stages_train_with_name_dropout(tmp_path, characters, movq_run, t2i_identity_run, monkeypatch):
    """recipe.identity.name_dropout reaches the captions the t2i and keyframe stages encode."""
    from kvideo.train.stages.diffusion import LatentDiffusionStage

    seen = []
    unnamed = LatentDiffusionStage.unnamed

    def recording(self, captions, batch, refs):
        seen.append((self.name, unnamed(self, captions, batch, refs)))
        return seen[-1][1]

    monkeypatch.setattr(LatentDiffusionStage, "unnamed", recording)
    names = {"recipe.identity.name_dropout": 1.0, "recipe.identity.name_word": "someone", "train.max_steps": 2}
    train(load_config([T2I_CONFIG], tiny_t2i_overrides(tmp_path / "t2i", characters, movq_run,
                                                       **{**data_overrides(characters), **names})))
    train(load_config([KEYFRAME_CONFIG], tiny_keyframe_overrides(tmp_path / "kf", characters, movq_run, t2i_identity_run,
                                                                 **{**data_overrides(characters), **names})))
    for stage in ("t2i", "keyframe"):
        captions = [c for name, batch in seen if name == stage for c in batch]
        assert any(c.startswith("someone ") for c in captions), stage


def test_a_model_without_identity_starts_from_a_t2i_model_with_it(t2i_identity_run, characters, movq_run):
    """Interpolation (no identity attention) and a keyframe model without it take a t2i checkpoint
    trained with identity: its identity layers are left out, every other weight is loaded."""
    from kvideo.inference.loading import build_stage_denoiser as build
    from test_interpolation import CONFIG as INTERPOLATION_CONFIG, tiny_interpolation_overrides

    t2i = ckpt.load_weights(ckpt.latest_checkpoint(t2i_identity_run), "ema")[0]
    for config, overrides in ((INTERPOLATION_CONFIG, tiny_interpolation_overrides), (KEYFRAME_CONFIG,
                                                                                     tiny_keyframe_overrides)):
        cfg = load_config([config], overrides("/tmp/unused", characters, movq_run, t2i_identity_run))
        model = build(cfg)
        init_from_t2i(model, cfg, keep_new=("in_layer.", "out_layer.2."))
        own = model.state_dict()
        assert model.reference is None
        assert torch.equal(own["unet.down_samples.1.units.0.cross_attention.attention.to_key.weight"],
                           t2i["unet.down_samples.1.units.0.cross_attention.attention.to_key.weight"])
