"""Shared fixtures. Every run draws fresh random inputs: the seed is printed in the header
and can be replayed with TRACE_TEST_SEED=<seed>."""

import os
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter on CPU tensors. The flag is
# read when the kernels are defined, so it must be set before the Triton backend is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from trace_kernels import _native

SEED = int(os.environ.get("TRACE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def pytest_report_header(config):
    ext = "built" if _native.load("_C") is not None else f"missing ({_native.error('_C')})"
    return [f"trace_kernels test seed: {SEED} (replay: TRACE_TEST_SEED={SEED})",
            f"trace_kernels._C: {ext}"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen(request):
    """A generator seeded from the run seed and the test's name: fresh per run, replayable."""
    g = torch.Generator()
    g.manual_seed((SEED * 1_000_003 + zlib.crc32(request.node.nodeid.encode())) % 2**63)
    return g


NATIVE_BACKENDS = ["cpu"] if _native.load("_C") is not None else []


_NATIVE_PARAMS = NATIVE_BACKENDS or [pytest.param("cpu", marks=pytest.mark.skip(reason="trace_kernels._C not built"))]


@pytest.fixture(params=_NATIVE_PARAMS)
def native_backend(request):
    return request.param


@pytest.fixture(params=["reference", *_NATIVE_PARAMS])
def any_backend(request):
    """The reference and every native CPU backend built here (ops tested bit for bit on each)."""
    return request.param


@pytest.fixture(scope="session")
def builtin_cache(tmp_path_factory):
    """One cache of built-in base models for the whole session (the tiny one pretrains in
    seconds, once)."""
    return tmp_path_factory.mktemp("trace-ft-cache")


@pytest.fixture(scope="session", autouse=True)
def _default_cache(builtin_cache):
    """The session's cache is the default one, so no test writes into the user's
    ~/.cache/trace-ft (models, kept scores) unless it names that cache itself."""
    old = os.environ.get("TRACE_FT_CACHE")
    os.environ["TRACE_FT_CACHE"] = str(builtin_cache)
    yield
    if old is None:
        os.environ.pop("TRACE_FT_CACHE", None)
    else:
        os.environ["TRACE_FT_CACHE"] = old
