"""Resume (`--checkpoint-dir URI --id-column COL`): a job that died is run again with the same
command; it keeps what was written and writes only the rest, every expected row exactly once.

How, on top of Ray Data's checkpointing (`ray.data.checkpoint.CheckpointConfig`):
- Ray Data's two-phase commit guards each write task: a pending id file is written before
  the task's Parquet file (into the output's `_temporary/`) and renamed once it is written.
  A run that starts over first deletes the Parquet files of every task that never committed
  (`load_checkpoint` of Ray's checkpoint manager), so every staged file left is whole.
- Ray Data then filters input rows by id. It would count an id as done once any of its rows
  is committed, but the fan-out rows of one input row can land in different write tasks, so
  a crash between their commits would lose the uncommitted ones. Switchyard instead reads
  the done rows, (id, adapter_id) pairs, from the staged files themselves and filters right
  after the read: a fan-out row keeps only the adapters whose rows are not written yet.
- At the end, before the output is published, every expected row (one per input id; per
  (id, adapter) for fan-out rows) is counted in the staged files: copies a replayed task
  wrote twice are dropped, and a missing row stops the job without `_SUCCESS`.

The checkpoint folder holds `switchyard-checkpoint.json` (what the job was: a rerun with
other options is refused) and Ray's id files under `ray/` (deleted when the job succeeds).
"""

from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from actors.config import fan_out_adapters
from pipeline.config import JobConfig
from pipeline.paths import Location, check_not_overlapping
from pipeline.read import InputFiles
from pipeline.write import Output, OutputWriteError

logger = logging.getLogger(__name__)
MANIFEST = "switchyard-checkpoint.json"
RAY_FOLDER = "ray"
# JobConfig fields that only tune how the job runs: a resumed run may change them.
TUNING = ("batch_size", "concurrency", "num_cpus", "num_gpus", "num_threads", "progress_seconds", "rows_per_block",
          "overwrite", "quick_adapter_check", "checkpoint_dir", "cluster_by_adapter",
          "allocator")
TUNING_OPTIONS = ("device", "max_loaded_adapters", "adapter_cache_mb", "max_batch_rows", "canary")


@dataclass
class Checkpoint:
    """Where a resumable job keeps its state, and how its input rows are keyed.

    Args:
        location: the checkpoint folder.
        id_column: the input column with a unique id per row.
        adapter_column: the input's own name of its adapter column, or None.
        fan_out: whether that column is a list (`adapter_ids`: one output row per adapter).
        manifest: what the job is (compared with an earlier run's).
        resumed: an earlier run of this job left its state here.
        complete: that earlier run finished (its output has `_SUCCESS`).
    """

    location: Location
    id_column: str
    adapter_column: str | None
    fan_out: bool
    manifest: dict
    resumed: bool = False
    complete: bool = False

    @property
    def ray_location(self) -> Location:
        return self.location.child(RAY_FOLDER)

    def ray_config(self):
        """Ray Data's CheckpointConfig for the write (rows are filtered by `filter_done`)."""
        from ray.data.checkpoint import CheckpointConfig

        from pipeline.ray_checkpoint import SwitchyardCheckpointManager

        return CheckpointConfig(id_column=self.id_column, checkpoint_path=self.ray_location.uri,
                                delete_checkpoint_on_success=False, checkpoint_manager_cls=SwitchyardCheckpointManager)


@dataclass
class Done:
    """The output rows an earlier run of the job staged: sorted ids (one per row) and, aligned
    with them, each row's adapter; and the staged files they were read from."""

    ids: np.ndarray
    adapters: list
    files: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.ids)


def check_checkpoint(config: JobConfig, input_files: InputFiles, output: Output,
                     renames: dict[str, str]) -> Checkpoint | None:
    """Up-front checks of `--checkpoint-dir` and `--id-column` (None without them).

    Refuses: one flag without the other, `--limit` (a resumed run would take another first
    N), an id column the input lacks, that is not an integer or string column, that holds
    nulls or repeats an id, or that the output would not carry; a checkpoint folder that
    overlaps the input, model, store or output, holds other files, or belongs to another job.

    Raises:
        ValueError: one line saying what is wrong and what to do.
    """
    if not config.checkpoint_dir and not config.id_column:
        return None
    if not (config.checkpoint_dir and config.id_column):
        raise ValueError("--checkpoint-dir and --id-column go together: the job resumes by the ids of the rows it "
                         "has written; pass both")
    if config.limit is not None:
        raise ValueError("--limit cannot be combined with --checkpoint-dir: a resumed run would take another first "
                         "N rows; run the sample without a checkpoint")
    check_not_overlapping(config.checkpoint_dir, {"input": config.input, "model folder": config.model,
                                                  "adapter store": config.adapters, "output": config.output},
                          flag="--checkpoint-dir")
    name = config.id_column
    schema = input_files.schema
    if name not in schema.names:
        raise ValueError(f"input has no {name!r} column (--id-column); its columns: {', '.join(schema.names)}")
    kind = schema.field(name).type
    if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"--id-column {name!r} is {kind}; it must hold integers or strings")
    adapter_column = next((old for old, new in renames.items() if new in ("adapter_id", "adapter_ids")), None)
    adapter_column = adapter_column or next((c for c in ("adapter_id", "adapter_ids") if c in schema.names), None)
    kind_of_adapters = schema.field(adapter_column).type if adapter_column else None
    fan_out = kind_of_adapters is not None and (pa.types.is_list(kind_of_adapters) or
                                                pa.types.is_large_list(kind_of_adapters))
    carried = name not in (adapter_column, "image" if config.task == "classify-image" else None)
    if not carried:
        raise ValueError(f"--id-column {name!r} does not pass through to the output; name a column of its own")
    _check_unique(config.input, name)
    location = Location.parse(config.checkpoint_dir)
    checkpoint = Checkpoint(location, name, adapter_column, fan_out, _manifest(config, input_files))
    _check_folder(checkpoint, output, config.overwrite)
    return checkpoint


def _check_unique(uri: str, column: str) -> None:
    """Refuse nulls and repeats in the id column (reads that one column)."""
    ids = pads.dataset(uri, format="parquet").to_table(columns=[column]).column(column)
    if ids.null_count:
        raise ValueError(f"--id-column {column!r} holds {ids.null_count} null(s); every row needs an id")
    counts = pc.value_counts(ids)
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0].as_py()
        raise ValueError(f"--id-column {column!r} repeats ids ({len(repeated)} of them, e.g. {first['values']!r} "
                         f"{first['counts']} times); every input row needs a unique id")


def _manifest(config: JobConfig, input_files: InputFiles) -> dict:
    """What makes two runs the same job: every option but the tuning ones, and the input."""
    import dataclasses

    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in TUNING and k != "options"}
    settings["options"] = {k: v for k, v in sorted(config.options.items()) if k not in TUNING_OPTIONS}
    return {"job": settings, "input_files": len(input_files.files), "input_rows": input_files.rows}


def _check_folder(checkpoint: Checkpoint, output: Output, overwrite: bool) -> None:
    """The checkpoint folder is new, empty, or this job's own; notes whether it resumes."""
    fs, path = checkpoint.location.fs, checkpoint.location.path
    uri = checkpoint.location.uri
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            raise ValueError(f"--checkpoint-dir {uri!r} is a file; pass a folder")
        entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        names = sorted(e.base_name for e in entries)
        if not names:
            return
        if MANIFEST not in names or set(names) - {MANIFEST, RAY_FOLDER}:
            raise ValueError(f"--checkpoint-dir {uri!r} holds files of something else ({names[0]!r}, ...); pass a new "
                             "or empty folder")
        with fs.open_input_stream(checkpoint.location.child(MANIFEST).path) as stream:
            earlier = json.loads(stream.read().decode())
    except OSError as e:
        raise ValueError(f"cannot use --checkpoint-dir {uri!r}: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"--checkpoint-dir {uri!r}: {MANIFEST} is not valid JSON ({e}); pass a new folder") from e
    if overwrite:
        return  # the job starts over: `clear` empties the folder after every check passed
    differences = _differences(earlier.get("job", {}), checkpoint.manifest["job"])
    if earlier.get("input_rows") != checkpoint.manifest["input_rows"]:
        differences.append(f"input rows {earlier.get('input_rows')} (now {checkpoint.manifest['input_rows']})")
    if differences:
        raise ValueError(f"--checkpoint-dir {uri!r} belongs to another job: {'; '.join(differences[:3])}; resume with "
                         "the same command, or pass a new --checkpoint-dir (or --overwrite to start over)")
    checkpoint.resumed = True
    checkpoint.complete = output.location.fs.get_file_info(output.marker.path).type == pafs.FileType.File


def _differences(earlier: dict, now: dict) -> list[str]:
    """Options that differ between two manifests, as `--flag old (now new)`."""
    found = []
    for key in sorted(set(earlier) | set(now)):
        old, new = earlier.get(key), now.get(key)
        if key == "options" and isinstance(old, dict) and isinstance(new, dict):
            found += _differences(old, new)
        elif old != new:
            found.append(f"--{key.replace('_', '-')} {old!r} (now {new!r})")
    return found


def start(checkpoint: Checkpoint) -> None:
    """Record the job in the checkpoint folder (before any row is written)."""
    fs = checkpoint.location.fs
    fs.create_dir(checkpoint.location.path, recursive=True)
    with fs.open_output_stream(checkpoint.location.child(MANIFEST).path) as stream:
        stream.write((json.dumps(checkpoint.manifest, indent=2, sort_keys=True, default=str) + "\n").encode())


def clear(checkpoint: Checkpoint) -> None:
    """Forget an earlier run (`--overwrite`): remove only what the job writes there."""
    fs = checkpoint.location.fs
    fs.delete_dir_contents(checkpoint.ray_location.path, missing_dir_ok=True)
    manifest = checkpoint.location.child(MANIFEST).path
    if fs.get_file_info(manifest).type == pafs.FileType.File:
        fs.delete_file(manifest)


def finish(checkpoint: Checkpoint) -> None:
    """After `_SUCCESS`: drop Ray's id files, keep the manifest (a rerun then reports the
    job complete instead of refusing the output)."""
    fs = checkpoint.location.fs
    if fs.get_file_info(checkpoint.ray_location.path).type == pafs.FileType.Directory:
        fs.delete_dir(checkpoint.ray_location.path)


def load_done(checkpoint: Checkpoint, output: Output) -> Done:
    """Delete what uncommitted write tasks of an earlier run staged (Ray Data's recovery),
    then read the rows the committed ones wrote: (id, adapter_id)."""
    if checkpoint.resumed:
        import ray
        from ray.data.checkpoint.checkpoint_filter import IdColumnCheckpointManager

        manager = IdColumnCheckpointManager(checkpoint_config=checkpoint.ray_config(),
                                            data_context=ray.data.DataContext.get_current())
        if checkpoint.location.fs.get_file_info(checkpoint.ray_location.path).type == pafs.FileType.Directory:
            manager.load_checkpoint(output.staging.uri, output.location.fs)
    files = staged_files(output)
    columns = [checkpoint.id_column, "adapter_id"]
    tables = [_read_columns(output, f, columns) for f in files]
    table = pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.string()) for c in columns})
    ids = _numpy_ids(table.column(checkpoint.id_column))
    order = np.argsort(ids, kind="stable")
    adapters = table.column("adapter_id").to_pylist()
    return Done(ids[order], [adapters[i] for i in order], files)


def staged_files(output: Output) -> list[str]:
    """The Parquet files in the output's staging folder, sorted."""
    infos = output.location.fs.get_file_info(pafs.FileSelector(output.staging.path, allow_not_found=True))
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))


def _read_columns(output: Output, path: str, columns: list[str]) -> pa.Table:
    with output.location.fs.open_input_file(path) as handle:
        return pq.read_table(handle, columns=columns)


def _numpy_ids(column) -> np.ndarray:
    """Ids as a numpy array that sorts and compares by value (strings as unicode)."""
    values = column.to_numpy(zero_copy_only=False) if len(column) else np.array([], dtype=np.int64)
    return values.astype(str) if values.dtype == object else values


def filter_done(dataset, *, checkpoint: Checkpoint, done: Done):
    """Drop the input rows whose output rows are all written; a fan-out row keeps only the
    adapters whose rows are not written yet (its list is rewritten)."""
    if not done.rows:
        return dataset
    return dataset.map_batches(_drop_done, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
                               fn_kwargs={"id_column": checkpoint.id_column, "adapter_column": checkpoint.adapter_column,
                                          "done_ids": done.ids, "done_adapters": done.adapters if checkpoint.fan_out
                                          else None})


def _drop_done(batch: pa.Table, id_column: str, adapter_column: str | None, done_ids: np.ndarray,
               done_adapters: list | None) -> pa.Table:
    """One block of `filter_done` (a Ray Data map task)."""
    ids = _numpy_ids(batch.column(id_column))
    left = np.searchsorted(done_ids, ids, side="left")
    right = np.searchsorted(done_ids, ids, side="right")
    has_done = right > left
    if done_adapters is None:  # one output row per input row
        return batch.filter(pa.array(~has_done))
    keep = np.ones(len(ids), dtype=bool)
    lists = batch.column(adapter_column).to_pylist()
    for i in np.flatnonzero(has_done):
        left_over = remaining(lists[i], done_adapters[left[i]:right[i]])
        keep[i] = bool(left_over)
        lists[i] = left_over
    index = batch.schema.get_field_index(adapter_column)
    batch = batch.set_column(index, batch.schema.field(index), pa.array(lists, type=batch.schema.field(index).type))
    return batch.filter(pa.array(keep))


def remaining(named, written: list) -> list:
    """The adapters of a fan-out row whose rows are not in `written` yet (repeats counted)."""
    todo = collections.Counter(written)
    left = []
    for adapter in fan_out_adapters(named):
        if todo[adapter]:
            todo[adapter] -= 1
        else:
            left.append(adapter)
    return left


def expected_rows(config: JobConfig, checkpoint: Checkpoint) -> collections.Counter:
    """How many times each `_key` must be in the output: once per input id, or for fan-out
    inputs once per (id, adapter) the row names (base rows: adapter None), repeats counted."""
    columns = [checkpoint.id_column] + ([checkpoint.adapter_column] if checkpoint.fan_out else [])
    table = pads.dataset(config.input, format="parquet").to_table(columns=columns)
    ids = table.column(checkpoint.id_column).to_pylist()
    if not checkpoint.fan_out:
        return collections.Counter(_key(i, None, False) for i in ids)
    return collections.Counter((i, a) for i, named in zip(ids, table.column(checkpoint.adapter_column).to_pylist())
                               for a in fan_out_adapters(named))


def reconcile(config: JobConfig, checkpoint: Checkpoint, output: Output) -> int:
    """Make the staged files hold every expected row exactly once, before they are published.

    Rows a replayed write task staged a second time are dropped (each file keeps its first
    copies, files in name order). Returns how many were dropped.

    Raises:
        OutputWriteError: expected rows are missing (the output stays unpublished; running the
            same command again writes them).
    """
    wanted = expected_rows(config, checkpoint)
    seen: collections.Counter = collections.Counter()
    dropped = 0
    for path in staged_files(output):
        table = _read_columns(output, path, [checkpoint.id_column, "adapter_id"])
        keep = []
        for i, a in zip(table.column(checkpoint.id_column).to_pylist(), table.column("adapter_id").to_pylist()):
            key = _key(i, a, checkpoint.fan_out)
            seen[key] += 1
            keep.append(seen[key] <= wanted.get(key, 0))
        if not all(keep):
            dropped += keep.count(False)
            _rewrite(output, path, keep)
    missing = [k for k, n in wanted.items() if seen[k] < n]
    if missing:
        shown = missing[0] if checkpoint.fan_out else missing[0][0]
        raise OutputWriteError(f"{len(missing)} expected output row(s) are missing (e.g. {checkpoint.id_column} "
                               f"{shown!r}); the output was not published: run the same command again to write them")
    if dropped:
        logger.warning("dropped %d output row(s) a replayed write task had staged twice", dropped)
    return dropped


def _key(row_id, adapter, fan_out: bool) -> tuple:
    return (row_id, None if adapter == "" else adapter) if fan_out else (row_id, None)


def _rewrite(output: Output, path: str, keep: list[bool]) -> None:
    """Rewrite one staged file with only the rows `keep` marks (written beside it, then moved)."""
    fs = output.location.fs
    with fs.open_input_file(path) as handle:
        table = pq.read_table(handle)
    temporary = path + ".rewrite"
    with fs.open_output_stream(temporary) as stream:
        pq.write_table(table.filter(pa.array(keep)), stream)
    fs.move(temporary, path)
