"""Write stage: Parquet files into the output folder (local path or any pyarrow URI).

The output is committed the way Hadoop and Spark jobs commit theirs, so a reader can always
tell a complete output from an incomplete one:
- the job writes its Parquet files into `<output>/_temporary/` (readers skip names that
  start with `_` or `.`: pyarrow, pandas, Spark and Ray Data all do);
- once every file is written, it moves them into `<output>/` and writes `<output>/_SUCCESS`
  (the job's summary as JSON) last.
A folder without `_SUCCESS` is incomplete, whatever files it holds.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.paths import Location

logger = logging.getLogger(__name__)
STAGING = "_temporary"
MARKER = "_SUCCESS"
PROBE_BYTES = 64 * 1024  # enough to hit a full disk, not just a free inode


class OutputWriteError(RuntimeError):
    """Writing the output failed mid-run (full disk, lost permissions); one line names the path."""


@dataclass
class Output:
    """The job's output folder and where its files are staged."""

    location: Location

    @property
    def uri(self) -> str:
        return self.location.uri

    @property
    def staging(self) -> Location:
        return self.location.child(STAGING)

    @property
    def marker(self) -> Location:
        return self.location.child(MARKER)


def check_output(uri: str, overwrite: bool) -> Output:
    """Up-front checks of the output folder; deletes nothing (see `clear_output`).

    Refuses a file, a folder that holds anything unless `overwrite` (saying whether it holds
    a complete or an incomplete earlier run; a job that resumes passes True and decides with
    `refuse_non_empty`), and a folder that cannot be written: a probe file is created (the
    folder too, if new) and removed.

    Raises:
        ValueError: one line naming the output and what to do.
    """
    output = Output(Location.parse(uri))
    fs, path = output.location.fs, output.location.path
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            raise ValueError(f"output {uri!r} is a file; pass a folder")
        if info.type == pafs.FileType.Directory and not overwrite:
            refuse_non_empty(output)
        _probe(output)
    except OSError as e:
        raise ValueError(f"cannot write to output {uri!r}: {_reason(e)}; pass a writable folder") from e
    return output


def refuse_non_empty(output: Output) -> None:
    """Raise if the folder holds anything, describing what an earlier run left there."""
    fs = output.location.fs
    entries = fs.get_file_info(pafs.FileSelector(output.location.path, allow_not_found=True))
    if not entries:
        return
    names = sorted(e.base_name for e in entries)
    if MARKER in names:
        found = f"the complete output of an earlier run ({MARKER} is there)"
    elif STAGING in names or any(n.endswith(".parquet") for n in names):
        found = f"an incomplete earlier run (no {MARKER} marker; {len(names)} entries, e.g. {names[0]!r})"
    else:
        found = f"{len(names)} entries, e.g. {names[0]!r}"
    raise ValueError(f"output folder {output.uri!r} is not empty: it holds {found}; pass a new folder, or "
                     "--overwrite to delete its contents")


def _probe(output: Output) -> None:
    """Write and remove a probe file, creating the folder for it and removing the folder
    again if it was new, so that a refused job leaves nothing behind (raises OSError)."""
    fs, path = output.location.fs, output.location.path
    new = fs.get_file_info(path).type == pafs.FileType.NotFound
    fs.create_dir(path, recursive=True)
    probe = output.location.child(f".switchyard-probe-{uuid.uuid4().hex}").path
    try:
        with fs.open_output_stream(probe) as stream:
            stream.write(b"\0" * PROBE_BYTES)
    finally:
        if fs.get_file_info(probe).type == pafs.FileType.File:
            fs.delete_file(probe)
        if new:
            fs.delete_dir(path)


def _reason(error: OSError) -> str:
    """What an OSError says, in a few words ("No space left on device")."""
    if error.errno:
        return os.strerror(error.errno)
    lines = str(error).split(". Detail:")[0].strip().splitlines()
    return lines[-1] if lines else type(error).__name__


def clear_output(output: Output) -> None:
    """Empty the output folder (`--overwrite`); call only after every up-front check passed."""
    try:
        output.location.fs.delete_dir_contents(output.location.path, missing_dir_ok=True)
    except OSError as e:
        raise ValueError(f"cannot empty output {output.uri!r}: {_reason(e)}") from e


def write_output(dataset, output: Output) -> None:
    """Write the dataset's blocks as Parquet files into the staging folder.

    Raises:
        OutputWriteError: a write failed (e.g. the disk is full); staged files are removed.
    """
    try:
        dataset.write_parquet(output.staging.uri)
    except Exception as e:  # noqa: BLE001 - Ray wraps the writer's OSError in its own error types
        cause = os_error(e)
        if cause is None:
            raise
        _remove_staging(output)
        raise OutputWriteError(f"writing output {output.uri!r} failed: {_reason(cause)}; nothing was committed "
                               "(no _SUCCESS): fix the storage and run the job again") from e


def write_empty(output: Output, schema: pa.Schema) -> None:
    """Stage one Parquet file with no rows and the output's schema (a zero-row input)."""
    path = output.staging.child("part-00000.parquet").path
    output.location.fs.create_dir(output.staging.path, recursive=True)
    with output.location.fs.open_output_stream(path) as stream:
        pq.write_table(schema.empty_table(), stream)


def unpublish_files(output: Output) -> int:
    """Move Parquet files a killed job had already published back into staging (a job that
    died while publishing resumes from its staging folder); returns how many moved."""
    fs = output.location.fs
    moved = 0
    for info in fs.get_file_info(pafs.FileSelector(output.location.path, allow_not_found=True)):
        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet"):
            fs.create_dir(output.staging.path, recursive=True)
            fs.move(info.path, output.staging.child(info.base_name).path)
            moved += 1
    return moved


def publish_files(output: Output) -> None:
    """Move the staged Parquet files into the output folder (readers see them from now on).

    Raises:
        OutputWriteError: a move failed (the output stays without `_SUCCESS`).
    """
    fs = output.location.fs
    try:
        staged = fs.get_file_info(pafs.FileSelector(output.staging.path, allow_not_found=True, recursive=True))
        for info in staged:
            if info.type == pafs.FileType.File:
                fs.move(info.path, output.location.child(info.base_name).path)
        fs.delete_dir(output.staging.path)
    except OSError as e:
        raise _incomplete(output, e) from e


def mark_complete(output: Output, summary: dict) -> None:
    """Write `_SUCCESS` holding `summary` as JSON: the last write of a finished job.

    Raises:
        OutputWriteError: the marker could not be written.
    """
    try:
        with output.location.fs.open_output_stream(output.marker.path) as stream:
            stream.write((json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
    except OSError as e:
        raise _incomplete(output, e) from e


def _incomplete(output: Output, error: OSError) -> OutputWriteError:
    """The error of a commit step that failed."""
    return OutputWriteError(f"committing output {output.uri!r} failed: {_reason(error)}; it has no {MARKER} and "
                            "is incomplete: fix the storage and run the job again")


def _remove_staging(output: Output) -> None:
    """Best effort: delete the staging folder after a failed write."""
    try:
        output.location.fs.delete_dir(output.staging.path)
    except OSError as e:
        logger.warning("could not remove %s: %s", output.staging.uri, e)


def os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind `error`: Ray re-raises a task's exception as a type that is both a
    RayTaskError and the original class, keeping the original in `.cause`."""
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError):
            found = error
            if error.errno:
                return error
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return found
