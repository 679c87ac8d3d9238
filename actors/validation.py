"""Validate a whole adapter store before any model work (the job's driver, `jobs/serve.py`).

Every adapter goes through `read_adapter`, the same function the Predictor runs in each
actor and replica, against a copy of the base model built on the meta device from its
`config.json`: module names and shapes without reading the model's weights. A thousand small
adapters take about 3 s (about 2 s with `values=False`, which reads only the safetensors
headers; `bench/validate_store.py`). They are read one after another: the work is Python
(config parsing, target matching), and reader threads made it slower on a local disk (1000
adapters: 2.95 s in one thread, 3.96 s with 2, 4.95 s with 4).
"""

from __future__ import annotations

import logging
import time

from actors.adapters import AdapterError, BaseTree, read_adapter
from actors.store import AdapterStore

logger = logging.getLogger(__name__)


def meta_base(model: str, task: str) -> BaseTree:
    """The task's model class built from `model`'s config.json on the meta device.

    Args:
        model: the local model folder.
        task: the task (decides the Auto class, so task heads are there).

    Returns:
        The base tree (modules with shapes, no weights).

    Raises:
        ValueError: the config cannot be built into the task's model class.
    """
    import torch
    import transformers

    from actors.tasks import TASK_CLASSES

    auto = getattr(transformers, TASK_CLASSES[task].auto_class)
    try:
        config = transformers.AutoConfig.from_pretrained(model, trust_remote_code=False, local_files_only=True)
        with torch.device("meta"):
            skeleton = auto.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot build model folder {model!r} as {TASK_CLASSES[task].auto_class} for task "
                         f"{task!r}: {e}") from e
    return BaseTree(skeleton)


def validate_store(model: str, adapters: str | None, task: str, values: bool = True,
                   modules: dict[str, str] | None = None) -> list[str]:
    """Check every adapter of the store against the base model, as the actors will.

    Args:
        model: the local model folder.
        adapters: the adapter store (None: none).
        task: the task.
        values: also read every tensor's values (finite checks); False reads headers only.

    Returns:
        The adapter ids.

    Raises:
        ValueError: one line: the first bad adapter (in id order), what is wrong and what to
            do, and how many others fail too.
    """
    store = AdapterStore(adapters, modules)
    ids = store.ids()
    if not ids:
        return ids
    started = time.perf_counter()
    base = meta_base(model, task)
    problems = [p for p in (_problem(store, a, base, values) for a in ids) if p]
    if problems:
        others = f" ({len(problems) - 1} more adapters fail too)" if len(problems) > 1 else ""
        raise ValueError(f"{problems[0]}{others}")
    logger.debug("validated %d adapters in %.1f s (%s)", len(ids), time.perf_counter() - started,
                "values read" if values else "headers only")
    return ids


def _problem(store: AdapterStore, adapter_id: str, base: BaseTree, values: bool) -> str | None:
    """Why adapter `adapter_id` would be refused, or None."""
    try:
        read_adapter(store.path(adapter_id), adapter_id, base, values=values)
    except AdapterError as e:
        return str(e)
    except KeyError:
        return f"adapter {adapter_id!r} cannot be resolved inside the store {str(store.root)!r}"
    return None
