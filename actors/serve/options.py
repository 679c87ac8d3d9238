"""Settings of the Serve application (its model and ingress deployments), and how they
arrive: `build_app(args)` (YAML values from `serve deploy`, strings from `serve run ...
key=value`) and `jobs/serve.py`'s flags (`actors/serve/launch.py`), both built from the
fields of `PredictorConfig` and `ServeOptions`. Imports neither Ray nor torch, nor any other
module of this package: `ingress`, `model` and `launch` import it, never the reverse."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from actors.allocator import ALLOCATORS, runtime_env
from actors.config import PredictorConfig, require
from actors.options import convert
from actors.store import AdapterStore, parse_lora_modules

PREDICTOR_FIELDS = {f.name for f in fields(PredictorConfig)}
BATCHERS = ("auto", "continuous", "coalescer", "serve.batch")


@dataclass
class ServeOptions:
    """How the deployment serves: replicas, their resources, batching and admission.

    Each field's `metadata["help"]` says what it means; it is also the flag's `--help` text.
    """

    num_replicas: int = field(default=1, metadata={
        "help": "replicas of the deployment (each holds the base model and every adapter)."})
    num_cpus: float = field(default=1.0, metadata={"help": (
        "CPUs per replica; on CPU, torch uses int(num_cpus) threads (at least 1) unless --num-threads is given.")})
    num_gpus: float = field(default=0.0, metadata={"help": "GPUs per replica (fractions share a GPU)."})
    max_batch_size: int = field(default=32, metadata={
        "help": "requests coalesced into one mixed batch (one Predictor call)."})
    batch_wait_timeout_s: float = field(default=0.01, metadata={"help": (
        "how long a batch waits for more requests once the model is free (not at all when max_batch_size "
        "requests already wait).")})
    batcher: str = field(default="auto", metadata={"help": (
        '"continuous" (task generate: requests join the running batch at its next decoding step and leave it when '
        'done; needed for stream, n > 1 and logprobs), "coalescer" (the next batch takes every request that '
        'arrived during the running one), "serve.batch" (Ray\'s `@serve.batch`, whose batches close on a timer '
        'while the model is busy: smaller batches under load), or "auto": continuous for generate, coalescer for '
        "the other tasks.")})
    max_ongoing_requests: int | None = field(default=None, metadata={"help": (
        "requests a replica admits at once (None: 4 x max_batch_size); must be >= max_batch_size, or "
        "batches never fill.")})
    max_queued_requests: int = field(default=-1, metadata={"help": (
        "requests queued for busy model replicas (per ingress replica) before a 503 `overloaded` (-1: no "
        "limit).")})
    max_pending_rows: int = field(default=1024, metadata={"help": (
        "inputs admitted into a replica and not yet answered; past it a request gets 503 (OpenAI shape). A "
        "request with more inputs gets 400.")})
    enable_adapter_management: bool = field(default=False, metadata={
        "help": "serve /v1/load_lora_adapter and /v1/unload_lora_adapter."})
    access_log: bool = field(default=False, metadata={"help": "Serve's one log line per request."})
    adapter_affinity: bool = field(default=True, metadata={"help": (
        "with several replicas, send each adapter's requests to its home replica (its slots stay resident; "
        "the less busy of two, or any, when busy); off: any replica, as base-model requests.")})
    allocator: str = field(default="system", metadata={"help": (
        "the model replicas' memory allocator: system keeps glibc's malloc, auto preloads tcmalloc when the "
        "machine deploying the app has it installed, tcmalloc requires it.")})
    served_model_name: list[str] | None = field(default=None, metadata={"help": (
        "the name(s) requests give as `model` for the base model, as vLLM's --served-model-name (default: the "
        "model folder's name); GET /v1/models lists the first.")})

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
        require(self.allocator in ALLOCATORS, f"allocator ({self.allocator!r}) must be one of {', '.join(ALLOCATORS)}")
        require(self.max_pending_rows >= 1, f"max_pending_rows ({self.max_pending_rows!r}) must be >= 1")
        require(self.served_model_name is None or (bool(self.served_model_name) and all(
            isinstance(n, str) and n for n in self.served_model_name)),
            f"served_model_name ({self.served_model_name!r}) must hold non-empty names")

    def batcher_for(self, task: str) -> str:
        """The batcher a replica of `task` runs ("auto" resolved).

        Raises:
            ValueError: "continuous" for a task other than generate.
        """
        if self.batcher == "auto":
            return "continuous" if task == "generate" else "coalescer"
        require(self.batcher != "continuous" or task == "generate",
                f"batcher continuous decodes (task generate); task {task!r} takes coalescer or serve.batch")
        return self.batcher

    def predictor_threads(self) -> int | None:
        """Torch threads of a CPU replica: its whole CPUs, at least 1 (None with a GPU)."""
        return max(1, int(self.num_cpus)) if self.num_gpus == 0 else None

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of the model deployment's `options(...)`."""
        return {
            "num_replicas": self.num_replicas,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                  **({"runtime_env": env} if (env := runtime_env(self.allocator)) else {})},
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
    options.batcher_for(predictor.get("task", PredictorConfig.task))
    AdapterStore(predictor.get("adapters"), parse_lora_modules(predictor.get("lora_modules"))).ids()  # up front
    return predictor, options


def options_dict(options: ServeOptions) -> dict[str, Any]:
    """ServeOptions as plain values (what travels to the replicas)."""
    return asdict(options)
