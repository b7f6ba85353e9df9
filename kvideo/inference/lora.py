"""LoRA adapters on a denoiser's UNet, built with peft: add, save apart, load, merge.

    add_lora(unet, LoraSpec(rank=8, alpha=8, targets=["to_query", "to_key", "to_value", "to_out"]))
    save_lora(unet, spec, "lora.safetensors")     # the adapter weights only, the spec in the metadata
    load_lora(unet, "lora.safetensors")           # a base model + an adapter (the pipeline's keyframe_lora)
    merge_lora(unet)                              # W + (alpha / rank) B A, the adapters removed

`add_lora` injects peft's LoRA layers in place (`peft.inject_adapter_in_model`): each targeted
Linear / Conv becomes a layer holding the frozen `base_layer` and `lora_A` / `lora_B`, with B at
zero so the model is unchanged at init. Targets are module-name suffixes (peft's
`target_modules`). peft is an optional extra: pip install 'kvideo[lora]'.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

DEFAULT_TARGETS = ["to_query", "to_key", "to_value", "to_out"]  # every attention projection


@dataclass
class LoraSpec:
    rank: int = 8
    alpha: float = 8.0
    targets: List[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dropout: float = 0.0

    @classmethod
    def from_config(cls, lora_cfg) -> "LoraSpec":
        """The spec of a recipe's `lora` section (kvideo.recipes.LoraTraining)."""
        return cls(int(lora_cfg.rank), float(lora_cfg.alpha), list(lora_cfg.targets), float(lora_cfg.dropout))

    def __post_init__(self):
        if self.rank < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1 or not self.targets:
            raise ValueError(f"LoRA: need rank >= 1, alpha > 0, dropout in [0, 1) and at least one target; got {self}")
        self.targets = [str(t) for t in self.targets]


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA needs peft: pip install 'kvideo[lora]'") from e
    return peft


def add_lora(module: nn.Module, spec: LoraSpec) -> nn.Module:
    """Inject LoRA layers into `module` in place; only they require gradients afterwards."""
    peft = _peft()
    names = [n for n, _ in module.named_modules()]
    missing = [t for t in spec.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"LoRA target '{missing[0]}' names no module of {type(module).__name__} "
                         "(targets are module-name suffixes, e.g. to_query, to_out)")
    config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                             target_modules=list(spec.targets))
    peft.inject_adapter_in_model(config, module)
    for name, p in module.named_parameters():
        p.requires_grad_("lora_" in name)
    return module


def lora_state_dict(module: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter weights of `module` (peft's names, without the adapter name)."""
    state = _peft().get_peft_model_state_dict(module)
    if not state:
        raise ValueError(f"{type(module).__name__} holds no LoRA adapter")
    return state


def save_lora(module: nn.Module, spec: LoraSpec, path, base: str = "") -> Path:
    """The adapter weights as safetensors, with the spec (and the `base` checkpoint it was trained
    on) in the metadata (`kvideo_lora`, `kvideo_lora_base`)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(module).items()}
    save_file(state, str(path), metadata={"kvideo_lora": json.dumps(asdict(spec)), "kvideo_lora_base": base})
    return path


def read_lora(path) -> tuple:
    """(LoraSpec, adapter weights) of a file `save_lora` wrote; errors name the file."""
    from safetensors.torch import load_file

    from kvideo.weights import safetensors_metadata

    meta = safetensors_metadata(path, "LoRA file")
    if "kvideo_lora" not in meta:
        raise ValueError(f"'{path}' has no kvideo_lora metadata: not a LoRA file written by kvideo (save_lora)")
    return LoraSpec(**json.loads(meta["kvideo_lora"])), load_file(str(path))


def load_lora(module: nn.Module, path) -> LoraSpec:
    """Add the adapter of `path` to a base `module` and load its weights; every weight must fit."""
    spec, state = read_lora(path)
    add_lora(module, spec)
    result = _peft().set_peft_model_state_dict(module, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"LoRA file '{path}': weight '{unexpected[0]}' fits no layer of the model")
    return spec


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W + scale B A) and put the plain layers back, so
    the module's state dict has the base model's keys again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuned = [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    if not tuned:
        raise ValueError(f"{type(module).__name__} holds no LoRA adapter to merge")
    for name, layer in tuned:
        layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, layer.get_base_layer())
    return module


def base_key(key: str) -> str:
    """A LoRA-injected model's key of a base weight -> the plain model's key."""
    return key.replace(".base_layer.", ".")
