"""The Hydra config tree (``configs/``): every preset composes against the structured schema and its objects can
be built; a bad override fails while composing, with a message naming the key, before any process starts."""

from __future__ import annotations

import re

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from lightning_pipe import PipelineError, PipelineStrategy
from lightning_pipe.conf import validate_config
from lightning_pipe.schedules import SCHEDULES
from lightning_pipe.train import CONFIG_DIR, build_data, build_model, build_strategy, build_trainer

CONFIGS = Path(CONFIG_DIR)
GROUPS = ("model", "data", "trainer", "strategy", "experiment")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _compose(overrides: list[str], tmp_path: Path, hydra: bool = False):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=[*overrides, f"trainer.default_root_dir={tmp_path}"],
                       return_hydra_config=hydra)


def _strategy_supported(cfg) -> bool:
    schedule_ok = cfg.strategy.schedule in SCHEDULES
    virtual_ok = cfg.strategy.virtual_stages is None or \
        "virtual_stages" in inspect.signature(PipelineStrategy.__init__).parameters
    return schedule_ok and virtual_ok


def _build_all(cfg) -> None:
    """Instantiate the data, model (on the meta device: the GPU presets hold a large model), strategy and
    trainer of ``cfg``. A strategy feature this version lacks must fail with a clear message."""
    validate_config(cfg)
    data = build_data(cfg)
    with torch.device("meta"):
        model = build_model(cfg, data)
    assert model.config.vocab_size == data.vocab_size
    assert data.block_size == cfg.model.block_size
    if not _strategy_supported(cfg):
        with pytest.raises((PipelineError, InstantiationException), match="schedule|virtual_stages"):
            build_strategy(cfg)
        return
    strategy = build_strategy(cfg)
    assert isinstance(strategy, PipelineStrategy)
    assert getattr(strategy, "schedule_name", cfg.strategy.schedule) == cfg.strategy.schedule
    # Build the Trainer as on this machine (CPU): GPU presets keep their devices, nodes and precision.
    trainer = build_trainer(cfg, strategy, accelerator="cpu", logger=False, enable_checkpointing=False)
    assert trainer.strategy is strategy
    assert trainer.max_steps == cfg.trainer.max_steps


def test_the_tree_has_every_group_and_the_presets() -> None:
    for group in GROUPS:
        assert _options(group), group
    assert {"default", "smoke", "sweep_microbatches", "sweep_schedules", "gpu_1node_8gpu",
            "slurm_multinode"} <= set(_options("experiment"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_preset_composes_and_builds(group: str, option: str, tmp_path: Path) -> None:
    cfg = _compose([f"{group}={option}"], tmp_path)
    assert OmegaConf.select(cfg, "model.n_layer") is not None
    _build_all(cfg)


@pytest.mark.parametrize("experiment", [e for e in _options("experiment") if e.startswith("sweep")])
def test_sweep_presets_compose_for_every_value(experiment: str, tmp_path: Path) -> None:
    cfg = _compose([f"experiment={experiment}"], tmp_path, hydra=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    params = cfg.hydra.sweeper.params
    assert params, "the preset names the values it sweeps"
    for key, values in params.items():
        for value in str(values).split(","):
            job = _compose([f"experiment={experiment}", f"{key}={value}"], tmp_path)
            assert str(OmegaConf.select(job, key)) == value
            _build_all(job)


def test_gpu_presets_describe_pipeline_times_data_parallel(tmp_path: Path) -> None:
    one = _compose(["experiment=gpu_1node_8gpu"], tmp_path)
    assert (one.trainer.devices, one.trainer.num_nodes, one.trainer.precision) == (8, 1, "bf16-mixed")
    assert one.strategy.pipeline_parallel_size * one.strategy.data_parallel_size == 8
    assert one.strategy.process_group_backend == "nccl"
    multi = _compose(["experiment=slurm_multinode"], tmp_path)
    world = multi.trainer.devices * multi.trainer.num_nodes
    assert multi.strategy.pipeline_parallel_size * multi.strategy.data_parallel_size == world
    assert multi.trainer.num_nodes > 1 and multi.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("override,error,words", [
    ("strategy.num_microbatch=4", ConfigCompositionException, "strategy.num_microbatch"),
    ("trainer.devics=4", ConfigCompositionException, "trainer.devics"),
    ("strategy=nonsense", MissingConfigException, "Available options"),
    ("experiment=nonsense", MissingConfigException, "sweep_microbatches"),
])
def test_bad_override_fails_while_composing(override: str, error: type, words: str, tmp_path: Path) -> None:
    with pytest.raises(error) as info:
        _compose([override], tmp_path)
    assert words in str(info.value)


@pytest.mark.parametrize("override,words", [
    ("model.n_layer=four", "could not be converted to Integer"),
    ("trainer.max_steps=1.5", "could not be converted to Integer"),
    ("checkpoint.enabled=maybe", "not a valid bool"),
])
def test_wrong_type_fails_with_the_full_key(override: str, words: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        _compose([override], tmp_path)
    cause = str(info.value.__cause__)
    assert words in cause and f"full_key: {override.split('=')[0]}" in cause


def test_added_key_is_caught_by_the_schema_check(tmp_path: Path) -> None:
    cfg = _compose(["+strategy.num_microbatch=4"], tmp_path)  # `+` skips Hydra's own check
    with pytest.raises(ConfigKeyError, match="num_microbatch"):
        validate_config(cfg)


@pytest.mark.parametrize("override,words", [
    ("strategy.schedule=nonsense", "unknown schedule"),
    ("strategy.num_microbatches=0", "num_microbatches"),
    ("strategy.balance=heaviest", "balance"),
])
def test_bad_strategy_value_names_the_choices(override: str, words: str, tmp_path: Path) -> None:
    cfg = _compose([override], tmp_path)
    with pytest.raises((PipelineError, InstantiationException), match=words):
        build_strategy(cfg)


def test_a_hand_made_cut_reaches_the_strategy_as_a_list(tmp_path: Path) -> None:
    cfg = _compose(["strategy.balance=[1,3]", "strategy.timeline_steps=[2]"], tmp_path)
    strategy = build_strategy(cfg)  # refused the ListConfig Hydra handed it, though the schema allows a list
    assert strategy.balance == [1, 3] and type(strategy.balance) is list


def test_cli_rejects_a_typo_before_starting_anything(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "lightning_pipe.train", "strategy.num_microbatch=4"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode != 0
    assert "Could not override 'strategy.num_microbatch'" in run.stderr, run.stderr[-2000:]
    assert not any(tmp_path.iterdir()), "no output directory is created for a config that does not compose"


@pytest.mark.parametrize("overrides,words", [
    (["model.n_head=3"], "model.n_head=3 must divide model.n_embd="),
    (["data.block_size=4096"], "data.block_size=4096 exceeds model.block_size="),
    (["data.stride=0"], "data.stride=0 must be at least 1"),
    (["model.n_layer=0"], "model.n_layer=0 must be at least 1"),
])
def test_values_that_would_break_the_run_are_named_before_it_starts(overrides: list[str], words: str,
                                                                     tmp_path: Path) -> None:
    cfg = _compose(overrides, tmp_path)
    with pytest.raises(ValueError, match=re.escape(words)):
        validate_config(cfg)


def test_a_vocabulary_smaller_than_the_datas_is_named(tmp_path: Path) -> None:
    cfg = _compose(["model.vocab_size=16"], tmp_path)
    data = build_data(cfg)
    assert data.vocab_size > 16
    with pytest.raises(ValueError, match=rf"model.vocab_size=16 is smaller than the data's {data.vocab_size} tokens"):
        build_model(cfg, data)
    cfg = _compose([f"model.vocab_size={data.vocab_size + 3}"], tmp_path)  # larger is fine (unused rows)
    with torch.device("meta"):
        assert build_model(cfg, data).config.vocab_size == data.vocab_size + 3
