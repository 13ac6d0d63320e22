"""Which path `install_core_grads` takes per layer: the cost model (`PathCosts`) picks the
cheapest of rows, elements and the full product, from shapes and cores alone."""

import torch

from trace_kernels import CoreMask, install_core_grads
from trace_kernels.core_grads import PathCosts

from .test_core_grads import model


def test_the_cost_model_takes_the_cheapest_path_or_the_full_product():
    c = PathCosts(row_factor=1.0, element_floor=100.0, element_factor=10.0, margin=0.9)
    # a core in few rows: rows (0.1 of the product) beat elements (floor + every element)
    assert c.choose(1000, 1000, rows=100, elements=100_000) == "rows"
    # scattered over most rows at low density: elements
    assert c.choose(1000, 1000, rows=900, elements=5_000) == "elements"
    # blocks that straddle rows have no row path
    assert c.choose(1000, 1000, rows=None, elements=5_000) == "elements"
    # dense, or too small a weight for the element path's floor to pay: the full product
    assert c.choose(1000, 1000, rows=950, elements=200_000) == "full"
    assert c.choose(8, 8, rows=None, elements=1) == "full"
    net = model()
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters() if n.endswith("weight")}
    spread = CoreMask.from_indices({n: ((r, col), 1, torch.arange(r) * col + torch.arange(r) % col)
                                    for n, (r, col) in shapes.items()})
    cheap = PathCosts(element_floor=0.0, element_factor=1.0)
    with install_core_grads(net, spread, costs=cheap) as handle:  # chosen by the model given
        assert sorted(handle.names) == ["0.weight", "2.weight", "4.weight"]
    with install_core_grads(net, spread, costs=PathCosts(element_floor=1e9)) as handle:
        assert handle.names == []


def test_the_constants_follow_the_cpu_measured_and_are_conservative_elsewhere(monkeypatch):
    from trace_kernels import core_grads

    assert PathCosts.for_device("meta") == core_grads.COSTS  # not a CPU: the defaults
    for vendor, expected in [("AuthenticAMD", core_grads.MEASURED["AuthenticAMD"]),
                             ("GenuineIntel", core_grads.COSTS), ("", core_grads.COSTS)]:
        monkeypatch.setattr(core_grads, "cpu_vendor", lambda v=vendor: v)
        assert PathCosts.for_device("cpu") == expected
    # the measured CPU's element path pays at 5 % of an MLP matrix; the defaults keep the full product
    amd = core_grads.MEASURED["AuthenticAMD"]
    assert amd.choose(1536, 576, rows=1500, elements=44_000) == "elements"
    assert core_grads.COSTS.choose(1536, 576, rows=1500, elements=44_000) == "full"
    # install_core_grads without `costs` asks for the weight's device's constants
    net = model()
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters() if n.endswith("weight")}
    spread = CoreMask.from_indices({n: ((r, col), 1, torch.arange(r) * col + torch.arange(r) % col)
                                    for n, (r, col) in shapes.items()})
    monkeypatch.setattr(PathCosts, "for_device", staticmethod(lambda d: PathCosts(element_floor=0.0, element_factor=1.0)))
    with install_core_grads(net, spread) as handle:
        assert sorted(handle.names) == ["0.weight", "2.weight", "4.weight"]
