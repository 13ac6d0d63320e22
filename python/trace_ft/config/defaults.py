"""What a setting left unset means, by kind of model: the built-in one (a 0.45M-parameter
Llama trained from scratch here, seconds per task) or a pretrained one (a real model:
SmolLM2-135M takes ~2.5 s per step of batch 8 on two CPU cores). `RunConfig` fills its unset
settings from here once, when it is built; nothing downstream derives a default again."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..lm.text import CHAR_TOKENIZER_FILE


@dataclass(frozen=True)
class ModelDefaults:
    lr: float              # the run's lr: full fine-tuning's, the baselines' and the probe's
    core_lr_factor: float  # the core's lr is the run's times this
    steps: int             # training steps per task
    batch_size: int
    probe_steps: int
    n_train: int
    n_test: int
    general_every: str     # general ability scored after every "task", or at the "end"
    routed: bool           # trace's task-routed row (a rescoring of every task after the run)
    score_unseen: str      # tasks not yet trained, scored after each task: "all" or the "next" only
    probe_autocast: str    # the probe's products: "off" (the weights' dtype) or "auto" (`RunConfig`)
    # the probe's steps count toward the task (trace_continue_probe) when they are at most
    # this share of the task's steps (0: never)
    continue_probe_share: float


DEFAULTS = {
    # the built-in model's frontier (bench/results/trace_ft_frontier.md)
    "builtin": ModelDefaults(lr=1e-3, core_lr_factor=10.0, steps=200, batch_size=32, probe_steps=50,
                             n_train=2000, n_test=200, general_every="task", routed=True,
                             score_unseen="all", probe_autocast="off", continue_probe_share=0.0),
    # SmolLM2-135M's real-model studies (docs/results.md): json, keyval and intro are learned
    # to 100 % in 16 steps of batch 8 at lr 1e-4, card (long upper-case answers) to 34-72 %
    # in 16 and 81-84 % in 24 (trace, seqft), so 24; a probe of 8 steps at that lr finds a
    # core that learns them; at core lr 10x TRACE destroyed more general ability than full
    # fine-tuning, at 3x it kept it. 32 test examples per task give a score to ~3 points;
    # general ability at the start and the end; the routed row (an extra analysis that
    # rescored every task, 10 % of a run) only when asked; of the tasks not yet trained only
    # the next is scored after each task (what FWT needs; the rest of the upper triangle is
    # a third of a real run's scoring and no metric reads it). The probe's products in bf16
    # where the device multiplies bf16 natively ("auto"): 0.65 of the fp32 probe's time, and
    # over three seeds of the real sequence the same retention and general ability
    # (docs/performance.md, rounds 14-15). The probe's steps count toward the task where
    # they are at most a tenth of it: on SmolLM2's real tasks continuing changed neither
    # retention nor general ability with a probe of 8 steps in tasks of 100 (three seeds) and
    # saved those steps; in tasks of 30 it cost plasticity (arithmetic, still learning, took
    # the loss), as at 8 of 24 and of 16 (docs/results.md)
    "pretrained": ModelDefaults(lr=1e-4, core_lr_factor=3.0, steps=24, batch_size=8, probe_steps=8,
                                n_train=400, n_test=32, general_every="end", routed=False,
                                score_unseen="next", probe_autocast="auto", continue_probe_share=0.1),
}


# what a suite changes in its model's defaults: the real tasks (tasks.real) need test sets of
# 200 for a standard error under 4 points, and more steps than the instruct formats
SUITE_DEFAULTS: dict[tuple[str, str], dict] = {
    ("pretrained", "real"): {"n_train": 1000, "n_test": 200, "steps": 60},
}


# what a known model changes in the pretrained defaults. Gemma 3 270M's attention and MLP
# weights are 5x smaller than SmolLM2's (median RMS 0.040 against 0.19), and Adam moves a
# weight by about lr a step whatever its size, so SmolLM2's lr 1e-4 is 5x hotter on Gemma: in
# the hot regime it took Gemma's perplexity from 24 to ~9,000 (full fine-tuning) and ~160
# (TRACE); at 3e-5 full fine-tuning still learned every task in 16 steps
# (docs/results.md, "The second family")
MODEL_DEFAULTS: dict[str, dict] = {"gemma3-270m": {"lr": 3e-5}}


def defaults_for(kind: str, suite: str, model: str | Path | None = None) -> ModelDefaults:
    """The defaults of a model kind, with those of its suite and of the model over them."""
    d = dataclasses.replace(DEFAULTS[kind], **SUITE_DEFAULTS.get((kind, suite), {}))
    return dataclasses.replace(d, **MODEL_DEFAULTS.get(str(model), {})) if kind == "pretrained" else d


def model_kind(model: str | Path) -> str:
    """"builtin" for the built-in model and any model saved from it (a directory with its
    character tokenizer, e.g. `adapt`'s output), else "pretrained"."""
    if str(model) == "builtin" or (Path(model) / CHAR_TOKENIZER_FILE).is_file():
        return "builtin"
    return "pretrained"
