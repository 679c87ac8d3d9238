"""Settings of the Serve application (its model and ingress deployments), and how they
arrive: `build_app(args)` (YAML values from `serve deploy`, strings from `serve run ...
key=value`) and `jobs/serve.py`'s flags (`main`), both built from the fields of
`PredictorConfig` and `ServeOptions`. Ray is imported only by `main`, torch not at all."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, fields
from typing import Any

from actors.config import DTYPES, TASKS, PredictorConfig, require
from actors.options import add_flags, convert
from actors.store import AdapterStore

logger = logging.getLogger(__name__)
PREDICTOR_FIELDS = {f.name for f in fields(PredictorConfig)}
BATCHERS = ("coalescer", "serve.batch")


@dataclass
class ServeOptions:
    """How the deployment serves: replicas, their resources, batching and admission.

    Args:
        num_replicas: replicas of the deployment (each holds the base model and every adapter).
        num_cpus, num_gpus: resources per replica. On CPU, torch uses int(num_cpus) threads
            (at least 1) unless `num_threads` is given.
        max_batch_size: requests coalesced into one mixed batch (one Predictor call).
        batch_wait_timeout_s: how long a batch waits for more requests once the model is
            free (not at all when max_batch_size requests already wait).
        batcher: "coalescer" (Switchyard's: the next batch takes every request that arrived
            during the running one) or "serve.batch" (Ray's `@serve.batch`, whose batches
            close on a timer while the model is busy: smaller batches under load).
        max_ongoing_requests: requests a replica admits at once (None: 4 x max_batch_size);
            must be >= max_batch_size, or batches never fill.
        max_queued_requests: requests queued for busy model replicas (per ingress replica)
            before a 503 `overloaded` (-1: no limit).
        max_pending_rows: inputs admitted into a replica and not yet answered; past it a
            request gets 503 (OpenAI shape). A request with more inputs gets 400.
        enable_adapter_management: serve /v1/load_lora_adapter and /v1/unload_lora_adapter.
        access_log: Serve's one log line per request.
    """

    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_batch_size: int = 32
    batch_wait_timeout_s: float = 0.01
    batcher: str = "coalescer"
    max_ongoing_requests: int | None = None
    max_queued_requests: int = -1
    max_pending_rows: int = 1024
    enable_adapter_management: bool = False
    access_log: bool = False

    def __post_init__(self) -> None:
        if self.max_ongoing_requests is None:
            self.max_ongoing_requests = 4 * self.max_batch_size
        require(self.num_replicas >= 1, f"num_replicas ({self.num_replicas!r}) must be >= 1")
        require(self.num_cpus >= 0 and self.num_gpus >= 0,
               f"num_cpus ({self.num_cpus!r}) and num_gpus ({self.num_gpus!r}) must be >= 0")
        require(self.max_batch_size >= 1, f"max_batch_size ({self.max_batch_size!r}) must be >= 1")
        require(self.batch_wait_timeout_s >= 0, f"batch_wait_timeout_s ({self.batch_wait_timeout_s!r}) must be >= 0")
        require(self.batcher in BATCHERS, f"batcher ({self.batcher!r}) must be one of {', '.join(BATCHERS)}")
        require(self.max_ongoing_requests >= self.max_batch_size,
               f"max_ongoing_requests ({self.max_ongoing_requests}) must be >= max_batch_size "
               f"({self.max_batch_size}): a replica past it refuses requests and batches stay small")
        require(self.max_queued_requests == -1 or self.max_queued_requests >= 1,
               f"max_queued_requests ({self.max_queued_requests!r}) must be -1 (no limit) or >= 1")
        require(self.max_pending_rows >= 1, f"max_pending_rows ({self.max_pending_rows!r}) must be >= 1")

    def predictor_threads(self) -> int | None:
        """Torch threads of a CPU replica: its whole CPUs, at least 1 (None with a GPU)."""
        return max(1, int(self.num_cpus)) if self.num_gpus == 0 else None

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of the model deployment's `options(...)`."""
        return {
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "logging_config": {"enable_access_log": self.access_log},
        }

    def ingress_options(self) -> dict[str, Any]:
        """Keyword arguments of the HTTP ingress deployment's `options(...)`: as many replicas
        as the model, no CPU reserved (it reads bodies and waits on the model replicas), and
        room for every request the model replicas admit plus those queued for them, so that
        requests wait at the model deployment's handle, whose overflow the ingress answers
        with a 503 in JSON."""
        admitted = self.num_replicas * self.max_ongoing_requests
        queued = self.max_queued_requests if self.max_queued_requests > 0 else admitted
        return {
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": admitted + queued,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": 0},
            "logging_config": {"enable_access_log": self.access_log},
        }


SERVE_FIELDS = {f.name for f in fields(ServeOptions)}


def split_args(args: dict[str, Any]) -> tuple[dict[str, Any], ServeOptions]:
    """(Predictor keyword arguments, ServeOptions) from an application's args.

    Values may be strings (`serve run actors.serve:build_app key=value`): they are converted
    to each field's type. The Predictor's arguments are validated here, before any replica
    starts (the model folder's config.json, the store's listing; adapters' weights are read
    by each replica).

    Raises:
        ValueError: an unknown or missing argument, or a bad value (the message names it).
    """
    unknown = sorted(set(args) - PREDICTOR_FIELDS - SERVE_FIELDS)
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}; valid: {sorted(PREDICTOR_FIELDS | SERVE_FIELDS)}")
    if not args.get("model"):
        raise ValueError("argument `model` (a local Hugging Face model folder) is required")
    predictor = {k: convert(PredictorConfig, k, v) for k, v in args.items() if k in PREDICTOR_FIELDS}
    options = ServeOptions(**{k: convert(ServeOptions, k, v) for k, v in args.items() if k in SERVE_FIELDS})
    if "num_threads" in PREDICTOR_FIELDS and predictor.get("num_threads") is None and options.predictor_threads():
        predictor["num_threads"] = options.predictor_threads()
    PredictorConfig(**predictor)
    AdapterStore(predictor.get("adapters")).ids()  # a missing store or a non-adapter sub-folder, up front
    return predictor, options


def options_dict(options: ServeOptions) -> dict[str, Any]:
    """ServeOptions as plain values (what travels to the replicas)."""
    return asdict(options)


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
    choices = {"dtype": DTYPES, "batcher": BATCHERS}
    add_flags(p, PredictorConfig, skip={"model", "adapters", "task"}, choices=choices)
    add_flags(p, ServeOptions, choices=choices)
    return p


def main(argv: list[str] | None = None) -> int:
    """Deploy on a local Ray (or RAY_ADDRESS's), print the URL once it answers, block until
    Ctrl-C or SIGTERM, then take the application down. Returns the exit status."""
    from ray import serve

    from actors.serve import APP_NAME, build_app

    args = vars(build_parser().parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        application = build_app({k: v for k, v in args.items() if v is not None})
        joined = _connect_ray(host, port)
    except ValueError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    status = 0
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=APP_NAME, route_prefix="/")  # raises if a replica cannot start
        _wait_until_answering(port)
        print(f"Switchyard ({args['task']}) is serving at http://{host}:{port}/v1  (Ctrl-C stops it)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    except RuntimeError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        status = 1
    finally:
        _take_down(joined)
    return status


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


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM stops the server like Ctrl-C."""
    raise KeyboardInterrupt


def _take_down(joined: bool) -> None:
    """Delete our application on a joined cluster; shut Serve and Ray down on our own."""
    import ray
    from ray import serve

    from actors.serve import APP_NAME

    try:
        if joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
    except Exception as e:  # noqa: BLE001 - e.g. Ray's own processes already got the signal too
        logger.warning("could not take the application down cleanly: %s", e)
    if not joined:
        ray.shutdown()
