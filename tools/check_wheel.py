"""Check a built wheel: it holds the CPU and CUDA extensions, the CUDA code covers the
requested architectures, and it imports and reports cleanly on a machine without a GPU.

    python tools/check_wheel.py wheelhouse/trace_kernels-*.whl
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cuda_archs import embedded_code  # noqa: E402


def check(wheel: Path) -> str:
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    for ext in ("trace_kernels/_C.", "trace_kernels/_cuda."):
        if not any(n.startswith(ext) and n.endswith(".so") for n in names):
            raise SystemExit(f"{wheel.name}: missing {ext}*.so")
    if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
        raise SystemExit(f"{wheel.name}: no LICENSE file")
    metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    if "License-Expression: Apache-2.0" not in metadata:
        raise SystemExit(f"{wheel.name}: no license metadata")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", tmp, str(wheel)], check=True)
        cuda_so = next(Path(tmp, "trace_kernels").glob("_cuda*.so"))
        code = embedded_code(cuda_so)
        # import the installed copy, not a source checkout
        env = {**os.environ, "PYTHONPATH": tmp}
        report = subprocess.run([sys.executable, "-m", "trace_kernels", "--require", "cpu"],
                                capture_output=True, text=True, env=env, cwd=tmp, check=True).stdout
    if "trace_kernels._cuda: built" not in report:
        raise SystemExit(f"{wheel.name}: the CUDA extension did not load:\n{report}")
    return f"{wheel.name}: CPU + CUDA extensions ({' '.join(code)})\n{report}"


if __name__ == "__main__":
    for w in sys.argv[1:]:
        print(check(Path(w)))
