"""The masked optimizer, shaped like torch's: a functional core and a thin class over it.

- `masked_adamw` (`functional.py`): one AdamW step over the core elements of a group's
  lists, planned once and stepped with only the gradients after; callable without the class.
- `MaskedAdamW` (`optimizer.py`): torch.optim.AdamW's arguments plus ``masks=``; keeps the
  param groups, the masks (`binding.py`, `layout.py`), the lazily made compact state and its
  state_dict mapping (`state.py`); its `step` calls `masked_adamw`.
- `swap_optimizer` (`swap.py`): a running torch.optim.AdamW handed to a MaskedAdamW, its
  state compacted onto the core through `MaskedAdamW.init_state`.

Reading one `step()`: `optimizer.py` → `functional.py` → the backend's kernel
(`trace_kernels.backends`, e.g. `backends/cpu.py`).
"""

from torch.optim.optimizer import register_optimizer_step_pre_hook

from .functional import StepPlan, masked_adamw
from .optimizer import MaskedAdamW, refuse_compact_state
from .swap import swap_optimizer

register_optimizer_step_pre_hook(refuse_compact_state)

__all__ = ["MaskedAdamW", "masked_adamw", "StepPlan", "swap_optimizer"]
