"""The op set, registered with torch.library and dispatched to a backend by device.

- `masked_adamw_` (`adamw.py`): AdamW over the selected blocks of many parameters at
  once, optimizer state for the selected elements only; `adamw_fisher_`: the dense
  probe step that also accumulates the Fisher diagonal in the same pass.
- `delta_stats` (`delta_stats.py`): per-block sums for importance and specificity.
- `sampled_dot` (`sampled_dot.py`): selected entries of a product A·Bᵀ (element-level
  core weight gradients).
- `rank_scores`, `rank_counts` (`rank_scores.py`): element-level importance from binned
  rank tables, only the candidates for the budget kept; the tables' histograms.
- `element_max_cosine` (`element_cosine.py`): element-level specificity.

Every argument is checked (`_checks.py`) before any backend runs, so bad input raises a
ValueError/TypeError that names the argument and leaves every tensor untouched.
"""

from ._checks import INDEX_DTYPES, MAX_REFS, PARAM_DTYPES
from .adamw import adamw_fisher_, element_base, masked_adamw_, masked_adamw_trusted_
from .delta_stats import DeltaStats, delta_stats
from .element_cosine import element_max_cosine
from .rank_scores import RankScores, rank_bin, rank_counts, rank_scores
from .sampled_dot import sampled_dot

__all__ = ["masked_adamw_", "masked_adamw_trusted_", "adamw_fisher_", "element_base", "delta_stats", "DeltaStats", "sampled_dot",
           "rank_scores", "rank_counts", "rank_bin", "RankScores", "element_max_cosine",
           "PARAM_DTYPES", "INDEX_DTYPES", "MAX_REFS"]
