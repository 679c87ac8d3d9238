"""Ray Data's batch formats in and out: pyarrow Table, pandas DataFrame, dict of numpy arrays.

Rows are read as Python values; pass-through columns are carried by the format's own
`take`, so their types survive unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa


def to_columns(batch: Any) -> tuple[str, dict[str, list], int]:
    """(format name, column -> Python values, row count) of a batch.

    Raises:
        ValueError: not one of Ray Data's batch formats.
    """
    if isinstance(batch, pa.Table):
        return "pyarrow", batch.to_pydict(), batch.num_rows
    if _is_pandas(batch):
        return "pandas", {c: [_cell(v) for v in batch[c].tolist()] for c in batch.columns}, len(batch)
    if isinstance(batch, dict):
        columns = {c: [_cell(v) for v in a] for c, a in batch.items()}
        sizes = {len(v) for v in columns.values()}
        if len(sizes) > 1:
            raise ValueError(f"batch columns have different lengths: {sorted(sizes)}")
        return "numpy", columns, sizes.pop() if sizes else 0
    raise ValueError(f"batch must be a pyarrow Table, a pandas DataFrame or a dict of numpy arrays, "
                     f"got {type(batch).__name__}")


def from_columns(batch: Any, fmt: str, take: list[int], drop: set[str], outputs: dict[str, list],
                 schema: pa.Schema) -> Any:
    """The output batch in `fmt`: the input's columns (minus `drop`) at rows `take`, then
    `outputs` typed by `schema`."""
    arrays = {name: pa.array(outputs[name], type=schema.field(name).type) for name in schema.names}
    if fmt == "pyarrow":
        table = batch.drop_columns([c for c in batch.column_names if c in drop or c in arrays])
        if not table.num_columns:  # nothing passes through (e.g. only image and adapter_id): the outputs alone
            return pa.table(arrays)
        table = table.take(pa.array(take, type=pa.int64()))
        for name, array in arrays.items():
            table = table.append_column(name, array)
        return table
    if fmt == "pandas":
        frame = batch.drop(columns=[c for c in batch.columns if c in drop or c in arrays])
        frame = frame.iloc[take].reset_index(drop=True)
        for name, array in arrays.items():
            frame[name] = array.to_pandas(types_mapper=_pandas_type)
        return frame
    out = {c: _array(v)[take] if len(take) else _array(v)[:0] for c, v in batch.items()
           if c not in drop and c not in arrays}
    out.update({name: _numpy(array) for name, array in arrays.items()})
    return out


def _array(values: Any) -> np.ndarray:
    """A pass-through column as numpy: ragged cells (lists of chat turns) as an object array."""
    try:
        return np.asarray(values)
    except ValueError:
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array


def _is_pandas(batch: Any) -> bool:
    """A pandas DataFrame, without importing pandas when it is not loaded."""
    return type(batch).__name__ == "DataFrame" and hasattr(batch, "iloc")


def _python(value: Any) -> Any:
    """A numpy scalar or array as a plain Python value."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _cell(value: Any) -> Any:
    """One input cell as a plain Python value; pandas' missing markers (NaN, pd.NA, NaT: what
    pandas holds for a null string, number or list) become None, as pyarrow's nulls do."""
    value = _python(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    return None if type(value).__name__ in ("NAType", "NaTType") else value


def _pandas_type(arrow_type: pa.DataType):
    """Nullable pandas dtypes for integer columns; the default (object/float) otherwise."""
    import pandas as pd

    return pd.Int64Dtype() if pa.types.is_integer(arrow_type) else None


def _numpy(array: pa.Array) -> np.ndarray:
    """An output column as numpy: a plain array when it has no nulls, else objects."""
    if pa.types.is_list(array.type):
        out = np.empty(len(array), dtype=object)
        out[:] = [None if v is None else np.asarray(v, dtype=np.float32) for v in array.to_pylist()]
        return out
    if array.null_count == 0 and not pa.types.is_string(array.type):
        return array.to_numpy(zero_copy_only=False)
    return np.asarray(array.to_pylist(), dtype=object)
