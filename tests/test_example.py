"""The README's main command: the masked fine-tuning example runs and trains only the core."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "masked_finetune.py"


def test_masked_finetune_example():
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "8"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "frozen elements changed: 0" in out.stdout
    assert "optimizer state:" in out.stdout
