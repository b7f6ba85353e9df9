"""Train the identity encoder (kvideo/models/identity_encoder.py) on ShapesWorld v2 renders and
report how well it reads the four identity attributes of characters it never saw.

    python tools/train_identity_encoder.py --train DIR --test DIR --out FILE.safetensors
        [--size 64] [--steps 2000] [--batch-size 64] [--lr 2e-3] [--seed 0] [--workers 1]
        [--frames-per-clip 4] [--recolour 1] [--unband 0.25]
        [--width 16] [--depth 4] [--embed-dim 64]

--train is a v2 split (tools/make_shapesworld.py --world characters: tar shards, characters.json,
references/), --test a v2 test split (--split test: its held-out characters appear only there).
Every image is decoded once into memory and resized to --size x --size:

    single, two_shots   --frames-per-clip random frames of a one-character clip (a two-shot clip's
                        may fall in either shot: the same character)
    lane                the same frames of a two-character clip, one image per lane: the lane's
                        rows (top [0, S/2): the first listed character; bottom [S/2, S)) padded back
                        to S x S with its own border rows, which the v2 spec keeps pure background,
                        so the character keeps its size relative to the canvas
    clip_ref            each one-character clip's KEY.ref.png
    references          the split's references/NAME.png

Training: AdamW, cross-entropy summed over the four heads, linear warmup then cosine decay, and
two augmentations:

- a horizontal flip of half the images: every shape is mirror-symmetric about its vertical axis
  and the band is horizontal, so no attribute changes (never a vertical flip: the triangle would
  point down);
- recolouring (--recolour: the share of images): the six palette colours are permuted at random
  and the body and band labels follow; of those with a band, an --unband share have the band
  painted in the body colour (band `none`, the render of the same character without a band).
  Without them the encoder learns the 12 training characters as a lookup (their colours give
  away their shape: every training triangle is red) and reads almost no held-out character right
  (measured: held-out frames 0.29 shape, 0.00 all four); with permutations only, a small square
  without a band (Otto; every small training square has one) reads as a circle. A v2 pixel is a
  blend of its background and one palette colour (band rows are whole pixels), so `recolour`
  finds that colour and its coverage and paints the coverage in the new colour.

One CPU thread by default (--threads): on a 2-core machine with another busy process, two threads
were 3-4x slower than one (measured).

Report (a printed table; OUT.json beside the weights; the same dict in the weights' metadata):
per-attribute and all-four accuracy on the test split's held-out characters and on all of its
characters, frames of single clips and reference images (clip_ref + references) separately, and
on (up to 4096 of) the training images; `retrieval`: for each test frame of a single clip, whether
its nearest reference among the test split's references/NAME.png (cosine of embeddings, the
identity loss's measure) is its own character, and the mean cosine to its own and to the others.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime
import multiprocessing
from pathlib import Path
from typing import List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from einops import rearrange  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kvideo.data.characters import HELD_OUT_CHARACTERS, IDENTITY, NO_BAND, lane_rows, load_bank  # noqa: E402
from kvideo.data.images import read_image  # noqa: E402
from kvideo.data.shapesworld import COLORS  # noqa: E402
from kvideo.data.shards import ShardIndex, resize_and_crop  # noqa: E402
from kvideo.data.video_io import read_video  # noqa: E402
from kvideo.models.identity_encoder import IdentityEncoder, IdentityEncoderConfig  # noqa: E402
from kvideo.weights import save_identity_encoder  # noqa: E402

SOURCES = ("single", "two_shots", "lane", "clip_ref", "references")
FRAMES = ("single",)  # the test images scored as frames
REFERENCES = ("clip_ref", "references")  # ... and as reference images
TRAIN_EVAL_IMAGES = 4096
PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # (6, 3) RGB 0..255, in COLORS order

# ----------------------------------------------------------------------------------------------
# Data: every image of a split, decoded once
# ----------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """The images of a split: ``pixels`` uint8 (n, 3, S, S), ``labels`` int64 (n, 4) (class
    indices in ``IDENTITY`` order), and each image's character and source (``SOURCES``)."""

    pixels: torch.Tensor
    labels: torch.Tensor
    names: List[str]
    sources: List[str]

    def __len__(self) -> int:
        return len(self.names)

    def mask(self, sources: Sequence[str], names: Optional[Sequence[str]] = None) -> torch.Tensor:
        """bool (n,): the images of these sources (and of these characters, when given)."""
        return torch.tensor([s in sources and (names is None or n in names) for s, n in zip(self.sources, self.names)],
                            dtype=torch.bool)


def to_square(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (n, h, w, 3) -> uint8 (n, 3, size, size): resized to cover, centre-cropped."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (n, 3, h, w)
    x = resize_and_crop(x, (size, size), None)
    return x.float().round().clamp(0, 255).to(torch.uint8).numpy()


def lane_square(frames: np.ndarray, lane: str) -> np.ndarray:
    """The rows of ``lane`` of (n, S, S, 3) frames, padded back to (n, S, S, 3) with copies of the
    lane's own top and bottom rows (background), so the character keeps its size."""
    s = frames.shape[1]
    top, bottom = lane_rows(lane, s)
    above = (s - (bottom - top)) // 2
    return np.pad(frames[:, top:bottom], ((0, 0), (above, s - (bottom - top) - above), (0, 0), (0, 0)), mode="edge")


def decode_clip(job) -> list:
    """One clip's images: [(uint8 (3, S, S), character metadata, source)]. ``job``: (mp4 bytes,
    metadata, KEY.ref.png bytes or None, frames per clip, seed, S)."""
    mp4, meta, ref, count, seed, size = job
    frames, _ = read_video(mp4)  # (f, h, w, 3) uint8
    picks = np.sort(np.random.default_rng(seed).choice(len(frames), min(count, len(frames)), replace=False))
    if meta["kind"] == "two_characters":
        groups = [(lane_square(frames[picks], p["lane"]), p, "lane") for p in meta["characters"]]
    else:
        groups = [(frames[picks], meta["character"], meta["kind"])]
    if ref is not None:
        groups.append((read_image(ref)[None], meta["character"], "clip_ref"))
    return [(image, person, source) for images, person, source in groups for image in to_square(images, size)]


def read_split(directory: Path, cfg: IdentityEncoderConfig, frames_per_clip: int, seed: int,
               workers: int = 1) -> tuple:
    """(ImageSet, {clip kind: count}) of the v2 split in ``directory``, images at ``cfg.image_size``."""
    index = ShardIndex(str(directory), required=("mp4", "json"), key=str(directory))
    metas = [index.metadata(i) for i in range(len(index))]
    classes = cfg.classes()

    def jobs():
        for i, meta in enumerate(metas):
            ref = index.read(i, "ref.png") if "ref.png" in index.members[i] else None
            yield index.read(i, "mp4"), meta, ref, frames_per_clip, [seed, i], cfg.image_size

    items = []
    # spawned, not forked: a fork after torch has started its OpenMP threads (the first split's
    # tensors) hangs the children's decoding
    with multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else nullcontext() as pool:
        decoded = pool.imap(decode_clip, jobs(), chunksize=8) if pool else map(decode_clip, jobs())
        for clip_items in tqdm(decoded, total=len(index), desc=f"decode {directory.name}", unit="clip"):
            items += clip_items
    bank = load_bank(directory)
    for path in sorted((directory / "references").glob("*.png")):
        image = to_square(read_image(path)[None], cfg.image_size)[0]
        items.append((image, {"name": path.stem, **bank[path.stem].attributes()}, "references"))

    def label(person):
        try:
            return [classes[a].index(person[a]) for a in IDENTITY]
        except ValueError:
            raise ValueError(f"{directory}: {person['name']} has an attribute outside the encoder's classes: "
                             f"{ {a: person[a] for a in IDENTITY} }") from None

    pixels = torch.from_numpy(np.stack([image for image, _, _ in items]))
    labels = torch.tensor([label(person) for _, person, _ in items], dtype=torch.long)
    kinds = dict(Counter(meta["kind"] for meta in metas))
    return ImageSet(pixels, labels, [p["name"] for _, p, _ in items], [s for _, _, s in items]), kinds


def as_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (n, 3, S, S) -> float in [-1, 1]."""
    return pixels.float() / 127.5 - 1.0


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def recolour(pixels: torch.Tensor, colour_map: torch.Tensor) -> torch.Tensor:
    """Images (b, 3, S, S) in 0..255 with palette colour k painted as colour ``colour_map[b, k]``
    (``colour_map`` (b, 6): indices into ``COLORS``); float, same range.

    Each pixel is taken as background + alpha * (colour - background), the background being the
    top-left pixel (every object keeps a margin from the canvas edge): of the six palette colours
    the one whose blend explains the pixel best, with its alpha in [0, 1]. Background pixels
    (alpha ~ 0) stay as they are; coding noise is kept along the background's direction only."""
    x = pixels.float()
    bg = x[:, :, :1, :1]  # (b, 3, 1, 1)
    v = PALETTE[None] - bg[:, None, :, 0, 0]  # (b, 6, 3): each colour's direction from the background
    dv = torch.einsum("bchw,bkc->bkhw", x - bg, v)  # (b, 6, S, S)
    vv = (v * v).sum(-1)[..., None, None]  # (b, 6, 1, 1)
    alpha = (dv / vv).clamp(0, 1)  # (b, 6, S, S)
    k = (alpha * (alpha * vv - 2 * dv)).min(1).indices  # (b, S, S): min of |d - alpha v|^2 - |d|^2
    a = alpha.gather(1, k[:, None])  # (b, 1, S, S)
    painted = rearrange(PALETTE[colour_map.gather(1, k.flatten(1)).view_as(k)], "b h w c -> b c h w")
    return bg + a * (painted - bg)  # (b, 3, S, S)


def recolour_labels(labels: torch.Tensor, colour_map: torch.Tensor) -> torch.Tensor:
    """Labels (b, 4) of images recoloured by ``colour_map`` (b, 6): body and band colours mapped,
    a band painted in its body's colour becoming ``none``; shape and size class kept. Needs the
    default body and band vocabularies (``COLORS`` order, then NO_BAND)."""
    body, band = IDENTITY.index("body"), IDENTITY.index("band")
    out = labels.clone()
    out[:, body] = colour_map.gather(1, labels[:, body:body + 1])[:, 0]
    coloured = labels[:, band] < len(COLORS)  # band index len(COLORS) is NO_BAND
    mapped = colour_map[coloured].gather(1, labels[coloured, band:band + 1])[:, 0]
    out[coloured, band] = torch.where(mapped == out[coloured, body], len(COLORS), mapped)
    return out


def augment(pixels: torch.Tensor, labels: torch.Tensor, args, gen: torch.Generator) -> tuple:
    """(images in [-1, 1], labels) of a uint8 batch (b, 3, S, S): an ``args.recolour`` share
    recoloured by random permutations of the palette, of which an ``args.unband`` share of those
    with a band lose it (painted in the body colour); all flipped horizontally at random."""
    b, body, band = len(pixels), IDENTITY.index("body"), IDENTITY.index("band")
    x = pixels.float()  # (b, 3, S, S) 0..255
    chosen = torch.rand(b, generator=gen) < args.recolour
    if chosen.any():
        n = int(chosen.sum())
        colour_map = torch.argsort(torch.rand(n, len(COLORS), generator=gen), dim=1)  # (n, 6) permutations
        old = labels[chosen]
        unband = (torch.rand(n, generator=gen) < args.unband) & (old[:, band] < len(COLORS))
        colour_map[unband, old[unband, band]] = colour_map[unband, old[unband, body]]
        x[chosen] = recolour(pixels[chosen], colour_map)
        labels = labels.clone()
        labels[chosen] = recolour_labels(old, colour_map)
    flip = torch.rand(b, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)  # horizontal only
    return x / 127.5 - 1.0, labels


def train(model: IdentityEncoder, data: ImageSet, args) -> float:
    """``args.steps`` AdamW steps on random batches of ``data``; returns the seconds taken."""
    cfg = model.cfg
    if args.recolour and (cfg.body != tuple(COLORS) or cfg.band != (*COLORS, NO_BAND)):
        raise ValueError("--recolour needs the default body and band vocabularies (the COLORS order)")
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    model.train()
    start = time.time()
    bar = tqdm(range(args.steps), desc="train", unit="step")
    for _ in bar:
        idx = torch.randint(len(data), (args.batch_size,), generator=gen)
        x, labels = augment(data.pixels[idx], data.labels[idx], args, gen)  # (b, 3, S, S), (b, 4)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[a], labels[:, k]) for k, a in enumerate(IDENTITY))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return time.time() - start


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def encode(model: IdentityEncoder, pixels: torch.Tensor, batch: int = 512) -> tuple:
    """(embeddings (n, d), predicted class indices (n, 4)) of uint8 images."""
    embeddings, predictions = [], []
    for chunk in pixels.split(batch):
        e = model.embed(as_input(chunk))
        logits = model.logits(e)
        embeddings.append(e)
        predictions.append(torch.stack([logits[a].argmax(-1) for a in IDENTITY], dim=1))
    return torch.cat(embeddings), torch.cat(predictions)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> dict:
    """{attribute: accuracy, "all": all four right, "n": images}; accuracies None when n = 0."""
    right = predictions == labels  # (n, 4)
    n = len(labels)
    out = {a: (right[:, k].float().mean().item() if n else None) for k, a in enumerate(IDENTITY)}
    return {**out, "all": right.all(dim=1).float().mean().item() if n else None, "n": n}


def retrieval(embeddings: torch.Tensor, data: ImageSet, names: Optional[Sequence[str]]) -> dict:
    """Frames of single clips (of ``names``, when given) against the folder references: top-1
    own character, mean cosine to the own reference and to the others'."""
    refs = data.mask(("references",)).nonzero().flatten()
    ref_names = [data.names[i] for i in refs]
    frames = data.mask(FRAMES, names).nonzero().flatten()
    frames = frames[torch.tensor([data.names[i] in ref_names for i in frames], dtype=torch.bool)]
    if not len(frames):
        return {"top1": None, "own_cosine": None, "other_cosine": None, "n": 0}
    cos = embeddings[frames] @ embeddings[refs].T  # (n, r)
    own = torch.tensor([[data.names[i] == r for r in ref_names] for i in frames], dtype=torch.bool)
    top1 = own[torch.arange(len(frames)), cos.argmax(1)]
    return {"top1": top1.float().mean().item(), "own_cosine": cos[own].mean().item(),
            "other_cosine": cos[~own].mean().item(), "n": len(frames)}


def evaluate(model: IdentityEncoder, test: ImageSet, train_data: ImageSet, seed: int) -> dict:
    """The report's accuracy and retrieval sections (see the module docstring)."""
    embeddings, predictions = encode(model, test.pixels)
    accuracy_of = {}
    for group, names in (("held_out", HELD_OUT_CHARACTERS), ("all", None)):
        accuracy_of[group] = {kind: accuracy(predictions[m], test.labels[m])
                              for kind, m in (("frames", test.mask(FRAMES, names)),
                                              ("references", test.mask(REFERENCES, names)))}
    pick = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(seed))[:TRAIN_EVAL_IMAGES]
    accuracy_of["train"] = {"images": accuracy(encode(model, train_data.pixels[pick])[1], train_data.labels[pick])}
    return {"accuracy": accuracy_of,
            "retrieval": {"held_out": retrieval(embeddings, test, HELD_OUT_CHARACTERS),
                          "all": retrieval(embeddings, test, None)}}


def table(results: dict) -> str:
    """The accuracy and retrieval sections as text."""
    cols = (*IDENTITY, "all")
    lines = [f"{'characters':<10} {'images':<11} {'n':>6}  " + "  ".join(f"{c:>10}" for c in cols)]
    for group, kinds in results["accuracy"].items():
        for kind, acc in kinds.items():
            cells = "  ".join(f"{'-' if acc[c] is None else f'{acc[c]:.3f}':>10}" for c in cols)
            lines.append(f"{group:<10} {kind:<11} {acc['n']:>6}  {cells}")
    lines.append("retrieval (test frames of single clips -> nearest of the test references/NAME.png):")
    for group, r in results["retrieval"].items():
        if r["n"]:
            lines.append(f"  {group:<9} top-1 own {r['top1']:.3f}, cosine own {r['own_cosine']:.3f} "
                         f"vs others {r['other_cosine']:.3f} (n {r['n']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=Path, required=True, help="a v2 split directory (shards + references/)")
    ap.add_argument("--test", type=Path, required=True, help="a v2 test split (held-out characters only there)")
    ap.add_argument("--out", type=Path, required=True, help="the weights, FILE.safetensors (FILE.json beside it)")
    ap.add_argument("--size", type=int, default=64, help="images are resized to SIZE x SIZE")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="decoding processes")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--frames-per-clip", type=int, default=4)
    ap.add_argument("--recolour", type=float, default=1.0,
                    help="share of training images whose palette colours are permuted (0: none)")
    ap.add_argument("--unband", type=float, default=0.25,
                    help="share of the recoloured images with a band whose band takes the body colour")
    ap.add_argument("--width", type=int, default=IdentityEncoderConfig.width)
    ap.add_argument("--depth", type=int, default=IdentityEncoderConfig.depth)
    ap.add_argument("--embed-dim", type=int, default=IdentityEncoderConfig.embed_dim)
    args = ap.parse_args(argv)
    if args.out.suffix != ".safetensors":
        ap.error(f"--out must end in .safetensors, got {args.out}")
    for name in ("recolour", "unband"):
        if not 0 <= getattr(args, name) <= 1:
            ap.error(f"--{name} is a share in [0, 1], got {getattr(args, name)}")
    for name in ("steps", "batch_size", "frames_per_clip", "workers", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = IdentityEncoderConfig(width=args.width, depth=args.depth, embed_dim=args.embed_dim, image_size=args.size)
    train_data, train_kinds = read_split(args.train, cfg, args.frames_per_clip, args.seed, args.workers)
    test, test_kinds = read_split(args.test, cfg, args.frames_per_clip, args.seed + 1, args.workers)
    model = IdentityEncoder(cfg)
    params = sum(p.numel() for p in model.parameters())
    print(f"identity encoder: {params / 1e6:.3f}M parameters; {len(train_data)} training images "
          f"{dict(Counter(train_data.sources))}, {len(test)} test images {dict(Counter(test.sources))}")
    seconds = train(model, train_data, args)
    report = {
        "command": shlex.join(["python", "tools/train_identity_encoder.py", *argv]),
        "date": datetime.now().isoformat(timespec="seconds"),
        "config": asdict(cfg), "params": params,
        "training": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                     "size": args.size, "frames_per_clip": args.frames_per_clip,
                     "recolour": args.recolour, "unband": args.unband, "seconds": round(seconds, 1)},
        "data": {split: {"dir": str(directory), "clips": kinds, "images": dict(Counter(data.sources))}
                 for split, directory, kinds, data in (("train", args.train, train_kinds, train_data),
                                                        ("test", args.test, test_kinds, test))},
        **evaluate(model, test, train_data, args.seed),
    }
    print(table(report))
    save_identity_encoder(model, args.out, report)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return report


if __name__ == "__main__":
    main()
