"""Tasks: `Task` and `Example` (base), the built-in suites (builtin; instruct, for a real
chat model), the general-ability probe and prose (general), task directories in the
TRACE-benchmark layout (files)."""

from .base import SCORERS, Example, Task
from .builtin import (BASE, BASE_OPS, DEFAULT_ORDER, FORMATS, SKILLS, SUITES, builtin_suite,
                      builtin_task)
from .files import TaskFormatError, load_task_dir, read_examples, resolve_tasks

__all__ = ["SCORERS", "Example", "Task", "BASE", "BASE_OPS", "DEFAULT_ORDER", "FORMATS", "SKILLS", "SUITES",
           "builtin_suite", "builtin_task", "TaskFormatError", "load_task_dir", "read_examples",
           "resolve_tasks"]
