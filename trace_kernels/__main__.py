"""``python -m trace_kernels [--require NAME]``: print the build and backend report.

``--require NAME`` exits non-zero unless backend NAME can run on the device it serves:
the CPU for cpu and reference, a CUDA device for cuda and triton (CI uses it to catch a
silently failed native build; a GPU job, to check the GPU build).
"""

import argparse
import sys

import torch

from . import backends
from .report import report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace_kernels", description=__doc__)
    parser.add_argument("--require", choices=backends.BACKENDS, action="append", default=[])
    args = parser.parse_args(argv)
    print(report())
    for name in args.require:
        device = "cuda" if name in ("cuda", "triton") else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            print(f"required backend {name} cannot be checked: no CUDA device is visible here",
                  file=sys.stderr)
            return 1
        try:
            backends.choose(device, name)
        except backends.BackendUnavailableError as exc:
            print(f"required backend missing: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
