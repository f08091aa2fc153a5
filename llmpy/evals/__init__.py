"""Zero-shot multiple-choice evaluation (HellaSwag, ARC-Easy/Challenge, PIQA, WinoGrande, OpenBookQA): tasks.py
fetches and parses the task files, scoring.py scores them with llmpy's own models on any backend."""
from .scoring import Scorer, evaluate, format_table
from .tasks import TASKS, Example, check_tasks, load_task

__all__ = ["TASKS", "Example", "Scorer", "check_tasks", "evaluate", "format_table", "load_task"]
