"""trace-kernels: fused kernels and a masked AdamW for TRACE continual fine-tuning.

Public API:
- `CoreMask`, `MaskEntry`: which blocks of which parameters a task trains.
- `MaskedAdamW`, `swap_optimizer`: AdamW over core elements only, with compact state.
- `ops.masked_adamw_`: the multi-tensor op behind the optimizer.
- `report()`: the build and backend report (also ``python -m trace_kernels``).
"""

from ._version import __version__
from .masks import CoreMask, MaskEntry
from .optim import MaskedAdamW, swap_optimizer
from .report import report

__all__ = ["CoreMask", "MaskEntry", "MaskedAdamW", "swap_optimizer", "report", "__version__"]
