"""trace-kernels: fused kernels and a masked AdamW for TRACE continual fine-tuning.

Public API:
- `CoreMask`, `MaskEntry`: which blocks of which parameters a task trains.
- `MaskedAdamW`, `swap_optimizer`: AdamW over core elements only, with compact state.
- `install_core_grads`: linear layers compute their core rows' weight gradients only.
- `ops.masked_adamw_`: the multi-tensor op behind the optimizer.
- `report()`: the build and backend report (also ``python -m trace_kernels``).
"""

from ._version import __version__
from .core_grads import CoreGrads, install_core_grads
from .masks import CoreMask, MaskEntry
from .optim import MaskedAdamW
from .swap import swap_optimizer
from .report import report

__all__ = ["CoreMask", "MaskEntry", "MaskedAdamW", "swap_optimizer", "install_core_grads", "CoreGrads",
           "report", "__version__"]
