"""The batch job: validate up front, then read -> infer -> write on Ray Data, then a summary."""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import sys
import time
from dataclasses import dataclass, field

from actors.allocator import allocator_env
from actors.config import INPUT_COLUMNS, output_schema
from pipeline import cluster
from pipeline.config import JobConfig
from pipeline.read import InputFiles, block_rows, open_input, read_input
from pipeline.validate import column_renames, renamed, validate_adapters, validate_job
from pipeline.write import (Output, OutputWriteError, check_output, clear_output, mark_complete, os_error,
                            publish_files, refuse_non_empty, unpublish_files, write_empty, write_output)

logger = logging.getLogger(__name__)
VERSIONS_SHOWN = 10  # adapters whose version the summary line names
BLOCK_ROWS = 1000  # default largest block: an output file is written at least every this many rows
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Summary:
    """What the job did, from the input's metadata and the output read back."""

    rows_in: int
    rows_out: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    per_adapter: dict[str, int] = field(default_factory=dict)
    adapters: int = 0  # adapters in the store (each checked up front)
    canary: bool = True  # every actor ran the start-up canary (an actor that failed it stops the job)
    startup_seconds: float | None = None  # until the first output file: Ray, model, adapters, canary, first rows
    steady_rate: float | None = None  # output rows per second after the first output file
    versions: dict[str, dict[str, int]] = field(default_factory=dict)  # adapter -> its adapter_version -> rows
    skipped: int | None = None  # with --checkpoint-dir: output rows an earlier run had written
    duplicates_dropped: int = 0  # with --checkpoint-dir: rows a replayed write task had staged twice

    @property
    def rate(self) -> float:
        """Output rows this run wrote per second of wall time (0 before the job has timed itself)."""
        return (self.rows_out - (self.skipped or 0)) / self.seconds if self.seconds else 0.0

    def lines(self) -> list[str]:
        """The human-readable summary the job prints at the end."""
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items())) or "none"
        adapters = ", ".join(f"{k} {v}" for k, v in sorted(self.per_adapter.items()))
        canary = "passed in every actor" if self.canary else "off (--no-canary)"
        first = "" if self.startup_seconds is None else (
            f" (first output after {self.startup_seconds:.1f} s: Ray, model and adapter loading, the canary and the "
            "first batches)")
        steady = "" if self.steady_rate is None else f"; {self.steady_rate:.1f} after the first output"
        resumed = [] if self.skipped is None else [
            f"rows skipped as already done: {self.skipped}" + (
                f" ({self.duplicates_dropped} copies a replayed write task had staged twice were dropped)"
                if self.duplicates_dropped else "")]
        return [
            f"rows in: {self.rows_in}",
            f"rows out: {self.rows_out}",
            *resumed,
            f"rows with errors: {sum(self.errors.values())} ({errors})",
            f"rows per adapter: {adapters}",
            *self._version_lines(),
            f"adapters: {self.adapters} in the store, each checked up front; start-up canary: {canary}",
            f"wall time: {self.seconds:.1f} s{first}",
            f"rows/s: {self.rate:.1f} overall{steady}",
        ]

    def _version_lines(self) -> list[str]:
        """The adapter_version of each adapter's rows; a line of its own for an adapter whose
        rows come from several versions (its folder changed mid-run or between a run and its
        resumption)."""
        if not self.versions:
            return []
        single = [f"{a} {next(iter(v))}" for a, v in sorted(self.versions.items()) if len(v) == 1]
        shown = ", ".join(single[:VERSIONS_SHOWN]) + (
            f" and {len(single) - VERSIONS_SHOWN} more" if len(single) > VERSIONS_SHOWN else "")
        lines = [f"adapter versions: {shown}"] if single else []
        for adapter, versions in sorted(self.versions.items()):
            if len(versions) > 1:
                counts = ", ".join(f"{v} {n} rows" for v, n in sorted(versions.items()))
                lines.append(f"warning: adapter {adapter}'s rows come from {len(versions)} versions of its files "
                             f"({counts}): its folder changed during the run or between a run and its resumption")
        return lines

    def as_dict(self) -> dict:
        """The summary as JSON-ready values (written into `_SUCCESS`)."""
        return {**dataclasses.asdict(self), "rows_per_second": round(self.rate, 3)}


def run(config: JobConfig) -> Summary:
    """Run the whole job.

    Every up-front check (input, options, model, store, output location, checkpoint folder,
    resources) runs before anything is deleted or any model work starts.

    Raises:
        ValueError: an up-front problem (one line).
        OutputWriteError: writing or committing the output failed mid-run.
    """
    from pipeline import resume

    input_files = open_input(config.input)
    validate_job(config, input_files)
    preload = allocator_env(config.allocator).get("LD_PRELOAD")  # refuses --allocator tcmalloc without it
    joined = bool(os.environ.get("RAY_ADDRESS"))
    if not joined:  # a local Ray will have this machine's CPUs: refuse before starting it
        check_resources(config, float(os.cpu_count() or 1), strict=True)
    output = check_output(config.output, config.overwrite or bool(config.checkpoint_dir))
    renames = column_renames(config, input_files.schema)
    checkpoint = resume.check_checkpoint(config, input_files, output, renames)
    if checkpoint is not None and not checkpoint.resumed and not config.overwrite:
        refuse_non_empty(output)  # a fresh checkpoint folder: the output must be new, as without one
    rows_in = input_files.rows if config.limit is None else min(config.limit, input_files.rows)
    if checkpoint is not None and checkpoint.complete:
        logger.info("output %s is complete already (%s): nothing to do", config.output, output.marker.uri)
        summary = summarize(config.output, rows_in)
        summary.skipped = summary.rows_out
        return summary
    adapter_ids = validate_adapters(config)
    if adapter_ids:
        shown = ", ".join(adapter_ids[:10]) + (f" and {len(adapter_ids) - 10} more" if len(adapter_ids) > 10 else "")
        logger.info("adapter store: %d adapters checked: %s", len(adapter_ids), shown)
    if preload:
        logger.info("actors' allocator: tcmalloc (%s)", preload)
    if config.overwrite:
        clear_output(output)
        if checkpoint is not None:
            resume.clear(checkpoint)
    if checkpoint is not None:
        resume.start(checkpoint)
    started = time.perf_counter()
    progress, run_state = None, _RunState()
    if rows_in == 0:  # Ray Data writes no file for an empty dataset: write the schema ourselves
        schema = output_schema(config.task, renamed(input_files.schema, renames))
        write_empty(output, renamed(schema, _names_back(config, schema)))
    else:
        from pipeline.progress import Progress

        every = 0.0 if sys.stderr.isatty() else config.progress_seconds  # a terminal shows Ray Data's bars
        progress = Progress(output.staging, rows_in, every)
        _infer_on_ray(config, input_files, output, joined, renames, rows_in, checkpoint, progress, run_state,
                      len(adapter_ids))
    ended = time.time()
    if checkpoint is not None:
        run_state.dropped = resume.reconcile(config, checkpoint, output)
    publish_files(output)
    summary = summarize(config.output, rows_in)
    summary.seconds = time.perf_counter() - started
    summary.adapters, summary.canary = len(adapter_ids), config.options.get("canary", True)
    if checkpoint is not None:
        summary.skipped, summary.duplicates_dropped = run_state.skipped, run_state.dropped
    if progress is not None:
        summary.startup_seconds, summary.steady_rate = progress.split(ended)
    mark_complete(output, summary.as_dict())
    if checkpoint is not None:
        resume.finish(checkpoint)
    return summary


@dataclass
class _RunState:
    """What a resumed run found and did."""

    skipped: int = 0  # output rows an earlier run had staged
    dropped: int = 0  # copies of rows a replayed write task had staged twice


def _infer_on_ray(config: JobConfig, input_files: InputFiles, output: Output, joined: bool,
                  renames: dict[str, str], rows: int, checkpoint, progress, state: _RunState, adapters: int) -> None:
    """read -> infer -> write (into the output's staging folder) on Ray Data; the input column
    named by `--prompt-column` (or the text or image one) keeps its name in the output. With a
    checkpoint, the rows an earlier run wrote are skipped and each write task commits its ids."""
    import ray

    init_ray()
    if joined:
        check_resources(config, ray.cluster_resources().get("CPU", 0.0), strict=False)
    context = ray.data.DataContext.get_current()
    keep = None
    if checkpoint is not None:
        keep = _skip_done(checkpoint, output, progress, state)
        context.checkpoint_config = checkpoint.ray_config()  # each write task commits its ids (two-phase)
    ledger = None
    try:
        per_block = config.rows_per_block or block_rows(rows, 2 * config.concurrency,
                                                        max(config.batch_size, BLOCK_ROWS))
        dataset = read_input(config.input, per_block, renames=renames, limit=config.limit, keep=keep)
        slots = config.options.get("max_loaded_adapters")
        if cluster.wanted(config.cluster_by_adapter, adapters, slots, renamed(input_files.schema, renames), rows,
                          config.num_gpus):
            logger.info("sorting rows by adapter before the actors (%d adapters, %s slots per actor; "
                        "--cluster-by-adapter off to keep streaming): the whole input is read first", adapters,
                        slots if slots is not None else "all")
            dataset = cluster.by_adapter(dataset, max(1, -(-rows // per_block)))
        from pipeline.infer import infer, start_ledger

        ledger = start_ledger()
        results = infer(dataset, config, ledger)
        back = _names_back(config, output_schema(config.task, renamed(input_files.schema, renames)))
        if back:
            results = results.rename_columns(back)
        with progress:
            write_output(results, output)
    except Exception as e:
        _raise_in_one_line(e, ledger)
        raise
    finally:
        context.checkpoint_config = None
        if ledger is not None:  # a driver that runs several jobs (tests, notebooks) keeps no stale ledgers
            ray.kill(ledger)


def _skip_done(checkpoint, output: Output, progress, state: _RunState):
    """Recover what an earlier run staged and return the read-stage filter that skips it."""
    from pipeline import resume

    unpublished = unpublish_files(output)
    if unpublished:
        logger.info("moved %d file(s) an earlier run had published back into staging", unpublished)
    done = resume.load_done(checkpoint, output)
    state.skipped = done.rows
    progress.ignore(done.files)
    logger.info("resuming: %d output row(s) are written already and are skipped", done.rows)
    return functools.partial(resume.filter_done, checkpoint=checkpoint, done=done)


def _raise_in_one_line(error: Exception, ledger) -> None:
    """Turn what the actors died of into one line: their start-up refusal (ValueError), or
    the rows that were running when retries ran out (OutputWriteError); else return."""
    refused = actor_start_error(error)
    if refused is not None:
        raise ValueError(f"the actors refused to start: {refused}") from None
    if ledger is None or "ActorDiedError" not in type(error).__name__ + str(error):
        return
    import ray

    killers = ray.get(ledger.killers.remote())
    if killers:
        shown = "; ".join(killers[:3]) + (f"; and {len(killers) - 3} more" if len(killers) > 3 else "")
        raise OutputWriteError(f"the model actors kept dying (a native crash or an out-of-memory kill) and Ray's "
                               f"retries ran out; running when they died: {shown}. Remove those rows from the input, "
                               "or give the actors more memory, and run again") from None


def _names_back(config: JobConfig, schema) -> dict[str, str]:
    """The task's input column back to the input's own name, when the output carries it."""
    wanted = INPUT_COLUMNS[config.task]
    return {wanted: config.input_column} if config.input_column != wanted and wanted in schema.names else {}


def actor_start_error(error: BaseException) -> str | None:
    """The Predictor's own message when Ray Data's actors died while starting (a model
    folder without the task's weights, a failed canary), or None for any other failure.
    Ray wraps it in an ActorDiedError whose text ends with the original `Kind: message`."""
    text = str(error)
    if "ActorDiedError" not in type(error).__name__ and "creation task" not in text:
        return None
    for line in reversed(text.splitlines()):
        for kind in ("ValueError: ", "RuntimeError: "):
            if line.startswith(kind):
                return line[len(kind):]
    return None


def init_ray() -> None:
    """Join the cluster of `ray job submit` (RAY_ADDRESS) or a running one, else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        pythonpath = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
        ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    _progress_bars()
    _quiet_storage_tracebacks()


def check_resources(config: JobConfig, total: float, strict: bool) -> None:
    """Refuse (`strict`, a local Ray) or warn (a joined cluster, which may autoscale) when the
    actor pool takes every CPU: Ray Data's read and write tasks would never run and the job
    would hang silently (docs/pitfalls.md "Ray Data")."""
    taken = config.concurrency * config.actor_cpus
    if config.num_gpus or total - taken >= 1:
        return
    message = (f"--concurrency {config.concurrency} x --num-cpus {config.actor_cpus:g} takes {taken:g} of the "
               f"cluster's {total:g} CPUs, leaving less than one for Ray Data's read and write tasks: the job "
               "would hang. Use fewer actors or fractional --num-cpus (e.g. 0.5)")
    if not strict:
        logger.warning(message)
        return
    raise ValueError(message)


class _StorageTracebackFilter(logging.Filter):
    """Drops the traceback (not the line) Ray Data logs on the terminal for a write that failed
    on storage (a full disk): the job ends with its own one line naming the path, and the
    session's log file keeps the whole trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _is_storage_error(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


def _is_storage_error(error: BaseException | None) -> bool:
    """Whether `error` comes from an OSError with an errno (ENOSPC, EROFS, EACCES, ...)."""
    cause = os_error(error)
    return cause is not None and bool(cause.errno)


def _quiet_storage_tracebacks() -> None:
    """Install `_StorageTracebackFilter` on Ray Data's terminal handlers."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_StorageTracebackFilter())


def _progress_bars() -> None:
    """Ray Data's progress bars on a terminal, none in CI logs."""
    import ray

    quiet = os.environ.get("CI") or os.environ.get("RAY_DATA_DISABLE_PROGRESS_BARS") or not sys.stderr.isatty()
    ray.data.DataContext.get_current().enable_progress_bars = not quiet


def summarize(output: str, rows_in: int) -> Summary:
    """Counts read back from the output's `adapter_id`, `adapter_version` and `error` columns only."""
    import pyarrow.dataset as pads

    table = pads.dataset(output, format="parquet").to_table(columns=["adapter_id", "adapter_version", "error"])
    summary = Summary(rows_in=rows_in, rows_out=table.num_rows)
    kinds = collections.Counter(e.split(":", 1)[0] for e in table.column("error").to_pylist() if e is not None)
    summary.errors = dict(kinds)
    adapters = table.column("adapter_id").to_pylist()
    summary.per_adapter = dict(collections.Counter(a or "(base)" for a in adapters))
    for adapter, version in zip(adapters, table.column("adapter_version").to_pylist()):
        if version is not None:
            per = summary.versions.setdefault(adapter, {})
            per[version] = per.get(version, 0) + 1
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: exit 0 on success, 2 with one line for up-front errors."""
    from pipeline.config import config_from_args

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = config_from_args(argv)
        summary = run(config)
    except (ValueError, TypeError) as e:
        print(f"batch_infer: error: {e}", file=sys.stderr)
        return 2
    except OutputWriteError as e:
        print(f"batch_infer: error: {e}", file=sys.stderr)
        return 1
    print("Switchyard batch job done: " + config.output)
    for line in summary.lines():
        print("  " + line)
    return 0
