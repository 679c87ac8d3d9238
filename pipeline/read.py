"""Read stage: the input Parquet as a Ray Dataset, split so that every actor gets work.

Before Ray starts, every input file's footer is read (in parallel: one small read per file),
so a corrupt file or two files that disagree on a column's type are named up front.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

FOOTER_READERS = 16


@dataclass
class InputFiles:
    """The input's files, their common schema and their total row count (from the footers)."""

    uri: str
    files: list[str]
    schema: pa.Schema
    rows: int
    file_schemas: list[pa.Schema]


def open_input(uri: str) -> InputFiles:
    """Discover the input's Parquet files and read every footer.

    Raises:
        ValueError: missing or unreadable input, a corrupt file (named), or files whose
            columns disagree in type (both named).
    """
    try:
        dataset = pads.dataset(uri, format="parquet", exclude_invalid_files=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read input {uri!r} as Parquet: {e}") from e
    files = sorted(dataset.files)
    if not files:
        raise ValueError(f"input {uri!r} holds no Parquet files")
    with ThreadPoolExecutor(max_workers=min(FOOTER_READERS, len(files))) as pool:
        footers = list(pool.map(lambda f: _footer(dataset.filesystem, f, uri), files))
    schemas = [f.schema.to_arrow_schema() for f in footers]
    return InputFiles(uri, files, _common_schema(files, schemas), sum(f.num_rows for f in footers), schemas)


def _footer(filesystem, path: str, uri: str) -> pq.FileMetaData:
    """One file's Parquet footer, naming the file if it cannot be read."""
    try:
        with filesystem.open_input_file(path) as handle:
            return pq.read_metadata(handle)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read input {uri!r}: file {path!r} is not valid Parquet ({e}); remove or "
                         "replace it") from e


def _common_schema(files: list[str], schemas: list[pa.Schema]) -> pa.Schema:
    """The first file's schema, after checking that no file gives a column another type."""
    seen: dict[str, tuple[pa.DataType, str]] = {}
    for path, schema in zip(files, schemas):
        for column in schema:
            first = seen.setdefault(column.name, (column.type, path))
            if first[0] != column.type:
                raise ValueError(f"input files disagree on column {column.name!r}: {first[1]!r} has {first[0]}, "
                                 f"{path!r} has {column.type}; write them with one schema")
    return schemas[0]


def read_input(uri: str, rows_per_block: int, renames: dict[str, str] | None = None, limit: int | None = None,
               keep=None):
    """A Ray Dataset over `uri`: the rows `keep` (a function of the read dataset, if given)
    keeps, its first `limit` rows if given, columns renamed by `renames` (old -> new), in
    blocks of `rows_per_block` rows (streamed: Ray Data would merge small files into one
    block, so one actor would do all the work and the only output file would be written at
    the very end)."""
    import ray

    dataset = ray.data.read_parquet(uri)
    if keep is not None:
        dataset = keep(dataset)
    if limit is not None:
        dataset = dataset.limit(limit)
    if renames:
        dataset = dataset.rename_columns(renames)
    return dataset.repartition(target_num_rows_per_block=rows_per_block)


def block_rows(rows: int, min_blocks: int, largest: int) -> int:
    """Rows per block: enough blocks for every actor (`min_blocks`), none over `largest` rows
    (so the output reaches storage as the job goes), at least one row."""
    return max(1, min(largest, -(-rows // max(1, min_blocks))))
