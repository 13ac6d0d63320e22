"""trace_ft.config: settings from defaults, a TOML file and flags (in that order), checked
all at once, and the strategies they build."""

import argparse

import pytest
import torch

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
    assert (cfg.steps, cfg.lr, cfg.trace.select.budget, cfg.trace.select.granularity) == (9, 0.5, 0.2, "row")
    assert cfg.threads >= 1
    assert _parse(["--granularity", "64"]).trace.select.granularity == 64   # a block size


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
    (TraceSettings, dict(select=dict(budget=1.5)), "budget must be a fraction"),
    (LoRASettings, dict(rank=0), "lora_rank must be >= 1"),
    (EWCSettings, dict(lam=-1.0), "ewc_lambda must be >= 0"),
    (SweepSettings, dict(probe_steps=[0]), "sweep_probe_steps must be >= 1"),
])
def test_each_strategys_settings_check_themselves_when_built(section, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        section(**kwargs)


def test_flat_names_round_trip_and_name_the_nested_settings():
    cfg = RunConfig.from_dict({"trace": {"budget": 0.2}, "ewc": {"lambda": 3.0}, "lora_rank": 4})
    assert (cfg.trace.select.budget, cfg.ewc.lam, cfg.lora.rank) == (0.2, 3.0, 4)
    flat = cfg.flat()
    assert (flat["trace_budget"], flat["ewc_lambda"], flat["lora_rank"]) == (0.2, 3.0, 4)
    assert RunConfig.from_dict(flat) == cfg
    point = cfg.replaced(trace_lr=3e-4, seed=2)
    assert (point.trace.lr, point.seed, point.trace.select.budget, cfg.trace.lr) == (3e-4, 2, 0.2, 1e-2)


def test_learning_rates_left_unset_take_the_models_defaults():
    builtin, real = RunConfig(), RunConfig(model="smollm2-135m")
    assert (builtin.lr, builtin.trace.lr) == (1e-3, 1e-2)
    assert (real.lr, real.trace.lr) == (1e-4, 3e-4)       # measured on SmolLM2-135M (README)
    assert RunConfig.from_dict({"model": "smollm2-135m", "lr": 2e-5}).trace.lr == 6e-5
    assert RunConfig.from_dict({"model": "m", "lr": 2e-5, "trace_lr": 1e-3}).trace.lr == 1e-3
    # a model with its own: Gemma 3 270M's weights are 5x smaller, so its lr is lower
    gemma = RunConfig(model="gemma3-270m")
    assert (gemma.lr, gemma.trace.lr, gemma.trace.probe_lr, gemma.steps) == (3e-5, 9e-5, 3e-5, 24)
    assert RunConfig.from_dict({"model": "gemma3-270m", "lr": 1e-4}).trace.lr == 3e-4  # explicit wins


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


@pytest.mark.parametrize("argv,needle", [
    (["--threshold", "nan"], "specificity_threshold must be a finite number"),
    (["--trace-lr", "inf"], "trace_lr must be > 0 and finite"),
    (["--lr", "inf"], "lr must be > 0 and finite"),
    (["--probe-lr", "nan"], "trace_probe_lr must be > 0 and finite"),
    (["--protect", "inf"], "protect must be >= 0 and finite"),
    (["--lora-lr", "nan"], "lora_lr must be > 0 and finite"),
    (["--ewc-lambda", "nan"], "ewc_lambda must be >= 0 and finite"),
])
def test_non_finite_settings_are_refused(argv, needle):
    """Issue #35: a NaN threshold silently turned the specificity exclusion off; an infinite
    lr was accepted."""
    with pytest.raises(ValueError, match=needle):
        _parse(argv)


def test_settings_left_unset_are_resolved_once_from_the_model():
    builtin, real = RunConfig(), RunConfig(model="smollm2-135m")
    assert (builtin.steps, builtin.batch_size, builtin.trace.probe_steps, builtin.n_test,
            builtin.general_every) == (200, 32, 50, 200, "task")
    assert (real.steps, real.batch_size, real.trace.probe_steps, real.n_test, real.general_every) == (24, 8, 8, 32, "end")
    # the probe is a short full fine-tuning: it runs at the run's lr, not the core's
    assert (builtin.trace.probe_lr, real.trace.probe_lr) == (1e-3, 1e-4)
    assert builtin.trace.core_grads and not RunConfig(parallel="fsdp2").trace.core_grads
    # every explicit setting wins
    given = RunConfig.from_dict(dict(model="smollm2-135m", steps=40, batch_size=4, trace_probe_steps=3, n_test=9,
                                     general_every="task", trace_probe_lr=5e-5))
    assert (given.steps, given.batch_size, given.trace.probe_steps, given.n_test, given.general_every,
            given.trace.probe_lr) == (40, 4, 3, 9, "task", 5e-5)
    # a frontier point's lr moves what was left to follow it (the core's and the probe's lr)
    point = real.replaced(lr=3e-5)
    assert (point.lr, point.trace.lr, point.trace.probe_lr) == (3e-5, 9e-5, 3e-5)
    fixed = RunConfig.from_dict(dict(model="smollm2-135m", trace_lr=2e-4)).replaced(lr=3e-5)
    assert (fixed.trace.lr, fixed.trace.probe_lr) == (2e-4, 3e-5)
    # and a changed model brings its own defaults
    assert builtin.replaced(model="smollm2-135m").steps == 24


def test_the_selection_is_nested_and_named_flat():
    cfg = RunConfig.from_dict({"trace": {"threshold": 0.3, "share_cores": True, "budget": 0.1}})
    sel = cfg.trace.select
    assert (sel.specificity_threshold, sel.share_earlier_cores, sel.budget) == (0.3, True, 0.1)
    flat = cfg.flat()
    assert (flat["trace_specificity_threshold"], flat["trace_share_earlier_cores"]) == (0.3, True)
    assert "trace_threshold" not in flat and RunConfig.from_dict(flat) == cfg
    assert RunConfig().trace.select.granularity == "element"  # one default, the method's


def test_a_yes_no_setting_alone_means_true_and_a_typo_is_refused(capsys):
    assert _parse(["--probe-continue"]).trace.continue_probe is True
    assert _parse(["--probe-continue", "--steps", "9"]).steps == 9   # the next flag is not its value
    assert _parse(["--probe-continue", "off"]).trace.continue_probe is False
    assert _parse([]).trace.continue_probe is False
    with pytest.raises(SystemExit):
        _parse(["--probe-continue", "ture"])
    err = capsys.readouterr().err
    assert "--probe-continue" in err and "'ture'" in err


def test_the_probe_counts_toward_the_task_by_default_where_it_is_a_small_share_of_it():
    def continues(**kw):
        return RunConfig.from_dict({"model": "smollm2-135m", **kw}).trace.continue_probe

    # a pretrained model: 8 probe steps are 33 % of the default 24 and 27 % of 30 (off), 8 % of 100 (on)
    assert continues() is False and continues(steps=30) is False and continues(steps=100) is True
    assert continues(steps=100, trace_probe_steps=11) is False and continues(steps=79) is False
    assert continues(steps=80) is True                       # 8 <= 0.1 * 80
    assert continues(steps=100, trace_continue_probe=False) is False  # given: kept
    assert continues(steps=10, trace_continue_probe=True) is True
    assert continues(steps=100, parallel="fsdp2", trace_core_grads=False) is False  # sharded: cannot
    # the built-in model: never by default (no study of it there)
    assert RunConfig.from_dict({"steps": 1000}).trace.continue_probe is False
    # resolved again for a replaced config (a frontier point, a sweep's probe length); a given value stays
    cfg = RunConfig.from_dict({"model": "smollm2-135m"})
    assert "trace_continue_probe" in cfg.defaulted and cfg.flat()["trace_continue_probe"] is False
    assert cfg.replaced(steps=100).trace.continue_probe is True
    assert cfg.replaced(trace_continue_probe=False).replaced(steps=100).trace.continue_probe is False
    one = dict(steps=100, sweep_granularity=["element"], sweep_budget=[0.05], sweep_probe_steps=[8, 16])
    assert [s.continue_probe for s in sweep_strategies(cfg.replaced(**one))] == [True, False]
    assert [s.continue_probe for s in sweep_strategies(cfg.replaced(**one, trace_continue_probe=True))] == [True, True]


def test_the_probe_autocast_setting_reaches_the_probe_and_is_checked():
    assert _parse([]).trace.probe_autocast == "off"
    cfg = _parse(["--probe-autocast", "bf16", "--model", "builtin"])
    assert build_strategy("trace", cfg).pipeline.probe_autocast is torch.bfloat16
    assert build_strategy("trace", _parse(["--model", "builtin"])).pipeline.probe_autocast is None
    with pytest.raises(ValueError, match="trace_probe_autocast must be one of off, bf16, fp16, auto, got 'bf8'"):
        RunConfig.from_dict({"trace_probe_autocast": "bf8"})


@pytest.mark.parametrize("native", [True, False])
def test_the_probe_autocast_default_is_bf16_where_the_device_multiplies_it_natively(monkeypatch, native):
    import trace_ft.config.run_config as run_config

    seen = []
    monkeypatch.setattr(run_config, "native_bf16", lambda device: seen.append(device) or native)
    resolved = "bf16" if native else "off"
    cfg = RunConfig.from_dict({"model": "smollm2-135m", "device": "cpu"})
    assert (cfg.trace.probe_autocast, seen) == (resolved, ["cpu"])
    assert cfg.flat()["trace_probe_autocast"] == resolved            # what results.json records
    assert RunConfig.from_dict({"model": "smollm2-135m", "trace_probe_autocast": "auto"}).trace.probe_autocast \
        == resolved                                                     # asked for by name: the same
    # given: kept; 16-bit weights: already products in their dtype; the built-in model: off
    assert RunConfig.from_dict({"model": "smollm2-135m", "trace_probe_autocast": "off"}).trace.probe_autocast == "off"
    assert RunConfig.from_dict({"model": "smollm2-135m", "dtype": "bfloat16"}).trace.probe_autocast == "off"
    assert RunConfig.from_dict({"model": "builtin"}).trace.probe_autocast == "off"
    # a replaced config (a frontier point) resolves the default again, a given value stays
    cfg = RunConfig.from_dict({"model": "smollm2-135m"})
    assert cfg.replaced(dtype="bfloat16").trace.probe_autocast == "off"
    assert cfg.replaced(trace_probe_autocast="fp16").replaced(dtype="bfloat16").trace.probe_autocast == "fp16"
    # given as "auto": resolved again for the replaced dtype, and still "auto" after that
    asked = RunConfig.from_dict({"model": "smollm2-135m", "trace_probe_autocast": "auto"})
    assert asked.trace.probe_autocast == resolved and asked.flat()["trace_probe_autocast"] == resolved
    as_bf16 = asked.replaced(dtype="bfloat16")
    assert as_bf16.trace.probe_autocast == "off"
    assert as_bf16.replaced(dtype="float32").trace.probe_autocast == resolved
    assert asked.replaced(trace_probe_autocast="off").replaced(dtype="float32").trace.probe_autocast == "off"
