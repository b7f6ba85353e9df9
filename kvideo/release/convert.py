"""The released Kandinsky Video 1.1 files -> kvideo stage checkpoints and a pipeline config.

    release/                                  out/
      t2v.pt            {'unet', 'null_embedding'}  -> t2i/  (the first-frame model: image mode)
                                                    -> keyframe/
      interpolation.pt  {'unet', 'null_embedding'}  -> interpolation/
      movq.pt                                       -> movq/
      video_movq.pt                                 -> video_decoder/
      t5_projections.pt {'projection_base', ...}    -> the text projection of every diffusion stage
    + a local Flan-UL2 (T5) directory               -> recipe.text_encoder.weights (read, not copied)
                                                    -> pipeline.yaml

Each stage's config is its full-size kvideo config (`configs/<stage>/kandinsky.yaml`, or the files
given) with the release's model options (`RELEASE_MODEL_OPTIONS`: where kvideo's defaults compute
something else, docs/RELEASE.md) and the release's sampling settings (`RELEASE_SAMPLING`), so a
release-layout checkpoint of another width or depth converts too, given configs of that size.

A checkpoint directory holds model.safetensors (the release's weights under kvideo's names, in
the release's dtype), an empty ema.safetensors (the release has one set of weights: the EMA is
the model), config.yaml and manifest.json; the frozen T5 tower is left out (kvideo reads it from
recipe.text_encoder.weights). `coverage` builds the full-size models on the meta device and
checks every release key against them, with the key names and shapes of `inventory.json.gz` or
of the files themselves.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig

from kvideo.release.keys import Conversion, convert
from kvideo.release.maps import (
    NO_CODEBOOK, T5_PROJECTION, first_frame_to_kvideo, interpolation_to_kvideo, k3_unet_to_kvideo, movq_to_kvideo,
    t2v_to_kvideo, video_movq_to_kvideo,
)

Tensors = Dict[str, torch.Tensor]
INVENTORY = Path(__file__).with_name("inventory.json.gz")

# ----------------------------------------------------------------------------------------------
# What the release is, in kvideo's terms
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReleaseFile:
    """One released file: its name, the entry holding the state dict (None: the file is one) and
    the key of the null embedding beside it."""

    name: str
    entry: Optional[str] = None
    null_embedding: Optional[str] = None


RELEASE_FILES: Dict[str, ReleaseFile] = {  # inventory model name -> file
    "t2v": ReleaseFile("t2v.pt", "unet", "null_embedding"),
    "interpolation": ReleaseFile("interpolation.pt", "unet", "null_embedding"),
    "movq": ReleaseFile("movq.pt"),
    "video_movq": ReleaseFile("video_movq.pt"),
    "t5_projection": ReleaseFile("t5_projections.pt", "projection_base"),
}


@dataclass(frozen=True)
class StageSource:
    """Where a kvideo stage's network comes from: the release model and the conversion."""

    release: str  # a key of RELEASE_FILES (or "kandinsky3", coverage only)
    convert: Callable[[Mapping[str, torch.Tensor], torch.nn.Module], Conversion]


STAGE_SOURCES: Dict[str, StageSource] = {
    "t2i": StageSource("t2v", first_frame_to_kvideo),
    "keyframe": StageSource("t2v", t2v_to_kvideo),
    "interpolation": StageSource("interpolation", interpolation_to_kvideo),
    "movq": StageSource("movq", movq_to_kvideo),
    "video_decoder": StageSource("video_movq", video_movq_to_kvideo),
}
DIFFUSION = ("t2i", "keyframe", "interpolation")

# model.* keys under which kvideo computes what the release computes (docs/RELEASE.md lists each)
RELEASE_MODEL_OPTIONS: Dict[str, Dict[str, object]] = {
    "t2i": {"pool_query": "all"},
    "keyframe": {"pool_query": "all", "temporal_norm": "frame", "up_temporal_attention_first": True},
    "interpolation": {"pool_query": "all", "temporal_norm": "frame", "temporal_conv_before_down": True,
                      "skip_embedding": "table", "attention_gates": 2},
    "movq": {},
    "video_decoder": {"temporal_mid_blocks": True},
}
RELEASE_T5_WIDTH = 4096  # Flan-UL2's d_model (the projection's input width; coverage only)
RELEASE_TEXT_ENCODER = {"kind": "t5", "context_length": 128, "projection_bias": False, "frozen": True, "truncate": True,
                        "trim_context": True}
# The release's sampling (kandinsky_video/t2v_pipeline.py, model/diffusion.py): diffusers'
# DDPMScheduler, squaredcos_cap_v2 with zero terminal SNR, thresholding whose max value 1 makes it
# clipping of x0 to [-1, 1]; guidance in the Kandinsky convention (w + 1) cond - w uncond.
_CLIP_X0 = {"dynamic_threshold": 0.995, "threshold_max": 1.0}
RELEASE_SAMPLING: Dict[str, Dict[str, object]] = {
    "t2i": {"sampler": "ddpm", "steps": 50, "spacing": "leading", "guidance": 5.0, **_CLIP_X0},
    "keyframe": {"sampler": "ddpm", "steps": 50, "spacing": "leading", "text_guidance": 5.0, "image_guidance": 2.0,
                 "keep_first_frame": False, **_CLIP_X0},
    "interpolation": {"sampler": "ddpm", "steps": 10, "spacing": "trailing", "guidance": 0.5, **_CLIP_X0},
}
RELEASE_RECIPE: Dict[str, Dict[str, object]] = {
    "t2i": {"diffusion.target": "eps", "latent_scale": 1.0},
    "keyframe": {"diffusion.target": "eps", "latent_scale": 1.0, "noise_aug.sample_level": 20,
                 "noise_aug.sample_noise": "uniform", "motion.default": "medium"},
    "interpolation": {"diffusion.target": "v", "latent_scale": 1.0},
}
RELEASE_PIPELINE = {"first_frame_scale": 2, "fps_preset": "medium", "decode_window": 5, "decode_overlap": 0}


def release_overrides(stage: str, out: Path, text_weights: Optional[str]) -> List[str]:
    """The dotlist that makes a full-size kvideo config of `stage` the release's: model options,
    the T5 text tower at `text_weights`, the converted MoVQ under `out`, the sampling settings."""
    items = [f"model.{k}={_value(v)}" for k, v in RELEASE_MODEL_OPTIONS[stage].items()]
    items.append(f"run_dir={out / stage}")
    if stage in DIFFUSION:
        items += [f"recipe.text_encoder.{k}={_value(v)}" for k, v in RELEASE_TEXT_ENCODER.items()]
        items += [f"recipe.text_encoder.weights={text_weights}" if text_weights else "recipe.text_encoder.weights=null",
                  f"recipe.movq={out / 'movq'}"] + (["recipe.init_from=null"] if stage != "t2i" else [])
        items += [f"recipe.{k}={_value(v)}" for k, v in RELEASE_RECIPE[stage].items()]
        items += [f"recipe.sampling.{k}={_value(v)}" for k, v in RELEASE_SAMPLING[stage].items()]
    if stage == "video_decoder":
        items.append(f"recipe.movq={out / 'movq'}")
    return items


def _value(v: object) -> str:
    """A dotlist value: YAML's true / false for booleans."""
    return str(v).lower() if isinstance(v, bool) else str(v)


def stage_config(stage: str, files: Sequence[Path], out: Path, text_weights: Optional[str],
                 overrides: Sequence[str] = ()) -> DictConfig:
    """The typed kvideo config of `stage`: `files`, then the release's settings, then `overrides`."""
    from kvideo.registry import load_config

    return load_config(files, release_overrides(stage, out, text_weights) + list(overrides))


# ----------------------------------------------------------------------------------------------
# Reading the release
# ----------------------------------------------------------------------------------------------


def read_release_file(path: Path, trust_pickle: bool = False, mmap: bool = True) -> dict:
    """torch.load of a released file with `weights_only=True` (plain tensors and dicts: all five
    files are), memory-mapped. A file that needs arbitrary unpickling is refused unless
    `trust_pickle` (then only a file from a source you trust)."""
    if not path.is_file():
        raise FileNotFoundError(f"release file '{path}' not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises several kinds for a file it will not read safely
        if trust_pickle:
            raise
        raise ValueError(f"'{path}' cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e}); "
                         "if you trust its source, pass --trust-pickle") from e


def release_state(loaded: dict, file: ReleaseFile, path: Path) -> Tensors:
    """The state dict of one released file (its `entry`, or the file itself)."""
    state = loaded if file.entry is None else loaded.get(file.entry)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"'{path}': expected a state dict{f' under {file.entry!r}' if file.entry else ''}; "
                         f"the file holds {sorted(loaded) if isinstance(loaded, Mapping) else type(loaded).__name__}")
    return dict(state)


def read_inventory(path: Path = INVENTORY) -> Dict[str, Dict[str, List[int]]]:
    """The release's key names and shapes per model (no weights): `inventory.json.gz`."""
    with gzip.open(path, "rt") as f:
        return json.load(f)["models"]


def meta_state(shapes: Mapping[str, Sequence[int]]) -> Tensors:
    """Tensors of the given shapes on the meta device (names and shapes, no memory)."""
    return {k: torch.empty(tuple(s), device="meta") for k, s in shapes.items()}


# ----------------------------------------------------------------------------------------------
# Converting one stage
# ----------------------------------------------------------------------------------------------


def build_network(cfg: DictConfig, device: str = "cpu") -> torch.nn.Module:
    """The stage's network (UNet or autoencoder) of `cfg`, randomly initialised on `device`."""
    from kvideo.registry import build_model

    with torch.device(device):
        return build_model(cfg)


def convert_stage(stage: str, state: Mapping[str, torch.Tensor], network: torch.nn.Module,
                  require: bool = True) -> Conversion:
    """The release's `state` -> `network`'s weights; with `require`, every release key must be
    mapped or consumed and every network key filled, or KeyError names the rest (without it the
    Conversion reports them: the coverage table). The autoencoders' codebook, which the release
    lacks (its decoder never quantises), is the network's own initialisation."""
    conversion = STAGE_SOURCES[stage].convert(state, network)
    own = network.state_dict()
    for key in [k for k in conversion.unfilled if k.startswith(NO_CODEBOOK)]:
        conversion.derive(key, own[key], "kvideo's initialisation (the release has no codebook; decode never reads it)")
    if require:
        conversion.require()
    return conversion


def text_state(projection: Mapping[str, torch.Tensor], null_embedding: Optional[torch.Tensor],
               out_dim: int) -> Tensors:
    """The text encoder's trainable part under a stage checkpoint's names (`text.*`): the
    release's projection and the stage's null embedding (1, out_dim)."""
    state = {"text." + T5_PROJECTION.to_kvideo(k): v for k, v in projection.items()}
    if null_embedding is not None:
        state["text.null_embedding"] = null_embedding.reshape(1, out_dim)
    return state


def write_checkpoint(out_dir: Path, cfg: DictConfig, state: Mapping[str, torch.Tensor]) -> Path:
    """A checkpoint directory kvideo reads (`kvideo.inference.checkpoints`): the weights, an
    empty EMA (so the EMA is the model), the config and the manifest."""
    from kvideo.config import to_plain, to_yaml
    from kvideo.train.checkpoint import save_weights, write_manifest

    if (out_dir / "model.safetensors").exists():
        raise FileExistsError(f"'{out_dir}' already holds a checkpoint; choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = to_plain(cfg)
    save_weights(out_dir / "model.safetensors", dict(state), plain, "model")
    save_weights(out_dir / "ema.safetensors", {}, plain, "ema")
    (out_dir / "config.yaml").write_text(to_yaml(cfg))
    write_manifest(out_dir)
    return out_dir


def pipeline_config(out: Path, device: str) -> dict:
    """The pipeline config of the converted cascade, with the release's sampling settings."""
    return {"t2i": str(out / "t2i"), "keyframe": str(out / "keyframe"), "interpolation": str(out / "interpolation"),
            "video_decoder": str(out / "video_decoder"), "which": "ema", "device": device,
            "first_frame_model": "t2i", **RELEASE_PIPELINE,
            "sampling": {stage: dict(settings) for stage, settings in RELEASE_SAMPLING.items()}}


@dataclass
class Release:
    """The released files of one directory, read lazily (memory-mapped) and once each."""

    root: Path
    trust_pickle: bool = False

    def __post_init__(self) -> None:
        self._loaded: Dict[str, dict] = {}

    def _file(self, model: str) -> dict:
        if model not in self._loaded:
            self._loaded[model] = read_release_file(self.root / RELEASE_FILES[model].name, self.trust_pickle)
        return self._loaded[model]

    def state(self, model: str) -> Tensors:
        return release_state(self._file(model), RELEASE_FILES[model], self.root / RELEASE_FILES[model].name)

    def null_embedding(self, model: str) -> Optional[torch.Tensor]:
        key = RELEASE_FILES[model].null_embedding
        return None if key is None else self._file(model).get(key)


def convert_release(release: Release, out: Path, configs: Mapping[str, Sequence[Path]],
                    text_weights: Optional[str], overrides: Optional[Mapping[str, Sequence[str]]] = None,
                    log: Callable[[str], None] = print) -> Dict[str, Conversion]:
    """Write one kvideo checkpoint per stage of `configs` (stage -> config files) under `out`, and
    `out/pipeline.yaml` when every stage of the cascade is there. Returns each stage's Conversion."""
    from kvideo.config import to_yaml

    conversions, overrides = {}, overrides or {}
    projection = release.state("t5_projection") if any(s in DIFFUSION for s in configs) else {}
    for stage in [s for s in STAGE_SOURCES if s in configs]:  # the autoencoders' paths are in later configs
        cfg = stage_config(stage, configs[stage], out, text_weights, overrides.get(stage, ()))
        network = build_network(cfg, "meta" if stage in DIFFUSION else "cpu")
        model = STAGE_SOURCES[stage].release
        conversion = convert_stage(stage, release.state(model), network)
        if stage in DIFFUSION:
            state = {"unet." + k: v for k, v in conversion.state_dict.items()}
            state.update(text_state(projection, release.null_embedding(model), cfg.recipe.text_encoder.out_dim))
        else:
            state = {"ae." + k: v for k, v in conversion.state_dict.items()}
        write_checkpoint(out / stage, cfg, state)
        log(conversion.report())
        conversions[stage] = conversion
    if all(stage in configs for stage in STAGE_SOURCES):
        (out / "pipeline.yaml").write_text(PIPELINE_HEADER + to_yaml(pipeline_config(out, "cuda")))
    return conversions


PIPELINE_HEADER = """\
# Kandinsky Video 1.1, converted by tools/convert_release.py: the release's cascade and its
# sampling settings (docs/RELEASE.md). The first frame comes from the t2v UNet's image mode (the
# t2i checkpoint) at twice the video size; decode windows of 5 frames without overlap stand for
# the release's chunks of about 4-5 frames.
"""


# ----------------------------------------------------------------------------------------------
# Coverage
# ----------------------------------------------------------------------------------------------


@dataclass
class CoverageRow:
    """One kvideo network against one release model: counts of keys and what became of them."""

    stage: str
    release: str
    release_keys: int
    renamed: int  # release keys renamed onto a kvideo key
    consumed: int  # release keys read by a transformation (a fold, a fusion, another stage's)
    unmapped: List[str]
    kvideo_keys: int
    copied: int  # kvideo keys holding a release tensor as it is (or reshaped by singleton dims)
    derived: int  # kvideo keys computed (the fold, qkv, constants, the codebook)
    unfilled: List[str]
    reshaped: int

    @property
    def complete(self) -> bool:
        return not self.unmapped and not self.unfilled


def coverage_row(stage: str, release: str, conversion: Conversion, state_keys: int, target_keys: int) -> CoverageRow:
    derived = len(conversion.derived)
    copied = len(conversion.state_dict) - derived
    renamed = state_keys - len(conversion.unmapped) - len(conversion.consumed)
    return CoverageRow(stage, release, state_keys, renamed, len(conversion.consumed), list(conversion.unmapped),
                       target_keys, copied, derived, list(conversion.unfilled), len(conversion.reshaped))


def coverage(configs: Mapping[str, Sequence[Path]], release: Optional[Mapping[str, Tensors]] = None,
             overrides: Optional[Mapping[str, Sequence[str]]] = None) -> List[CoverageRow]:
    """Every stage's network of `configs` (stage -> config files) built on the meta device against
    the release's keys: `release` (model -> state dict, e.g. meta tensors of the files) or the
    inventory. Shapes that cannot be fitted raise ValueError naming them."""
    release = release or {k: meta_state(v) for k, v in read_inventory().items()}
    overrides = overrides or {}
    rows = []
    for stage, files in configs.items():
        cfg = stage_config(stage, files, Path("release"), None, overrides.get(stage, ()))
        network = build_network(cfg, "meta")
        source = STAGE_SOURCES[stage]
        state = release[source.release]
        conversion = convert_stage(stage, state, network, require=False)
        rows.append(coverage_row(stage, RELEASE_FILES[source.release].name, conversion, len(state),
                                 len(network.state_dict())))
        if stage == "t2i" and "kandinsky3" in release:  # the same network from Kandinsky 3's own UNet
            k3 = k3_unet_to_kvideo(release["kandinsky3"], network)
            rows.append(coverage_row("t2i", "Kandinsky 3 unet", k3, len(release["kandinsky3"]),
                                     len(network.state_dict())))
        if stage in DIFFUSION and "t5_projection" in release:
            projection = release["t5_projection"]
            text = _projection_target(cfg)
            rows.append(coverage_row(f"{stage} text", RELEASE_FILES["t5_projection"].name + ":projection_base",
                                     convert(projection, T5_PROJECTION, text), len(projection), len(text)))
    return rows


def _projection_target(cfg: DictConfig) -> Tensors:
    """The shapes of a T5 text encoder's projection of `cfg` (no tower needed), on the meta device."""
    t = cfg.recipe.text_encoder
    with torch.device("meta"):
        layers = {"proj": torch.nn.Linear(RELEASE_T5_WIDTH, t.out_dim, bias=t.projection_bias),
                  "norm": torch.nn.LayerNorm(t.out_dim)}
    return {f"{name}.{k}": v for name, layer in layers.items() for k, v in layer.state_dict().items()}



def coverage_table(rows: Sequence[CoverageRow]) -> str:
    """The coverage rows as a Markdown table, then the keys left over (if any)."""
    head = ("| kvideo network | release | release keys | renamed | consumed | unmapped | kvideo keys | copied | "
            "derived | unfilled | reshaped |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r.stage} | {r.release} | {r.release_keys} | {r.renamed} | {r.consumed} | {len(r.unmapped)} | "
                     f"{r.kvideo_keys} | {r.copied} | {r.derived} | {len(r.unfilled)} | {r.reshaped} |")
    for r in rows:
        for label, keys in (("unmapped", r.unmapped), ("unfilled", r.unfilled)):
            if keys:
                lines.append(f"\n{r.stage} {label}: {', '.join(keys[:12])}{' ...' if len(keys) > 12 else ''}")
    return "\n".join(lines)
