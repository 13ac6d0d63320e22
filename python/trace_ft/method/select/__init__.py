"""Core-parameter selection: importance and specificity per block, then a budget.

The default ("trace", METHOD.md):
- importance per block b: L2 = ‖Δ_b‖₂ and Fisher = Σ_{e∈b} F_e, combined scale-free as the
  mean of the two scores' percentile ranks over all eligible blocks (options: product or
  weighted sum of max-normalised scores, either score alone; ranks/maxima over all blocks
  or within each tensor);
- specificity: s_b = max over earlier tasks τ of cos(Δ_t,b, Δ_τ,b), from exact earlier
  updates or their sketches;
- the core: among blocks with s_b below `specificity_threshold` (rule "exclude"; or rule
  "downweight": importance × (1 − max(s_b, 0))) and not core for an earlier task (unless
  `share_earlier_cores`), the most important blocks up to `budget` of the eligible elements,
  globally or per tensor.

The "paper" method reproduces the authors' released selection: whole tensors, score
0.5·minmax(RMS of Δ) + 0.5·minmax(mean Fisher), the top `budget` (default 10 %) of tensors
ranked globally. "paper_specificity" is their separate specificity selector: tensors
ranked by mean cosine with earlier tasks' updates, least similar first.

The package: `config` (settings, earlier tasks, the result), `stats` (a tensor's block sums,
sharded too), `ranks` (percentile ranks and the importance), `scorer` (what is computed of
each tensor, once for both drivers), `budget`, `paper` (the authors' rule), and the two
drivers: `core.select_core` (every tensor's scores held) and `streamed.select_streamed` (a
large model's element level, tensor by tensor, the same core bit for bit).
"""

from .config import (GRANULARITIES, IMPORTANCE, METHODS, SPECIFICITY_UNITS, EarlierTask, Selection, SelectConfig,
                     specificity_size)
from .core import select_core
from .ranks import EXACT_RANKS_UP_TO, RANK_BITS

__all__ = ["GRANULARITIES", "IMPORTANCE", "METHODS", "SPECIFICITY_UNITS", "EarlierTask", "Selection", "SelectConfig",
           "specificity_size", "select_core", "EXACT_RANKS_UP_TO", "RANK_BITS"]
