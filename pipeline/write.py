"""Write stage: Parquet files into the output folder (local path or any pyarrow URI)."""

from __future__ import annotations

import pyarrow.fs as pafs


def prepare_output(uri: str, overwrite: bool) -> None:
    """Refuse a non-empty output folder unless `overwrite` (then empty it).

    Raises:
        ValueError: the folder holds files and `overwrite` is off, or it cannot be used.
    """
    try:
        fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            raise ValueError(f"output {uri!r} is a file; pass a folder")
        if info.type == pafs.FileType.Directory and fs.get_file_info(pafs.FileSelector(path)):
            if not overwrite:
                raise ValueError(f"output folder {uri!r} is not empty; pass a new folder or --overwrite")
            fs.delete_dir_contents(path)
    except OSError as e:
        raise ValueError(f"cannot use output {uri!r}: {e}") from e


def write_output(dataset, uri: str) -> None:
    """Write the dataset's blocks as Parquet files into `uri`."""
    dataset.write_parquet(uri)
