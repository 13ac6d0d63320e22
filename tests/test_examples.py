"""The examples run: the masked fine-tuning example and the Trainer example train only the core."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import torchrun

EXAMPLE = Path(__file__).parents[1] / "examples" / "masked_finetune.py"


def test_masked_finetune_example():
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "8"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "frozen elements changed: 0" in out.stdout
    assert "optimizer state:" in out.stdout


TRAINER_EXAMPLE = Path(__file__).parents[1] / "examples" / "trainer_trace.py"


@pytest.mark.slow
def test_trainer_example_trains_only_the_core(tmp_path, builtin_cache):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    env = {**os.environ, "TRACE_FT_CACHE": str(builtin_cache)}
    out = subprocess.run([sys.executable, str(TRAINER_EXAMPLE), "--steps", "4", "--out",
                          str(tmp_path / "run"), "--history", str(tmp_path / "h")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "elements changed outside the core: 0" in out.stdout
    assert (tmp_path / "run" / "checkpoint-2" / "trace_core.safetensors").is_file()
    assert (tmp_path / "h" / "manifest.json").is_file()


@pytest.mark.slow
def test_trainer_example_recipe_under_torchrun(tmp_path, builtin_cache):
    """The example's --fsdp2 path on 2 CPU ranks: the Trainer builds the optimizer from the
    recipe, rank 0 probes and sends the core (accelerate runs DDP on CPU ranks; the FSDP2
    path itself is tests/ft/integrations/test_hf.py's)."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = torchrun([TRAINER_EXAMPLE, "--steps", "4", "--out", tmp_path / "run", "--history", tmp_path / "h",
                    "--fsdp2"], timeout=600, env={"TRACE_FT_CACHE": str(builtin_cache)})
    assert out.stdout.count("elements changed outside the core: 0") == 1  # rank 0 reports
    assert (tmp_path / "run" / "checkpoint-2" / "trace_core.safetensors").is_file()
    assert (tmp_path / "h" / "manifest.json").is_file()
