"""The lab's Hydra config: every group option composes into valid run settings; bad overrides fail clearly."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf

from nanovllm_lab.config import Config
from nanovllm_lab.comm import STRATEGIES
from nanovllm_lab.lab.schemas import strategy_schemas
from nanovllm_lab.lab.settings import LabConfigError, settings_from_config
from nanovllm_lab.lab.testing import CONF_DIR, compose
from nanovllm_lab.models.arch import BUILTIN_ARCHS


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_defaults_run_blocking_tiny_small_tp1():
    s = settings_from_config(compose())
    assert (s.model, s.tp, s.strategy) == ("tiny", 1, {"name": "blocking"})
    assert (s.workload.name, s.logger.name) == ("small", "files")
    assert s.config["strategy"] == {"name": "blocking"}  # the record names what ran
    assert not s.trace and s.device in ("cpu", "cuda")
    Config.from_kwargs(s.model, **s.engine_kwargs)  # exactly the engine's kwargs


def test_readme_command_composes():
    s = settings_from_config(compose(["+strategy=overlap", "tp=2"]))
    assert s.tp == 2 and s.engine_kwargs["tensor_parallel_size"] == 2
    assert s.strategy["name"] == "overlap" and s.engine_kwargs["strategy"] == s.strategy
    # the engine never sees a DictConfig
    assert not any(isinstance(v, (DictConfig, ListConfig)) for v in s.engine_kwargs.values())
    assert not any(isinstance(v, (DictConfig, ListConfig)) for v in s.strategy.values())


@pytest.mark.parametrize("group", ["model", "workload", "strategy", "logger"])
def test_every_group_option_validates(group):
    opts = options(group)
    assert opts, f"conf/{group} is empty"
    for opt in opts:
        prefix = "+" if group == "strategy" else ""  # strategy is not in the defaults list
        s = settings_from_config(compose([f"{prefix}{group}={opt}"]))
        name = {"model": s.model_label, "workload": s.workload.name, "strategy": s.strategy_name,
                "logger": s.logger.name}[group]
        assert name == opt


def test_groups_cover_the_registries():
    from nanovllm_lab.lab.loggers import LOGGERS
    from nanovllm_lab.lab.workloads import WORKLOADS
    assert set(options("model")) == set(BUILTIN_ARCHS)
    assert set(options("strategy")) == set(STRATEGIES.names())
    assert set(options("workload")) == set(WORKLOADS.names())
    assert set(options("logger")) == set(LOGGERS.names())


def test_strategy_schemas_mirror_the_engine_configs():
    from nanovllm_lab.comm import STRATEGIES, resolve_strategy
    schemas = strategy_schemas()
    for name in STRATEGIES.names():
        engine_cls = STRATEGIES.get(name)[0]
        assert {f.name for f in dataclasses.fields(schemas[name])} == {f.name for f in dataclasses.fields(engine_cls)}
        # the YAML's values are accepted by the engine's own checks
        spec = settings_from_config(compose([f"+strategy={name}"])).strategy
        assert resolve_strategy(dict(spec)).name == name


def test_strategy_params_override_and_type_check():
    s = settings_from_config(compose(["+strategy=chunked", "strategy.chunks=8"]))
    assert s.strategy["chunks"] == 8
    with pytest.raises(ConfigCompositionException, match="chunks"):
        compose(["+strategy=chunked", "strategy.chunks=abc"])
    with pytest.raises(ConfigCompositionException, match="chunkz"):
        compose(["+strategy=chunked", "strategy.chunkz=1"])
    with pytest.raises(LabConfigError, match="chunks must be"):  # the engine's range check
        settings_from_config(compose(["+strategy=chunked", "strategy.chunks=0"]))


def test_unknown_strategy_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as e:
        compose(["+strategy=bogus"])
    for name in ("blocking", "overlap", "chunked"):
        assert name in str(e.value)
    with pytest.raises(LabConfigError, match=r"unknown strategy 'bogus'; valid: .*blocking"):
        settings_from_config(compose(["+strategy=blocking", "strategy.name=bogus"]))


def test_strategy_needs_plus():
    with pytest.raises(ConfigCompositionException, match=re.escape("+strategy=chunked")):
        compose(["strategy=chunked"])


def test_unknown_model_lists_the_valid_ones():
    with pytest.raises(MissingConfigException, match="qwen3-8b"):
        compose(["model=bogus"])
    with pytest.raises(LabConfigError, match=r"unknown model 'bogus'; valid: tiny, qwen3-0.6b"):
        settings_from_config(compose(["model.name=bogus"]))
    with pytest.raises(LabConfigError, match="no config.json"):
        settings_from_config(compose(["model.path=/nonexistent/dir"]))


def test_model_path(qwen3_dir):
    s = settings_from_config(compose([f"model.path={qwen3_dir}"]))
    assert s.model == qwen3_dir and s.model_label == Path(qwen3_dir).name


@pytest.mark.parametrize("override,match", [
    ("tp=0", "tp must be an integer >= 1"),
    ("tp=3", "must divide the attention heads"),
    ("max_num_seqs=0", "max_num_seqs"),
    ("dtype=float8", "dtype"),
    ("+tpp=2", "unknown config key 'tpp'"),
    ("+workload.bogus=1", "unknown config key 'bogus' in 'workload'"),
])
def test_bad_values_are_clear_errors(override, match):
    with pytest.raises(LabConfigError, match=match):
        settings_from_config(compose([override]))


def test_typo_key_and_bad_type_fail_composition():
    with pytest.raises(ConfigCompositionException, match="tpp"):
        compose(["tpp=2"])
    with pytest.raises(ConfigCompositionException, match="tp"):
        compose(["tp=two"])
    with pytest.raises(MissingConfigException, match="small"):
        compose(["workload=bogus"])


def test_workload_params_checked_before_the_engine(tmp_path):
    from nanovllm_lab.lab.testing import run_in_process
    with pytest.raises(LabConfigError, match="min_input_len <= max_input_len"):
        run_in_process(["workload.min_input_len=10", "workload.max_input_len=5"], tmp_path)
    err = (tmp_path / "error.json").read_text()
    assert "LabConfigError" in err and not (tmp_path / "summary.json").exists()


def test_run_and_sweep_dirs_name_strategy_and_tp():
    cfg = compose(["+strategy=overlap", "tp=2", "results_dir=/r"], return_hydra_config=True)
    run_dir = OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"]
    assert re.fullmatch(r"/r/runs/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_overlap_tp2", run_dir)
    cfg = compose(["results_dir=/r"], return_hydra_config=True)
    assert OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"].endswith("_blocking_tp1")
    assert re.fullmatch(r"/r/sweeps/[\d_-]+_sweep", OmegaConf.select(cfg, "hydra.sweep.dir"))


def _devices() -> int:
    import os

    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else (os.cpu_count() or 1)


def test_experiment_sweep_points_compose():
    """Every point of every preset's hydra.sweeper.params composes into valid settings."""
    import torch
    for exp in options("experiment"):
        cfg = compose([f"+experiment={exp}"], return_hydra_config=True)
        params = OmegaConf.to_container(cfg.hydra.sweeper.params)
        assert params, f"experiment {exp} defines no sweep"
        assert cfg.tag == exp
        for key, values in params.items():
            for value in str(values).split(","):
                point = compose([f"+experiment={exp}", f"{key}={value}"])
                if key == "tp" and int(value) > _devices():
                    # A point sized for a bigger machine than this one must fail for exactly that reason.
                    with pytest.raises(LabConfigError, match=f"tensor_parallel_size={value} exceeds the"):
                        settings_from_config(point)
                    continue
                if key == "elementwise_kernels" and value == "triton" and not torch.cuda.is_available():
                    # The Triton kernels need CUDA: on a CPU machine the point fails, naming that.
                    with pytest.raises(LabConfigError, match="elementwise_kernels='triton' needs a CUDA device"):
                        settings_from_config(point)
                    continue
                s = settings_from_config(point)
                assert s.tag == exp
