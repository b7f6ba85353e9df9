"""Stage video_decoder on tiny models: starts as the image decoder, trains with the encoder frozen,
flicker metric, clear errors."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kvideo.inference.autoencoder import load_video_movq
from kvideo.metrics.reconstruction import evaluate_video_decoding, flicker_by_distance, static_background_flicker
from kvideo.registry import load_config
from kvideo.inference import checkpoints as ckpt
from kvideo.train.engine import train
from kvideo.train.stages.video_decoder import temporal_difference_loss

from conftest import ROOT

CONFIG = ROOT / "configs" / "video_decoder" / "shapes.yaml"
TINY_MOVQ = {"model.ch": 8, "model.norm_groups": 4, "model.n_embed": 32}


def overrides(run_dir, shards, movq_run, **extra):
    values = {"run_dir": str(run_dir), "data.shards": str(shards), "data.val_shards": str(shards),
              "data.size": "[32,32]", "data.num_workers": 0, "data.num_frames": 4, "recipe.movq": str(movq_run),
              "train.batch_size": 2, "train.max_steps": 3, "train.checkpoint_every": 3, "train.log_every": 1,
              "train.preview_every": 3, "train.precision": "fp32", "train.eval_every": 3, "train.eval_batches": 1,
              "recipe.disc_channels": 8, "recipe.disc_norm_groups": 4, "recipe.gan_start": 2, **TINY_MOVQ}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def vdec_run(tmp_path_factory, shapes_shards, movq_run) -> Path:
    run = tmp_path_factory.mktemp("video_decoder")
    train(load_config([CONFIG], overrides(run, shapes_shards, movq_run, **{"recipe.temporal_weight": 0.5})))
    return run


def test_trains_with_the_encoder_frozen_and_the_gan_on(vdec_run, movq_run):
    last = ckpt.latest_checkpoint(vdec_run)
    assert last.name == "step_0000003"
    image = ckpt.load_weights(ckpt.latest_checkpoint(movq_run), "ema")[0]  # the stage starts from the EMA weights
    video = ckpt.load_weights(last, "model")[0]
    for key in image:
        if key.startswith(("ae.encoder.", "ae.quant_conv.", "ae.quantize.embedding")):
            assert torch.equal(video[key], image[key]), key
    assert any(k.startswith("ae.temporal_convs.") for k in video) and any(k.startswith("disc.") for k in video)
    assert any(not torch.equal(video[k], image[k]) for k in image if k.startswith("ae.decoder."))
    # the frozen encoder is its own EMA: written once, in model.safetensors; the EMA state is complete
    ema_file = load_file(str(last / "ema.safetensors"))
    assert not any(k.startswith("ae.encoder.") for k in ema_file) and any(k.startswith("ae.decoder.") for k in ema_file)
    ema = ckpt.load_weights(last, "ema")[0]
    assert ema.keys() == video.keys() and torch.equal(ema["ae.encoder.conv_in.weight"], video["ae.encoder.conv_in.weight"])
    metrics = (vdec_run / "metrics.jsonl").read_text()
    assert '"vdec/temporal_l1"' in metrics
    assert '"vdec/g_loss"' in metrics and '"flicker_reduction"' in metrics.replace("eval/", "")


@pytest.mark.parametrize("init, spatial", [("zero", 3), ("default", 3), ("identity", 3), ("identity", 1)])
def test_at_step_zero_it_decodes_as_the_image_decoder(tmp_path, shapes_shards, movq_run, init, spatial):
    from kvideo.inference.autoencoder import load_movq
    from kvideo.train.stages.video_decoder import build_video_decoder

    cfg = load_config([CONFIG], overrides(tmp_path, shapes_shards, movq_run, **{
        "model.temporal_conv_init": init, "model.temporal_spatial_kernel": spatial}))
    ae = build_video_decoder(cfg).ae.eval()
    blend = ae.temporal_convs["up_0_block_0"][0]
    assert blend.conv.kernel_size == (3, spatial, spatial)
    assert bool(blend.conv.weight.any()) is (init != "zero") and blend.gate.item() == (1.0 if init == "identity" else 0.0)
    image_ema = load_movq(movq_run)  # build_video_decoder starts from the EMA weights
    z = torch.randn(2, 4, 5, 8, 8)
    expected = image_ema.decode(z.permute(0, 2, 1, 3, 4).reshape(10, 4, 8, 8))
    got = ae.decode_video(z).permute(0, 2, 1, 3, 4).reshape(10, 3, 32, 32)
    assert torch.allclose(got, expected, atol=1e-5)
    # what each start gives the temporal convs to learn from at step 0: only the identity start
    # lets the convs' weights take a gradient (the zero gate multiplies theirs by zero)
    got.square().mean().backward()
    conv_grads = [float(b.conv.weight.grad.abs().sum()) for pair in ae.temporal_convs.values() for b in pair]
    assert all((g > 0) is (init == "identity") for g in conv_grads), conv_grads


def test_spatial_lr_scale_puts_the_loaded_decoder_in_its_own_group(tmp_path, shapes_shards, movq_run):
    from kvideo.train.stages.video_decoder import VideoDecoderStage, build_video_decoder

    cfg = load_config([CONFIG], overrides(tmp_path, shapes_shards, movq_run, **{"recipe.spatial_lr_scale": 0.1}))
    model = build_video_decoder(cfg)
    ae = VideoDecoderStage(cfg, torch.device("cpu")).phases(model)[0]
    groups = ae.param_groups(1e-3)
    assert [g["name"] for g in groups] == ["spatial", "rest"] and groups[0]["lr"] == pytest.approx(1e-4)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.ae.temporal_parameters()}
    frozen = {id(p) for part in (model.ae.encoder, model.ae.quant_conv, model.ae.quantize) for p in part.parameters()}
    assert not frozen & {id(p) for p in groups[0]["params"]}  # the frozen encoder takes no learning rate
    assert any(id(p) == id(model.ae.decoder.conv_out.weight) for p in groups[0]["params"])


def test_flicker_metric_and_evaluation(vdec_run, shapes_shards, movq_run):
    truth = torch.zeros(1, 3, 3, 4, 4)
    truth[:, :, 1:, 0, 0] = 1.0  # one pixel changes: not static
    frames = truth.clone()
    frames[:, :, 1, 2, 2] = 0.5  # flicker on a static pixel: 0.5 up then 0.5 down
    # 2 frame pairs x 16 pixels, one not static (pixel 0, 0 from frame 0 to 1): (0.5 + 0.5) / 31
    assert float(static_background_flicker(frames, truth)) == pytest.approx(1.0 / 31)
    # the training loss on frame differences: the flicker costs 0.5 twice in each channel (2 x 3 x 16 x 3
    # differences); the true change alone costs nothing, and a shifted but steady clip costs nothing
    assert float(temporal_difference_loss(frames, truth)) == pytest.approx(1.0 * 3 / (3 * 2 * 16))
    assert float(temporal_difference_loss(truth + 0.3, truth)) == pytest.approx(0.0, abs=1e-7)
    ae = load_video_movq(vdec_run)
    from kvideo.data.shards import ClipDataset, ClipFormat, ShardIndex, collate

    ds = ClipDataset(ShardIndex(str(shapes_shards)), ClipFormat(4, 24, (32, 32)), seed=0, train=False)
    batch = collate([ds[(0, 0)], ds[(0, 1)]])
    out = evaluate_video_decoding(ae, [batch], torch.device("cpu"), window=3, overlap=1)
    assert out["clips"] == 2 and out["psnr_video"] > 0 and out["flicker_image"] >= 0
    # against the image MoVQ the run started from: the video columns stay, the image ones change
    # (the fine-tuning moved the decoder's spatial weights)
    from kvideo.inference.autoencoder import load_movq

    start = evaluate_video_decoding(ae, [batch], torch.device("cpu"), window=3, overlap=1,
                                    image_decoder=load_movq(movq_run))
    assert start["psnr_video"] == out["psnr_video"] and start["flicker_video"] == out["flicker_video"]
    assert start["psnr_image"] != out["psnr_image"]
    bands = out["flicker_by_distance"]
    assert [b["band"] for b in bands] == ["<= 1 px", "<= 2 px", "<= 4 px", "<= 8 px", "<= 16 px", "> 16 px"]
    assert sum(b["static_share"] for b in bands) == pytest.approx(1.0)
    assert sum(b["share_of_image_flicker"] for b in bands) == pytest.approx(1.0)


def test_flicker_by_distance_puts_each_pixel_in_one_band():
    truth = torch.zeros(1, 3, 2, 40, 40)
    truth[:, :, 1, 10, 10] = 1.0  # one pixel moves
    frames = truth.clone()
    frames[:, :, 1, 10, 11] = 0.3  # a leak next to it (1 px away)
    frames[:, :, 1, 10, 14] = 0.2  # 4 px away
    frames[:, :, 1, 35, 35] = 0.1  # far from any motion
    sums, counts = flicker_by_distance(frames, truth)
    # rings of the 3x3, 5x5, 9x9, 17x17 and 33x33 squares around the moving pixel (the last clipped
    # by the canvas edge to 27x27), then the rest of the 1599 static pixels
    assert counts.tolist() == [8, 16, 56, 208, 27 * 27 - 289, 1599 - (27 * 27 - 1)]
    assert sums.tolist() == pytest.approx([0.3, 0.0, 0.2, 0.0, 0.0, 0.1])
    assert float(static_background_flicker(frames, truth)) == pytest.approx(0.6 / 1599)


def test_mismatched_movq_is_named(tmp_path, shapes_shards, movq_run):
    from kvideo.train.stages.video_decoder import build_video_decoder

    cfg = load_config([CONFIG], overrides(tmp_path, shapes_shards, movq_run, **{"model.ch": 16}))
    with pytest.raises(ValueError, match=r"model.ch=8 \(this config has 16\)"):
        build_video_decoder(cfg)


def test_evaluate_and_sample_video_decoder(tmp_path, vdec_run, shapes_shards, capsys):
    import json

    import sample
    from kvideo.data.video_io import read_video
    from tools import evaluate_video_decoder

    out = tmp_path / "r.json"
    code = evaluate_video_decoder.main(["--checkpoint", str(vdec_run), "--shards", str(shapes_shards),
                                        "--max-clips", "4", "--window", "3", "--overlap", "1", "--out", str(out)])
    assert code == 0
    r = json.loads(out.read_text())[0]
    assert r["clips"] == 4 and r["window"] == 3 and r["psnr_video"] > 0 and r["flicker_image"] >= 0
    assert r["image_decoder"] == "start"
    assert "| step_" in capsys.readouterr().out
    assert evaluate_video_decoder.main(["--checkpoint", str(vdec_run), "--shards", str(shapes_shards), "--max-clips",
                                        "4", "--image-decoder", "same", "--out", str(out)]) == 0
    same = json.loads(out.read_text())[0]
    assert same["image_decoder"] == "same" and same["psnr_image"] != r["psnr_image"]
    capsys.readouterr()

    clip = tmp_path / "clip.mp4"
    first = next(iter(sorted(shapes_shards.glob("*.tar"))))
    import tarfile

    with tarfile.open(first) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".mp4"))
        clip.write_bytes(tar.extractfile(member).read())
    decoded = tmp_path / "decoded.mp4"
    assert sample.main(["--stage", "video_decoder", "--checkpoint", str(vdec_run), "--input", str(clip),
                        "--out", str(decoded), "--window", "4", "--overlap", "1", "--side-by-side"]) == 0
    frames, _ = read_video(str(decoded))
    assert frames.shape == (12, 32, 96, 3)
    assert "video decoder: PSNR" in capsys.readouterr().out
