"""Continuous batching against the coalescer, online (issue: "New requests join a running batch").

Builds the bench Llama of bench/mixed_batch.py (hidden 256, 4 layers) with --adapters LoRA
adapters (r=16, all linear layers), deploys it once per batcher on a local Ray (one replica,
1 CPU, 1 torch thread) behind 127.0.0.1, and at each of --clients concurrent clients sends
requests that cycle over every adapter and the base model, each with its own max_tokens
(8 to 48, greedy), so requests finish at different steps. Per batcher and client count it prints
requests/s, generated tokens/s, p50/p99 latency and p50/p99 time to first token. The
continuous batcher runs twice: without streaming, then with `stream: true` (time to first
token: the first chunk with text); the coalescer cannot stream (its first token arrives with
its last). Every answer's text is compared across runs (they must be equal, request for
request).

    .venv/bin/python bench/serve_continuous.py [--clients 1 8 32] [--requests-per-client 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients")
    p.add_argument("--requests-per-client", type=int, default=4, help="requests per client (at least 8 in all)")
    p.add_argument("--adapters", type=int, default=8, help="LoRA adapters in the store")
    p.add_argument("--batchers", nargs="+", default=["continuous", "coalescer"], help="batchers to compare")
    return p.parse_args(argv)


def requests(names: list[str], base: str, n: int) -> list[dict]:
    """`n` completion bodies over every adapter and the base model, with mixed lengths."""
    from testkit.data import SENTENCES

    models = [*names, base]
    return [{"model": models[i % len(models)], "prompt": SENTENCES[i % len(SENTENCES)][: 16 + (i * 13) % 60],
             "max_tokens": 8 + (i * 11) % 41, "temperature": 0} for i in range(n)]


async def load(url: str, bodies: list[dict], clients: int, stream: bool) -> tuple[float, list[dict]]:
    """(wall seconds, per request: latency, time to first token, text, tokens) of `bodies`
    sent by `clients` concurrent clients."""
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i, body in enumerate(bodies):
        queue.put_nowait((i, body))
    out: list[dict | None] = [None] * len(bodies)

    async def one(http: httpx.AsyncClient, body: dict) -> dict:
        started = time.perf_counter()
        if not stream:
            r = await http.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            done = time.perf_counter() - started
            answer = r.json()
            return {"latency": done, "ttft": done, "text": answer["choices"][0]["text"],
                    "tokens": answer["usage"]["completion_tokens"]}
        text, first = "", None
        async with http.stream("POST", f"{url}/v1/completions", json={**body, "stream": True,
                                                                       "stream_options": {"include_usage": True}}) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    first = first if first is not None else time.perf_counter() - started
                    text += chunk["choices"][0]["text"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        done = time.perf_counter() - started
        return {"latency": done, "ttft": first if first is not None else done, "text": text, "tokens": tokens}

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i, body = queue.get_nowait()
            out[i] = await one(http, body)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - started, out


def measure(url: str, model: str, store: str, batcher: str, args: argparse.Namespace, names: list[str]) -> dict:
    """Figures per client count against one deployment."""
    from ray import serve

    from actors.serve import build_app

    top = max(args.clients)
    serve.run(build_app({"model": model, "adapters": store, "task": "generate", "num_cpus": 1, "batcher": batcher,
                         "max_new_tokens": 48, "max_batch_size": top, "access_log": False}),
              name="bench", route_prefix="/")
    base, results = Path(model).name, {}
    asyncio.run(load(url, requests(names, base, 8), 8, False))  # warm-up
    for stream in ([False, True] if batcher == "continuous" else [False]):
        name = f"{batcher}{' stream' if stream else ''}"
        for clients in args.clients:
            bodies = requests(names, base, max(8, clients * args.requests_per_client))
            wall, rows = asyncio.run(load(url, bodies, clients, stream))
            latencies, ttfts = [r["latency"] for r in rows], [r["ttft"] for r in rows]
            results[name, clients] = {"rps": len(rows) / wall, "tps": sum(r["tokens"] for r in rows) / wall,
                                      "p50": statistics.median(latencies), "p99": _p99(latencies),
                                      "ttft50": statistics.median(ttfts), "ttft99": _p99(ttfts),
                                      "texts": [r["text"] for r in rows]}
    serve.delete("bench")
    return results


def _p99(values: list[float]) -> float:
    """The 99th percentile (the largest value for fewer than 100)."""
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


def main(argv: list[str] | None = None) -> int:
    import logging
    import os

    import ray
    from ray import serve

    from mixed_batch import build

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model, store = build(Path(tmp), args.adapters)
        names = sorted(p.name for p in Path(store).iterdir())
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            figures = {}
            for batcher in args.batchers:
                figures.update(measure(f"http://127.0.0.1:{port}", model, store, batcher, args, names))
        finally:
            serve.shutdown()
            ray.shutdown()
    print(f"\nbench Llama (hidden 256, 4 layers), {args.adapters} LoRA r=16 adapters + base, requests cycling over "
          f"them, max_tokens 8-48 (greedy); one replica, 1 CPU, 1 torch thread; {args.requests_per_client} "
          "requests per client (at least 8)")
    print(f"{'batcher':<18} {'clients':>7} {'req/s':>6} {'tok/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'TTFT p50':>8} "
          f"{'TTFT p99':>8}")
    for (name, clients), r in figures.items():
        print(f"{name:<18} {clients:>7} {r['rps']:6.2f} {r['tps']:6.0f} {1000 * r['p50']:7.0f} "
              f"{1000 * r['p99']:7.0f} {1000 * r['ttft50']:8.0f} {1000 * r['ttft99']:8.0f}")
    modes = list(dict.fromkeys(name for name, _ in figures))
    for clients in args.clients:
        texts = [figures[m, clients]["texts"] for m in modes]
        same = sum(all(t[i] == texts[0][i] for t in texts) for i in range(len(texts[0])))
        print(f"{clients} clients: {same}/{len(texts[0])} answers equal across {', '.join(modes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
