"""Serve's failure answers (README "Errors"): bodies nested too deep, and model replicas that
die mid-request, which the ingress answers with 503 + Retry-After in OpenAI's error shape
(Serve's own proxy would answer 500 in text/plain). Real HTTP on 127.0.0.1, replicas killed
with SIGKILL as the kernel's OOM killer would."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest

from testkit.data import SENTENCES

TIMEOUT = httpx.Timeout(120.0)
# Long requests: 2 x 200 rows of 100 new tokens keep the model busy for seconds.
LONG = {"prompt": [SENTENCES[i % len(SENTENCES)][:10] for i in range(200)], "max_tokens": 100}


# ---------------------------------------------------------------------------------------
# Without Ray
# ---------------------------------------------------------------------------------------


def _reference_depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(_reference_depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(_reference_depth, value.values()), default=0)
    return 0


@pytest.mark.parametrize("value", [
    1, "[[[", [], [[1, [2]], {}], {"a": {"b": ["]]]", "x\\\"[[", "\\\\"]}}, {"[": "{\\", "]": [[[]]]},
    ["\u00e9[", {"k\"[": ["\\\\\"]"]}],
])
def test_json_depth_skips_brackets_inside_strings(value):
    from actors.serve.api import json_depth

    for ascii_only in (True, False):
        text = json.dumps(value, ensure_ascii=ascii_only).encode()
        assert json_depth(text) == _reference_depth(value), text


def test_json_depth_does_not_recurse():
    from actors.serve.api import json_depth

    assert json_depth(b"[" * 1_000_000) == 1_000_000
    assert json_depth(b'{"a": [' + b"[1], " * 100_000 + b"2]}") == 3


def test_failed_model_calls_are_503_or_500_in_json():
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from actors.serve.ingress import model_failure

    task_error = RayTaskError("answer", "Traceback ...", KeyError("x"))
    cases = [(ActorDiedError(), 503, "replica_unavailable"),
             (DeploymentUnavailableError(DeploymentID(name="SwitchyardModel", app_name="a")), 503,
              "replica_unavailable"),
             (BackPressureError(num_queued_requests=5, max_queued_requests=5), 503, "overloaded"),
             (task_error.as_instanceof_cause(), 500, "internal"), (RuntimeError("bug"), 500, "internal")]
    for error, status, code in cases:
        response = model_failure(error).response()
        body = json.loads(response.body)
        assert (response.status_code, body["error"]["code"], set(body["error"])) == (status, code,
                                                                                    {"message", "type", "code"})
        assert response.headers.get("retry-after") == ("1" if status == 503 else None)


# ---------------------------------------------------------------------------------------
# Over HTTP, on the session's Ray
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_url(ray_cluster):
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def _deploy(serve_url: str, name: str, model: str, **args) -> str:
    """An application of the base model alone (no adapters: quick to start); its base URL."""
    from ray import serve

    from actors.serve import build_app

    serve.run(build_app({"model": model, "task": "generate", "num_cpus": 0.25, "access_log": False, **args}),
              name=name, route_prefix=f"/{name}")
    return f"{serve_url}/{name}"


def _model_replicas(name: str) -> dict[str, int]:
    """The application's live model replicas: replica id (as /v1/stats names it) -> pid."""
    import ray
    from ray.util.state import list_actors

    filters = [("class_name", "=", f"ServeReplica:{name}:SwitchyardModel"), ("state", "=", "ALIVE")]
    actors = list_actors(address=ray.dashboard_url, filters=filters)  # the session's Ray (conftest), not another
    return {a.name.rsplit("#", 1)[-1]: a.pid for a in actors}


def _busy_replica(url: str, rows: int, timeout_s: float = 60.0) -> str:
    """The id of a model replica holding `rows` admitted inputs, once one does (/v1/stats
    reaches one replica per call)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = httpx.get(f"{url}/v1/stats", timeout=TIMEOUT).json()
        if stats["pending_rows"] >= rows:
            return stats["replica"]
        assert time.monotonic() < deadline, "the requests never reached a replica"
        time.sleep(0.05)


def _busiest(pids: list[int], timeout_s: float = 60.0) -> int:
    """The one of `pids` that is computing (/v1/stats cannot say: Serve routes it to the idle
    replica): it uses most of a CPU while the others idle."""
    import psutil

    processes = [psutil.Process(pid) for pid in pids]
    deadline = time.monotonic() + timeout_s
    while True:
        before = [sum(p.cpu_times()[:2]) for p in processes]
        time.sleep(0.5)
        used = [sum(p.cpu_times()[:2]) - b for p, b in zip(processes, before)]
        ranked = sorted(range(len(pids)), key=used.__getitem__, reverse=True)
        if used[ranked[0]] > 0.1 and used[ranked[0]] > 3 * used[ranked[1]]:
            return pids[ranked[0]]
        assert time.monotonic() < deadline, f"no replica got busy (CPU seconds per 0.5 s: {used})"


async def _kill_during(url: str, name: str, model: str, requests: int) -> tuple[list[httpx.Response], float]:
    """Send `requests` long completions, SIGKILL the model replica that admitted them; return
    the responses and the seconds from the kill to the last of them."""
    replicas = _model_replicas(name)
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        body = {"model": Path(model).name, **LONG}
        sent = [asyncio.ensure_future(client.post(f"{url}/v1/completions", json=body)) for _ in range(requests)]
        if len(replicas) == 1:
            replica = await asyncio.to_thread(_busy_replica, url, requests * len(LONG["prompt"]))
            pid = replicas[replica]
        else:
            pid = await asyncio.to_thread(_busiest, list(replicas.values()))
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        responses = await asyncio.gather(*sent)
    return responses, time.monotonic() - killed


def _assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert (set(error), error["code"], error["type"]) == ({"message", "type", "code"}, "replica_unavailable",
                                                          "server_error")


@pytest.mark.slow
def test_replica_killed_mid_request_gets_503_json_and_so_does_the_next_until_its_successor_runs(serve_url, llama):
    """One replica: its requests get 503; so do new ones at once (no wait for the successor,
    which could take as long as a model load); once Serve's successor runs, they are answered."""
    from ray import serve

    url = _deploy(serve_url, "dies", llama[0], canary=False)
    responses, seconds = asyncio.run(_kill_during(url, "dies", llama[0], 2))
    for response in responses:
        _assert_unavailable(response)
    assert seconds < 10, f"the in-flight requests were answered {seconds:.1f} s after the kill"
    body = {"model": Path(llama[0]).name, "prompt": "the cat", "max_tokens": 4}
    started = time.monotonic()
    retry = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)
    _assert_unavailable(retry)
    assert time.monotonic() - started < 2, "a request during the restart waited instead of getting 503"
    _assert_unavailable(httpx.get(f"{url}/health", timeout=TIMEOUT))
    while retry.status_code == 503:  # what a client does with Retry-After
        assert time.monotonic() - started < 120, "no successor answered within 120 s"
        time.sleep(float(retry.headers["retry-after"]))
        retry = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)
    assert retry.status_code == 200, retry.text
    print(f"one replica: answered again {time.monotonic() - started:.1f} s after the 503s")
    serve.delete("dies")


@pytest.mark.slow
def test_with_two_replicas_the_other_answers_at_once(serve_url, llama):
    from ray import serve

    url = _deploy(serve_url, "pair", llama[0], canary=False, num_replicas=2)
    assert len(_model_replicas("pair")) == 2
    responses, _ = asyncio.run(_kill_during(url, "pair", llama[0], 1))
    _assert_unavailable(responses[0])
    started = time.monotonic()
    retry = httpx.post(f"{url}/v1/completions", json={"model": Path(llama[0]).name, "prompt": "the cat",
                                                       "max_tokens": 4}, timeout=TIMEOUT)
    assert retry.status_code == 200, retry.text
    assert time.monotonic() - started < 5, "the surviving replica did not answer the retry at once"
    serve.delete("pair")

