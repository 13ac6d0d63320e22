"""trace_ft.config: settings from defaults, a TOML file and flags (in that order), checked
all at once, and the strategies they build."""

import argparse

import pytest

from trace_ft.config import (EWCSettings, LoRASettings, ReplaySettings, RunConfig, SweepSettings, TraceSettings,
                             add_settings, config_from_args)
from trace_ft.continual.strategies.factory import build_strategy, sweep_strategies


def _parse(argv, tmp_path=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config")
    add_settings(p)
    return config_from_args(p.parse_args(argv))


def test_precedence_and_tables(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('steps = 7\nlr = 0.5\n[trace]\nbudget = 0.2\ngranularity = "row"\n')
    cfg = _parse(["--config", str(f), "--steps", "9"])
    assert (cfg.steps, cfg.lr, cfg.trace.budget, cfg.trace.granularity) == (9, 0.5, 0.2, "row")
    assert cfg.threads >= 1
    assert _parse(["--granularity", "64"]).trace.granularity == 64   # a block size


@pytest.mark.parametrize("over,needle", [
    (dict(trace_granularity="page"), "granularity must be one of"),
    (dict(dtype="float8"), "dtype must be one of"),
    (dict(device="tpu:0"), "device must be"),
    (dict(size="huge"), "size must be one of"),
    (dict(trace_lr=0.0), "trace_lr must be > 0"),
    (dict(lora_rank=0), "lora_rank must be >= 1"),
    (dict(replay_ratio=1.0), "replay_ratio in [0, 1)"),
    (dict(replay_buffer=0), "replay_buffer must be >= 1"),  # what the replay strategy demands
    (dict(general_every="epoch"), "general_every must be 'task' or 'end'"),
    (dict(strategies=["seqft", "nope"]), "unknown strategy 'nope'"),
    (dict(sweep_granularity=["element", "page"]), "granularity must be one of"),
])
def test_every_setting_is_checked(over, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace(")", r"\)")):
        RunConfig.from_dict(over).validate()


@pytest.mark.parametrize("section,kwargs,needle", [
    (ReplaySettings, dict(buffer=0), "replay_buffer must be >= 1"),
    (TraceSettings, dict(lr=-1.0), "trace_lr must be > 0"),
    (TraceSettings, dict(budget=1.5), "budget must be a fraction"),
    (LoRASettings, dict(rank=0), "lora_rank must be >= 1"),
    (EWCSettings, dict(lam=-1.0), "ewc_lambda must be >= 0"),
    (SweepSettings, dict(probe_steps=[0]), "sweep_probe_steps must be >= 1"),
])
def test_each_strategys_settings_check_themselves_when_built(section, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        section(**kwargs)


def test_flat_names_round_trip_and_name_the_nested_settings():
    cfg = RunConfig.from_dict({"trace": {"budget": 0.2}, "ewc": {"lambda": 3.0}, "lora_rank": 4})
    assert (cfg.trace.budget, cfg.ewc.lam, cfg.lora.rank) == (0.2, 3.0, 4)
    flat = cfg.flat()
    assert (flat["trace_budget"], flat["ewc_lambda"], flat["lora_rank"]) == (0.2, 3.0, 4)
    assert RunConfig.from_dict(flat) == cfg
    point = cfg.replaced(trace_lr=3e-4, seed=2)
    assert (point.trace.lr, point.seed, point.trace.budget, cfg.trace.lr) == (3e-4, 2, 0.2, 1e-2)


def test_learning_rates_left_unset_take_the_models_defaults():
    builtin, real = RunConfig(), RunConfig(model="smollm2-135m")
    assert (builtin.lr, builtin.trace.lr) == (1e-3, 1e-2)
    assert (real.lr, real.trace.lr) == (1e-4, 3e-4)       # measured on SmolLM2-135M (README)
    assert RunConfig.from_dict({"model": "smollm2-135m", "lr": 2e-5}).trace.lr == 6e-5
    assert RunConfig.from_dict({"model": "m", "lr": 2e-5, "trace_lr": 1e-3}).trace.lr == 1e-3


def test_a_model_saved_from_the_builtin_one_keeps_its_defaults(tmp_path):
    (tmp_path / "char_tokenizer.json").write_text("{}")   # what adapt's output holds
    assert RunConfig(model=str(tmp_path)).trace.lr == 1e-2


def test_unknown_keys_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown configuration keys: bogus"):
        RunConfig.from_dict({"bogus": 1})


def test_strategies_built_from_the_settings():
    cfg = RunConfig.from_dict(dict(trace_budget=0.1, trace_lr=3e-3, trace_probe_steps=7, ewc_lambda=5.0))
    trace = build_strategy("trace", cfg)
    assert trace.lr == 3e-3 and trace.pipeline.probe_steps == 7
    assert trace.pipeline.select_config.budget == 0.1
    assert build_strategy("trace_row", cfg).pipeline.select_config.granularity == "row"
    assert build_strategy("trace_paper", cfg).pipeline.select_config.method == "paper"
    assert build_strategy("ewc", cfg).lam == 5.0
    names = [s.name for s in sweep_strategies(RunConfig.from_dict(dict(
        sweep_granularity=["row"], sweep_budget=[0.1], sweep_probe_steps=[5, 10])))]
    assert names == ["trace[row,0.1,p5]", "trace[row,0.1,p10]"]
