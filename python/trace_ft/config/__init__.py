"""Run settings: `RunConfig` (every setting of `trace-ft run`, and of `adapt`, `frontier` and
`eval` where they apply) with each strategy's section (`sections`), the defaults unset
settings take by kind of model (`defaults`), the command-line flags (`flags`) and the one
builder of what a run works on (`setup.RunSetup`). The commands are siblings over this package."""

from .defaults import DEFAULTS, ModelDefaults, model_kind
from .flags import ADAPT_SKIPS, RUN_FLAGS, add_settings, config_from_args
from .run_config import DEFAULT_STRATEGIES, DTYPES, RunConfig, default_threads, load_config_file
from .sections import EWCSettings, LoRASettings, ReplaySettings, SweepSettings, TraceSettings
from .setup import RunSetup, general_tasks

__all__ = ["DEFAULTS", "ModelDefaults", "model_kind", "ADAPT_SKIPS", "RUN_FLAGS", "add_settings",
           "config_from_args", "DEFAULT_STRATEGIES", "DTYPES", "RunConfig", "default_threads", "load_config_file",
           "EWCSettings", "LoRASettings", "ReplaySettings", "SweepSettings", "TraceSettings", "RunSetup",
           "general_tasks"]
