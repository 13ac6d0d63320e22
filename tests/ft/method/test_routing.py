"""trace_ft.method.routing: core values round-trip, and setting later cores back rebuilds an
earlier model bit for bit (and says so when cores overlap)."""

import pytest
import torch
from torch import nn

from trace_ft.method.routing import TaskValues, check_disjoint, core_values, set_back, set_core_values
from trace_kernels import CoreMask


def _core(rows):
    m = torch.zeros(8, 6, dtype=torch.bool)
    m[rows] = True
    return CoreMask.from_dense({"weight": m})


def test_rebuild_earlier_models_exactly(gen):
    model = nn.Linear(6, 8, bias=False)
    snapshots, routes = [model.weight.detach().clone()], []
    for rows in ([0, 3], [1, 5], [2]):
        core = _core(rows)
        before = core_values(model, core)
        with torch.no_grad():  # "training": only the core moves
            model.weight[rows] += torch.randn(len(rows), 6, generator=gen)
        routes.append(TaskValues(core, before, core_values(model, core)))
        snapshots.append(model.weight.detach().clone())
    check_disjoint(routes)
    for i in range(3, -1, -1):
        rebuilt = nn.Linear(6, 8, bias=False)
        rebuilt.load_state_dict(model.state_dict())
        set_back(rebuilt, routes[i:])
        assert torch.equal(rebuilt.weight, snapshots[i])
    assert routes[0].nbytes == 2 * 12 * 4 + 12 * 4  # values before and after, int32 indices


def test_overlapping_cores_are_named_and_values_checked():
    routes = [TaskValues(_core([0, 1]), {}, {}), TaskValues(_core([1, 2]), {}, {})]
    with pytest.raises(ValueError, match="tasks 1 and 2 share 6 elements"):
        check_disjoint(routes)
    model = nn.Linear(6, 8, bias=False)
    with pytest.raises(ValueError, match="3 values for a core of 12"):
        set_core_values(model, _core([0, 1]), {"weight": torch.zeros(3)})
