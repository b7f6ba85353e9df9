"""Reference images per clip (kvideo/data/references.py): a v2 split's own KEY.ref.png and its
references/ folder reach the batch in lane order, padded and masked; a bad picture is a bad
sample; without the field "references" nothing changes."""

import io
import shutil
import tarfile

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf

from kvideo.config import ConfigError, DataConfig, check_ranges
from kvideo.data.characters import CharactersSpec, write_characters
from kvideo.data.datasets import build_dataset
from kvideo.data.latent_cache import LatentCacheSpec, build_latent_cache
from kvideo.data.references import ReferenceReader, reference_names
from kvideo.data.shards import BadSample, ShardIndex, collate

FIELDS = ("caption", "references")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A tiny ShapesWorld v2 train split: 8 clips (4 single, 2 two-shot, 2 two-character), 8
    frames of 32 px, in 2 shards, and references/NAME.png for its 12 characters."""
    out = tmp_path_factory.mktemp("characters")
    write_characters(out, CharactersSpec(8, size=32, num_frames=8, clips_per_shard=4), progress=False)
    return out


def data_cfg(shards, **kw):
    """The `data` section of a run on `shards` (typed, so every key has its schema default)."""
    values = dict(shards=str(shards), num_frames=4, fps=24.0, size=[32, 32], num_workers=0)
    return OmegaConf.structured(DataConfig(**{**values, **kw}))


def decode(data: bytes) -> torch.Tensor:
    """(3, h, w) in [-1, 1] of PNG bytes, decoded with OpenCV (not the code under test)."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1])).permute(2, 0, 1).float() / 127.5 - 1


def kinds(dataset):
    """{kind: [sample indices]} of a dataset's index."""
    out = {}
    for i in range(len(dataset.index)):
        out.setdefault(dataset.index.metadata(i)["kind"], []).append(i)
    return out


def test_reference_names_of_every_metadata_layout():
    assert reference_names({"character": {"name": "Ada", "lane": "full"}}) == ["Ada"]
    assert reference_names({"characters": [{"name": "Kobi", "lane": "top"}, {"name": "Fizz"}]}) == ["Kobi", "Fizz"]
    assert reference_names({"reference_names": ["cat", "dog"]}) == ["cat", "dog"]
    assert reference_names({"caption": "a red circle"}) == []
    for bad in ({"character": "Ada"}, {"characters": [{"name": ""}]}, {"reference_names": "cat"}):
        with pytest.raises(BadSample) as e:
            reference_names(bad)
        assert e.value.reason == "metadata"


def test_single_clips_carry_their_own_reference(split):
    data = build_dataset(data_cfg(split, reference_size=[64, 64]), seed=0, train=True, fields=FIELDS)
    for i in kinds(data)["single"] + kinds(data)["two_shots"]:
        item = data[(0, i)]
        name = data.index.metadata(i)["character"]["name"]
        assert item["reference_names"] == [name, ""]
        assert item["reference_present"].tolist() == [True, False]
        torch.testing.assert_close(item["references"][0], decode(data.index.read(i, "ref.png")), atol=0, rtol=0)
        assert not item["references"][1].any()  # padding is zeros
    # with data.references set, the clip's own picture still wins for its first name
    both = build_dataset(data_cfg(split, references=str(split / "references"), reference_size=[64, 64]), seed=0,
                         train=True, fields=FIELDS)
    i = kinds(data)["single"][0]
    name = data.index.metadata(i)["character"]["name"]
    assert torch.equal(both[(0, i)]["references"][0], decode(data.index.read(i, "ref.png")))
    assert not torch.equal(both[(0, i)]["references"][0], decode((split / "references" / f"{name}.png").read_bytes()))


def test_two_character_clips_get_both_references_in_lane_order(split):
    refs = split / "references"
    data = build_dataset(data_cfg(split, references=str(refs), max_references=3, reference_size=[64, 64]), seed=0,
                         train=True, fields=FIELDS)
    for i in kinds(data)["two_characters"]:
        people = data.index.metadata(i)["characters"]
        assert [p["lane"] for p in people] == ["top", "bottom"]
        item = data[(0, i)]
        assert item["reference_names"] == [people[0]["name"], people[1]["name"], ""]
        assert item["reference_present"].tolist() == [True, True, False]
        for j in range(2):
            assert torch.equal(item["references"][j], decode((refs / f"{people[j]['name']}.png").read_bytes()))
        assert not item["references"][2].any()
    # no directory: a two-character clip has no picture at all, every slot absent
    bare = build_dataset(data_cfg(split), seed=0, train=True, fields=FIELDS)
    item = bare[(0, kinds(data)["two_characters"][0])]
    assert item["reference_present"].tolist() == [False, False] and item["reference_names"] == ["", ""]
    assert item["references"].shape == (2, 3, 32, 32) and not item["references"].any()


def test_reference_size_resizes_and_the_batch_stacks(split):
    data = build_dataset(data_cfg(split, references=str(split / "references"), reference_size=[16, 24]), seed=0,
                         train=True, fields=FIELDS)
    i = kinds(data)["single"][0]
    item = data[(0, i)]
    assert item["references"].shape == (2, 3, 16, 24) and item["references"].dtype == torch.float32
    full = decode(data.index.read(i, "ref.png"))[None]  # (1, 3, 64, 64): covers 16 x 24 at 24 x 24, cropped
    want = F.interpolate(full, size=(24, 24), mode="bilinear", antialias=True, align_corners=False)[0, :, 4:20]
    torch.testing.assert_close(item["references"][0], want, atol=1e-5, rtol=0)
    assert item["references"].min() >= -1 and item["references"].max() <= 1
    default = build_dataset(data_cfg(split), seed=0, train=True, fields=FIELDS)[(0, i)]
    assert default["references"].shape == (2, 3, 32, 32)  # None: data.size

    batch = collate([data[(0, j)] for j in range(len(data))])
    assert batch["size"] == 8 and batch["references"].shape == (8, 2, 3, 16, 24)
    assert batch["reference_present"].shape == (8, 2) and batch["reference_present"].dtype == torch.bool
    assert len(batch["reference_names"]) == 8 and all(len(n) == 2 for n in batch["reference_names"])
    named = [len(reference_names(m)) for m in batch["meta"]]  # every named character of the split has a picture
    assert batch["reference_present"].sum(1).tolist() == named and sorted(named) == [1] * 6 + [2] * 2


def test_without_the_field_nothing_changes(split):
    plain = build_dataset(data_cfg(split, references=str(split / "references")), seed=3, train=True,
                          fields=("caption",))
    refs = build_dataset(data_cfg(split, references=str(split / "references")), seed=3, train=True, fields=FIELDS)
    assert plain.extras is None
    for item in [(0, 0), (1, 2), (4, 5)]:
        a, b = plain[item], refs[item]
        assert set(a) == {"video", "caption", "motion_score", "key", "meta"}
        assert set(b) - set(a) == {"references", "reference_present", "reference_names"}
        assert torch.equal(a["video"], b["video"])  # the clip's random start and crop are untouched
    batch = collate([plain[(0, j)] for j in range(4)])
    assert not {"references", "reference_present", "reference_names"} & set(batch)


def corrupt_member(split, out, key, ext, data=b"\x89PNG\r\n\x1a\n not a png"):
    """A copy of the split's shards with member KEY.EXT replaced by `data`."""
    out.mkdir()
    for tar in sorted(split.glob("*.tar")):
        with tarfile.open(tar) as src, tarfile.open(out / tar.name, "w") as dst:
            for info in src:
                payload = src.extractfile(info).read()
                if info.name == f"{key}.{ext}":
                    payload, info.size = data, len(data)
                dst.addfile(info, io.BytesIO(payload))
    return out


def test_a_corrupt_reference_is_a_bad_sample(split, tmp_path):
    index = ShardIndex(str(split))
    i = next(i for i in range(len(index)) if "ref.png" in index.members[i])
    shards = corrupt_member(split, tmp_path / "shards", index.keys[i], "ref.png")
    data = build_dataset(data_cfg(shards), seed=0, train=True, fields=FIELDS)
    failed = data[(0, i)]["failed"]
    assert failed["reason"] == "reference" and f"{index.keys[i]}.ref.png" in failed["message"]
    batch = collate([data[(0, j)] for j in range(len(data))])
    assert batch["size"] == 7 and [f["reason"] for f in batch["failed"]] == ["reference"]
    assert data[(0, i)].keys() == {"failed"}
    assert "video" in build_dataset(data_cfg(shards), seed=0, train=True)[(0, i)]  # not read: not a bad sample

    refs = tmp_path / "references"  # a corrupt picture in data.references: the clips that name it
    shutil.copytree(split / "references", refs)
    two = next(j for j in range(len(index)) if "characters" in index.metadata(j))
    name = index.metadata(two)["characters"][1]["name"]
    (refs / f"{name}.png").write_bytes(b"garbage")
    data = build_dataset(data_cfg(split, references=str(refs)), seed=0, train=True, fields=FIELDS)
    failed = data[(0, two)]["failed"]
    assert failed["reason"] == "reference" and f"{name}.png" in failed["message"]
    assert "data.references" in failed["message"]


def test_reference_settings_are_checked(split, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.references"):
        build_dataset(data_cfg(split, references=str(tmp_path / "missing")), seed=0, train=True, fields=FIELDS)
    build_dataset(data_cfg(split, references=str(tmp_path / "missing")), seed=0, train=True)  # not read: no check
    with pytest.raises(ValueError, match="data.reference_size"):
        ReferenceReader(None, 2, (32,))
    with pytest.raises(ConfigError, match="data.max_references"):
        check_ranges(OmegaConf.create({"data": data_cfg(split, max_references=0)}))
    with pytest.raises(ConfigError, match="data.reference_size"):
        check_ranges(OmegaConf.create({"data": data_cfg(split, reference_size=[0, 8])}))


class PoolingEncoder(nn.Module):
    """A stand-in MoVQ: its latents are the frames average-pooled 4x (and one weight to fingerprint)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def encode(self, x):  # (n, 3, h, w) -> (n, 3, h / 4, w / 4)
        return F.avg_pool2d(x, 4) * self.scale


def test_latent_clips_carry_references_too(split, tmp_path):
    cache = tmp_path / "cache"
    build_latent_cache(LatentCacheSpec(cache, str(split), "pooling", (32, 32)), PoolingEncoder())
    refs = split / "references"
    cfg = data_cfg(split, latent_cache=str(cache), references=str(refs))
    latent = build_dataset(cfg, seed=0, train=True, fields=FIELDS)
    pixels = build_dataset(data_cfg(split, references=str(refs)), seed=0, train=True, fields=FIELDS)
    assert type(latent).__name__ == "LatentClipDataset"
    for i in range(len(latent)):
        a, b = latent[(2, i)], pixels[(2, i)]
        assert a["latents"].shape == (3, 4, 8, 8) and "video" not in a
        assert torch.equal(a["references"], b["references"]) and a["reference_names"] == b["reference_names"]
    batch = collate([latent[(0, i)] for i in range(4)])
    assert batch["latents"].shape == (4, 3, 4, 8, 8) and batch["references"].shape == (4, 2, 3, 32, 32)
