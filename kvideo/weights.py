"""Loaders: read weight files into networks built by kvideo.models, and write them.

The networks in kvideo/models/ read no files; this module is where their pretrained weights
come in. Nothing is ever downloaded: every path is a local file.

    build_text_encoder(cfg)       the text encoder of `cfg.kind`: an open_clip TextEncoder, its tower
                                  loaded from `cfg.weights` when set, or a T5TextEncoder read from
                                  the local directory `cfg.weights`
    load_text_tower(encoder, p)   an open_clip checkpoint -> encoder.tower
    load_text_projection(e, sd)   a projection state dict (the release's Linear + LayerNorm) -> e.proj, e.norm
    load_lpips(path)              LPIPS from one local file
    convert_lpips_weights(...)    that file, from torchvision's VGG16 and the official lin heads
    save_identity_encoder(m, p)   an IdentityEncoder -> safetensors (its config and report in the metadata)
    load_identity_encoder(p)      that file -> the frozen IdentityEncoder

Command line (the LPIPS file):

    python -m kvideo.weights VGG16.pth LPIPS_VGG_LIN.pth OUT.safetensors

Sections: text encoder, LPIPS, identity encoder.
"""

from __future__ import annotations

import argparse
import json
import weakref
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from kvideo.models.text_encoder import ProjectedText, TextEncoder, TextEncoderConfig

if TYPE_CHECKING:
    from kvideo.models.identity_encoder import IdentityEncoder
    from kvideo.models.lpips import LPIPS

PathLike = Union[str, Path]

# ----------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------


def build_text_encoder(cfg: TextEncoderConfig) -> ProjectedText:
    """The text encoder of `cfg`, its tower loaded from `cfg.weights` when that is set.

    The network is initialised first (same random numbers whether or not weights follow), then
    the tower's weights are replaced."""
    if cfg.kind == "t5":
        return build_t5_text_encoder(cfg)
    if cfg.kind != "open_clip":
        raise ValueError(f"recipe.text_encoder.kind must be open_clip or t5, got {cfg.kind!r}")
    encoder = TextEncoder(cfg)
    if cfg.weights is not None:
        load_text_tower(encoder, cfg.weights)
    return encoder


# Frozen T5 towers already loaded in this process, by resolved directory: every diffusion stage of a
# pipeline names the same frozen tower (Flan-UL2's encoder is about 8.7B parameters), so the stages
# share one module instead of loading it three times. A tower lives as long as an encoder holds it.
_FROZEN_T5_TOWERS: "weakref.WeakValueDictionary[str, torch.nn.Module]" = weakref.WeakValueDictionary()


def build_t5_text_encoder(cfg: TextEncoderConfig, load_weights: bool = True) -> ProjectedText:
    """A T5TextEncoder from the local directory `cfg.weights` in transformers' layout (config.json,
    the tokenizer's files, the weights: a whole T5 or its encoder; a decoder is ignored). The
    tower is loaded as it is built (an 8.7B-parameter Flan-UL2 encoder is not initialised twice),
    and a frozen tower is shared with every other encoder of this process built from the same
    directory; without `load_weights` it is randomly initialised and the weights are not read."""
    from kvideo.models.t5_text import T5TextEncoder

    if cfg.weights is None:
        raise ValueError("recipe.text_encoder.kind t5 needs recipe.text_encoder.weights: a local directory holding a "
                         "transformers T5 checkpoint (config.json, the tokenizer's files, the weights)")
    path = Path(cfg.weights)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"recipe.text_encoder.weights {str(path)!r}: no config.json there (a T5 text encoder "
                                "is a local transformers directory)")
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not load_weights:
        return T5TextEncoder(cfg, T5Config.from_pretrained(path, local_files_only=True), tokenizer)
    key = str(path.resolve())
    tower = _FROZEN_T5_TOWERS.get(key) if cfg.frozen else None
    if tower is None:
        tower = T5EncoderModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).encoder
        if cfg.frozen:
            _FROZEN_T5_TOWERS[key] = tower
    return T5TextEncoder(cfg, tower.config, tokenizer, tower=tower)


def load_text_projection(encoder: ProjectedText, state: Dict[str, torch.Tensor]) -> None:
    """Fill `encoder.proj` and `encoder.norm` from a projection state dict: the release's
    `nn.Sequential(Linear, LayerNorm)` (`0.weight`, `1.weight`, `1.bias`; t5_projections.pt's
    `projection_base`) or kvideo's names (`proj.*`, `norm.*`). A Linear without bias needs
    `projection_bias: false`."""
    from kvideo.release.maps import T5_PROJECTION

    renamed = {T5_PROJECTION.to_kvideo(k): v for k, v in state.items()}
    own = {k: v for k, v in encoder.state_dict().items() if k.startswith(("proj.", "norm."))}
    if set(renamed) != set(own):
        raise KeyError(f"text projection: the state dict has {sorted(state)}, the encoder needs {sorted(own)} "
                       "(a Linear without bias needs recipe.text_encoder.projection_bias: false)")
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in renamed.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"text projection shapes do not fit the encoder: {wrong}")
    encoder.load_state_dict(renamed, strict=False)


def load_text_tower(encoder: TextEncoder, path: PathLike) -> None:
    """Load `encoder.tower` from a local open_clip checkpoint: a full CLIP state dict (text keys
    at the top level, `visual.*` ignored), a CustomTextCLIP one (`text.*`) or a tower state dict,
    optionally under `state_dict` and with `module.` / `_orig_mod.` prefixes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text encoder weights {str(path)!r} not found")
    if path.suffix == ".safetensors":
        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    if any(k.startswith("text.") for k in sd):
        sd = {k[len("text."):]: v for k, v in sd.items() if k.startswith("text.")}
    arch = encoder.cfg.arch
    own = encoder.tower.state_dict()
    missing = sorted(k for k in own if k not in sd)
    if missing:
        raise KeyError(f"text encoder weights {str(path)!r} lack {len(missing)} text-tower keys of "
                       f"{arch!r}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    picked = {k: sd[k] for k in own}
    pos = picked["positional_embedding"]
    if pos.shape[0] > own["positional_embedding"].shape[0]:  # e.g. tiny tower saved with a longer context
        picked["positional_embedding"] = pos[: own["positional_embedding"].shape[0]]
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in picked.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"text encoder weights {str(path)!r} do not fit {arch!r}: {wrong[:8]}")
    encoder.tower.load_state_dict(picked)


# ----------------------------------------------------------------------------------------------
# LPIPS
# ----------------------------------------------------------------------------------------------
# kvideo.models.lpips is imported inside these functions: it is a training-only module, and
# `import kvideo.pipeline` (which reaches build_text_encoder) must not load it
# (tests/test_architecture.py).
#
# The file (.safetensors, or a .pt / .pth state dict readable with `torch.load(weights_only=True)`)
# holds exactly the LPIPS state dict (kvideo.models.lpips.expected_shapes). It is built from
# torchvision's ImageNet VGG16 state dict (`vgg16-397923af.pth`, as saved in torch's hub cache)
# and the official LPIPS lin-layer file (`vgg.pth` of the `lpips` package, keys
# `lin{k}.model.1.weight`; it ships inside the `lpips` wheel under `lpips/weights/v0.1/`).


def safetensors_metadata(path: PathLike, what: str) -> Dict[str, str]:
    """The metadata of the safetensors file `path` ({} when it has none); a missing file is a
    FileNotFoundError and a file that is not safetensors a ValueError, each naming `what` (e.g.
    "LoRA file") and the path."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} '{path}' not found")
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors' own error type for a file that is not one
        raise ValueError(f"{what} '{path}' is not a safetensors file ({e})") from None


def write_safetensors(tensors: Dict[str, torch.Tensor], path: PathLike, metadata: Dict[str, str]) -> Path:
    """Write `tensors` and `metadata` to the safetensors file `path` atomically (a temporary file
    beside it, then a rename), its folder made when missing. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def _load_tensors(path: PathLike) -> Dict[str, torch.Tensor]:
    """A flat {key: tensor} dict from a .safetensors file or a torch state dict file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file not found: {path} (LPIPS never downloads weights)")
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a flat state dict of tensors (got {type(state).__name__})")
    return state


def _check_lpips_keys(state: Dict[str, torch.Tensor], source: PathLike) -> None:
    """Raise KeyError / ValueError naming the missing, unexpected or mis-shaped keys."""
    from kvideo.models.lpips import expected_shapes

    shapes = expected_shapes()
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise KeyError(
            f"{source} does not have the LPIPS key layout (see kvideo.models.lpips): "
            f"{len(missing)} missing {missing[:6]}, {len(unexpected)} unexpected {unexpected[:6]}; "
            "build the file with convert_lpips_weights(vgg_path, lin_path, out_path)"
        )
    wrong = [f"{k}: {tuple(state[k].shape)} != {shapes[k]}" for k in shapes if tuple(state[k].shape) != shapes[k]]
    if wrong:
        raise ValueError(f"{source}: tensors of the wrong shape: {wrong[:6]}")


def load_lpips(path: PathLike) -> LPIPS:
    """The frozen LPIPS network with its weights from `path`. The file is checked (key layout,
    shapes, non-negative lin heads) before the network is built."""
    from kvideo.models.lpips import LPIPS, TAP_CHANNELS

    state = _load_tensors(path)
    _check_lpips_keys(state, path)
    if any((state[f"lins.{k}.weight"] < 0).any() for k in range(len(TAP_CHANNELS))):
        raise ValueError(f"{path}: LPIPS lin weights must be non-negative (the official ones are)")
    lpips = LPIPS()
    lpips.load_state_dict(state, strict=True)
    return lpips


def convert_lpips_weights(vgg_path: PathLike, lin_path: PathLike, out_path: PathLike) -> Path:
    """Combine torchvision's VGG16 state dict and the official LPIPS lin file into one file.

    vgg_path: `torchvision.models.vgg16` state dict (`features.*` are kept, `classifier.*` dropped).
    lin_path: LPIPS lin heads, keys `lin{k}.model.1.weight` (the official `vgg.pth`).
    out_path: `.safetensors` -> safetensors, anything else -> `torch.save`. Returns out_path.
    """
    from kvideo.models.lpips import TAP_CHANNELS, VGG_CONV_LAYERS

    vgg, lin = _load_tensors(vgg_path), _load_tensors(lin_path)
    out: Dict[str, torch.Tensor] = {}
    for layer in VGG_CONV_LAYERS:
        for name in ("weight", "bias"):
            key = f"features.{layer}.{name}"
            if key not in vgg:
                raise KeyError(f"{vgg_path}: no {key}; expected a torchvision vgg16 state dict")
            out[key] = vgg[key]
    for k in range(len(TAP_CHANNELS)):
        key = f"lin{k}.model.1.weight"
        if key not in lin:
            raise KeyError(f"{lin_path}: no {key}; expected the official LPIPS vgg.pth lin layers")
        out[f"lins.{k}.weight"] = lin[key]
    _check_lpips_keys(out, out_path)
    out = {k: v.detach().contiguous().float() for k, v in out.items()}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if out_path.suffix == ".safetensors":
        save_file(out, str(out_path))
    else:
        torch.save(out, out_path)
    return out_path


# ----------------------------------------------------------------------------------------------
# Identity encoder
# ----------------------------------------------------------------------------------------------
# One safetensors file: the state dict, and in the metadata `format` (IDENTITY_ENCODER_FORMAT),
# `config` (the IdentityEncoderConfig as JSON: sizes and class vocabularies) and `report` (JSON:
# what tools/train_identity_encoder.py measured, e.g. the held-out accuracy; {} when none).
# kvideo.models.identity_encoder is imported inside the functions, as LPIPS is.

IDENTITY_ENCODER_FORMAT = "kvideo.identity_encoder.v1"


def save_identity_encoder(model: IdentityEncoder, path: PathLike, report: Optional[dict] = None) -> Path:
    """Write `model` (weights, config, `report`) to the safetensors file `path`, atomically.
    Returns the path."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": IDENTITY_ENCODER_FORMAT, "config": json.dumps(asdict(model.cfg)),
                "report": json.dumps(report or {})}
    return write_safetensors(tensors, path, metadata)


def load_identity_encoder(path: PathLike) -> IdentityEncoder:
    """The IdentityEncoder saved at `path` by `save_identity_encoder`, in eval mode with
    requires_grad off (gradients still reach its inputs). A missing file, a file that is not
    safetensors, one of another format or one whose tensors do not fit its config is an error
    naming the file."""
    from kvideo.models.identity_encoder import IdentityEncoder, IdentityEncoderConfig

    meta = safetensors_metadata(path, "identity encoder")
    if meta.get("format") != IDENTITY_ENCODER_FORMAT:
        raise ValueError(f"'{path}' is not an identity encoder: its metadata format is {meta.get('format')!r}, "
                         f"expected {IDENTITY_ENCODER_FORMAT!r} (written by kvideo.weights.save_identity_encoder)")
    try:
        cfg = IdentityEncoderConfig(**json.loads(meta["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"identity encoder '{path}': its config metadata is unusable ({e})") from None
    model = IdentityEncoder(cfg)
    try:
        model.load_state_dict(load_file(str(path), device="cpu"))
    except RuntimeError as e:
        raise ValueError(f"identity encoder '{path}': its tensors do not fit its config ({e})") from None
    return model.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description="Combine VGG16 and LPIPS lin weights into one file.")
    parser.add_argument("vgg_path", help="torchvision vgg16 state dict (e.g. vgg16-397923af.pth)")
    parser.add_argument("lin_path", help="official LPIPS lin layers (lpips/weights/v0.1/vgg.pth)")
    parser.add_argument("out_path", help="output .safetensors or .pth")
    args = parser.parse_args()
    print(convert_lpips_weights(args.vgg_path, args.lin_path, args.out_path))


if __name__ == "__main__":
    main()
