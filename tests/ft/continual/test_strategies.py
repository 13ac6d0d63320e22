"""trace_ft strategies on a tiny Llama: what each one trains, and the EWC penalty."""

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from trace_ft.lm.model import BuiltinSpec, builtin_config
from trace_ft.continual.strategies import EWC, EWCPenalty, LoRA, Replay, SeqFT, Trace
from trace_ft.continual.strategies.base import Context
from trace_ft.continual.strategies.ewc import empirical_fisher
from trace_ft.method.select import SelectConfig
from trace_ft.tasks import builtin_task
from trace_ft.lm.text import CharTokenizer
from trace_ft.lm.train import TrainConfig

SPEC = BuiltinSpec(hidden=32, layers=1, heads=2, intermediate=64)


def _ctx(steps=6):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    tok = CharTokenizer()
    model = LlamaForCausalLM(builtin_config(SPEC, tok.vocab_size))
    return Context(model=model, codec=tok, train=TrainConfig(steps=steps, batch_size=8, lr=1e-2),
                   progress=False, num_tasks=2)


TASKS = [builtin_task("rev", n_train=64, n_test=8), builtin_task("sub", n_train=64, n_test=8)]


def test_trace_moves_only_core_elements_and_avoids_earlier_cores():
    ctx = _ctx()
    strat = Trace(SelectConfig(budget=0.1, granularity="row"), probe_steps=3)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    strat.learn(ctx, 1, TASKS[0], [])
    core1 = strat.history[0].core
    moved = 0
    for n, p in ctx.model.named_parameters():
        changed = p.detach() != before[n]
        inside = core1.to_dense(n) if n in core1 else torch.zeros_like(changed)
        assert not (changed & ~inside).any(), n
        moved += int(changed.sum())
    assert moved > 0
    assert all(p.requires_grad for p in ctx.model.parameters())   # flags restored
    strat.learn(ctx, 2, TASKS[1], TASKS[:1])
    core2 = strat.history[1].core
    assert core2.intersection(core1).numel_selected == 0
    assert 0 < core2.numel_selected <= 0.1 * core2.numel + max(e.block_size for e in core2.values())


def test_trace_continuing_from_its_probe_counts_the_probe_steps_toward_the_task():
    ctx = _ctx(steps=6)
    strat = Trace(SelectConfig(budget=0.1, granularity="element"), probe_steps=4, continue_probe=True)
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    found = strat.find_core(ctx, 1, TASKS[0])
    assert found.start is not None and found.start.steps == 4
    assert set(found.start.values) == set(found.core.nonempty())
    losses, _ = strat.train_core(ctx, 1, TASKS[0], found.core, start=found.start)
    assert len(losses) == 6 - 4  # the task's 6 steps: 4 of probe, 2 on the core
    for n, p in ctx.model.named_parameters():
        changed = p.detach() != before[n]
        inside = found.core.to_dense(n) if n in found.core else torch.zeros_like(changed)
        assert not (changed & ~inside).any(), n
    assert strat.config()["continue_probe"] is True
    # a probe longer than the task: the core keeps the probe's values, no step of its own
    ctx = _ctx(steps=3)
    found = strat.find_core(ctx, 1, TASKS[0])
    assert strat.train_core(ctx, 1, TASKS[0], found.core, start=found.start)[0] == []


def test_seqft_replay_train_everything_and_lora_merges_back():
    for strat in (SeqFT(), Replay(buffer_per_task=4)):
        ctx = _ctx()
        before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
        cost = strat.learn(ctx, 1, TASKS[0], [])
        assert cost.trainable == sum(p.numel() for p in ctx.model.parameters())
        assert any((p.detach() != before[n]).any() for n, p in ctx.model.named_parameters())
    ctx = _ctx()
    names = [n for n, _ in ctx.model.named_parameters()]
    before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    cost = LoRA(rank=2).learn(ctx, 1, TASKS[0], [])
    assert [n for n, _ in ctx.model.named_parameters()] == names    # adapter merged away
    assert 0 < cost.trainable < sum(before[n].numel() for n in names)
    changed = {n for n, p in ctx.model.named_parameters() if (p.detach() != before[n]).any()}
    assert changed and all("proj" in n for n in changed)


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_drift():
    ctx = _ctx()
    fisher = empirical_fisher(ctx.model, ctx.batches([TASKS[0]], 3, salt=1), 3)
    assert sum(float(f.sum()) for f in fisher.values()) > 0
    anchor = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    pen = EWCPenalty(ctx.model, fisher, anchor, lam=10.0)
    with torch.no_grad():
        assert float(pen()) == 0.0
    values = []
    direction = {n: torch.randn_like(p) for n, p in ctx.model.named_parameters()}
    for scale in (1e-3, 1e-2, 1e-1):
        with torch.no_grad():
            for n, p in ctx.model.named_parameters():
                p.copy_(anchor[n] + scale * direction[n])
        with torch.no_grad():
            values.append(float(pen()))
    assert 0 < values[0] < values[1] < values[2]
    assert values[2] == pytest.approx(100 * values[1], rel=1e-3)    # quadratic in the drift
    # and the strategy uses it from the second task on
    ewc = EWC(lam=1e3, fisher_batches=2)
    ctx = _ctx()
    ewc.learn(ctx, 1, TASKS[0], [])
    assert ewc.fisher is not None
    cost = ewc.learn(ctx, 2, TASKS[1], TASKS[:1])
    assert cost.extra["ewc_bytes"] > 0


def test_trace_guard_records_fisher_and_protects_the_general_task():
    ctx = _ctx()
    general = builtin_task("base", n_train=64, n_test=8)
    strat = Trace(SelectConfig(budget=0.1, granularity="element", protect=5.0), probe_steps=2,
                  fisher_batches=2, general=general)
    strat.learn(ctx, 1, TASKS[0], [])
    assert len(strat.history) == 2                 # the general task's Fisher, then task 1
    assert strat.history[0].core is None and strat.history[0].fisher
    assert all(float(f.float().sum()) >= 0 for f in strat.history[1].fisher.values())
    assert sum(float(f.float().sum()) for f in strat.history[1].fisher.values()) > 0
    assert strat.config()["protect_general"] == "base"
    # the run's last task (ctx.num_tasks = 2): no later selection reads its Fisher, none is taken
    strat.learn(ctx, 2, TASKS[1], TASKS[:1])
    assert len(strat.history) == 3 and strat.history[2].core is not None and not strat.history[2].fisher


def test_trace_trains_row_cores_from_core_rows_gradients(monkeypatch):
    """A row-level core: the linear layers compute their core rows' gradients only, and the
    task ends where the full-gradient run ends (no clipping: its norm is over what each
    path computes)."""
    import trace_ft.method.pipeline as pipeline_mod

    installed = []
    install = pipeline_mod.install_core_grads

    def spy(model, core):
        handle = install(model, core)
        installed.append(handle.names)
        return handle

    results = []
    for core_grads in (False, True):
        ctx = _ctx()
        ctx = dataclasses.replace(ctx, train=dataclasses.replace(ctx.train, max_grad_norm=None))
        strat = Trace(SelectConfig(budget=0.1, granularity="row"), probe_steps=3, core_grads=core_grads)
        if core_grads:
            monkeypatch.setattr(pipeline_mod, "install_core_grads", spy)
        strat.learn(ctx, 1, TASKS[0], [])
        results.append(dict(ctx.model.named_parameters()))
    assert installed and any("mlp" in n for n in installed[0])
    assert not any("core_grad" in n for n in results[1])
    for n, p in results[0].items():
        torch.testing.assert_close(results[1][n], p, rtol=1e-4, atol=1e-5, msg=n)
