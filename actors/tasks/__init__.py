"""Tasks: how rows become model inputs and model outputs become columns."""

from __future__ import annotations

from actors.tasks.base import ERROR_KINDS, Encoded, RowError, Task
from actors.tasks.generate import GenerateTask
from actors.tasks.image import ClassifyImageTask
from actors.tasks.text import ClassifyTask, EmbedTask

TASK_CLASSES: dict[str, type[Task]] = {
    t.name: t for t in (GenerateTask, ClassifyTask, EmbedTask, ClassifyImageTask)
}

__all__ = ["ERROR_KINDS", "Encoded", "RowError", "Task", "TASK_CLASSES"]
