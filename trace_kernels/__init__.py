"""trace-kernels: fused kernels and a masked AdamW for TRACE continual fine-tuning.

Public API:
- `CoreMask`, `MaskEntry`: which blocks of which parameters a task trains.
- `MaskedAdamW`, `swap_optimizer`: AdamW over core elements only, with compact state;
  `masked_adamw`, the functional step the class calls (`trace_kernels.optim`).
- `install_core_grads`: linear layers compute their core rows' weight gradients only.
- `ops`: the registered ops (`masked_adamw_`, `adamw_fisher_`, `delta_stats`, `sampled_dot`),
  each dispatched to a backend's kernel.
- `report()`: the build and backend report (also ``python -m trace_kernels``).
"""

from ._version import __version__
from .core_grads import CoreGrads, install_core_grads, remove_core_grads
from .masks import CoreMask, MaskEntry
from .optim import MaskedAdamW, masked_adamw, swap_optimizer
from .report import report

__all__ = ["CoreMask", "MaskEntry", "MaskedAdamW", "masked_adamw", "swap_optimizer", "install_core_grads", "remove_core_grads", "CoreGrads",
           "report", "__version__"]
