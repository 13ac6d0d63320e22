"""Check a built wheel: it holds the CPU and CUDA extensions; the CUDA extension has
machine code (SASS) for every requested architecture and PTX for the newest (forward
compatibility); neither extension needs libtorch, libc10 or libcudart (the CUDA runtime is
linked statically, the driver is loaded at run time); it imports and reports cleanly on a
machine without a GPU. Prints the architectures, the PTX ISA version and the oldest driver
that can load that PTX.

    python tools/check_wheel.py [--archs "8.0;9.0"] wheelhouse/trace_kernels-*.whl

--archs defaults to TRACE_KERNELS_CUDA_ARCHS (the build's setting), else "8.0;9.0".
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cuda_archs import fatbin_entries, needed_libraries  # noqa: E402

# PTX ISA version -> (the CUDA release that introduced it, its minimum Linux driver)
PTX_DRIVER = {(9, 0): ("13.0", "580.65"), (8, 8): ("12.9", "575.51"), (8, 7): ("12.8", "570.26"),
              (8, 5): ("12.5", "555.42"), (8, 4): ("12.4", "550.54"), (8, 3): ("12.3", "545.23"),
              (8, 2): ("12.2", "535.54"), (8, 1): ("12.1", "530.30"), (8, 0): ("12.0", "525.60")}
FORBIDDEN = ("libtorch", "libc10", "libcudart")  # prefixes: libtorch_python, libtorch_cuda, ...


def requested(raw: str) -> list[int]:
    """[80, 90] from "8.0;9.0a" (the arch numbers the fatbin records)."""
    return [int(m.group(1) + m.group(2)) for m in
            (re.fullmatch(r"(\d+)\.(\d)a?", x) for x in re.split(r"[;, ]+", raw.strip()) if x) if m]


def driver_floor(version: tuple[int, int]) -> str:
    cuda = PTX_DRIVER.get(version)
    if cuda is None:
        return f"PTX ISA {version[0]}.{version[1]}: a driver of the CUDA release that introduced it or newer"
    return (f"NVIDIA driver >= {cuda[1]} (CUDA {cuda[0]}: the runtime linked in, and PTX ISA "
            f"{version[0]}.{version[1]} for GPUs newer than the SASS)")


def check(wheel: Path, archs: list[int]) -> str:
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
        entries = fatbin_entries(cuda_so)
        for so in Path(tmp, "trace_kernels").glob("_*.so"):
            bad = [lib for lib in needed_libraries(so) if lib.startswith(FORBIDDEN)]
            if bad:
                raise SystemExit(f"{wheel.name}: {so.name} needs {', '.join(bad)}")
        # import the installed copy, not a source checkout
        env = {**os.environ, "PYTHONPATH": tmp}
        report = subprocess.run([sys.executable, "-m", "trace_kernels", "--require", "cpu"],
                                capture_output=True, text=True, env=env, cwd=tmp, check=True).stdout
    if "trace_kernels._cuda: built" not in report:
        raise SystemExit(f"{wheel.name}: the CUDA extension did not load:\n{report}")
    sass = sorted({e["arch"] for e in entries if e["kind"] == "sm"})
    ptx = [e for e in entries if e["kind"] == "ptx"]
    missing = [a for a in archs if a not in sass]
    if missing:
        raise SystemExit(f"{wheel.name}: no machine code for sm_{', sm_'.join(map(str, missing))} "
                         f"(has sm_{', sm_'.join(map(str, sass))})")
    if not ptx or max(e["arch"] for e in ptx) < max(archs):
        raise SystemExit(f"{wheel.name}: no PTX for compute_{max(archs)} (GPUs newer than the "
                         "build could not run it)")
    newest = max(ptx, key=lambda e: e["arch"])
    return (f"{wheel.name}: CPU + CUDA extensions; SASS sm_{', sm_'.join(map(str, sass))}; PTX "
            f"compute_{newest['arch']}; {driver_floor(newest['ptx_version'])}; no libtorch/libcudart "
            f"dependency\n{report}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("wheels", nargs="+", type=Path)
    ap.add_argument("--archs", default=os.environ.get("TRACE_KERNELS_CUDA_ARCHS", "8.0;9.0"))
    args = ap.parse_args()
    for w in args.wheels:
        print(check(w, requested(args.archs)))


if __name__ == "__main__":
    main()
