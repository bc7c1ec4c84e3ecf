"""Evaluation comparable with HRM-Text's: task presets over local files (`tasks`), its scorers
(`scorers`, `drop`), the runner that generates and scores (`runner`), and the log-likelihood of
continuations (`likelihood`, for lm-eval). Between `model` and `train`: training evaluates with it.
"""

from .likelihood import continuation_logprobs
from .runner import format_table, run_tasks, write_samples
from .tasks import PRESETS, Task, parse_task_spec

__all__ = ["PRESETS", "Task", "parse_task_spec", "run_tasks", "format_table", "write_samples",
           "continuation_logprobs"]
