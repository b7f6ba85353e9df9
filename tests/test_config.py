"""Typed configs: every config builds, typos and wrong types are rejected by name."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvideo.config import ConfigError, to_plain
from kvideo.registry import load_config, model_config
from kvideo.models.movq import MovqConfig
from kvideo.registry import model_info

ROOT = Path(__file__).resolve().parents[1]
# Training configs only: prepare (test_prepare.py), pipeline, ablations (test_pipeline.py), demo
# and experiment budgets (test_demo.py) are other kinds of file, each loaded by its own tests.
NOT_TRAINING = ("prepare", "pipeline", "ablations", "demo", "experiments")
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name not in NOT_TRAINING)


def test_there_are_configs():
    assert any(p.parent.name == "movq" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_every_config_builds(path):
    """Every config loads, and its model builds (on the meta device: no memory, no time)."""
    cfg = load_config([path], require_complete=False)
    info = model_info(cfg)
    assert info["total_params"] > 0 and info["total_params"] == sum(info["modules"].values())


def test_model_info_tool_on_the_released_movq():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "model_info.py"),
                          str(ROOT / "configs" / "movq" / "kandinsky.yaml"), "--json"],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    assert abs(info["total_params"] / 270.6e6 - 1) < 0.02
    assert abs(info["modules"]["encoder"] / 109.5e6 - 1) < 0.02
    assert abs(info["modules"]["decoder"] / 161.1e6 - 1) < 0.02
    assert info["trainable_params"] == info["total_params"]


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "stage: movq\nrun_dir: r\ndata: {shards: s}\nmodel: {name: movq, size: shapes}\n"


def test_typo_in_section_is_named_with_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config([_write(tmp_path, BASE + "train: {max_step: 3}\n")])
    msg = str(e.value)
    assert "train.max_step" in msg and "max_steps" in msg and "batch_size" in msg


def test_typo_in_model_and_override(tmp_path):
    with pytest.raises(ConfigError, match="model.chh"):
        load_config([_write(tmp_path, BASE)], ["model.chh=3"])
    with pytest.raises(ConfigError, match="recipe.gan_strat"):
        load_config([_write(tmp_path, BASE)], ["recipe.gan_strat=3"])


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size"):
        load_config([_write(tmp_path, BASE)], ["train.batch_size=many"])


def test_unknown_stage_model_and_size(tmp_path):
    with pytest.raises(ConfigError, match="unknown stage 'movqq'"):
        load_config([_write(tmp_path, BASE.replace("stage: movq", "stage: movqq"))])
    with pytest.raises(ConfigError, match="model.name"):
        load_config([_write(tmp_path, BASE)], ["model.name=nope"])
    with pytest.raises(ConfigError, match="unknown size 'huge'"):
        load_config([_write(tmp_path, BASE)], ["model.size=huge"])


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="data.shards"):
        load_config([_write(tmp_path, "stage: movq\nrun_dir: r\n")])


def test_named_size_then_overrides_win(tmp_path):
    cfg = load_config([_write(tmp_path, BASE)], ["model.ch=48", "train.lr=0.003"])
    assert cfg.model.ch == 48 and cfg.train.lr == 0.003
    mc = model_config(cfg)
    assert isinstance(mc, MovqConfig) and mc.ch == 48
    plain = to_plain(cfg)
    assert plain["model"]["size"] == "shapes" and isinstance(plain["model"]["ch_mult"], list)
    # a stored config reloads to the same config
    again = load_config(base=plain)
    assert to_plain(again) == plain


def test_later_files_override_earlier(tmp_path):
    a = _write(tmp_path, BASE + "train: {max_steps: 5, lr: 0.1}\n")
    b = tmp_path / "b.yaml"
    b.write_text("train: {max_steps: 7}\n")
    cfg = load_config([a, b])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 0.1
