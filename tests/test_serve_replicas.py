"""Serve with two model replicas: each adapter's requests go to one home replica (its
adapter slots stay resident), base-model requests to either, and /v1/load_lora_adapter and
/v1/unload_lora_adapter reach every replica."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

import oracle
from actors.serve.routing import home
from testkit.data import SENTENCES

TIMEOUT = httpx.Timeout(120.0)
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def two(ray_cluster, llama, tmp_path_factory):
    """A generate application with two model replicas on a private copy of the Llama store."""
    import socket

    from ray import serve

    from actors.serve import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model, store = llama
    copy = tmp_path_factory.mktemp("replicas") / "store"
    shutil.copytree(store, copy)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({"model": model, "adapters": str(copy), "task": "generate", "num_replicas": 2,
                         "num_cpus": 0.25, "max_new_tokens": MAX_TOKENS, "enable_adapter_management": True,
                         "access_log": False}), name="two", route_prefix="/two")
    yield f"http://127.0.0.1:{port}/two/v1", model, str(copy)
    serve.shutdown()


def _replica_stats(url: str, client: httpx.Client) -> dict[str, dict]:
    """Every replica's /v1/stats (a stats call goes to either replica: ask until both answered)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 60  # Serve's router prefers the replica it thinks less busy, for up to 10 s
    while time.monotonic() < deadline:
        stats = client.get(f"{url}/stats").json()
        seen[stats["replica"]] = stats
        if len(seen) == 2:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"only replicas {sorted(seen)} answered /v1/stats")


def _adapters(store: str) -> list[str]:
    return sorted(p.name for p in Path(store).iterdir())


def test_each_adapter_is_answered_by_its_home_replica(two):
    url, model, store = two
    adapters = _adapters(store)
    with httpx.Client(timeout=TIMEOUT) as client:
        before = _replica_stats(url, client)
        sent = {name: 0 for name in adapters}
        for round_ in range(2):
            for i, name in enumerate(adapters + [Path(model).name]):
                prompt = SENTENCES[(i + round_) % len(SENTENCES)][:20]
                response = client.post(f"{url}/completions", json={"model": name, "prompt": prompt})
                assert response.status_code == 200, response.text
                adapter = None if name == Path(model).name else name
                text, _, _ = oracle.generate(model, store, adapter, prompt, MAX_TOKENS)
                assert response.json()["choices"][0]["text"] == text
                sent[name] = sent.get(name, 0) + 1
        after = _replica_stats(url, client)
    replicas = sorted(after)
    for name in adapters:
        served = {r: after[r]["requests_by_adapter"].get(name, 0) - before[r]["requests_by_adapter"].get(name, 0)
                  for r in replicas}
        assert served == {r: sent[name] if r == home(name, replicas) else 0 for r in replicas}, name


def test_load_and_unload_reach_every_replica(two):
    url, model, store = two
    shutil.copytree(Path(store) / "lora-rs", Path(store) / "late")
    prompt = {"model": "late", "prompt": "the cat"}
    with httpx.Client(timeout=TIMEOUT) as client:
        counts = {r: s["adapters"] for r, s in _replica_stats(url, client).items()}
        loaded = client.post(f"{url}/load_lora_adapter", json={"lora_name": "late"})
        assert loaded.status_code == 200 and loaded.json()["status"] == "loaded", loaded.text
        assert {r: s["adapters"] for r, s in _replica_stats(url, client).items()} == {r: n + 1 for r, n in counts.items()}
        for _ in range(8):  # the model list comes from either replica: both know the adapter
            assert "late" in [m["id"] for m in client.get(f"{url}/models").json()["data"]]
        response = client.post(f"{url}/completions", json=prompt)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == oracle.generate(model, store, "late", "the cat", MAX_TOKENS)[0]
        again = client.post(f"{url}/load_lora_adapter", json={"lora_name": "late"})
        assert again.status_code == 200 and again.json()["status"] == "already_loaded"
        bad = client.post(f"{url}/load_lora_adapter", json={"lora_name": "absent"})
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "adapter_not_found"

        unloaded = client.post(f"{url}/unload_lora_adapter", json={"lora_name": "late"})
        assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloaded", unloaded.text
        assert {r: s["adapters"] for r, s in _replica_stats(url, client).items()} == counts
        for _ in range(4):
            gone = client.post(f"{url}/completions", json=prompt)
            assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
        missing = client.post(f"{url}/unload_lora_adapter", json={"lora_name": "late"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"
    shutil.rmtree(Path(store) / "late")


class _Replica:
    def __init__(self, name: str) -> None:
        self.replica_id = type("ReplicaID", (), {"unique_id": name})()


class _Cache(dict):
    def get(self, replica_id):  # the router asks by ReplicaID
        return super().get(replica_id.unique_id)


def _choose(queues: dict[str, int], key: str) -> list[list[str]]:
    """The ranks AdapterAffinityRouter returns for a request with session_id `key`."""
    import asyncio
    from types import SimpleNamespace

    from actors.serve.routing import AdapterAffinityRouter

    router = object.__new__(AdapterAffinityRouter)  # its choice needs no running Serve
    router.spill_queue, router.slack, router._replica_queue_len_cache = 4, 2, _Cache(queues)
    replicas = [_Replica(name) for name in queues]
    ranks = asyncio.run(router.choose_replicas(replicas, SimpleNamespace(metadata=SimpleNamespace(session_id=key))))
    return [[r.replica_id.unique_id for r in rank] for rank in ranks if rank]


def test_router_bounds_the_homes_load_then_spills_to_all_when_both_are_busy():
    from actors.serve.routing import _score, pin

    names = ["r0", "r1", "r2", "r3"]
    by_weight = sorted(names, key=lambda r: _score("ad", r), reverse=True)  # the adapter's homes, best first
    first, second = by_weight[:2]
    idle = dict.fromkeys(names, 0)
    assert _choose(idle, "ad")[0] == [first]
    assert _choose({**idle, first: 2}, "ad")[0] == [first]  # within the slack of the second
    assert _choose({**idle, first: 3}, "ad")[0] == [first, second]  # past it: the less busy of the two
    assert _choose({**idle, first: 4, second: 3}, "ad")[0] == [first, second]  # the home is full
    assert _choose({**idle, first: 4, second: 9}, "ad") == [by_weight]  # both busy: the least busy of all
    assert _choose({**idle, "r2": 100}, pin("r2")) == [["r2"]]  # pinned: that replica whatever its queue
    base = _choose(idle, "")
    assert len(base) == 1 and len(base[0]) == 2 and set(base[0]) <= set(names)


@pytest.mark.parametrize("affinity, body, key", [
    (True, {"model": "lora-a", "prompt": "x"}, "lora-a"),  # an adapter: its home replica
    (True, {"model": "base", "prompt": "x"}, ""),  # the base model's name: any replica
    (True, {"model": 7}, ""),  # a body the replica will refuse: any replica
    (False, {"model": "lora-a", "prompt": "x"}, ""),  # --no-adapter-affinity: any replica
])
def test_the_ingress_names_the_adapter_to_the_router_unless_affinity_is_off(affinity, body, key):
    from types import SimpleNamespace

    from actors.serve.ingress import SwitchyardIngress
    from actors.serve.options import ServeOptions

    ingress = SimpleNamespace(options=ServeOptions(adapter_affinity=affinity), base_names={"base"})
    assert SwitchyardIngress.func_or_class._affinity(ingress, body) == key
