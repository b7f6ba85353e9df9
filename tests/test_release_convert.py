"""The release converter (kvideo.release, tools/convert_release.py).

- Full size, no weights: every key of the released files (their recorded names and shapes,
  kvideo/release/inventory.json.gz) maps onto a parameter of the same shape of the kvideo network
  built on the meta device from configs/STAGE/kandinsky.yaml plus the release's options, and every
  kvideo parameter is filled.
- Tiny, with weights: release-layout files written from tiny kvideo networks (by the inverse
  maps, with the release's extra parameters: the image-mode input conv, the perturbation
  embedding folded at conversion, separate q / k / v, the dead norm inputs) convert back to the
  same weights, load through the normal loaders, and sample through the converted pipeline.
"""

import math

import pytest
import torch

from kvideo.release import (
    MOVQ, interpolation_to_kvideo, interpolation_to_release, t2v_to_kvideo, t2v_to_release, to_release_names,
    video_movq_to_kvideo, video_movq_to_release,
)
from kvideo.release.convert import (
    RELEASE_MODEL_OPTIONS, STAGE_SOURCES, build_network, coverage, coverage_table, read_inventory, stage_config,
)
from test_t5_text import write_tiny_t5
from tools import convert_release

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
FULL = {stage: [ROOT / "configs" / stage / "kandinsky.yaml"] for stage in STAGE_SOURCES}
SHAPES = {stage: [ROOT / "configs" / stage / "shapes.yaml"] for stage in STAGE_SOURCES}

# ----------------------------------------------------------------------------------------------
# Full size, on the meta device
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_coverage():
    return coverage(FULL)


def test_every_release_key_maps_onto_a_full_size_parameter_of_its_shape(full_coverage):
    rows = {(r.stage, r.release): r for r in full_coverage}
    assert all(r.complete for r in full_coverage), coverage_table(full_coverage)
    inventory = read_inventory()
    # every key of every file is accounted for: renamed, or read by a transformation
    for row in full_coverage:
        assert row.renamed + row.consumed == row.release_keys
        assert row.copied + row.derived == row.kvideo_keys
    t2v = inventory["t2v"]
    keyframe, first = rows[("keyframe", "t2v.pt")], rows[("t2i", "t2v.pt")]
    assert keyframe.release_keys == first.release_keys == len(t2v) == 1910
    assert keyframe.consumed == 2  # image_in_layer.{weight,bias}: the first-frame model's
    assert keyframe.reshaped == 12  # the temporal attentions' 1x1-conv feed-forwards -> Linear
    assert first.derived == 2 and first.kvideo_keys == len(inventory["kandinsky3"])
    interp = rows[("interpolation", "interpolation.pt")]
    assert interp.release_keys == 1723 and interp.consumed == 5  # the perturbation MLP (4) and its merge
    assert interp.derived == 2  # time_embed.mlp.2.{weight,bias}
    video = rows[("video_decoder", "video_movq.pt")]
    assert video.release_keys == 570 and video.consumed == 24 + 16  # q, k, v (fused) and the unused norm inputs
    assert rows[("movq", "movq.pt")].derived == 2 == video.derived - 16  # the codebook and its usage buffer
    assert rows[("t2i", "Kandinsky 3 unet")].complete


def test_the_inventory_is_the_release_at_its_published_sizes():
    """The recorded names and shapes add up to the published parameter counts."""
    inventory = read_inventory()
    count = {name: sum(math.prod(shape) for shape in keys.values()) for name, keys in inventory.items()}
    assert count["t2v"] == 4_149_077_956
    assert count["interpolation"] == 3_979_941_530
    assert count["movq"] == 270_603_567
    decoder = sum(math.prod(s) for k, s in inventory["video_movq"].items() if k.startswith("decoder."))
    assert decoder == 556_645_919


def test_a_kvideo_default_option_leaves_release_keys_unmapped():
    """Without the release's options the interpolation network lacks the skip table and the
    second gates: the report says so instead of passing."""
    defaults = [f"{k}={v}" for k, v in {"skip_embedding": "sinusoid", "attention_gates": 1}.items()]
    rows = coverage({"interpolation": FULL["interpolation"]},
                    overrides={"interpolation": [f"model.{d}" for d in defaults]})
    row = next(r for r in rows if r.release == "interpolation.pt")
    assert not row.complete
    assert "skip_embeddings.weight" in row.unmapped and "skip_embed.embed.mlp.0.weight" in row.unfilled


def test_the_coverage_command_prints_a_complete_table(capsys):
    assert convert_release.main(["--coverage", "--stages", "movq,video_decoder"]) == 0
    out = capsys.readouterr().out
    assert "| video_decoder | video_movq.pt | 570 |" in out and "every release key mapped" in out


# ----------------------------------------------------------------------------------------------
# Tiny, with weights
# ----------------------------------------------------------------------------------------------


def randomise(model: torch.nn.Module, seed: int) -> dict:
    """Every parameter random (zero-initialised ones included, or nothing is proven)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def tiny_network(stage: str, out, seed: int):
    cfg = stage_config(stage, SHAPES[stage], out, None, ["recipe.text_encoder.weights=null"] if stage in
                       ("t2i", "keyframe", "interpolation") else [])
    return randomise(build_network(cfg), seed)


def test_the_maps_run_both_ways_on_tiny_networks(tmp_path):
    keyframe = tiny_network("keyframe", tmp_path, 1)
    image_in = {"weight": torch.randn(keyframe["in_layer.weight"].shape), "bias": torch.randn(keyframe["in_layer.bias"].shape)}
    release = t2v_to_release(keyframe, image_in)
    assert "image_in_layer.weight" in release and "to_temporal_embed.1.weight" in release
    net = build_network(stage_config("keyframe", SHAPES["keyframe"], tmp_path, None, ["recipe.text_encoder.weights=null"]),
                        "meta")
    back = t2v_to_kvideo(release, net)
    assert back.complete and all(torch.equal(back.state_dict[k], v) for k, v in keyframe.items())

    interp = tiny_network("interpolation", tmp_path, 2)
    e, s = interp["time_embed.mlp.0.weight"].shape
    perturbation = {"1.weight": torch.randn(e, s), "1.bias": torch.randn(e), "3.weight": torch.randn(e, e) * 0.1,
                    "3.bias": torch.randn(e)}
    release = interpolation_to_release(interp, perturbation, merge=0.3)
    assert "skip_embeddings.weight" in release and "down_samples.1.temporal_attention_block.temporal_merge2" in release
    net = build_network(stage_config("interpolation", SHAPES["interpolation"], tmp_path, None,
                                     ["recipe.text_encoder.weights=null"]), "meta")
    back = interpolation_to_kvideo(release, net)
    assert back.complete
    for key, value in interp.items():
        torch.testing.assert_close(back.state_dict[key], value, rtol=1e-5, atol=1e-6)

    video = tiny_network("video_decoder", tmp_path, 3)
    release = video_movq_to_release({k: v for k, v in video.items() if not k.startswith("quantize.")})
    assert any(k.endswith("temporal_attn_1.q.weight") for k in release)
    net = build_network(stage_config("video_decoder", SHAPES["video_decoder"], tmp_path, None), "meta")
    back = video_movq_to_kvideo(release, net)
    for key, value in video.items():
        if key.startswith("quantize."):
            continue
        if ".norm.conv_" in key and key.startswith("temporal_attn."):  # the release never uses them
            assert back.derived[key]
            continue
        assert torch.equal(back.state_dict[key], value), key


def test_the_perturbation_fold_is_the_release_time_embedding():
    """(1 - m) to_time_embed(t) + m perturbation_to_time_embed(0), computed directly, equals the
    folded kvideo time embedding for several timesteps."""
    from kvideo.models.unet import TimestepEmbedding

    torch.manual_seed(0)
    s, e, m = 16, 24, 0.37
    time, pert = TimestepEmbedding(s, e).double(), TimestepEmbedding(s, e).double()
    release = {"to_time_embed.1.weight": time.mlp[0].weight, "to_time_embed.1.bias": time.mlp[0].bias,
               "to_time_embed.3.weight": time.mlp[2].weight, "to_time_embed.3.bias": time.mlp[2].bias,
               "perturbation_to_time_embed.1.weight": pert.mlp[0].weight,
               "perturbation_to_time_embed.1.bias": pert.mlp[0].bias,
               "perturbation_to_time_embed.3.weight": pert.mlp[2].weight,
               "perturbation_to_time_embed.3.bias": pert.mlp[2].bias,
               "time_embed_merge": torch.tensor([m], dtype=torch.float64)}
    folded = TimestepEmbedding(s, e).double()
    target = torch.nn.Module()
    target.time_embed = folded
    conversion = interpolation_to_kvideo({k: v.detach() for k, v in release.items()}, target)
    assert conversion.complete and len(conversion.consumed) == 5
    folded.load_state_dict({k[len("time_embed."):]: v for k, v in conversion.state_dict.items()})
    t = torch.tensor([0.0, 99.0, 500.0, 999.0])
    with torch.no_grad():
        expected = (1 - m) * time(t) + m * pert(torch.zeros(1))
        torch.testing.assert_close(folded(t), expected, rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Tiny release files written from tiny kvideo networks, converted by the command."""
    root = tmp_path_factory.mktemp("release")
    release, out, t5 = root / "files", root / "kvideo", write_tiny_t5(root / "t5")
    release.mkdir()
    networks = {stage: tiny_network(stage, out, i) for i, stage in enumerate(STAGE_SOURCES)}
    keyframe = networks["keyframe"]
    image_in = {"weight": torch.randn(keyframe["in_layer.weight"].shape), "bias": torch.randn(keyframe["in_layer.bias"].shape)}
    out_dim = keyframe["time_embed.mlp.0.weight"].shape[0] and 128  # the shapes UNets' context_dim
    torch.save({"unet": t2v_to_release(keyframe, image_in), "null_embedding": torch.randn(out_dim)}, release / "t2v.pt")
    interp = networks["interpolation"]
    e, s = interp["time_embed.mlp.0.weight"].shape
    pert = {"1.weight": torch.randn(e, s), "1.bias": torch.randn(e), "3.weight": torch.randn(e, e) * 0.1,
            "3.bias": torch.randn(e)}
    torch.save({"unet": interpolation_to_release(interp, pert, 0.25), "null_embedding": torch.randn(1, out_dim)},
               release / "interpolation.pt")
    movq = {k: v for k, v in networks["movq"].items() if not k.startswith("quantize.")}
    torch.save(to_release_names(movq, MOVQ), release / "movq.pt")
    video = {k: v for k, v in networks["video_decoder"].items() if not k.startswith("quantize.")}
    video.update({k: v for k, v in movq.items() if k.startswith(("encoder.", "quant_conv."))})  # one latent space
    networks["video_decoder"].update(video)
    torch.save(video_movq_to_release(video), release / "video_movq.pt")
    projection = {"0.weight": torch.randn(out_dim, 32) * 0.2, "1.weight": torch.randn(out_dim), "1.bias": torch.randn(out_dim)}
    torch.save({"projection_base": projection, "projection_interpolation": projection}, release / "t5_projections.pt")
    args = ["--release", str(release), "--text-encoder", str(t5), "--out", str(out)]
    args += [f"--config={stage}={files[0]}" for stage, files in SHAPES.items()]
    assert convert_release.main(args) == 0
    return {"out": out, "networks": networks, "image_in": image_in, "projection": projection, "t5": t5,
            "release": release}


def test_converted_checkpoints_load_with_the_release_weights(converted):
    from kvideo.inference.autoencoder import load_movq, load_video_movq
    from kvideo.inference.loading import load_bundle

    out, networks = converted["out"], converted["networks"]
    key = load_bundle(out / "keyframe", "keyframe")
    loaded = key.denoiser.unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in networks["keyframe"].items())
    assert torch.equal(key.denoiser.text.proj.weight, converted["projection"]["0.weight"])
    assert key.denoiser.text.proj.bias is None and key.cfg.recipe.text_encoder.kind == "t5"
    for option, value in RELEASE_MODEL_OPTIONS["keyframe"].items():
        assert key.cfg.model[option] == value
    first = load_bundle(out / "t2i", "t2i")
    c = first.denoiser.unet.in_layer.in_channels
    assert torch.equal(first.denoiser.unet.in_layer.weight, converted["image_in"]["weight"][:, :c])
    assert torch.equal(first.denoiser.unet.out_layer[2].weight, networks["keyframe"]["out_layer.2.weight"])
    interp = load_bundle(out / "interpolation", "interpolation")
    loaded = interp.denoiser.unet.state_dict()
    for k, v in networks["interpolation"].items():
        torch.testing.assert_close(loaded[k], v, rtol=1e-5, atol=1e-6)
    assert interp.cfg.recipe.diffusion.target == "v" and interp.cfg.recipe.sampling.spacing == "trailing"
    loaded = load_movq(out / "movq").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in networks["movq"].items() if not k.startswith("quantize."))
    video = load_video_movq(out / "video_decoder").state_dict()
    assert video["temporal_attn.mid_attn_1.norm.conv_y.bias"].eq(1).all()
    assert torch.equal(video["temporal_convs.mid_block_1.0.conv.weight"],
                       networks["video_decoder"]["temporal_convs.mid_block_1.0.conv.weight"])
    # the frozen T5 tower is read from the T5 directory, not stored
    from safetensors import safe_open

    with safe_open(str(out / "keyframe" / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("text.tower.") for k in f.keys())


def test_the_converted_pipeline_samples(converted):
    from kvideo.pipeline import Pipeline, load_pipeline_config

    cfg = load_pipeline_config(converted["out"] / "pipeline.yaml", ["device=cpu"])
    assert cfg.sampling["keyframe"]["threshold_max"] == 1.0 and cfg.first_frame_scale == 2
    pipe = Pipeline(cfg)
    towers = {id(bundle.denoiser.text.tower) for bundle in (pipe.t2i, pipe.keyframe, pipe.interpolation)}
    assert len(towers) == 1  # one frozen T5 for the three stages
    video = pipe(["a red circle moves left"], t2i_steps=2, keyframe_steps=2, interpolation_steps=1, num_keyframes=3,
                 size=[32, 32], seed=0)
    assert video.frames.shape[:3] == (1, 3, 9) and torch.isfinite(video.frames).all()
    keyframes = video.settings["keyframes"]
    assert keyframes["noise_aug_noise"] == "uniform" and keyframes["threshold_max"] == 1.0
    assert keyframes["text_guidance"] == 5.0 and keyframes["image_guidance"] == 2.0 and keyframes["motion_score"] == 10.0
    assert video.settings["interpolation"]["spacing"] == "trailing" and video.settings["first_frame"]["size"] == [64, 64]


def test_a_second_conversion_into_the_same_directory_is_refused(converted, capsys):
    args = ["--release", str(converted["release"]), "--text-encoder", str(converted["t5"]), "--out",
            str(converted["out"]), "--stages", "movq", f"--config=movq={SHAPES['movq'][0]}"]
    assert convert_release.main(args) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err


def test_a_missing_release_file_is_named(tmp_path, capsys):
    args = ["--release", str(tmp_path), "--out", str(tmp_path / "out"), "--stages", "movq",
            f"--config=movq={SHAPES['movq'][0]}"]
    assert convert_release.main(args) == 2
    assert "movq.pt" in capsys.readouterr().err
