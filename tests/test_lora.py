"""LoRA adapters (peft) on the keyframe UNet: identity at init, merge, save / load, the LoRA
fine-tuning recipe, tools/merge_lora.py and the pipeline's base + adapter."""

import pytest
import torch

from kvideo.inference.conditioning import TextVideoCondition
from kvideo.inference.loading import load_bundle
from kvideo.inference.lora import LoraSpec, add_lora, load_lora, lora_state_dict, merge_lora, read_lora, save_lora
from kvideo.inference.checkpoints import load_stage_weights
from kvideo.models.video_unet import VideoUNet
from kvideo.registry import load_config
from kvideo.train.engine import train

from test_factorized import T2V, t2v_overrides, t2v_run  # noqa: F401 (fixture)
from test_keyframe import PROMPT
from test_video_unet import randomise_temporal, tiny_video_config, video_inputs

SPEC = LoraSpec(rank=2, alpha=4.0, targets=["to_query", "to_value", "to_out"])


def _unet(seed=0):
    torch.manual_seed(seed)
    unet = VideoUNet(tiny_video_config()).eval()
    randomise_temporal(unet)
    return unet


def _train_adapters(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def test_lora_is_the_identity_at_init_trains_only_adapters_and_merges_exactly(tmp_path):
    unet = _unet()
    x, t, context, mask = video_inputs()
    with torch.no_grad():
        before = unet(x, t, context, mask)
        add_lora(unet, SPEC)
        assert torch.equal(unet(x, t, context, mask), before)  # B = 0: unchanged at init
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    _train_adapters(unet)
    with torch.no_grad():
        adapted = unet(x, t, context, mask)
        assert not torch.allclose(adapted, before, atol=1e-4)
        path = save_lora(unet, SPEC, tmp_path / "lora.safetensors", base="somewhere")
        spec, state = read_lora(path)
        assert spec == SPEC and set(state) == set(lora_state_dict(unet))
        # base + adapter from the file: the same outputs
        fresh = _unet()
        load_lora(fresh, path)
        assert torch.allclose(fresh(x, t, context, mask), adapted, atol=1e-6)
        # merged: the plain model's keys again, the adapted outputs
        merge_lora(unet)
        assert set(unet.state_dict()) == set(_unet().state_dict())
        assert torch.allclose(unet(x, t, context, mask), adapted, atol=1e-5)
    with pytest.raises(ValueError, match="names no module"):
        add_lora(_unet(), LoraSpec(targets=["to_nothing"]))
    torch.save({}, tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="plain.safetensors"):
        read_lora(tmp_path / "plain.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ValueError, match="no kvideo_lora metadata"):
        read_lora(tmp_path / "weights.safetensors")


def test_a_lora_run_trains_adapters_over_a_frozen_base_and_merges(tmp_path, t2v_run, shapes_shards, movq_run,  # noqa: F811
                                                                    t2i_run, capsys):
    import sys

    from conftest import ROOT
    sys.path.insert(0, str(ROOT / "tools"))
    import merge_lora as tool

    run = tmp_path / "lora"
    overrides = t2v_overrides(run, shapes_shards, movq_run, t2i_run, **{
        "recipe.lora.enabled": "true", "recipe.lora.base": str(t2v_run), "recipe.lora.rank": 2,
        "recipe.anchor.enabled": "true", "recipe.anchor.timestep": "true", "train.lr": 0.05,
        "recipe.init_from": "null"})  # the base holds every weight
    train(load_config(T2V, overrides))
    base_state, _ = load_stage_weights(t2v_run, "keyframe")  # the base is its EMA weights, as sampled
    state, _ = load_stage_weights(run, "keyframe", "model")
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in state.items())  # the adapters moved
    for k, v in base_state.items():  # and the base did not
        assert torch.equal(state.get(k, state.get(k.replace(".to_query.", ".to_query.base_layer.")
                                               .replace(".to_value.", ".to_value.base_layer.")
                                               .replace(".to_key.", ".to_key.base_layer.")
                                               .replace(".to_out.", ".to_out.base_layer."))), v), k
    assert tool.main(["--checkpoint", str(run), "--lora-out", str(tmp_path / "a.safetensors"),
                      "--merged-out", str(tmp_path / "merged")]) == 0
    lora_run = load_bundle(run, "keyframe")
    merged = load_bundle(tmp_path / "merged", "keyframe")
    assert not merged.cfg.recipe.lora.enabled
    g = torch.Generator().manual_seed(0)
    x, anchor = torch.randn(1, 4, 3, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        cond = TextVideoCondition(lora_run.denoiser.context([PROMPT]), torch.tensor([0.1]), 300.0, anchor,
                                  torch.ones(1), 0, True)
        a = lora_run.denoiser(x, torch.tensor([500]), cond)
        b = merged.denoiser(x, torch.tensor([500]), cond)
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
        # the pipeline's base + adapter is the LoRA run too
        from kvideo.pipeline import Pipeline, PipelineConfig
        pipe = Pipeline(PipelineConfig(keyframe=str(t2v_run), keyframe_lora=str(tmp_path / "a.safetensors")))
        c = pipe.keyframe.denoiser(x, torch.tensor([500]), cond)
        assert torch.allclose(a, c, atol=1e-5)
    assert tool.main(["--checkpoint", str(t2v_run), "--lora-out", str(tmp_path / "b.safetensors")]) == 2
    assert "not a LoRA run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="recipe.lora.base"):
        train(load_config(T2V, [o for o in overrides if not o.startswith("recipe.lora.base=")]))
