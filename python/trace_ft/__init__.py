"""trace_ft: the TRACE method on top of trace_kernels.

- `probe`: short warm-start fine-tune that returns each parameter's update and Fisher
  diagonal, leaving the model exactly as it was.
- `select_core`: importance and specificity scores per block, and the core set under a
  budget, as a `trace_kernels.CoreMask`.
- `TracePipeline`: one task after another (probe → select → train the core → remember).
- `sketch_update`: fixed-size random-projection sketches of earlier tasks' updates.

Packages: `method` (the method), `tasks`, `lm` (models, tokenizers, batches, the training
loop), `store` (task history, checkpoints), `continual` (strategies, metrics, reports),
`commands` (the `trace-ft` commands), `integrations` (the Hugging Face Trainer).
"""

from .method.pipeline import TracePipeline
from .method.probe import DEFAULT_EXCLUDE, ProbeResult, eligible_parameters, probe
from .method.select import EarlierTask, Selection, SelectConfig, select_core
from .method.sketch import BlockSketch, sketch_update

__all__ = [
    "DEFAULT_EXCLUDE", "ProbeResult", "eligible_parameters", "probe",
    "EarlierTask", "Selection", "SelectConfig", "select_core",
    "BlockSketch", "sketch_update", "TracePipeline",
]
