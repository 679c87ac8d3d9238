"""The online half: a Ray Serve deployment holding one `Predictor`, with an OpenAI-compatible
FastAPI ingress. Concurrent requests, whatever adapters they name, are coalesced by
`@serve.batch` into one mixed batch: one Predictor call over all their rows, run in a worker
thread so the event loop keeps parsing requests.

    serve run actors.serve:build_app model=DIR adapters=DIR task=generate
    serve deploy deploy/serve_config.yaml
    python jobs/serve.py --model DIR --adapters DIR --task generate   # main() below

Endpoints (docs/serve.md): GET /v1/models, /v1/stats; POST /v1/completions (generate),
/v1/embeddings (embed), /v1/classify (classify, classify-image), /v1/load_lora_adapter and
/v1/unload_lora_adapter (with enable_adapter_management).

No `from __future__ import annotations` in this module: it is the FastAPI ingress, and
FastAPI resolves route annotations at run time (FACTS.md: with it, every POST got 422).
"""

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.config import TASKS, PredictorConfig
from actors.serve_api import (
    ApiError, ClassifyBody, CompletionBody, EmbeddingBody, LoadAdapterBody, UnloadAdapterBody, Work, base_model_name,
    classify_response, completion_response, completion_work, embedding_response, error_body, image_work,
    models_response, parse_body, read_json, row_error, text_work,
)
from actors.serve_options import ServeOptions, add_flags, options_dict, split_args
from actors.store import ADAPTER_ID_PATTERN, is_valid_adapter_id

logger = logging.getLogger(__name__)
APP_NAME = "switchyard"
REQUEST, ROW = "__request", "__row"  # our own index columns: Predictor row order is not promised
ENDPOINT_TASKS = {"completions": ("generate",), "embeddings": ("embed",), "classify": ("classify", "classify-image")}
SCHEMAS = {"completions": CompletionBody, "embeddings": EmbeddingBody, "classify": ClassifyBody}
INPUT_NAMES = {"completions": "prompt", "embeddings": "input", "classify": "input"}
RECENT_BATCHES = 32

app = FastAPI(title="Switchyard", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods, in OpenAI's error shape."""
    code = "not_found" if exc.status_code == 404 else "http_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(exc.status_code, message, code), status_code=exc.status_code)


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


@serve.deployment(name="Switchyard")
@serve.ingress(app)
class SwitchyardServer:
    """One replica: a Predictor (base model + every adapter of the store) behind HTTP.

    Args:
        predictor_args: keyword arguments of `Predictor` (model, adapters, task, options).
        options: `ServeOptions` fields, as a dict.
    """

    def __init__(self, predictor_args: dict, options: dict) -> None:
        from actors.predictor import Predictor  # torch and transformers load in replicas only

        self.options = ServeOptions(**options)
        self.predictor = Predictor(**predictor_args)
        self.task = self.predictor.config.task
        self.input_column = self.predictor.task.input_column
        self.base_name = base_model_name(predictor_args["model"])
        self.created = int(time.time())
        self.stats = BatchStats()
        self.metrics = ServeMetrics()
        self.pending_rows = 0
        self.broken: BaseException | None = None
        self._coalesce.set_max_batch_size(self.options.max_batch_size)
        self._coalesce.set_batch_wait_timeout_s(self.options.batch_wait_timeout_s)
        if self.base_name in self.predictor.adapter_ids:
            logger.warning("adapter %r has the base model's name; requests for that name get the base model",
                           self.base_name)

    def check_health(self) -> None:
        """Serve's health check: a replica whose model call failed fatally is restarted."""
        if self.broken is not None:
            raise RuntimeError(f"replica unusable after a fatal model error: {self.broken!r}")

    # -- endpoints --------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        """The base model and every adapter (OpenAI's list shape)."""
        return JSONResponse(models_response(self.base_name, self.predictor.adapter_ids, self.created))

    @app.get("/v1/stats")
    async def stats(self) -> JSONResponse:
        """This replica's batching counters (cheap; for tests and dashboards)."""
        replica = serve.get_replica_context().replica_id.unique_id
        return JSONResponse({**self.stats.summary(), "pending_rows": self.pending_rows, "task": self.task,
                             "replica": replica})

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> JSONResponse:
        """OpenAI completions (task generate)."""
        return await self._answer(request, "completions")

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> JSONResponse:
        """OpenAI embeddings (task embed)."""
        return await self._answer(request, "embeddings")

    @app.post("/v1/classify")
    async def classify(self, request: Request) -> JSONResponse:
        """Text or image classification (tasks classify, classify-image)."""
        return await self._answer(request, "classify")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request) -> JSONResponse:
        """Register an adapter folder of the store (this replica only)."""
        return await self._manage(request, "load_lora_adapter")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request) -> JSONResponse:
        """Forget an adapter (this replica only)."""
        return await self._manage(request, "unload_lora_adapter")

    # -- inference requests -----------------------------------------------------------------

    async def _answer(self, request: Request, endpoint: str) -> JSONResponse:
        """Parse, admit, run in a coalesced batch and render one inference request."""
        started, adapter_tag = time.perf_counter(), "unknown"
        try:
            if self.task not in ENDPOINT_TASKS[endpoint]:
                raise ApiError(404, f"/v1/{endpoint} needs task {' or '.join(ENDPOINT_TASKS[endpoint])}; this "
                               f"deployment serves task {self.task}", "not_found")
            body = parse_body(SCHEMAS[endpoint], await read_json(request))
            adapter = self._resolve(body.model)
            adapter_tag = body.model
            rows = await self._submit(self._work(endpoint, body, adapter))
            error = row_error(rows, INPUT_NAMES[endpoint])
            if error is not None:
                raise error
            payload = self._render(endpoint, body, rows)
        except ApiError as e:
            self.metrics.answered(endpoint, adapter_tag, e.status, e.code, started)
            return e.response()
        self.metrics.answered(endpoint, adapter_tag, 200, None, started)
        return JSONResponse(payload)

    def _resolve(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base model).

        Raises:
            ApiError: 404 for a name that is neither the base model nor an adapter.
        """
        if model == self.base_name:
            return None
        if model in self.predictor.adapter_ids:
            return model
        raise ApiError(404, f"model {model[:200]!r} does not exist here; GET /v1/models lists the base model "
                       f"({self.base_name!r}) and every adapter", "model_not_found")

    def _work(self, endpoint: str, body: Any, adapter: str | None) -> Work:
        """The request's rows."""
        if endpoint == "completions":
            return completion_work(body, adapter, self.predictor.config)
        if self.task == "classify-image":
            return image_work(body, adapter)
        return text_work(body, adapter)

    def _render(self, endpoint: str, body: Any, rows: list[dict]) -> dict:
        """The response body for successful rows."""
        if endpoint == "completions":
            return completion_response(body.model, rows)
        if endpoint == "embeddings":
            return embedding_response(body.model, rows, body.encoding_format)
        return classify_response(body.model, rows)

    async def _submit(self, work: Work) -> list[dict]:
        """Admit a request's rows, wait for its coalesced batch, return its rows in order.

        Raises:
            ApiError: 400 for more inputs than max_pending_rows, 503 while too many are
                pending, or the error of a failed model call.
        """
        n, limit = len(work.inputs), self.options.max_pending_rows
        if n > limit:
            raise ApiError(400, f"{n} inputs in one request, over max_pending_rows ({limit}); split the request",
                           "too_many_inputs")
        if self.pending_rows + n > limit:
            raise ApiError(503, f"overloaded: {self.pending_rows} inputs pending, limit {limit}; retry later",
                           "overloaded")
        self._pending(n)
        try:
            result = await self._coalesce(work)
        finally:
            self._pending(-n)
        if isinstance(result, ApiError):
            raise result
        return result

    def _pending(self, delta: int) -> None:
        """Move the pending-rows count (and its gauge)."""
        self.pending_rows += delta
        self.metrics.pending_rows.set(self.pending_rows)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # set from ServeOptions in __init__
    async def _coalesce(self, works: list[Work]) -> list:
        """Concurrent requests -> one mixed batch; runs the model in a worker thread."""
        results, infos = await asyncio.to_thread(self._predict, works)
        for info in infos:
            self.stats.record(info)
            self.metrics.batch(info)
        return results

    def _predict(self, works: list[Work]) -> tuple[list, list[BatchInfo]]:
        """One Predictor call per distinct (top_p, seed, stop) among `works` (usually one)."""
        groups: dict[tuple, list[int]] = {}
        for i, work in enumerate(works):
            groups.setdefault(work.options_key, []).append(i)
        results: list = [None] * len(works)
        infos = []
        for members in groups.values():
            batch = [works[i] for i in members]
            started = time.perf_counter()
            for i, out in zip(members, self._call_predictor(batch)):
                results[i] = out
            adapters = {w.adapter for w in batch}
            infos.append(BatchInfo(sum(len(w.inputs) for w in batch), len(batch), len(adapters - {None}),
                                   None in adapters, time.perf_counter() - started))
        return results, infos

    def _call_predictor(self, batch: list[Work]) -> list:
        """Each request's rows (in order), or an ApiError for every request of a failed call."""
        try:
            predictor = self.predictor.with_options(**batch[0].options) if batch[0].options else self.predictor
        except ValueError as e:
            return [ApiError(400, f"bad_parameter: {e}", "bad_parameter")] * len(batch)
        try:
            table = predictor(self._table(batch))
        except Exception as e:  # noqa: BLE001 - the requests get 500; a fatal error also fails the health check
            logger.exception("Predictor call over %d requests failed", len(batch))
            if not isinstance(e, ValueError):  # ValueError = a malformed batch, our bug; the rest is fatal
                self.broken = e
            return [ApiError(500, f"internal: {type(e).__name__}: {e}", "internal")] * len(batch)
        rows: list[list] = [[None] * len(w.inputs) for w in batch]
        for row in table.to_pylist():
            rows[row[REQUEST]][row[ROW]] = row
        if self.task == "embed":
            self._count_tokens([r for rs in rows for r in rs if not r["error"]])
        return rows

    def _table(self, batch: list[Work]) -> pa.Table:
        """The Predictor's input: every request's rows, with our index columns."""
        columns: dict[str, list] = {self.input_column: [], "adapter_id": [], REQUEST: [], ROW: []}
        for name in batch[0].params:
            columns[name] = []
        for r, work in enumerate(batch):
            n = len(work.inputs)
            columns[self.input_column] += work.inputs
            columns["adapter_id"] += [work.adapter] * n
            columns[REQUEST] += [r] * n
            columns[ROW] += range(n)
            for name, values in work.params.items():
                columns[name] += values
        types = {"prompt": pa.string(), "text": pa.string(), "image": pa.binary(), "adapter_id": pa.string(),
                 "max_new_tokens": pa.int64(), "temperature": pa.float64()}
        return pa.table({name: pa.array(values, type=types.get(name, pa.int64())) for name, values in columns.items()})

    def _count_tokens(self, rows: list[dict]) -> None:
        """`num_input_tokens` of embed rows, for OpenAI's usage (the Predictor tokenizes alike)."""
        if rows:
            ids = self.predictor.task.processor([r[self.input_column] for r in rows])["input_ids"]
            for row, tokens in zip(rows, ids):
                row["num_input_tokens"] = len(tokens)

    # -- adapter management -----------------------------------------------------------------

    async def _manage(self, request: Request, endpoint: str) -> JSONResponse:
        """Load or unload an adapter of the store, when enabled."""
        started, adapter_tag = time.perf_counter(), "unknown"
        try:
            if not self.options.enable_adapter_management:
                raise ApiError(404, f"/v1/{endpoint} is off; deploy with enable_adapter_management=true "
                               "(jobs/serve.py --enable-adapter-management) to load and unload adapters", "not_found")
            data = await read_json(request)
            if endpoint == "load_lora_adapter":
                name, status = await self._load(parse_body(LoadAdapterBody, data))
            else:
                name, status = await self._unload(parse_body(UnloadAdapterBody, data))
            adapter_tag = name
        except ApiError as e:
            self.metrics.answered(endpoint, adapter_tag, e.status, e.code, started)
            return e.response()
        self.metrics.answered(endpoint, adapter_tag, 200, None, started)
        return JSONResponse({"object": "lora_adapter", "id": name, "status": status})

    async def _load(self, body: LoadAdapterBody) -> tuple[str, str]:
        """Register store/lora_name; loading an adapter twice is a no-op."""
        name = self._adapter_in_store(body.lora_name, body.lora_path)
        if body.load_inplace:
            raise ApiError(400, "load_inplace is not supported: unload the adapter, then load it", "unsupported")
        if name in self.predictor.adapter_ids:
            return name, "already_loaded"
        try:
            await asyncio.to_thread(self.predictor.load_adapter, name)
        except KeyError as e:
            raise ApiError(404, f"no adapter folder {name!r} (with adapter_config.json) in the adapter store; "
                           "copy it there first", "adapter_not_found") from e
        except ValueError as e:
            raise ApiError(400, str(e), "bad_adapter") from e
        logger.info("loaded adapter %s", name)
        return name, "loaded"

    async def _unload(self, body: UnloadAdapterBody) -> tuple[str, str]:
        """Forget an adapter; its later requests get 404."""
        name = body.lora_name
        if name not in self.predictor.adapter_ids:
            raise ApiError(404, f"adapter {name[:200]!r} is not loaded", "adapter_not_found")
        try:
            await asyncio.to_thread(self.predictor.unload_adapter, name)
        except KeyError as e:
            raise ApiError(404, f"adapter {name!r} is not loaded", "adapter_not_found") from e
        logger.info("unloaded adapter %s", name)
        return name, "unloaded"

    def _adapter_in_store(self, name: str, path: str | None) -> str:
        """`name`, checked to be an adapter id whose folder (and `path`, if given) is inside the store.

        Raises:
            ApiError: 400 for a bad id, the base model's name, no store, or a path elsewhere.
        """
        if not is_valid_adapter_id(name):
            raise ApiError(400, f"lora_name {name[:200]!r} must match {ADAPTER_ID_PATTERN.pattern}", "bad_adapter_id")
        if name == self.base_name:
            raise ApiError(400, f"lora_name {name!r} is the base model's name; pick another", "bad_adapter_id")
        store = self.predictor.config.adapters
        if store is None:
            raise ApiError(400, "this deployment has no adapter store (start it with adapters=DIR)", "no_store")
        if path is not None:
            try:
                inside = (Path(store) / path).resolve() == (Path(store) / name).resolve()
            except (OSError, ValueError):
                inside = False
            if not inside:
                raise ApiError(400, "lora_path must be the folder named lora_name inside the server's adapter "
                               "store (or be omitted): adapters load only from the store", "path_outside_store")
        return name


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application: `serve deploy` / `serve run actors.serve:build_app key=value ...`.

    Args:
        args: model, adapters, task, any `PredictorConfig` option (device, dtype,
            max_new_tokens, ...) and any `ServeOptions` field (num_replicas, num_cpus,
            num_gpus, max_batch_size, ...). Strings are converted to the fields' types.

    Returns:
        The bound deployment.

    Raises:
        ValueError: an unknown argument or a bad value (checked before any replica starts).
    """
    predictor_args, options = split_args(dict(args))
    deployment = SwitchyardServer.options(**options.deployment_options())
    return deployment.bind(predictor_args, options_dict(options))


# ---------------------------------------------------------------------------------------
# jobs/serve.py: a local server from flags
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """jobs/serve.py's flags: the Predictor's options and the serving options."""
    p = argparse.ArgumentParser(prog="serve.py", description="Switchyard online: an OpenAI-compatible server "
                                "for one base model and every adapter of a store, on Ray Serve.")
    p.add_argument("--model", required=True, help="local Hugging Face model folder")
    p.add_argument("--adapters", help="adapter store: a folder of PEFT adapter folders")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    add_flags(p, PredictorConfig, skip={"model", "adapters", "task"})
    add_flags(p, ServeOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    """Deploy on a local Ray (or RAY_ADDRESS's), print the URL once it answers, block until
    Ctrl-C or SIGTERM, then take the application down. Returns the exit status."""
    args = vars(build_parser().parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        application = build_app({k: v for k, v in args.items() if v is not None})
        joined = _connect_ray(host, port)
    except ValueError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    url = f"http://{host}:{port}/v1"
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=APP_NAME, route_prefix="/")
        _wait_until_answering(port)
        print(f"Switchyard ({args['task']}) is serving at {url}  (Ctrl-C stops it)", flush=True)
        _block_until_stopped()
    finally:
        _take_down(joined)
    return 0


def _connect_ray(host: str, port: int) -> bool:
    """Join RAY_ADDRESS's cluster (True) or start a local one (False, after checking the port).

    Raises:
        ValueError: the port is taken.
    """
    import ray

    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return True
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port} ({e}); pass another --port") from e
    ray.init(address="local", include_dashboard=False)
    return False


def _wait_until_answering(port: int, timeout_s: float = 120.0) -> None:
    """Poll GET /v1/models on loopback until it answers 200.

    Raises:
        RuntimeError: no answer within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the endpoint on port {port} did not answer within {timeout_s:.0f}s; see the Ray logs")
        time.sleep(0.25)


def _block_until_stopped() -> None:
    """Sleep until Ctrl-C or SIGTERM."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM stops the server like Ctrl-C."""
    raise KeyboardInterrupt


def _take_down(joined: bool) -> None:
    """Delete our application on a joined cluster; shut Serve and Ray down on our own."""
    import ray

    try:
        if joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    except Exception as e:  # noqa: BLE001 - e.g. Ray's own processes already got the signal too
        logger.warning("could not take the application down cleanly: %s", e)
    if not joined:
        ray.shutdown()
