"""data.latent_cache: the cached latents are the ones the stage would have encoded, builds resume,
a cache of other weights is refused, and the latent stages train from it."""

import json

import pytest
import torch
from einops import rearrange
from omegaconf import OmegaConf

from conftest import MOVQ_CONFIG, T2I_CONFIG, tiny_movq_overrides, tiny_t2i_overrides
from kvideo.registry import load_config
from kvideo.data.datasets import build_dataset
from kvideo.data.latent_cache import LatentCacheSpec, LatentClipDataset, build_latent_cache
from kvideo.data.shards import ClipDataset, ClipFormat, ShardIndex, collate
from kvideo.inference.autoencoder import load_movq
from kvideo.train.engine import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory, shapes_shards, movq_run):
    out = tmp_path_factory.mktemp("latent_cache")
    build_latent_cache(LatentCacheSpec(out, str(shapes_shards), str(movq_run), (32, 32)), load_movq(movq_run))
    return out


@pytest.mark.parametrize("num_frames,fps", [(1, 24.0), (4, 12.0)])
def test_cached_latents_equal_encoding_the_decoded_clip(cache, shapes_shards, movq_run, num_frames, fps):
    movq = load_movq(movq_run)
    index = ShardIndex(str(shapes_shards))
    clip = ClipFormat(num_frames, fps, (32, 32), random_crop=False)
    pixels, latents = ClipDataset(index, clip, seed=3, train=True), LatentClipDataset(index, cache, clip, seed=3, train=True)
    for item in [(0, 0), (1, 5), (2, 17), (7, 23)]:  # several epochs: random clip starts
        a, b = pixels[item], latents[item]
        assert a["key"] == b["key"] and a["caption"] == b["caption"] and a["motion_score"] == b["motion_score"]
        with torch.no_grad():
            want = rearrange(movq.encode(rearrange(a["video"], "c f h w -> f c h w")), "f c h w -> c f h w")
        assert b["latents"].shape == want.shape == (4, num_frames, 8, 8)
        torch.testing.assert_close(b["latents"], want, atol=2e-3, rtol=2e-3)  # float16 storage
    batch = collate([latents[(0, i)] for i in range(3)])
    assert batch["latents"].shape == (3, 4, num_frames, 8, 8) and "video" not in batch


def test_rebuild_redoes_only_missing_shards_and_refuses_other_weights(tmp_path, cache, shapes_shards, movq_run):
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 3
    stamps = {f.name: f.stat().st_mtime_ns for f in files}
    files[1].unlink()
    spec = LatentCacheSpec(cache, str(shapes_shards), str(movq_run), (32, 32))
    build_latent_cache(spec, load_movq(movq_run))
    after = {f.name: f.stat().st_mtime_ns for f in sorted(cache.glob("*.safetensors"))}
    assert after.keys() == stamps.keys()
    assert [n for n in after if after[n] != stamps[n]] == [files[1].name]
    assert not list(cache.glob("*.tmp*"))

    other = load_movq(movq_run)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(ValueError, match=r"data.latent_cache .* holds latents of the MoVQ"):
        build_latent_cache(LatentCacheSpec(cache, str(shapes_shards), "other", (32, 32)), other)
    with pytest.raises(ValueError, match=r"data.size"):
        build_latent_cache(LatentCacheSpec(cache, str(shapes_shards), str(movq_run), (16, 16)), load_movq(movq_run))
    with pytest.raises(ValueError, match=r"other shards .* not of data.shards"):
        one_shard = str(sorted(shapes_shards.glob("*.tar"))[0])
        build_latent_cache(LatentCacheSpec(cache, one_shard, str(movq_run), (32, 32)), load_movq(movq_run))
    assert json.loads((cache / "cache.json").read_text())["size"] == [32, 32]


@pytest.mark.parametrize("field,kwargs", [("cache", dict(cache="")), ("shards", dict(shards="")),
                                          ("movq_source", dict(movq_source="")), ("size", dict(size=(32,))),
                                          ("size", dict(size=(0, 32))), ("size", dict(size="32"))])
def test_latent_cache_spec_names_the_bad_field(field, kwargs):
    good = dict(cache="c", shards="s.tar", movq_source="m", size=(32, 32))
    with pytest.raises(ValueError, match=rf"LatentCacheSpec\.{field} "):
        LatentCacheSpec(**{**good, **kwargs})
    spec = LatentCacheSpec(**{**good, "size": [32, "16"]})
    assert spec.size == (32, 16) and spec.cache.name == "c"


def test_incomplete_cache_is_an_error(tmp_path, shapes_shards):
    shards = [str(p.resolve()) for p in sorted(shapes_shards.glob("*.tar"))]
    (tmp_path / "cache.json").write_text(json.dumps({"format": 1, "size": [32, 32], "shards": shards, "movq": "m",
                                                  "movq_fingerprint": "0" * 64}))
    with pytest.raises(FileNotFoundError, match="incomplete: 3 of 3"):
        LatentClipDataset(ShardIndex(str(shapes_shards)), tmp_path, ClipFormat(1, 24, (32, 32)), seed=0)


def test_build_dataset_reads_the_cache_for_training_only(cache, shapes_shards):
    data = OmegaConf.create(dict(shards=str(shapes_shards), val_shards=str(shapes_shards), num_frames=1, fps=24.0,
                                 size=[32, 32], random_crop=False, latent_cache=str(cache)))
    assert type(build_dataset(data, 0, train=True)) is LatentClipDataset
    assert type(build_dataset(data, 0, train=False)) is ClipDataset
    data.latent_cache = None
    assert type(build_dataset(data, 0, train=True)) is ClipDataset


def test_latent_stages_train_from_the_cache_and_pixel_stages_refuse_it(tmp_path, shapes_shards, movq_run):
    cache = tmp_path / "cache"
    run = tmp_path / "t2i"
    train(load_config([T2I_CONFIG], tiny_t2i_overrides(run, shapes_shards, movq_run,
                                                      **{"data.latent_cache": str(cache), "train.max_steps": 2,
                                                         "train.checkpoint_every": 2, "train.preview_every": 0})))
    assert (cache / "cache.json").exists() and len(list(cache.glob("*.safetensors"))) == 3
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["main/loss"] for r in rows if "main/loss" in r]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    with pytest.raises(ValueError, match="data.latent_cache is set, but stage 'movq' trains on pixels"):
        train(load_config([MOVQ_CONFIG], tiny_movq_overrides(tmp_path / "m", shapes_shards,
                                                             **{"data.latent_cache": str(cache)})))


def test_keyframe_and_interpolation_train_and_preview_from_the_cache(tmp_path, shapes_shards, movq_run, t2i_run):
    from test_interpolation import CONFIG as INTERPOLATION_CONFIG, tiny_interpolation_overrides
    from test_keyframe import KEYFRAME_CONFIG, tiny_keyframe_overrides

    cache = tmp_path / "cache"
    extra = {"data.latent_cache": str(cache), "train.max_steps": 1, "train.checkpoint_every": 1,
             "train.preview_every": 1}
    for name, config, overrides in [("keyframe", KEYFRAME_CONFIG, tiny_keyframe_overrides),
                                    ("interpolation", INTERPOLATION_CONFIG, tiny_interpolation_overrides)]:
        run = tmp_path / name
        train(load_config([config], overrides(run, shapes_shards, movq_run, t2i_run, **extra)))
        assert list((run / "previews").glob("*.png")), name
        assert (run / "checkpoints" / "step_0000001").is_dir(), name
