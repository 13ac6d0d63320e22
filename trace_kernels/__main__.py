"""``python -m trace_kernels [--require cpu]``: print the build and backend report.

``--require NAME`` exits non-zero unless backend NAME is usable on CPU (CI uses it to
catch a silently failed native build).
"""

import argparse
import sys

from . import backends
from .report import report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trace_kernels", description=__doc__)
    parser.add_argument("--require", choices=backends.BACKENDS, action="append", default=[])
    args = parser.parse_args(argv)
    print(report())
    for name in args.require:
        try:
            backends.choose("cpu", name)
        except backends.BackendUnavailableError as exc:
            print(f"required backend missing: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
