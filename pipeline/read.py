"""Read stage: the input Parquet as a Ray Dataset, split so that every actor gets work."""

from __future__ import annotations

import pyarrow.dataset as pads


def open_input(uri: str) -> pads.Dataset:
    """The input as a pyarrow dataset (schema and row count without reading the data).

    Raises:
        ValueError: missing or unreadable input, with the path.
    """
    try:
        dataset = pads.dataset(uri, format="parquet")
        dataset.schema  # noqa: B018 - forces the footer read
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read input {uri!r} as Parquet: {e}") from e
    if not dataset.files:
        raise ValueError(f"input {uri!r} holds no Parquet files")
    return dataset


def read_input(uri: str, files: int, min_blocks: int):
    """A Ray Dataset over `uri`; a few files are re-split into `min_blocks` blocks (one small
    Parquet file is one block: a single actor would do all the work)."""
    import ray

    dataset = ray.data.read_parquet(uri)
    if files < min_blocks:
        dataset = dataset.repartition(min_blocks)
    return dataset
