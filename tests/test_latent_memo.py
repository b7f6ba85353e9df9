"""The references' latent memo (kvideo.inference.autoencoder.LatentMemo): the latents an encoder
gives each image alone, each image encoded once, the oldest dropped past the size limit."""

import torch
from torch import nn

from kvideo.inference.autoencoder import LatentMemo


class CountingEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.images = 0

    def encode(self, x):
        self.images += x.shape[0]
        return self.conv(x)


def test_each_image_is_encoded_once_and_alone():
    torch.manual_seed(0)
    enc = CountingEncoder()
    memo = LatentMemo(enc, max_mb=1)
    images = torch.randn(3, 3, 8, 8)
    batch = torch.cat([images, images[:1]])  # an image twice in one batch
    first = memo.encode(batch, torch.device("cpu"))
    with torch.no_grad():
        alone = torch.cat([enc.conv(image[None]) for image in batch])
    torch.testing.assert_close(first, alone, rtol=0, atol=0)
    assert enc.images == 3 and (memo.misses, memo.hits) == (3, 1)
    again = memo.encode(images.flip(0), torch.device("cpu"))
    assert enc.images == 3 and memo.hits == 4
    torch.testing.assert_close(again, first[:3].flip(0), rtol=0, atol=0)
    # another shape or dtype of the same bytes is another image
    memo.encode(images[:1].reshape(1, 3, 4, 16), torch.device("cpu"))
    assert enc.images == 4


def test_the_least_recently_used_latents_go_past_the_limit():
    enc = CountingEncoder()
    one = 4 * 4 * 4 * 4  # bytes of one (4, 4, 4) float32 latent
    memo = LatentMemo(enc, max_mb=2.5 * one / 2**20)  # room for two
    a, b, c = torch.randn(3, 1, 3, 8, 8)
    memo.encode(a, torch.device("cpu"))
    memo.encode(b, torch.device("cpu"))
    memo.encode(a, torch.device("cpu"))  # a is now the most recent
    memo.encode(c, torch.device("cpu"))  # b goes
    assert len(memo.entries) == 2 and memo.bytes == 2 * one
    seen = enc.images
    memo.encode(a, torch.device("cpu"))
    assert enc.images == seen
    memo.encode(b, torch.device("cpu"))
    assert enc.images == seen + 1
