"""Typed configuration: dataclass schemas under OmegaConf, and `load_config`.

A run is described by one `Config`. Its sections that every stage shares (`data`, `train`) have
fixed schemas here; the sections that depend on the stage are typed by the `Schemas` the loader
is handed (`kvideo.registry.SCHEMAS`: each stage's recipe schema and the models' schemas; this
module imports neither):

    stage: movq              # a registered stage; decides the schema of `recipe`
    model:
      name: movq             # a registered model; decides the schema of the rest of `model`
      size: shapes           # optional named size: its values are the defaults of this section
      ch: 64                 # any field of the model's schema overrides the named size
    recipe:                  # the stage's training recipe: losses, conditioning dropout, ...
      gan_start: 50000

`load_config(files, overrides, schemas=...)` merges YAML files left to right, then `key=value`
overrides, over the schema (`kvideo.registry.load_config` hands it the registered schemas). An
unknown key, a value of the wrong type or one outside its field's range (`checked`) stops
start-up with a `ConfigError` that names the dotted key (and the valid keys next to it, or the
range). Defaults live in these schemas only: code reads `cfg.train.lr`, never
`cfg.get("lr", 1e-4)`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

# ----------------------------------------------------------------------------------------------
# Ranges
# ----------------------------------------------------------------------------------------------


def checked(default: Any = MISSING, rule: str = "", *, factory: Optional[Callable[[], Any]] = None):
    """A dataclass field whose value `load_config` checks against `rule`:
    ">= 1", "> 0", "[0, 1]", "[0, 1)" (any bracket pair), "one of a|b|c", or "each " and one of
    those for a list. None passes (an Optional field's "off")."""
    _rule_check(rule)  # a malformed rule fails at import, not at a user's start-up
    kwargs = {"default_factory": factory} if factory is not None else {"default": default}
    return field(metadata={"rule": rule}, **kwargs)


def _rule_check(rule: str) -> Callable[[Any], bool]:
    if rule.startswith("each "):
        one = _rule_check(rule[len("each "):])
        return lambda v: all(one(x) for x in v)
    if rule.startswith("one of "):
        choices = rule[len("one of "):].split("|")
        return lambda v: str(v) in choices
    if rule[:1] in "[(" and rule[-1:] in "])":
        lo, hi = (float(x) for x in rule[1:-1].split(","))
        lo_ok = (lambda v: v >= lo) if rule[0] == "[" else (lambda v: v > lo)
        hi_ok = (lambda v: v <= hi) if rule[-1] == "]" else (lambda v: v < hi)
        return lambda v: lo_ok(v) and hi_ok(v)
    op, _, bound = rule.partition(" ")
    b = float(bound)
    compare = {">=": lambda v: v >= b, ">": lambda v: v > b, "<=": lambda v: v <= b, "<": lambda v: v < b}
    if op not in compare:
        raise ValueError(f"unknown range rule {rule!r}")
    return compare[op]


def _describe(rule: str) -> str:
    if rule.startswith("each "):
        return f"a list whose every element is {_describe(rule[len('each '):])}"
    if rule.startswith("one of "):
        return "one of " + ", ".join(rule[len("one of "):].split("|"))
    return f"in {rule}" if rule[:1] in "[(" else rule


def check_ranges(node: Any, prefix: str = "") -> None:
    """Every `checked` field under a typed config node against its rule; a ConfigError names the
    first value out of range by its dotted key."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_ranges(item, f"{prefix}{i}.")
        return
    if not isinstance(node, DictConfig):
        return
    schema = OmegaConf.get_type(node)
    rules = {f.name: f.metadata["rule"] for f in dataclasses.fields(schema) if "rule" in f.metadata} \
        if dataclasses.is_dataclass(schema) else {}
    for key in node.keys():
        if OmegaConf.is_missing(node, key):
            continue
        value = node[key]
        if key in rules and value is not None:
            plain_value = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
            if not _rule_check(rules[key])(plain_value):
                raise ConfigError(f"config key '{prefix}{key}' = {plain_value!r}: must be {_describe(rules[key])}")
        check_ranges(value, f"{prefix}{key}.")


# ----------------------------------------------------------------------------------------------
# Shared sections
# ----------------------------------------------------------------------------------------------


@dataclass
class BucketConfig:
    """One shape of training batch (`data.buckets`): its frame size, clip length and batch size,
    drawn with probability proportional to `weight`."""

    size: List[int] = checked(rule="each >= 1", factory=lambda: [64, 64])  # (height, width)
    frames: int = checked(1, ">= 1")  # the bucket's data.num_frames
    batch_size: int = checked(1, ">= 1")  # per rank and per micro-batch
    weight: float = checked(1.0, "> 0")


@dataclass
class DataConfig:
    """Where training samples come from and what one sample looks like."""

    shards: str = MISSING  # a directory of .tar shards, a glob, or a comma-separated list of both
    val_shards: Optional[str] = None  # held-out shards for `train.eval_every`
    num_frames: int = checked(1, ">= 1")  # 1: single frames (image stages); > 1: clips of this many frames
    fps: float = checked(24.0, "> 0")  # clip frames are picked by timestamp at this rate
    # Training draws a clip's start uniformly where a window of this many seconds fits (None: the
    # clip's own span, (num_frames - 1) / fps). An image model that makes the first frames of a
    # video cascade sets the keyframe clip's span, so it learns frames a keyframe clip starts from.
    window_s: Optional[float] = checked(None, "> 0")
    size: List[int] = checked(rule="each >= 1", factory=lambda: [64, 64])  # (height, width) after resize+crop
    random_crop: bool = True  # random crop in training; centre crop when false (always in eval)
    num_workers: int = checked(2, ">= 0")  # DataLoader worker processes per rank
    # A batch not ready after this many seconds (a decoder that hangs) is skipped and the workers
    # restarted; needs num_workers > 0. 0 waits forever.
    timeout_s: float = checked(600.0, ">= 0")
    max_sample_mb: float = checked(2048.0, "> 0")  # a tar member larger than this is skipped, not read into memory
    shuffle: bool = True
    # Latent stages (t2i, keyframe, interpolation): a directory of precomputed MoVQ latents of
    # data.shards, built by the stage on start when missing (kvideo/data/latent_cache.py).
    latent_cache: Optional[str] = None
    # Resolution and duration buckets: each micro-batch is drawn from one bucket (every rank the
    # same, seeded by the run seed and the draw's number), in place of data.size, data.num_frames
    # and train.batch_size; empty: one shape (kvideo/data/buckets.py). A latent cache is kept per
    # frame size, under data.latent_cache/HxW.
    buckets: List[BucketConfig] = field(default_factory=list)
    # Reference images, read when the stage reads the field "references" (kvideo/data/references.py):
    # a directory of NAME.png looked up by the character names of a clip's metadata (e.g. a
    # ShapesWorld v2 split's references/); a sample's own KEY.ref.png is its first name's. None:
    # own references only.
    references: Optional[str] = None
    max_references: int = checked(2, ">= 1")  # reference slots per clip; absent ones are zeros, masked
    # (height, width) each reference is resized to cover and centre-cropped to; None: data.size
    reference_size: Optional[List[int]] = checked(None, "each >= 1")


@dataclass
class FSDPConfig:
    """FSDP2 settings of `train.parallel: fsdp | hsdp` (kvideo/train/parallel.py)."""

    # dtype the gathered parameters compute in, and of the gradient reduce-scatter; the sharded
    # master weights and the optimizer states stay fp32
    param_dtype: str = checked("fp32", "one of fp32|bf16")
    reduce_dtype: str = checked("fp32", "one of fp32|bf16")
    # frozen parts (the text tower, the video decoder's encoder): replicate (every rank holds them
    # whole, no collective in their forward) | shard (their memory split over the ranks)
    frozen: str = checked("replicate", "one of replicate|shard")
    reshard_after_forward: bool = True  # free each block's gathered weights after its forward (ZeRO-3)
    # hsdp: ranks per shard group (the model is sharded within a group, replicated across groups);
    # 0 = the ranks of one node (torchrun's LOCAL_WORLD_SIZE)
    shard_size: int = checked(0, ">= 0")


@dataclass
class TrainConfig:
    """The training engine's settings: one schema for every stage."""

    max_steps: int = checked(1000, ">= 0")
    # stop, with a checkpoint, once this many minutes were spent in training steps (counted across
    # resumes; 0: no limit): arms compared at equal minutes stop there instead of running on to
    # max_steps. The learning-rate schedule still runs to max_steps; minutes depend on the host.
    max_minutes: float = checked(0.0, ">= 0")
    batch_size: int = checked(8, ">= 1")  # per rank and per micro-batch
    grad_accum: int = checked(1, ">= 1")  # micro-batches per optimizer step
    lr: float = checked(1e-4, ">= 0")
    betas: List[float] = checked(rule="each [0, 1)", factory=lambda: [0.9, 0.999])
    weight_decay: float = checked(0.0, ">= 0")
    warmup_steps: int = checked(0, ">= 0")
    schedule: str = checked("constant", "one of constant|cosine|linear")  # decay after warmup to min_lr_ratio
    min_lr_ratio: float = checked(0.0, "[0, 1]")
    # AdamW's implementation: fused (one kernel over every tensor, CPU and CUDA; the ShapesWorld
    # t2i step is 1.18x faster than with torch's CPU default, the loop: docs/BENCHMARKS.md) |
    # foreach | loop
    optimizer_impl: str = checked("fused", "one of fused|foreach|loop")
    grad_clip: float = checked(1.0, ">= 0")  # max global grad norm per phase; 0 disables clipping
    ema_decay: float = checked(0.9999, "[0, 1]")
    ema_warmup: bool = True  # decay = min(ema_decay, (1 + n) / (10 + n)) for the n-th update
    precision: str = checked("fp32", "one of fp32|bf16")  # bf16: autocast, where the device supports it
    grad_checkpointing: bool = False
    # every 4-D weight (the 2-D convolutions) in channels_last, so the convolutions run on NHWC
    # activations (oneDNN's preferred layout on CPU; docs/benchmarks/time_to_quality.md)
    channels_last: bool = False
    # torch.compile each block (the FSDP units of kvideo/train/parallel.py) in place: checkpoint keys
    # unchanged (no `_orig_mod.`); the first steps pay the compilation
    compile: bool = False
    device: str = "auto"  # auto | cpu | cuda
    # ddp: every rank holds the whole model (one process: no wrapper) | fsdp: parameters,
    # gradients, optimizer states and EMA sharded over the ranks, checkpoints sharded | hsdp: sharded
    # within a group of ranks, replicated across groups
    parallel: str = checked("ddp", "one of ddp|fsdp|hsdp")
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    # seconds a collective waits for the other ranks before the run fails (rank-0-only work such as
    # previews and evaluation must fit in it)
    dist_timeout_s: float = checked(1800.0, "> 0")
    checkpoint_every: int = checked(1000, ">= 1")
    keep_checkpoints: int = checked(3, ">= 0")  # newest N kept; 0 keeps all
    log_every: int = checked(10, ">= 1")
    preview_every: int = checked(500, ">= 0")  # 0 disables previews
    eval_every: int = checked(0, ">= 0")  # 0 disables evaluation on data.val_shards
    eval_batches: int = checked(8, ">= 1")
    max_nonfinite_in_row: int = checked(20, ">= 1")  # consecutive non-finite losses that stop the run
    num_threads: int = checked(0, ">= 0")  # torch intra-op threads per process; 0 keeps torch's default


@dataclass
class Config:
    """A whole run. `model` and `recipe` are typed by the model and stage registries."""

    stage: str = MISSING
    run_dir: str = MISSING
    seed: int = 0
    resume: str = "auto"  # auto: newest intact checkpoint in run_dir if any | none | a checkpoint path
    # Resume refuses a checkpoint whose run read its data in another order (seed, batch size,
    # shards, shuffle, world size); true resumes anyway, with a warning naming the changes.
    resume_allow_changes: bool = False
    # A checkpoint of this stage whose weights (its EMA) start the run instead of the random
    # initialisation: fine-tuning another run or a converted release (tools/convert_release.py).
    # Weights only (a new optimizer, step 0); a resumed run ignores it. A discriminator the
    # checkpoint lacks (a release has none) starts fresh.
    init_weights: Optional[str] = None
    model: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recipe: Any = None  # the stage's training recipe: losses, conditioning dropout, frozen parts


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the valid choices."""


@dataclass(frozen=True)
class StageSchema:
    """A stage a config can name: the dataclass of its `recipe` section and its default model."""

    recipe: type
    default_model: str


@dataclass(frozen=True)
class Schemas:
    """What types the stage-dependent sections: stage name -> StageSchema, model name -> anything with
    `schema` (the dataclass of its hyper-parameters) and `sizes` (named sizes), e.g. registry.ModelEntry."""

    stages: Dict[str, StageSchema]
    models: Dict[str, Any]


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _model_section_schema(model_name: str, schema: type) -> type:
    """The `model` section's dataclass: `name`, `size`, then every field of the model's schema."""
    hints = typing.get_type_hints(schema)  # resolved types (schemas may use string annotations)
    fields = [("name", str, field(default=model_name)), ("size", Optional[str], field(default=None))]
    for f in dataclasses.fields(schema):
        fields.append((f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory)))
    return dataclasses.make_dataclass(f"{schema.__name__}Section", fields)


def _valid_keys(schema: DictConfig, dotted: str) -> List[str]:
    parent = schema
    for part in dotted.split(".")[:-1]:
        if not isinstance(parent, DictConfig) or part not in parent:
            break
        parent = parent[part]
    return sorted(parent.keys()) if isinstance(parent, DictConfig) else []


def _merge(schema: DictConfig, other: DictConfig, source: str) -> DictConfig:
    """Merge `other` over `schema`, turning OmegaConf's errors into ones that name the key."""
    try:
        return OmegaConf.merge(schema, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        valid = ", ".join(_valid_keys(schema, key))
        raise ConfigError(f"{source}: unknown config key '{key}'. Valid keys here: {valid}") from None
    except ValidationError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(f"{source}: wrong type for config key '{key}': {e.msg}") from None


def _schema_for(raw: DictConfig, schemas: Schemas) -> DictConfig:
    """Build the typed schema for a raw config by reading its `stage` and `model.name`."""
    stage = raw.get("stage")
    if stage is None or OmegaConf.is_missing(raw, "stage"):
        raise ConfigError(f"config key 'stage' is required. Valid stages: {', '.join(schemas.stages)}")
    if stage not in schemas.stages:
        raise ConfigError(f"config key 'stage': unknown stage '{stage}'. Valid stages: {', '.join(schemas.stages)}")
    stage_schema = schemas.stages[stage]

    model_raw = raw.get("model") or {}
    model_name = model_raw.get("name", stage_schema.default_model)
    if model_name not in schemas.models:
        raise ConfigError(f"config key 'model.name': unknown model '{model_name}'. Valid models: {', '.join(schemas.models)}")
    entry = schemas.models[model_name]
    section = _model_section_schema(model_name, entry.schema)
    size = model_raw.get("size")
    if size is not None:
        if size not in entry.sizes:
            raise ConfigError(f"config key 'model.size': unknown size '{size}' for model '{model_name}'. "
                              f"Valid sizes: {', '.join(entry.sizes)}")
        model_node = OmegaConf.structured(section(name=model_name, size=size, **dataclasses.asdict(entry.sizes[size])))
    else:
        model_node = OmegaConf.structured(section(name=model_name))

    schema = OmegaConf.structured(Config)
    schema.model = model_node
    schema.recipe = OmegaConf.structured(stage_schema.recipe)
    return schema


def load_config(files: Sequence[str | Path] = (), overrides: Sequence[str] = (), *, schemas: Schemas,
                base: Optional[dict] = None, require_complete: bool = True) -> DictConfig:
    """Load a run config: YAML `files` merged left to right, then `key=value` `overrides`, typed by
    `schemas` (`kvideo.registry.load_config` passes the registered ones).

    `base` (a plain dict, e.g. the config stored in a checkpoint) is merged first when given.
    `require_complete=False` allows missing values (for tools that only build the model).
    Returns a typed, read-only DictConfig with every value resolved; missing required values
    (`stage`, `run_dir`, `data.shards`) raise a ConfigError that names them.
    """
    raws = []
    if base is not None:
        raws.append(("checkpoint config", OmegaConf.create(base)))
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raws.append((str(path), OmegaConf.load(path)))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
        except Exception as e:  # yaml.YAMLError and friends
            raise ConfigError(f"{path}: cannot parse YAML: {e}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
    if overrides:
        raws.append(("command line", OmegaConf.from_dotlist(list(overrides))))

    untyped = OmegaConf.merge(*[r for _, r in raws]) if raws else OmegaConf.create({})
    cfg = _schema_for(untyped, schemas)
    for source, raw in raws:
        cfg = _merge(cfg, raw, source)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing and require_complete:
        raise ConfigError(f"required config keys have no value: {', '.join(missing)}")
    if not missing:
        OmegaConf.resolve(cfg)
    check_ranges(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_plain(cfg: DictConfig) -> dict:
    """The config as plain Python data (dicts, lists, numbers, strings) for checkpoints."""
    return OmegaConf.to_container(cfg, resolve=True)


def to_yaml(cfg: DictConfig | dict) -> str:
    return OmegaConf.to_yaml(cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg))


def plain(value: Any) -> Any:
    """A config node as plain Python data; anything else unchanged."""
    if isinstance(value, (DictConfig,)) or OmegaConf.is_list(value):
        return OmegaConf.to_container(value, resolve=True)
    return value
