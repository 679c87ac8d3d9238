"""Infer stage: `actors.Predictor` as a callable class in a Ray Data actor pool, with bounded
retries and poison-row isolation.

Ray Data restarts a model actor that dies (SIGKILL, a native crash, the OOM killer) and runs
its task again, forever by default: an input that kills the actor every time would keep the
job retrying. Here the pool gets finite `max_restarts` and `max_task_retries`, and a small
`Ledger` actor remembers which batches and rows were running in an actor when it died:
- a batch that was in flight during a death runs again one row at a time;
- a row that was in flight during a death is not run again: it gets an `internal` error.
So each row that kills its actor costs one death for its batch and one for itself, the
other rows of its batch are answered, and the job goes on. Should the retries run out all
the same, the job ends with one line naming the rows that killed the actors.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
import warnings
from typing import Any

import pyarrow as pa

from actors.allocator import runtime_env
from actors.predictor import Predictor
from pipeline.config import JobConfig

logger = logging.getLogger(__name__)
MAX_RESTARTS = 24  # deaths of one model actor over the whole job
MAX_TASK_RETRIES = 6  # reruns of one block after deaths: each poison row of a block costs about one
POISON_ERROR = ("internal: the model process died while running this row, twice (a native crash or an out-of-memory "
                "kill); it was not run again")
NOTE_CHARS = 80


class Ledger:
    """Which batches and rows were in flight in each model actor, and how many deaths each
    has seen (a Ray actor, one per job; its state lives as long as the driver)."""

    def __init__(self) -> None:
        self._in_flight: dict[str, set[str]] = {}  # actor id -> keys it was running
        self._deaths: dict[str, int] = {}
        self._notes: dict[str, str] = {}

    def restarted(self, actor: str) -> None:
        """Actor `actor` came back after dying: what it was running gets one more death."""
        for key in self._in_flight.pop(actor, set()):
            self._deaths[key] = self._deaths.get(key, 0) + 1

    def start(self, actor: str, key: str, note: str) -> int:
        """`actor` starts `key`; returns the deaths `key` has seen before."""
        self._in_flight.setdefault(actor, set()).add(key)
        self._notes[key] = note
        return self._deaths.get(key, 0)

    def end(self, actor: str, key: str) -> None:
        self._in_flight.get(actor, set()).discard(key)

    def killers(self) -> list[str]:
        """Notes of the rows (or, if none, batches) that were running when actors died."""
        rows = [self._notes[k] for k, n in self._deaths.items() if n and k.startswith("row:")]
        return rows or [self._notes[k] for k, n in self._deaths.items() if n]


class JobMetrics:
    """Ray metrics of the batch job's actors (exported with Ray's, e.g. on the Prometheus
    endpoint, as Serve's are): output rows by adapter and outcome, and seconds per actor
    batch by adapter. Adapter tags are store adapters, `(base)`, or `unknown` for ids the
    store lacks, so the input cannot grow the tag values."""

    LATENCY_S = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]

    def __init__(self, task: str, metrics=None) -> None:
        if metrics is None:
            from ray.util import metrics
        self.task = task
        self.rows = metrics.Counter("switchyard_job_rows", "Output rows of the batch job, by adapter and outcome "
                                    "(ok, or the error kind).", tag_keys=("task", "adapter", "outcome"))
        self.latency = metrics.Histogram("switchyard_job_batch_latency_s", "Seconds per actor batch, observed once "
                                         "for each adapter with rows in it.", boundaries=self.LATENCY_S,
                                         tag_keys=("task", "adapter"))

    def batch(self, result: pa.Table, seconds: float) -> None:
        """Count one answered batch."""
        outcomes = collections.Counter()
        for adapter, error in zip(result.column("adapter_id").to_pylist(), result.column("error").to_pylist()):
            kind = error.split(":", 1)[0] if error else "ok"
            name = "unknown" if kind == "unknown_adapter" and adapter else adapter or "(base)"
            outcomes[name, kind] += 1
        for (adapter, outcome), n in outcomes.items():
            self.rows.inc(n, tags={"task": self.task, "adapter": adapter, "outcome": outcome})
        for adapter in {a for a, _ in outcomes}:
            self.latency.observe(seconds, tags={"task": self.task, "adapter": adapter})


class JobPredictor(Predictor):
    """The Predictor of the job's actors: reports its restarts to the ledger and isolates
    what was in flight when an actor died (see the module's docstring).

    Args:
        ledger: the job's Ledger actor handle.
        **kwargs: the Predictor's arguments.
    """

    def __init__(self, ledger, **kwargs: Any) -> None:
        import ray

        context = ray.get_runtime_context()
        self._ledger, self._actor = ledger, context.get_actor_id()
        with warnings.catch_warnings():  # Ray's property reads its own deprecated `actor_id` (a warning per actor)
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = context.was_current_actor_reconstructed
        self._restarted = restarted  # only a restarted actor can be handed work that was in flight at a death
        if restarted:
            ray.get(ledger.restarted.remote(self._actor))
            logger.warning("model actor restarted after it died; the rows it was running are retried one by one")
        super().__init__(**kwargs)
        self._metrics = JobMetrics(self.task.name)

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        key = "batch:" + _fingerprint(batch)
        if not self._start(key, f"a batch of {batch.num_rows} rows starting with {self._note(batch)}"):
            result = super().__call__(batch)
        else:
            result = pa.concat_tables([self._isolated(batch.slice(i, 1)) for i in range(batch.num_rows)])
        self._ledger.end.remote(self._actor, key)
        self._metrics.batch(result, time.perf_counter() - started)
        return result

    def _isolated(self, row: pa.Table) -> pa.Table:
        """One row of a batch that was running when an actor died."""
        key = "row:" + _fingerprint(row)
        if self._start(key, self._note(row)):
            logger.warning("not running a row that was running when a model actor died: %s", self._note(row))
            result = self.fail(row, POISON_ERROR)
        else:
            result = super().__call__(row)
        self._ledger.end.remote(self._actor, key)
        return result

    def _start(self, key: str, note: str) -> int:
        """Record `key` as in flight; its earlier deaths (waited for only in a restarted actor:
        Ray reruns a dead actor's tasks on that same actor, so elsewhere the answer is 0 and the
        batch does not wait for a round trip to the ledger)."""
        import ray

        reply = self._ledger.start.remote(self._actor, key, note)
        return ray.get(reply) if self._restarted else 0

    def _note(self, batch: pa.Table) -> str:
        """The first row's input and adapter, for messages."""
        column = self.task.input_column
        value = batch.column(column)[0].as_py() if column in batch.column_names and batch.num_rows else None
        adapter = next((batch.column(c)[0].as_py() for c in ("adapter_id", "adapter_ids") if c in batch.column_names),
                       None)
        text = repr(value)[:NOTE_CHARS] if not isinstance(value, bytes) else f"<{len(value)} bytes>"
        return f"{column} {text} (adapter {adapter!r})"


def _fingerprint(table: pa.Table) -> str:
    """A hash of a batch's content (Arrow IPC writes only the rows of a slice)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()[:32]


def start_ledger():
    """The job's Ledger actor (no CPU of its own)."""
    import ray

    return ray.remote(num_cpus=0)(Ledger).remote()


def infer(dataset, config: JobConfig, ledger):
    """Map every batch through a pool of `config.concurrency` Predictor actors."""
    import ray

    with warnings.catch_warnings():  # Ray 2.60 names no parameter for the retry bounds; its warning blames us
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return dataset.map_batches(
            JobPredictor,
            fn_constructor_kwargs={"ledger": ledger, **config.predictor_kwargs()},
            compute=ray.data.ActorPoolStrategy(size=config.concurrency),
            batch_size=config.batch_size,
            batch_format="pyarrow",
            num_cpus=config.actor_cpus,
            num_gpus=config.num_gpus,
            max_restarts=MAX_RESTARTS,  # passed as ray_remote_args, deprecated for removal in Ray 2.64
            max_task_retries=MAX_TASK_RETRIES,
            **({"runtime_env": env} if (env := runtime_env(config.allocator)) else {}),
        )
