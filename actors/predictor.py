"""Predictor: the class the Ray Data actors and the Serve replicas hold. No Ray imports.

`Predictor(model=DIR, adapters=DIR, task=TASK, **options)(batch)` runs a batch in any of
Ray Data's formats; each row goes through its own adapter (`adapter_id`), or through
several (`adapter_ids`: one output row each), in shared model calls.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from actors.batches import from_columns, to_columns
from actors.config import (ADAPTER_ID, ADAPTER_IDS, ADAPTER_VERSION, ERROR, PredictorConfig, added_columns,
                           dropped_columns, fan_out_adapters)
from actors.runtime import AdapterRuntime, UnknownAdapterError
from actors.store import AdapterStore, parse_lora_modules
from actors.tasks import TASK_CLASSES, Encoded, RowError

logger = logging.getLogger(__name__)
# Options that only steer generation or batching: a `with_options` view can change them.
SHAREABLE_OPTIONS = ("max_new_tokens", "temperature", "top_p", "seed", "stop", "max_batch_rows")


@dataclass
class _Row:
    """One output row in the making."""

    source: int  # index of its input row
    adapter: Any  # the adapter id as given (None / "" for base rows)
    encoded: Encoded | None = None
    outputs: dict | None = None
    error: str | None = None
    version: str | None = None  # content hash of the adapter files it ran through

    @property
    def adapter_key(self) -> Any:
        """The adapter to route through, None for base rows (null or empty id)."""
        return None if self.adapter is None or self.adapter == "" else self.adapter


class Predictor:
    """One base model with every adapter of a store attached, running mixed batches.

    Args:
        model: local Hugging Face model folder.
        adapters: adapter store folder (sub-folders are PEFT adapters), or None.
        task: generate, classify, embed or classify-image.
        **options: the remaining fields of `PredictorConfig` (device, dtype, ...).

    Raises:
        ValueError: bad options, a bad model folder, or an adapter that cannot be routed
            (the message names it).
        RuntimeError: the start-up canary found mixed batches disagreeing with single-adapter runs.
    """

    def __init__(self, model: str, adapters: str | None = None, task: str = "generate", **options: Any) -> None:
        started = time.perf_counter()
        self.config = PredictorConfig(model=model, adapters=adapters, task=task, **options)
        if self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        self.device = resolve_device(self.config.device)
        hf_model, processor, self._untrained = load_model(self.config, self.device)
        self.task = TASK_CLASSES[task](hf_model, processor, self.config)
        store = AdapterStore(adapters, parse_lora_modules(self.config.lora_modules))
        self.runtime = AdapterRuntime(hf_model, store, self.config.max_loaded_adapters,
                                      self.config.adapter_cache_mb * 2**20)
        self._base_error = self._check_untrained(self.runtime.adapter_ids)
        if self.config.canary:
            from actors.canary import check_routing

            check_routing(self)
        logger.info("Predictor ready in %.1fs: task %s, %d adapters, device %s", time.perf_counter() - started,
                    task, len(self.runtime.adapter_ids), self.device)

    @property
    def adapter_ids(self) -> list[str]:
        """Every adapter id of the store."""
        return list(self.runtime.adapter_ids)

    def load_adapter(self, adapter_id: str) -> None:
        """Register an adapter that was added to the store after start-up.

        Raises:
            KeyError: no adapter folder `adapter_id` inside the store.
            ValueError: the adapter cannot be routed (the message says why), or it failed the
                routing canary (then it is not kept).
        """
        self.runtime.add(adapter_id, publish=False)
        try:
            self._check_untrained([adapter_id])
        except ValueError:
            self.runtime.remove(adapter_id)
            raise
        if not self.config.canary:
            self.runtime.publish(adapter_id)
            return
        from actors.canary import check_routing

        try:
            check_routing(self, [adapter_id])
        except RuntimeError as e:
            self.runtime.remove(adapter_id)
            raise ValueError(str(e)) from e
        self.runtime.publish(adapter_id)  # only now can rows name it

    def _check_untrained(self, adapter_ids: list[str]) -> str | None:
        """Refuse weights the model folder lacks (transformers initialises them randomly),
        unless each of `adapter_ids` carries its own copy of the modules holding them.

        Returns:
            None when the folder has every weight; else the error for base rows, which
            would run the random weights.

        Raises:
            ValueError: naming the weights, and the adapters without their own copy.
        """
        if not self._untrained:
            return None
        n = len(self._untrained)
        names = ", ".join(self._untrained[:4]) + (f" and {n - 4} more" if n > 4 else "")
        auto = TASK_CLASSES[self.config.task].auto_class
        lacking = [a for a in adapter_ids if not _supplies(self.runtime.heads_of(a), self._untrained)]
        if lacking or not self.runtime.adapter_ids:
            who = (f"; adapter(s) {', '.join(repr(a) for a in lacking[:3])} carry no copy of their own "
                   "(modules_to_save)" if lacking else "")
            raise ValueError(f"the model folder {self.config.model!r} has no trained weights for {names}: {auto} "
                             f"initialises them randomly, so rows would be silently wrong{who}. Use the folder saved "
                             f"for task {self.config.task!r} (with its head), the --task the folder was saved for, or "
                             "adapters that each save those modules")
        return (f"base rows would run the randomly initialised {names} (the model folder has no trained weights for "
                "them); name one of the store's adapters, each of which carries its own")

    def unload_adapter(self, adapter_id: str) -> None:
        """Forget an adapter; its rows get `unknown_adapter` afterwards.

        Raises:
            KeyError: not a loaded adapter.
        """
        self.runtime.remove(adapter_id)

    def with_options(self, **options: Any) -> Predictor:
        """A Predictor sharing this one's model and adapters, with other generation options.

        Serve uses it for requests whose top_p, seed or stop differ from the server's.

        Args:
            **options: new values among `SHAREABLE_OPTIONS` (validated like the constructor's).

        Raises:
            ValueError: an option that would need another model load, or a bad value.
        """
        fixed = sorted(set(options) - set(SHAREABLE_OPTIONS))
        if fixed:
            raise ValueError(f"options {fixed} change the loaded model; only {list(SHAREABLE_OPTIONS)} can vary")
        view = copy.copy(self)
        view.config = dataclasses.replace(self.config, **options)
        view.task = copy.copy(self.task)
        view.task.config = view.config
        return view

    def __call__(self, batch: Any) -> Any:
        """Run one batch; returns the same format with the task's output columns and `error`.

        Raises:
            ValueError: a malformed batch (no task column, both adapter columns).
        """
        fmt, columns, n = to_columns(batch)
        self._check_columns(columns)
        rows = self._expand(columns, n)
        self._encode(rows, columns)
        self._run(rows)
        return self._output(batch, fmt, rows)

    def fail(self, batch: Any, error: str) -> Any:
        """The output batch of `batch` without running it: every row (each named adapter of a
        fan-out row) gets `error` and null outputs."""
        fmt, columns, n = to_columns(batch)
        rows = self._expand(columns, n)
        for row in rows:
            row.error = error
        return self._output(batch, fmt, rows)

    def _check_columns(self, columns: dict) -> None:
        """Raise for a batch this task cannot read."""
        self.task.column_of(columns)
        if ADAPTER_ID in columns and ADAPTER_IDS in columns:
            raise ValueError(f"batch has both {ADAPTER_ID!r} and {ADAPTER_IDS!r}; use one of them")

    def _expand(self, columns: dict, n: int) -> list[_Row]:
        """One _Row per input row, or per named adapter of a fan-out row."""
        if ADAPTER_IDS in columns:
            return [_Row(i, a) for i, ids in enumerate(columns[ADAPTER_IDS]) for a in fan_out_adapters(_named(ids, i))]
        adapters = columns.get(ADAPTER_ID, [None] * n)
        return [_Row(i, adapters[i]) for i in range(n)]

    def _encode(self, rows: list[_Row], columns: dict) -> None:
        """Check adapters and encode inputs; problems go to the row's error."""
        values = columns[self.task.column_of(columns)]
        params = {p: columns[p] for p in self.task.row_parameters if p in columns}
        for row in rows:
            try:
                row.encoded = self.encode_row(values[row.source], row.adapter_key,
                                              {p: v[row.source] for p, v in params.items()}, row.adapter)
            except RowError as e:
                row.error = str(e)
            except Exception as e:  # noqa: BLE001 - an unexpected encoding failure fails its row only
                _reraise_fatal(e)
                row.error = f"internal: {type(e).__name__}: {e}"

    def encode_row(self, value: Any, adapter: str | None, params: dict, named: Any = None) -> Encoded:
        """One row's model input, checked against its adapter.

        Args:
            value: the row's input (prompt, chat turns, text or image).
            adapter: the adapter to route through (None: the base model).
            params: the row's own parameters (max_new_tokens, temperature).
            named: the adapter id as the row gave it (for the message; default `adapter`).

        Raises:
            RowError: an unknown adapter, base rows the model cannot run, or a bad input.
        """
        if adapter is not None and not self.knows(adapter):
            raise RowError("unknown_adapter", f"adapter {named if named is not None else adapter!r} is not in the "
                           "adapter store")
        if adapter is None and self._base_error:
            raise RowError("unknown_adapter", self._base_error)
        encoded = self.task.encode(value, params)
        if adapter is not None:
            self.task.check_virtual(encoded, self.runtime.virtual_length(adapter))
        return encoded

    def knows(self, adapter: Any) -> bool:
        """Whether `adapter` names an adapter rows can use (no copy of the id list)."""
        return isinstance(adapter, str) and self.runtime.known(adapter)

    def _run(self, rows: list[_Row]) -> None:
        """Run every encoded row in model calls that fit the adapter capacity and batch size.

        Rows of similar lengths go together (less padding). When the rows name more adapters
        than there are slots, each adapter's rows go together instead, adapters already in a
        slot first, so that each adapter is loaded at most once for the whole batch and the
        resident ones run before anything evicts them; the next call's adapters are read
        ahead while a call runs."""
        todo = [r for r in rows if r.error is None]
        adapters = {r.adapter_key for r in todo if r.adapter_key is not None}
        if len(adapters) > self.runtime.capacity:
            resident = set(self.runtime.loaded_ids)
            todo.sort(key=lambda r: (r.adapter_key not in resident, r.adapter_key or "", _length(r)))
        else:
            todo.sort(key=_length)
        groups = _groups(todo, self.runtime.capacity, self.config.max_batch_rows)
        for k, group in enumerate(groups):
            if k + 1 < len(groups):
                self.runtime.prefetch([r.adapter_key for r in groups[k + 1] if r.adapter_key is not None])
            self._run_group(group)

    def _run_group(self, group: list[_Row]) -> None:
        """One model call. If it runs out of memory, the group is split in halves and each
        half runs on its own (a single row that still does not fit fails with `internal`);
        if it fails otherwise, each row runs alone, so a bad row fails by itself."""
        try:
            outputs, versions = self._call_model(group)
        except Exception as e:  # noqa: BLE001 - any model failure becomes the rows' `internal` error
            if is_out_of_memory(e):
                _free_cached_memory(self.device)
                if len(group) > 1:
                    logger.warning("a model call of %d rows ran out of memory; running it in two halves", len(group))
                    half = len(group) // 2
                    self._run_group(group[:half])
                    self._run_group(group[half:])
                    return
                group[0].error = f"internal: out of memory on one row alone: {str(e).splitlines()[0]}"
                return
            _reraise_fatal(e)
            if len(group) > 1:
                for row in group:
                    self._run_group([row])
                return
            if isinstance(e, UnknownAdapterError):  # unloaded between the row's check and its model call
                group[0].error = f"unknown_adapter: adapter {group[0].adapter!r} is not in the adapter store"
                return
            logger.warning("row failed: %s", e)
            group[0].error = f"internal: {type(e).__name__}: {e}"
            return
        for row, out, version in zip(group, outputs, versions):
            row.version = version
            names = self.runtime.labels_of(row.adapter_key) if row.adapter_key is not None else None
            if names and "label_id" in out:  # the adapter was trained on its own label names
                out["label"] = names[out["label_id"]]
            row.outputs = out

    def _call_model(self, group: list[_Row]) -> tuple[list[dict], list[str | None]]:
        """Pin the group's adapters, route each row to its slot and run the task, the rows
        ordered by slot so that each adapter's rows are contiguous (its structured ops then
        work on slices); the outputs, and each row's adapter version, come back in the
        group's order."""
        adapters = [r.adapter_key for r in group if r.adapter_key is not None]
        with self.runtime.acquire(adapters) as slots, torch.inference_mode():
            row_slots = [slots.get(r.adapter_key, 0) for r in group]
            versions = [self.runtime.version_of(s) for s in row_slots]
            order = sorted(range(len(group)), key=row_slots.__getitem__)
            with self.runtime.route([row_slots[i] for i in order]):
                outputs = self.task.run([group[i].encoded for i in order])
        result: list = [None] * len(group)
        for i, out in zip(order, outputs):
            result[i] = out
        return result, versions

    def _output(self, batch: Any, fmt: str, rows: list[_Row]) -> Any:
        """The result batch: pass-through columns, adapter_id, outputs and error."""
        schema = added_columns(self.task.name)
        nulls = self.task.null_outputs()
        outputs = {name: [] for name in schema.names}
        for row in rows:
            adapter = row.adapter if row.adapter is None or isinstance(row.adapter, str) else str(row.adapter)
            values = {**nulls, **(row.outputs or {}), ADAPTER_ID: adapter, ADAPTER_VERSION: row.version,
                      ERROR: row.error}
            for name in schema.names:
                outputs[name].append(values[name])
        return from_columns(batch, fmt, [r.source for r in rows], dropped_columns(self.task.name), outputs, schema)


def _named(ids: Any, row: int) -> list:
    """The adapters one `adapter_ids` cell names (null: none). A bare string would fan out
    into one row per character, so it is a malformed batch."""
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{ADAPTER_IDS!r} must hold lists of adapter ids, but row {row} holds the string {ids!r}; "
                         f"use {ADAPTER_ID!r} for one adapter per row")
    return list(ids or ())


def _length(row: _Row) -> int:
    """Token count of a text row (0 for images)."""
    inputs = row.encoded.inputs
    return len(inputs) if isinstance(inputs, list) else 0


def _groups(rows: list, capacity: int, max_rows: int) -> list[list]:
    """Split rows into model calls of at most `max_rows` rows and `capacity` distinct adapters."""
    groups, current, adapters = [], [], set()
    for row in rows:
        key = row.adapter_key
        new = key is not None and key not in adapters
        if current and (len(current) >= max_rows or (new and len(adapters) >= capacity)):
            groups.append(current)
            current, adapters = [], set()
        current.append(row)
        if key is not None:
            adapters.add(key)
    if current:
        groups.append(current)
    return groups


def is_out_of_memory(error: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, Python's MemoryError, or the CPU
    allocator's RuntimeError."""
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def _free_cached_memory(device: torch.device) -> None:
    """Give the allocator's cached blocks back before a smaller retry."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _reraise_fatal(error: Exception) -> None:
    """Device failures end the actor: they are not a row's problem."""
    if isinstance(error, RuntimeError) and ("CUDA error" in str(error) or "device-side" in str(error)):
        raise error


def resolve_device(device: str) -> torch.device:
    """`auto` is cuda when a GPU is visible, else cpu; `cuda` without one is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device ({device!r}) asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(device)


def load_model(config: PredictorConfig, device: torch.device) -> tuple[torch.nn.Module, Any, list[str]]:
    """The task's Auto model class and tokenizer or image processor, from a local folder,
    and the names of the weights the folder lacks (missing or of another shape), which
    transformers initialised randomly."""
    import transformers

    task_class = TASK_CLASSES[config.task]
    dtype = getattr(torch, config.dtype)
    auto = getattr(transformers, task_class.auto_class)
    processor_class = transformers.AutoImageProcessor if config.task == "classify-image" else transformers.AutoTokenizer
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar from every actor and replica
    try:
        model, info = auto.from_pretrained(config.model, dtype=dtype, trust_remote_code=False, local_files_only=True,
                                           use_safetensors=True, output_loading_info=True)
        processor = processor_class.from_pretrained(config.model, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load model folder {config.model!r} as {task_class.auto_class} for task "
                         f"{config.task!r}: {e}") from e
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    for p in model.parameters():
        p.requires_grad_(False)
    untrained = sorted({*info.get("missing_keys", ()), *(m[0] for m in info.get("mismatched_keys", ()))})
    return model.to(device).eval(), processor, untrained


def _supplies(heads: frozenset[str], weights: list[str]) -> bool:
    """Whether whole-module copies `heads` hold every one of `weights` (dotted names)."""
    return all(any(w.startswith(f"{h}.") for h in heads) for w in weights)
