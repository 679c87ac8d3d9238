"""The model side of the Serve application: `SwitchyardModel`, a deployment whose replicas
each hold a `Predictor` and coalesce concurrent requests into mixed batches. It speaks no
HTTP: the ingress (actors/serve/ingress.py) reads and parses each body and calls it through a
deployment handle with the parsed JSON; every method answers a `Reply` (status, JSON body)
that the ingress renders. A replica that dies mid-request therefore fails only the handle
call, which the ingress, in another process, answers with a 503 in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve

from actors.allocator import running_allocator
from actors.serve.api import (
    ApiError, ChatBody, ClassifyBody, CompletionBody, EmbeddingBody, LoadAdapterBody, Reply, UnloadAdapterBody, Work,
    base_model_name, chat_response, chat_work, classify_response, completion_response, completion_work,
    embedding_response, image_work, models_response, parse_body, row_error, text_work,
)
from actors.serve.batching import BatchRunner, BatchStats, Coalescer, ServeMetrics
from actors.serve.options import ServeOptions
from actors.serve.streaming import EngineRequest, sse_events
from actors.store import ADAPTER_ID_PATTERN, is_valid_adapter_id

logger = logging.getLogger(__name__)
SCHEMAS = {"completions": CompletionBody, "chat/completions": ChatBody, "embeddings": EmbeddingBody,
           "classify": ClassifyBody}
INPUT_NAMES = {"completions": "prompt", "chat/completions": "messages", "embeddings": "input", "classify": "input"}


@serve.deployment(name="SwitchyardModel")
class SwitchyardModel:
    """One replica: a Predictor (base model + every adapter of the store) and its batching.

    Args:
        predictor_args: keyword arguments of `Predictor` (model, adapters, task, options).
        options: `ServeOptions` fields, as a dict.
    """

    def __init__(self, predictor_args: dict, options: dict) -> None:
        from actors.predictor import Predictor  # torch and transformers load in replicas only

        self.options = ServeOptions(**options)
        self.predictor = Predictor(**predictor_args)
        self.task = self.predictor.config.task
        self.runner = BatchRunner(self.predictor)
        self.base_names = self.options.served_model_name or [base_model_name(predictor_args["model"])]
        self.base_name = self.base_names[0]
        self.created = int(time.time())
        self.batch_stats = BatchStats()
        self.metrics = ServeMetrics()
        self.pending_rows = 0
        self.by_adapter: collections.Counter[str] = collections.Counter()  # requests taken per adapter ("": base)
        self.coalescer = Coalescer(self._run_batch, self.options.max_batch_size, self.options.batch_wait_timeout_s)
        self.engine = None
        if self.options.batcher_for(self.task) == "continuous":
            from actors.engine import DecodeEngine

            self.engine = DecodeEngine(self.predictor, self.options.max_batch_size)
        self._serve_batch.set_max_batch_size(self.options.max_batch_size)
        self._serve_batch.set_batch_wait_timeout_s(self.options.batch_wait_timeout_s)
        for name in set(self.base_names) & set(self.predictor.adapter_ids):
            logger.warning("adapter %r has the base model's name; requests for that name get the base model", name)

    def check_health(self) -> None:
        """Serve's health check: a replica whose model call failed fatally is restarted."""
        if self.runner.broken is not None:
            raise RuntimeError(f"replica unusable after a fatal model error: {self.runner.broken!r}")
        if not self.coalescer.alive:
            raise RuntimeError("the batching task stopped; requests would wait forever")
        if self.engine is not None and (self.engine.broken is not None or not self.engine.alive):
            raise RuntimeError(f"the decoding loop stopped or failed fatally: {self.engine.broken!r}")

    # -- what the ingress calls -------------------------------------------------------------

    async def models(self) -> Reply:
        """GET /v1/models: the base model and every adapter (OpenAI's list shape)."""
        return Reply(200, models_response(self.base_name, self.predictor.adapter_ids, self.created))

    async def health(self) -> Reply:
        """GET /health: 200 while this replica can answer, else 503 (what `check_health` sees)."""
        try:
            self.check_health()
        except RuntimeError as e:
            return ApiError(503, f"the model replica is unhealthy: {e}", "replica_unavailable").reply()
        return Reply(200, {})

    async def stats(self) -> Reply:
        """GET /v1/stats: this replica's batching counters (cheap; for tests and dashboards)."""
        replica = serve.get_replica_context().replica_id.unique_id
        engine = {"continuous": self.engine.summary()} if self.engine is not None else {}
        return Reply(200, {**self.batch_stats.summary(), **engine, "pending_rows": self.pending_rows,
                           "task": self.task, "replica": replica, "requests_by_adapter": dict(self.by_adapter),
                           "adapters": len(self.predictor.adapter_ids), "slot_loads": self.predictor.runtime.slot_loads,
                           "allocator": running_allocator()})

    async def answer(self, endpoint: str, data: dict) -> Reply:
        """One inference request: validate, admit, run in a mixed batch, render.

        Args:
            endpoint: "completions", "chat/completions", "embeddings" or "classify" (the
                ingress checked the task).
            data: the request's JSON object.

        Returns:
            The response, or an error in OpenAI's shape.
        """
        adapter_tag = "unknown"
        try:
            body, adapter = self._parse(endpoint, data)
            adapter_tag = body.model
            work = self._work(endpoint, body, adapter)
            if work.stream:
                raise ApiError(400, "stream: true is answered by the streaming call; send it through the HTTP "
                               "server", "bad_parameter")
            self.by_adapter[adapter or ""] += 1
            rows = await self._submit(work, endpoint)
            error = row_error(rows, INPUT_NAMES[endpoint])
            if error is not None:
                raise error
            return Reply(200, self._render(endpoint, body, rows, work.copies), adapter_tag)
        except ApiError as e:
            return e.reply(adapter_tag)

    async def answer_stream(self, endpoint: str, data: dict) -> AsyncIterator[Reply | str]:
        """A request with `stream: true` (completions, chat): first a `Reply` (an error, or a
        200 whose body is empty: the stream begins), then its server-sent events. A
        cancelled call (the client went away) takes its rows out of the batch."""
        adapter_tag = "unknown"
        try:
            body, adapter = self._parse(endpoint, data)
            adapter_tag = body.model
            work = self._work(endpoint, body, adapter)
            self._check_engine(work)
            request = EngineRequest(self.engine, work, endpoint)
            self._admit(work.rows)
            self.by_adapter[adapter or ""] += 1
        except ApiError as e:
            yield e.reply(adapter_tag)
            return
        try:
            await request.start()
        except ApiError as e:
            self._pending(-work.rows)
            yield e.reply(adapter_tag)
            return
        try:
            yield Reply(200, {}, adapter_tag)
            events = []
            async for event in sse_events(request, body.model):
                events.append(event)
                if not request.has_reports():  # what came in one go leaves as one message
                    yield "".join(events)
                    events = []
            if events:
                yield "".join(events)
        finally:
            request.cancel()  # no-op for finished rows
            self._pending(-work.rows)

    async def manage(self, endpoint: str, data: dict) -> Reply:
        """POST /v1/load_lora_adapter or /v1/unload_lora_adapter (the ingress checked that
        adapter management is on).

        Args:
            endpoint: "load_lora_adapter" or "unload_lora_adapter".
            data: the request's JSON object.

        Returns:
            `{"object": "lora_adapter", "id", "status"}`, or an error in OpenAI's shape.
        """
        try:
            if endpoint == "load_lora_adapter":
                name, status = await self._load(parse_body(LoadAdapterBody, data))
            else:
                name, status = await self._unload(parse_body(UnloadAdapterBody, data))
        except ApiError as e:
            return e.reply()
        return Reply(200, {"object": "lora_adapter", "id": name, "status": status}, name)

    # -- inference requests -----------------------------------------------------------------

    def _resolve(self, model: str) -> str | None:
        """The adapter a request's `model` names (None: the base model).

        Raises:
            ApiError: 404 for a name that is neither the base model nor an adapter.
        """
        if model in self.base_names:
            return None
        if self.predictor.knows(model):
            return model
        raise ApiError(404, f"model {model[:200]!r} does not exist here; GET /v1/models lists the base model "
                       f"({self.base_name!r}) and every adapter", "model_not_found")

    def _work(self, endpoint: str, body: Any, adapter: str | None) -> Work:
        """The request's rows."""
        if endpoint == "completions":
            return completion_work(body, adapter, self.predictor.config)
        if endpoint == "chat/completions":
            return chat_work(body, adapter, self.predictor.config)
        if self.task == "classify-image":
            return image_work(body, adapter)
        return text_work(body, adapter)

    def _parse(self, endpoint: str, data: dict) -> tuple[Any, str | None]:
        """The request's body, and the adapter its `model` names (None: the base model).

        Raises:
            ApiError: 400 for a bad body, 404 for an unknown model.
        """
        body = parse_body(SCHEMAS[endpoint], data)
        return body, self._resolve(body.model)

    def _render(self, endpoint: str, body: Any, rows: list[dict], copies: int) -> dict:
        """The response body for successful rows."""
        if endpoint == "completions":
            return completion_response(body.model, rows, copies)
        if endpoint == "chat/completions":
            return chat_response(body.model, rows, copies)
        if endpoint == "embeddings":
            return embedding_response(body.model, rows, body.encoding_format)
        return classify_response(body.model, rows)

    def _check_engine(self, work: Work) -> None:
        """Raise 400 for stream, n > 1 or logprobs when the continuous batcher is off."""
        if work.needs_engine and self.engine is None:
            raise ApiError(400, f"{work.needs_engine} need the continuous batcher; this deployment runs batcher "
                           f"{self.options.batcher!r} (start it with batcher=continuous, the default for task "
                           "generate)", "unsupported")

    def _admit(self, n: int) -> None:
        """Count `n` more pending rows.

        Raises:
            ApiError: 400 for more rows than max_pending_rows, 503 while too many are pending.
        """
        limit = self.options.max_pending_rows
        if n > limit:
            raise ApiError(400, f"{n} inputs in one request, over max_pending_rows ({limit}); split the request",
                           "too_many_inputs")
        if self.pending_rows + n > limit:
            raise ApiError(503, f"overloaded: {self.pending_rows} inputs pending, limit {limit}; retry later",
                           "overloaded")
        self._pending(n)

    async def _submit(self, work: Work, endpoint: str) -> list[dict]:
        """Admit a request's rows, wait for them (the continuous batcher for generate, else a
        coalesced batch), return its rows in order.

        Raises:
            ApiError: 400 for more inputs than max_pending_rows, 503 while too many are
                pending, or the error of a failed model call.
        """
        self._check_engine(work)  # only generation work sets stream, n or logprobs
        self._admit(work.rows)
        try:
            if self.engine is not None:  # a continuous batcher exists for task generate only
                request = EngineRequest(self.engine, work, endpoint)
                try:
                    await request.start()
                    return await request.finals()
                finally:
                    request.cancel()  # the caller went away mid-way: its rows leave the batch
            if self.options.batcher == "serve.batch":
                result = await self._serve_batch(work)
            else:
                result = await self.coalescer.submit(work)
        finally:
            self._pending(-work.rows)
        if isinstance(result, ApiError):
            raise result
        return result

    def _pending(self, delta: int) -> None:
        """Move the pending-rows count (and its gauge)."""
        self.pending_rows += delta
        self.metrics.pending_rows.set(self.pending_rows)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # set from ServeOptions in __init__
    async def _serve_batch(self, works: list[Work]) -> list:
        """batcher="serve.batch": Ray's batching (see actors/serve/batching.py for the difference)."""
        return await self._run_batch(works)

    async def _run_batch(self, works: list[Work]) -> list:
        """Concurrent requests -> one mixed batch; runs the model in a worker thread."""
        results, infos = await asyncio.to_thread(self.runner, works)
        for info in infos:
            self.batch_stats.record(info)
            self.metrics.batch(info)
        return results

    # -- adapter management -----------------------------------------------------------------

    async def _load(self, body: LoadAdapterBody) -> tuple[str, str]:
        """Register store/lora_name; loading an adapter twice is a no-op."""
        name = self._adapter_in_store(body.lora_name, body.lora_path)
        if body.load_inplace:
            raise ApiError(400, "load_inplace is not supported: unload the adapter, then load it", "unsupported")
        if self.predictor.knows(name):
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
        if not self.predictor.knows(name):
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
