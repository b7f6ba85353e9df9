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
