"""Progress of a running job, read from the Parquet files it has staged so far: a log line
every few seconds (when stderr is not a terminal, where Ray Data draws no bars), and when the
first output appeared, which splits the job's rate into start-up and steady state."""

from __future__ import annotations

import logging
import threading
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)


class Progress:
    """Watch a staging folder while the job writes into it.

    Args:
        staging: the output's staging Location (`fs`, `path`).
        rows_in: input rows (for the log line).
        every: seconds between log lines; 0 logs nothing (the files are still read at the end).
    """

    def __init__(self, staging, rows_in: int, every: float) -> None:
        self.staging, self.rows_in, self.every = staging, rows_in, every
        self.started = time.time()
        self._rows: dict[str, tuple[int, float]] = {}  # file -> (rows, modification time)
        self._ignored: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def ignore(self, paths: list[str]) -> None:
        """Leave out files that were there before this run (a resumed job's earlier output)."""
        self._ignored = set(paths)

    def __enter__(self) -> Progress:
        if self.every > 0:
            self._thread = threading.Thread(target=self._run, name="switchyard-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.poll()
            rows, elapsed = self.rows, time.time() - self.started
            logger.info("progress: %d output rows written (%d input rows), %.0f s, %.1f rows/s", rows, self.rows_in,
                        elapsed, rows / elapsed if elapsed else 0.0)

    def poll(self) -> None:
        """Count the rows of staged files not seen before (their Parquet footers only)."""
        try:
            infos = self.staging.fs.get_file_info(pafs.FileSelector(self.staging.path, allow_not_found=True,
                                                                     recursive=True))
        except OSError as e:  # progress is best effort: the write itself reports real failures
            logger.debug("progress: cannot list %s: %s", self.staging.path, e)
            return
        for info in infos:
            if info.type != pafs.FileType.File or not info.path.endswith(".parquet") or info.path in self._rows \
                    or info.path in self._ignored:
                continue
            try:
                with self.staging.fs.open_input_file(info.path) as f:
                    rows = pq.ParquetFile(f).metadata.num_rows
            except (OSError, ValueError):  # still being written: next time
                continue
            modified = info.mtime.timestamp() if info.mtime is not None else time.time()
            self._rows[info.path] = (rows, modified)

    @property
    def rows(self) -> int:
        """Output rows in the files seen so far."""
        return sum(r for r, _ in self._rows.values())

    def split(self, ended: float) -> tuple[float | None, float | None]:
        """(seconds until the first output file was written, rows/s after it), None where
        unknown (no file seen, or every row came in the first file)."""
        if not self._rows:
            return None, None
        first_rows, first = min(self._rows.values(), key=lambda v: v[1])
        startup = max(0.0, first - self.started)
        later = self.rows - first_rows
        span = ended - first
        return startup, (later / span if later and span > 0 else None)
