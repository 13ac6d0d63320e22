"""GPU-only checks (`pytest -m gpu` on a machine with CUDA; skipped elsewhere)."""

import copy

import pytest
import torch

from trace_kernels import CoreMask, MaskedAdamW

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_full_mask_matches_torch_fused_adamw_on_cuda(backend):
    pytest.importorskip("triton")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 64)).cuda()
    ref = copy.deepcopy(model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    opt = MaskedAdamW(model.named_parameters(), lr=1e-3, weight_decay=0.01,
                      masks=CoreMask.full(shapes, "row"), backend=backend)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    x = torch.randn(32, 256, device="cuda")
    for _ in range(7):
        for m, o in ((model, opt), (ref, ropt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert ((p - q).norm() / q.norm()).item() < 1e-6


def test_backend_choice_on_cuda():
    from trace_kernels import backends

    assert backends.choose("cuda").name in ("triton", "reference")
