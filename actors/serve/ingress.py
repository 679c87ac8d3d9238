"""The online half: a Ray Serve application of two deployments with an OpenAI-compatible API.

`SwitchyardIngress` (here, the FastAPI app) answers HTTP: it reads and checks each body (size,
nesting depth, JSON) and calls `SwitchyardModel` (actors/serve/model.py) through a deployment
handle. The model replicas hold a Predictor each and coalesce concurrent requests, whatever
adapters they name, into one mixed batch run in a worker thread (actors/serve/batching.py).

Why two deployments: when a replica dies mid-request, Serve's HTTP proxy answers its requests
with its own 500 in text/plain. The ingress is another process: it sees the handle call fail
(`RayActorError`) and answers 503 with Retry-After in OpenAI's error shape.

    serve run actors.serve:build_app model=DIR adapters=DIR task=generate
    serve deploy deploy/serve_config.yaml
    python jobs/serve.py --model DIR --adapters DIR --task generate   # actors/serve/launch.py

Endpoints (README.md, "Online serving"): GET /v1/models, /v1/stats; POST /v1/completions (generate),
/v1/embeddings (embed), /v1/classify (classify, classify-image), /v1/load_lora_adapter and
/v1/unload_lora_adapter (with enable_adapter_management).

No `from __future__ import annotations` in this module: it is the FastAPI ingress, and
FastAPI resolves route annotations at run time (docs/pitfalls.md: with it, every POST got 422).
"""

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import Application
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.config import PredictorConfig
from actors.serve.api import ApiError, Reply, base_model_name, error_body, read_json, server_sent
from actors.serve.batching import ServeMetrics
from actors.serve.model import SwitchyardModel
from actors.serve.options import ServeOptions, options_dict, split_args
from actors.serve.routing import AdapterAffinityRouter, pin, running_replicas

logger = logging.getLogger(__name__)
ENDPOINT_TASKS = {"completions": ("generate",), "chat/completions": ("generate",), "embeddings": ("embed",),
                  "classify": ("classify", "classify-image")}

app = FastAPI(title="Switchyard", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods, in OpenAI's error shape."""
    code = "not_found" if exc.status_code == 404 else "http_error"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(error_body(exc.status_code, message, code), status_code=exc.status_code)


STREAMING = ("completions", "chat/completions")  # endpoints that take `stream: true`
RESTART_PROBE_TIMEOUT_S = 5.0  # how long one probe of a restarting model replica may wait
RESTART_PROBE_INTERVAL_S = 0.5
MANAGE_TIMEOUT_S = 120.0  # how long one replica may take to load (read, check, canary) an adapter
MODEL_DEPLOYMENT = "SwitchyardModel"


# Defined above the deployment class: defined below it, it was missing in the replica (a NameError
# there): the class, wrapped by `serve.ingress`, travels by value with the globals it saw
# (docs/pitfalls.md "Ray Serve").
def _restarting_reply() -> Reply:
    """503 while the only model replica restarts after it stopped."""
    return ApiError(503, "the model replica is restarting after it stopped; retry after Retry-After seconds",
                    "replica_unavailable").reply()


def model_failure(error: Exception) -> ApiError:
    """The answer to a request whose call to a model replica failed, rather than the request.

    Args:
        error: what awaiting the deployment handle raised.

    Returns:
        503 (with Retry-After) when the replica died or is unreachable, when no replica runs,
        or when the queue for busy replicas is full; 500 for anything else.
    """
    if isinstance(error, RayActorError):  # ActorDiedError, ActorUnavailableError
        return ApiError(503, "the model replica serving this request stopped before answering; Serve starts a new "
                        "one. Retry after Retry-After seconds (with num_replicas >= 2 another replica answers at once)",
                        "replica_unavailable")
    if isinstance(error, DeploymentUnavailableError):
        return ApiError(503, "no model replica is running (the deployment is starting or being replaced); retry "
                        "after Retry-After seconds", "replica_unavailable")
    if isinstance(error, BackPressureError):
        return ApiError(503, f"overloaded: {error.message}; retry after Retry-After seconds", "overloaded")
    logger.error("a call to a model replica failed: %s", error)
    return ApiError(500, f"internal: the model replica's call failed ({type(error).__name__}); see the replica's "
                    "log", "internal")



@serve.deployment(name="SwitchyardIngress")
@serve.ingress(app)
class SwitchyardIngress:
    """The HTTP side: bodies in, a call to a model replica, JSON out; no model here.

    Args:
        model: handle of the `SwitchyardModel` deployment.
        task: the deployment's task (which endpoints it serves).
        options: `ServeOptions` fields, as a dict.
    """

    def __init__(self, model: DeploymentHandle, task: str, options: dict, base_names: list[str] = ()) -> None:
        self.model = model
        self.task = task
        self.options = ServeOptions(**options)
        self.base_names = set(base_names)  # requests naming these have no adapter, so no home replica
        self.metrics = ServeMetrics()
        self._restart: asyncio.Task | None = None  # one replica died: waits until a model replica answers again

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 when a model replica answers; 503 with Retry-After while none does (vLLM's /health)."""
        return await self._call(None, time.perf_counter(), "health")

    @app.get("/v1/models")
    async def models(self) -> JSONResponse:
        """The base model and every adapter (OpenAI's list shape)."""
        return await self._call(None, time.perf_counter(), "models")

    @app.get("/v1/stats")
    async def stats(self) -> JSONResponse:
        """One model replica's batching counters (cheap; for tests and dashboards)."""
        return await self._call(None, time.perf_counter(), "stats")

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> JSONResponse:
        """OpenAI completions (task generate)."""
        return await self._infer(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> JSONResponse:
        """OpenAI chat completions (task generate): the turns rendered by the chat template."""
        return await self._infer(request, "chat/completions")

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> JSONResponse:
        """OpenAI embeddings (task embed)."""
        return await self._infer(request, "embeddings")

    @app.post("/v1/classify")
    async def classify(self, request: Request) -> JSONResponse:
        """Text or image classification (tasks classify, classify-image)."""
        return await self._infer(request, "classify")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, request: Request) -> JSONResponse:
        """Register an adapter folder of the store on every model replica."""
        return await self._manage(request, "load_lora_adapter")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, request: Request) -> JSONResponse:
        """Forget an adapter on every model replica."""
        return await self._manage(request, "unload_lora_adapter")

    async def _infer(self, request: Request, endpoint: str) -> JSONResponse:
        """An inference request: checked and parsed here, answered by a model replica."""
        started = time.perf_counter()
        try:
            if self.task not in ENDPOINT_TASKS[endpoint]:
                raise ApiError(404, f"/v1/{endpoint} needs task {' or '.join(ENDPOINT_TASKS[endpoint])}; this "
                               f"deployment serves task {self.task}", "not_found")
            data = await read_json(request)
        except ApiError as e:
            return self._answered(endpoint, e.reply(), started)
        if endpoint in STREAMING and isinstance(data, dict) and data.get("stream") is True:
            return await self._stream(endpoint, started, data)
        return await self._call(endpoint, started, "answer", endpoint, data, affinity=self._affinity(data))

    def _affinity(self, data: Any) -> str:
        """The adapter a request names (its home replica serves it: actors/serve/routing.py),
        or "" for the base model and bodies the replica will refuse."""
        model = data.get("model") if isinstance(data, dict) and self.options.adapter_affinity else None
        return model if isinstance(model, str) and model not in self.base_names else ""

    async def _stream(self, endpoint: str, started: float, data: dict) -> JSONResponse | StreamingResponse:
        """A streaming request: the model replica's first item is its answer's head (an
        error, or 200: then its server-sent events follow). When the client goes away,
        Starlette stops the body, and cancelling the handle's stream takes the request's
        rows out of the replica's batch."""
        if self._restarting():
            return self._answered(endpoint, _restarting_reply(), started)
        events = self.model.options(stream=True, session_id=self._affinity(data)).answer_stream.remote(
            endpoint, data)
        try:
            head = await events.__anext__()
        except Exception as e:  # noqa: BLE001 - the replica died or is unreachable: answered in JSON
            events.cancel()
            return self._answered(endpoint, model_failure(e).reply(), started)
        self._answered(endpoint, head, started)
        if head.status != 200:
            return head.response()

        async def body():
            try:
                async for event in events:
                    yield event
            except Exception as e:  # noqa: BLE001 - the replica died mid-stream: an error event ends it
                error = model_failure(e)
                yield server_sent(error_body(error.status, error.message, error.code))
                yield server_sent("[DONE]")
            finally:
                events.cancel()  # a no-op once the stream ended

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _manage(self, request: Request, endpoint: str) -> JSONResponse:
        """Load or unload an adapter of the store, when enabled."""
        started = time.perf_counter()
        try:
            if not self.options.enable_adapter_management:
                raise ApiError(404, f"/v1/{endpoint} is off; deploy with enable_adapter_management=true "
                               "(jobs/serve.py --enable-adapter-management) to load and unload adapters", "not_found")
            data = await read_json(request)
        except ApiError as e:
            return self._answered(endpoint, e.reply(), started)
        if self._restarting():
            return self._answered(endpoint, _restarting_reply(), started)
        return self._answered(endpoint, await self._manage_everywhere(endpoint, data), started)

    async def _manage_everywhere(self, endpoint: str, data: Any) -> Reply:
        """Load or unload on every running model replica, each call pinned to its replica, in turn.

        One reply for all: the replicas' shared answer to a bad request (they check it
        alike); else 200 when every replica answered 200 (loading is idempotent), or 404 on
        some for an unload (those did not have it: 200 if any did, 404 if none); 503 when a
        replica did not answer, naming how many did (loading again is safe)."""
        try:
            await self.model.stats.remote()  # the handle learns of the replicas from Serve's controller
        except Exception as e:  # noqa: BLE001 - no replica answers
            return model_failure(e).reply()
        replicas = running_replicas(serve.get_replica_context().app_name, MODEL_DEPLOYMENT)

        async def one(replica: str) -> Reply | Exception:
            call = self.model.options(session_id=pin(replica)).manage.remote(endpoint, data)
            try:
                return await asyncio.wait_for(call, MANAGE_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - the replica died or did not answer: counted below
                call.cancel()
                return e

        # One replica after the other: calls made while answering one HTTP request share its
        # request id, and Serve's router matches concurrent calls to replicas by that id.
        replies = [await one(r) for r in replicas]
        answered = [r for r in replies if isinstance(r, Reply)]
        refused = [r for r in answered if r.status != 200 and not (endpoint == "unload_lora_adapter" and r.status == 404)]
        if refused:
            return refused[0]
        if len(answered) < len(replicas) or not replicas:
            failed = next((r for r in replies if not isinstance(r, Reply)), None)
            logger.error("%s reached %d of %d model replicas: %r", endpoint, len(answered), len(replicas), failed)
            return ApiError(503, f"{endpoint} reached {len(answered)} of {len(replicas)} model replicas (one stopped "
                            "or did not answer in time); retry after Retry-After seconds (loading and unloading "
                            "again is safe)", "replica_unavailable").reply()
        done = [r for r in answered if r.status == 200]
        if not done:
            return answered[0]  # unload: no replica had it (404)
        return next((r for r in done if r.body.get("status") in ("loaded", "unloaded")), done[0])

    async def _call(self, endpoint: str | None, started: float, method: str, *args: Any,
                    affinity: str = "") -> JSONResponse:
        """Call `method` of a model replica (the home replica of `affinity`, an adapter id); a
        failed call (not a failed request) gets `model_failure`. While the only model replica
        restarts after dying, calls get 503 at once instead of waiting for its successor
        (which may take as long as loading the model)."""
        if self._restarting():
            return self._answered(endpoint, _restarting_reply(), started)
        try:
            handle = self.model.options(session_id=affinity) if affinity else self.model
            reply = await getattr(handle, method).remote(*args)
        except Exception as e:  # noqa: BLE001 - the replica died, the queue is full, or a bug: answered in JSON
            if isinstance(e, RayActorError) and self.options.num_replicas == 1 and (
                    self._restart is None or self._restart.done()):
                self._restart = asyncio.get_running_loop().create_task(self._until_a_replica_answers())
            reply = model_failure(e).reply()
        return self._answered(endpoint, reply, started)

    def _restarting(self) -> bool:
        """Whether the only model replica is restarting (calls get 503 at once meanwhile)."""
        return self._restart is not None and not self._restart.done()

    async def _until_a_replica_answers(self) -> None:
        """Poll a model replica (its cheap stats) until one answers: Serve's successor is up."""
        while True:
            try:
                await asyncio.wait_for(self.model.stats.remote(), timeout=RESTART_PROBE_TIMEOUT_S)
                logger.info("a model replica answers again")
                return
            except Exception:  # noqa: BLE001 - not up yet (dead, starting, or still queued)
                await asyncio.sleep(RESTART_PROBE_INTERVAL_S)

    def _answered(self, endpoint: str | None, reply: Reply, started: float) -> JSONResponse:
        """Count the answer (inference and adapter endpoints only) and render it."""
        if endpoint is not None:
            self.metrics.answered(endpoint, reply.adapter, reply.status, reply.code, started)
        return reply.response()


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application: `serve deploy` / `serve run actors.serve:build_app key=value ...`.

    Args:
        args: model, adapters, task, any `PredictorConfig` option (device, dtype,
            max_new_tokens, ...) and any `ServeOptions` field (num_replicas, num_cpus,
            num_gpus, max_batch_size, ...). Strings are converted to the fields' types.

    Returns:
        The ingress deployment, bound to the model deployment.

    Raises:
        ValueError: an unknown argument or a bad value (checked before any replica starts).
    """
    from ray.serve.config import RequestRouterConfig

    predictor_args, options = split_args(dict(args))
    router = RequestRouterConfig(request_router_class=AdapterAffinityRouter,
                                 request_router_kwargs={"spill_queue": options.max_batch_size})
    model = SwitchyardModel.options(name=MODEL_DEPLOYMENT, request_router_config=router,
                                    **options.deployment_options()).bind(predictor_args, options_dict(options))
    task = predictor_args.get("task", PredictorConfig.task)
    base_names = options.served_model_name or [base_model_name(predictor_args["model"])]
    return SwitchyardIngress.options(**options.ingress_options()).bind(model, task, options_dict(options), base_names)
