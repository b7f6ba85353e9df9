"""Stage t2i on tiny models: trains on a frozen MoVQ's latents, checkpoints, samples a first frame."""

import numpy as np
import pytest
import torch
from PIL import Image

from kvideo.config import ConfigError
from kvideo.registry import load_config
from kvideo.inference import checkpoints as ckpt

from conftest import T2I_CONFIG, tiny_t2i_overrides


def test_t2i_trains_checkpoints_and_previews(t2i_run):
    last = ckpt.latest_checkpoint(t2i_run)
    assert last.name == "step_0000003"
    weights = ckpt.load_weights(last, "ema")[0]
    assert any(k.startswith("unet.") for k in weights) and any(k.startswith("text.proj") for k in weights)
    assert not any(k.startswith("movq") for k in weights)  # the frozen MoVQ is named, not stored
    assert (t2i_run / "previews" / "step_0000003.png").is_file()
    assert '"t2i/mse"' in (t2i_run / "metrics.jsonl").read_text()


def test_text_dropout_uses_the_null_context(t2i_run):
    from kvideo.inference.loading import load_bundle

    model = load_bundle(t2i_run, "t2i").denoiser
    prompts = ["a red circle standing still on a black background", "a blue square moving up slowly on a white background"]
    context = model.context(prompts, drop=torch.tensor([False, True]))
    tokens, mask = context.tokens, context.mask
    null_tokens, null_mask = model.text.null_context(1)
    plain_tokens = model.context(prompts).tokens
    assert torch.equal(tokens[1], null_tokens[0]) and torch.equal(mask[1], null_mask[0])
    assert torch.equal(tokens[0], plain_tokens[0])


def _sample(tmp_path, run, name, *extra):
    import sample

    out = tmp_path / name
    code = sample.main(["--stage", "t2i", "--checkpoint", str(run), "--prompt",
                        "a red circle standing still on a black background", "--out", str(out), *extra])
    assert code == 0
    return torch.from_numpy(np.asarray(Image.open(out).convert("RGB"), dtype=np.float32))


def test_sample_t2i_same_seed_same_image_and_negative_prompt_is_used(tmp_path, t2i_run):
    a = _sample(tmp_path, t2i_run, "a.png", "--seed", "3", "--sampler", "dpmpp_2m", "--steps", "3")
    b = _sample(tmp_path, t2i_run, "b.png", "--seed", "3", "--sampler", "dpmpp_2m", "--steps", "3")
    c = _sample(tmp_path, t2i_run, "c.png", "--seed", "4", "--sampler", "dpmpp_2m", "--steps", "3")
    assert torch.equal(a, b) and not torch.equal(a, c)
    d = _sample(tmp_path, t2i_run, "d.png", "--seed", "3", "--sampler", "dpmpp_2m", "--steps", "3",
                "--negative-prompt", "a blue square moving left quickly on a white background")
    assert not torch.equal(a, d)
    for sampler in ("ddpm", "ddim"):
        _sample(tmp_path, t2i_run, f"{sampler}.png", "--sampler", sampler, "--steps", "3")


def test_t2i_config_errors_are_named(tmp_path, shapes_shards, movq_run):
    with pytest.raises(ConfigError, match="recipe.text_encoder.widht"):
        load_config([T2I_CONFIG], tiny_t2i_overrides(tmp_path, shapes_shards, movq_run,
                                                     **{"recipe.text_encoder.widht": 3}))
    cfg = load_config([T2I_CONFIG], tiny_t2i_overrides(tmp_path, shapes_shards, movq_run,
                                                       **{"recipe.text_encoder.out_dim": 24}))
    from kvideo.inference.denoiser import build_denoiser
    from kvideo.inference.loading import build_stage_denoiser, load_bundle

    with pytest.raises(ValueError, match="must equal model.context_dim"):
        build_denoiser(cfg)
    with pytest.raises(ValueError, match="must equal model.context_dim"):
        build_stage_denoiser(cfg)
    with pytest.raises(ValueError, match="expected a t2i checkpoint"):
        load_bundle(movq_run, "t2i")


def test_evaluate_t2i_scores_every_canonical_prompt(tmp_path, t2i_run, capsys):
    import json

    from tools import evaluate_t2i  # the repository root is on the test path (pytest.ini)

    code = evaluate_t2i.main(["--checkpoint", str(t2i_run), "--all-checkpoints", "--per-prompt", "1", "--steps", "2",
                              "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 1 and results[0]["step"] == 3
    assert results[0]["seen"]["n"] == 30 and results[0]["held_out"]["n"] == 30
    assert 0.0 <= results[0]["seen"]["color"] <= 1.0
    room = results[0]["seen"]["room_for_motion"]  # None when the tiny model drew no object at all
    assert room is None or 0.0 <= room <= 1.0
    printed = capsys.readouterr().out
    assert "| step_0000003 |" in printed and "room for motion" in printed
