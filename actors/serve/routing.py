"""Which model replica answers a request: `AdapterAffinityRouter`, Serve's request router of
the model deployment, run by the ingress's handle (in the ingress's process).

With several replicas, each adapter has a home replica, the highest of a hash of (adapter,
replica) over the running replicas (rendezvous hashing), and its requests go there, so each
replica's adapter slots hold about 1/R of the adapters in use and stay resident instead of
every replica swapping every adapter in. Homes by hash split the requests unevenly, so the
load is bounded: when the home has `slack` more requests in flight than the adapter's
second-highest replica, or `spill_queue` or more (by default one full batch), a request goes
to the less busy of the two, and when both have `spill_queue`, to the least busy of all.
Requests for the base model have no home: the less busy of two random replicas (Serve's
default). A replica that stops or starts moves only the adapters whose home it was or becomes.

The ingress names the adapter through the handle's `session_id` (Serve's field for sticky
routing; not `multiplexed_model_id`, by which `@serve.batch` would split the mixed batches).
The same field can pin a call to one replica (`pin(replica_id)`): that is how
`/v1/load_lora_adapter` reaches every replica.
Each request is routed on its own (no FIFO matching between requests), so a pinned call is
never handed another request's replica.
"""

from __future__ import annotations

import hashlib
import importlib
import random
import weakref

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PIN = "switchyard-replica:"  # session_id prefix of a call pinned to one replica
DEFAULT_SPILL_QUEUE = 32
DEFAULT_SLACK = 2
_ROUTERS: weakref.WeakSet = weakref.WeakSet()  # the routers of this process's handles


def pin(replica_id: str) -> str:
    """The session_id that sends a call to the replica `replica_id` only."""
    return PIN + replica_id


def running_replicas(app: str, deployment: str) -> list[str]:
    """The ids of the running replicas of `deployment` in application `app` that this
    process's handles route to (empty until a handle has learnt of them from Serve's
    controller)."""
    found: set[str] = set()
    for router in list(_ROUTERS):
        if (router.app_name, router.deployment_name) == (app, deployment):
            found.update(rid.unique_id for rid in router.curr_replicas)
    return sorted(found)


def _score(key: str, replica: str) -> int:
    """The rendezvous-hashing weight of `replica` for `key` (stable across processes)."""
    return int.from_bytes(hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest(), "big")


def home(key: str, replicas: list[str]) -> str:
    """The home replica of adapter `key` among `replicas`."""
    return max(replicas, key=lambda r: _score(key, r))


class AdapterAffinityRouter(RequestRouter):
    """Adapter requests to their home replicas, pinned calls to their replica, the rest
    anywhere (see the module docstring)."""

    def initialize_state(self, spill_queue: int = DEFAULT_SPILL_QUEUE, slack: int = DEFAULT_SLACK, **kwargs) -> None:
        self.spill_queue, self.slack = spill_queue, slack
        # Serve ships this class by value: its copy has globals of its own, so the routers are
        # registered in the module the ingress imports.
        importlib.import_module(__name__)._ROUTERS.add(self)

    @property
    def deployment_name(self) -> str:
        return self._deployment_id.name

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if key.startswith(PIN):
            target = key[len(PIN):]
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        if not key or len(candidate_replicas) < 2:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = sorted(candidate_replicas, key=lambda r: _score(key, r.replica_id.unique_id), reverse=True)
        cache = self.replica_queue_len_cache
        queued = [cache.get(r.replica_id) or 0 for r in ranked[:2]]
        if queued[0] < self.spill_queue and queued[0] <= queued[1] + self.slack:
            return [ranked[:1], ranked[1:2], ranked[2:]]
        if queued[1] < self.spill_queue:
            return [ranked[:2], ranked[2:]]  # the less busy of the two
        return [ranked]  # both busy: the least busy of all
