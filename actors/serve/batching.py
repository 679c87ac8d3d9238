"""How concurrent requests become one Predictor call in a Serve replica (`Coalescer`,
`BatchRunner`), and what is counted about it (GET /v1/stats and Ray metrics). No FastAPI here.

Ray's `@serve.batch` forms the next batch while the current one runs: its wait window
(`batch_wait_timeout_s`) closes on a timer and the batch queues behind the running one, so
under load one model call's worth of requests is cut into several small batches that then
run one after another (ray/serve/batching.py, `_process_batches`). `Coalescer` opens its
window only once the model is free, and takes everything that arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from actors.serve.api import ApiError, Work

logger = logging.getLogger(__name__)
RECENT_BATCHES = 32
REQUEST, ROW = "__request", "__row"  # our own index columns: the Predictor's row order is not promised
TURN = pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string())])
COLUMN_TYPES = {"prompt": pa.string(), "text": pa.string(), "image": pa.binary(), "messages": pa.list_(TURN),
                "adapter_id": pa.string(),
                "max_new_tokens": pa.int64(), "temperature": pa.float64(), REQUEST: pa.int64(), ROW: pa.int64()}


class Coalescer:
    """Runs concurrent items in shared calls of `run`, one call at a time.

    When the model is free and an item waits, the next call waits up to `wait_s` for up to
    `max_items` items (not at all if that many already wait: everything that arrived during
    the previous call), then runs them together, whatever adapters they name.

    Args:
        run: async function of a list of items returning one result per item.
        max_items: items per call.
        wait_s: how long a call waits for more items after the model became free.
    """

    def __init__(self, run: Callable[[list], Awaitable[list]], max_items: int, wait_s: float) -> None:
        self._run = run
        self.max_items, self.wait_s = max_items, wait_s
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._arrived: asyncio.Event | None = None
        self._consumer: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        """False once the consumer task has stopped (it never should)."""
        return self._consumer is None or not self._consumer.done()

    async def submit(self, item: Any) -> Any:
        """The result of `item`, once a call that took it returns."""
        if self._consumer is None:  # created in the replica's running event loop
            self._arrived = asyncio.Event()
            self._consumer = asyncio.get_running_loop().create_task(self._consume())
        future = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._arrived.set()
        return await future

    async def _consume(self) -> None:
        """Forever: wait for items, fill a call, run it, hand out the results."""
        while True:
            await self._fill()
            taken = [self._queue.popleft() for _ in range(min(self.max_items, len(self._queue)))]
            taken = [(item, future) for item, future in taken if not future.done()]  # done: cancelled by a client
            if taken:
                await self._run_call(taken)

    async def _fill(self) -> None:
        """Wait until an item waits, then until `max_items` wait or `wait_s` has passed."""
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = time.monotonic() + self.wait_s
        while len(self._queue) < self.max_items and (left := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                break

    async def _run_call(self, taken: list[tuple[Any, asyncio.Future]]) -> None:
        """One call of `run`; its exception goes to every item of the call."""
        try:
            results = await self._run([item for item, _ in taken])
        except Exception as e:  # noqa: BLE001 - handed to the callers, the consumer goes on
            for _, future in taken:
                if not future.done():
                    future.set_exception(e)
            return
        for (_, future), result in zip(taken, results):
            if not future.done():
                future.set_result(result)


class BatchRunner:
    """Runs coalesced requests through the Predictor: one call per distinct (top_p, seed,
    stop) among them (usually one), all their rows together. Call it in a worker thread.

    Args:
        predictor: the replica's Predictor.
    """

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.input_column = predictor.task.input_column
        self.broken: BaseException | None = None  # a fatal model error: the replica must go

    def __call__(self, works: list[Work]) -> tuple[list, list[BatchInfo]]:
        """(per request: its rows in order, or an ApiError; one BatchInfo per Predictor call)."""
        groups: dict[tuple, list[int]] = {}
        for i, work in enumerate(works):
            groups.setdefault(work.options_key, []).append(i)
        results: list = [None] * len(works)
        infos = []
        for members in groups.values():
            batch = [works[i] for i in members]
            started = time.perf_counter()
            for i, out in zip(members, self._call(batch)):
                results[i] = out
            adapters = {w.adapter for w in batch}
            infos.append(BatchInfo(sum(len(w.inputs) for w in batch), len(batch), len(adapters - {None}),
                                   None in adapters, time.perf_counter() - started))
        return results, infos

    def _call(self, batch: list[Work]) -> list:
        """One Predictor call; each request's rows (in order), or an ApiError for every request."""
        try:
            predictor = self.predictor.with_options(**batch[0].options) if batch[0].options else self.predictor
        except ValueError as e:
            return [ApiError(400, f"bad_parameter: {e}", "bad_parameter")] * len(batch)
        try:
            table = predictor(self._table(batch))
        except Exception as e:  # noqa: BLE001 - the requests get 500; a fatal error also fails the health check
            logger.exception("Predictor call over %d requests failed", len(batch))
            if not isinstance(e, ValueError):  # ValueError: a malformed batch (our bug); anything else is fatal
                self.broken = e
            return [ApiError(500, f"internal: {type(e).__name__}: {e}", "internal")] * len(batch)
        rows: list[list] = [[None] * len(w.inputs) for w in batch]
        for row in table.to_pylist():
            rows[row[REQUEST]][row[ROW]] = row
        if self.predictor.config.task == "embed":
            self._count_tokens([r for request in rows for r in request if not r["error"]])
        return rows

    def _table(self, batch: list[Work]) -> pa.Table:
        """The Predictor's input: every request's rows, with our index columns."""
        column = batch[0].column or self.input_column  # one per call: the works share their options_key
        columns: dict[str, list] = {column: [], "adapter_id": [], REQUEST: [], ROW: []}
        columns.update({name: [] for name in batch[0].params})
        for r, work in enumerate(batch):
            n = len(work.inputs)
            columns[column] += work.inputs
            columns["adapter_id"] += [work.adapter] * n
            columns[REQUEST] += [r] * n
            columns[ROW] += range(n)
            for name, values in work.params.items():
                columns[name] += values
        return pa.table({name: pa.array(values, type=COLUMN_TYPES[name]) for name, values in columns.items()})

    def _count_tokens(self, rows: list[dict]) -> None:
        """`num_input_tokens` of embed rows, for OpenAI's usage (tokenized as the Predictor does)."""
        if rows:
            ids = self.predictor.task.processor([r[self.input_column] for r in rows])["input_ids"]
            for row, tokens in zip(rows, ids):
                row["num_input_tokens"] = len(tokens)


@dataclass
class BatchInfo:
    """One Predictor call: its rows, the requests coalesced into it, their distinct adapters."""

    rows: int
    requests: int
    adapters: int  # distinct adapter ids (base rows not counted)
    base: bool  # whether base-model requests were in it
    seconds: float


class BatchStats:
    """Counters behind GET /v1/stats (this replica only)."""

    def __init__(self) -> None:
        self.batches = self.requests = self.rows = 0
        self.max_rows = self.max_requests = self.max_adapters = 0
        self.recent: deque[dict] = deque(maxlen=RECENT_BATCHES)

    def record(self, info: BatchInfo) -> None:
        """Count one Predictor call."""
        self.batches += 1
        self.requests += info.requests
        self.rows += info.rows
        self.max_rows = max(self.max_rows, info.rows)
        self.max_requests = max(self.max_requests, info.requests)
        self.max_adapters = max(self.max_adapters, info.adapters)
        self.recent.append({"rows": info.rows, "requests": info.requests, "adapters": info.adapters,
                            "base": info.base, "seconds": round(info.seconds, 4)})

    def summary(self) -> dict:
        """The JSON of GET /v1/stats (without the live gauges)."""
        n = max(self.batches, 1)
        return {"batches": self.batches, "requests": self.requests, "rows": self.rows,
                "mean_batch_rows": self.rows / n, "max_batch_rows": self.max_rows,
                "mean_batch_requests": self.requests / n, "max_batch_requests": self.max_requests,
                "max_batch_adapters": self.max_adapters, "recent_batches": list(self.recent)}


class ServeMetrics:
    """Ray metrics (exported with Ray's, e.g. on the Prometheus endpoint): requests, errors
    and latency per endpoint and adapter; rows, requests and adapters per coalesced batch.
    The adapter tag is a known model name or `unknown`, so clients cannot grow its values."""

    LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
    SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]

    def __init__(self) -> None:
        from ray.util import metrics

        tags = ("endpoint", "adapter")
        self.requests = metrics.Counter("switchyard_requests", "Requests answered, by HTTP status.",
                                        tag_keys=(*tags, "status"))
        self.errors = metrics.Counter("switchyard_errors", "Requests answered with an error, by error code.",
                                      tag_keys=(*tags, "code"))
        self.latency = metrics.Histogram("switchyard_request_latency_s", "Seconds from request to answer.",
                                         boundaries=self.LATENCY_S, tag_keys=tags)
        self.batch_rows = metrics.Histogram("switchyard_batch_rows", "Rows per coalesced batch.", self.SIZES)
        self.batch_requests = metrics.Histogram("switchyard_batch_requests", "Requests per coalesced batch.",
                                                self.SIZES)
        self.batch_adapters = metrics.Histogram("switchyard_batch_adapters", "Distinct adapters per coalesced batch.",
                                                self.SIZES)
        self.pending_rows = metrics.Gauge("switchyard_pending_rows", "Inputs admitted and not yet answered.")

    def answered(self, endpoint: str, adapter: str, status: int, code: str | None, started: float) -> None:
        """Count one answered request."""
        tags = {"endpoint": endpoint, "adapter": adapter}
        self.requests.inc(tags={**tags, "status": str(status)})
        if code is not None:
            self.errors.inc(tags={**tags, "code": code})
        self.latency.observe(time.perf_counter() - started, tags=tags)

    def batch(self, info: BatchInfo) -> None:
        """Observe one coalesced batch."""
        self.batch_rows.observe(info.rows)
        self.batch_requests.observe(info.requests)
        self.batch_adapters.observe(info.adapters)
