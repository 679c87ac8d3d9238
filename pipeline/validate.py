"""Validate stage: everything that can be checked before any model work. Each check raises
ValueError with one line that says what is wrong and what to do."""

from __future__ import annotations

import pyarrow as pa

from actors.config import INPUT_COLUMNS, check_model_dir
from actors.store import AdapterStore
from pipeline.config import JobConfig


def required_columns(task: str) -> list[str]:
    """The columns the task reads (besides the optional adapter columns)."""
    return [INPUT_COLUMNS[task]]


def validate_job(config: JobConfig, schema: pa.Schema) -> list[str]:
    """Check the model folder, adapter store and input schema; returns the adapter ids.

    Raises:
        ValueError: the first problem found.
    """
    check_model_dir(config.model)
    adapter_ids = AdapterStore(config.adapters).ids() if config.adapters else []
    validate_columns(config.task, schema)
    return adapter_ids


def validate_columns(task: str, schema: pa.Schema) -> None:
    """The input has the task's columns and at most one adapter column of the right type."""
    names = set(schema.names)
    missing = [c for c in required_columns(task) if c not in names]
    if missing:
        raise ValueError(f"input has no {', '.join(repr(c) for c in missing)} column, which task {task!r} reads "
                         f"(columns: {', '.join(sorted(names))})")
    if "adapter_id" in names and "adapter_ids" in names:
        raise ValueError("input has both 'adapter_id' and 'adapter_ids' columns; keep one of them")
    if "adapter_ids" in names and not pa.types.is_list(schema.field("adapter_ids").type) \
            and not pa.types.is_large_list(schema.field("adapter_ids").type):
        raise ValueError(f"column 'adapter_ids' must be a list of strings, not {schema.field('adapter_ids').type}")
