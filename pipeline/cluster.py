"""Adapter-aware blocks: when the store holds more adapters than an actor keeps in slots,
rows are sorted by adapter before the actor pool, so that each actor batch names few
adapters and each adapter is loaded into a slot a few times in the whole job instead of in
nearly every batch.

Fan-out rows (`adapter_ids` lists) are expanded first into one row per adapter, as the
Predictor would expand them (base entries as null), so a fan-out row's adapters can land in
different batches. Ray Data's sort is an all-to-all exchange: every input row is read, and
held in Ray's object store (spilled to disk past its size) before the first batch reaches an
actor, so output files appear only after the whole input is read. `--cluster-by-adapter off`
keeps the streaming order.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from actors.config import ADAPTER_ID, ADAPTER_IDS, fan_out_adapters

KEY = "__switchyard_adapter"  # the sort key: the adapter id, "" for the base model
MODES = ("auto", "on", "off")
ROWS_PER_ADAPTER = 16  # `auto` sorts inputs with at least this many rows per adapter on average


def wanted(mode: str, adapters: int, slots: int | None, schema: pa.Schema, rows: int, gpus: float) -> bool:
    """Whether the job clusters its rows: `on`; or `auto` when the input names adapters, the
    store holds more than `slots` (`--max-loaded-adapters`; None: all fit), the input has at
    least ROWS_PER_ADAPTER rows per adapter (below that, sorted batches still name many
    adapters and the sort's fixed cost is not won back), and the actors run on GPUs (`gpus`
    per actor > 0), where a model call split into a few rows per adapter costs about as much
    as a full one. On CPU actors a split call costs in proportion to its rows: measured on
    `bench/many_adapters.py`, sorting did not pay there, so `auto` leaves CPU jobs streaming."""
    if ADAPTER_ID not in schema.names and ADAPTER_IDS not in schema.names:
        return False
    if mode == "auto":
        return slots is not None and adapters > slots and rows >= ROWS_PER_ADAPTER * adapters and gpus > 0
    return mode == "on"


def by_adapter(dataset, blocks: int):
    """`dataset` with fan-out rows expanded and every row sorted by adapter, in about
    `blocks` blocks (the sort's own blocks can be one large block, which one actor would run
    alone, or many tiny ones; merging or splitting neighbours keeps the order)."""
    expanded = dataset.map_batches(expand, batch_format="pyarrow", zero_copy_batch=True)
    return expanded.sort(KEY).repartition(blocks, shuffle=False).drop_columns([KEY])


def expand(batch: pa.Table) -> pa.Table:
    """One row per adapter of each `adapter_ids` cell (as the Predictor expands them), and
    the sort key column.

    Raises:
        ValueError: an `adapter_ids` cell holding a string, not a list (as the Predictor).
    """
    if ADAPTER_IDS in batch.column_names:
        index, adapters = [], []
        for i, cell in enumerate(batch.column(ADAPTER_IDS).to_pylist()):
            if isinstance(cell, (str, bytes)):
                raise ValueError(f"{ADAPTER_IDS!r} must hold lists of adapter ids, but a row holds the string "
                                 f"{cell!r}; use {ADAPTER_ID!r} for one adapter per row")
            for adapter in fan_out_adapters(cell):
                index.append(i)
                adapters.append(adapter)
        batch = batch.take(pa.array(index, pa.int64())).drop_columns([ADAPTER_IDS])
        batch = batch.append_column(ADAPTER_ID, pa.array(adapters, pa.string()))
    key = pc.fill_null(batch.column(ADAPTER_ID).cast(pa.string()), "")
    return batch.append_column(KEY, key)
