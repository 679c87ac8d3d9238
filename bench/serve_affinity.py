"""Serve with several model replicas: each adapter's requests to its home replica
(`adapter_affinity`, actors/serve/routing.py) against any replica, side by side in one run.

Builds testkit's small Llama with --adapters LoRA adapters (r=16, all linear layers),
deploys on a local Ray --replicas model replicas with --slots adapter slots each (fewer than
the adapters, more than the adapters per replica with affinity), and sends --requests
completions over every adapter in random order from --concurrency clients, once with
affinity on and once off. Prints requests/s, p50/p99 latency and the adapter swaps into
slots (`slot_loads` of every replica's /v1/stats).

    .venv/bin/python bench/serve_affinity.py [--replicas 2] [--adapters 12] [--slots 8] [--requests 192]
                                             [--adapter-cache-mb 2048]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import serve_load  # noqa: E402


def replica_stats(url: str, replicas: int) -> dict[str, dict]:
    """Every replica's /v1/stats (each call reaches one replica: ask until all answered)."""
    import httpx

    seen: dict[str, dict] = {}
    deadline = time.monotonic() + 60  # Serve's router prefers the replica it thinks less busy, for up to 10 s
    while time.monotonic() < deadline:
        stats = httpx.get(f"{url}/v1/stats", timeout=60).json()
        seen[stats["replica"]] = stats
        if len(seen) == replicas:
            return seen
        time.sleep(0.1)
    raise RuntimeError(f"only {len(seen)} replicas answered /v1/stats")


def measure(url: str, model: str, store: str, rows: list, affinity: bool, args: argparse.Namespace) -> dict:
    from ray import serve

    from actors.serve import build_app

    serve.run(build_app({"model": model, "adapters": store, "task": "generate", "num_replicas": args.replicas,
                         "num_cpus": 2 / args.replicas / 2, "max_new_tokens": args.max_tokens,
                         "max_loaded_adapters": args.slots, "max_batch_size": args.concurrency,
                         "adapter_cache_mb": args.adapter_cache_mb,
                         "adapter_affinity": affinity, "access_log": False}), name="bench", route_prefix="/")
    base = Path(model).name
    asyncio.run(serve_load.load(url, base, rows[: 2 * args.concurrency], args.concurrency, args.max_tokens))
    before = replica_stats(url, args.replicas)
    wall, latencies = asyncio.run(serve_load.load(url, base, rows, args.concurrency, args.max_tokens))
    after = replica_stats(url, args.replicas)
    serve.delete("bench")
    return {"rps": len(rows) / wall, "p50": statistics.median(latencies),
            "p99": statistics.quantiles(latencies, n=100)[98],
            "swaps": sum(after[r]["slot_loads"] - before[r]["slot_loads"] for r in after),
            "per_replica": {r: sum(after[r]["requests_by_adapter"].values())
                            - sum(before[r]["requests_by_adapter"].values()) for r in after}}


def main() -> int:
    args = parse_args()
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        model, store, names = serve_load.build(Path(tmp), args.adapters)
        gen = random.Random(0)
        from testkit.data import SENTENCES

        rows = [(gen.choice(names), SENTENCES[i % len(SENTENCES)][: 12 + (i * 7) % 30]) for i in range(args.requests)]
        with serve_load.local_serve() as url:
            results = {affinity: measure(url, model, store, rows, affinity, args) for affinity in (True, False)}
    print(f"{args.requests} requests over {args.adapters} adapters in random order, {args.concurrency} clients, "
          f"{args.max_tokens} new tokens; {args.replicas} replicas x {args.slots} slots, host tier "
          f"{args.adapter_cache_mb} MiB")
    print(f"{'affinity':<9} {'req/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'swaps':>6}  requests per replica")
    for affinity, r in results.items():
        print(f"{'on' if affinity else 'off':<9} {r['rps']:6.1f} {1000 * r['p50']:7.0f} {1000 * r['p99']:7.0f} "
              f"{r['swaps']:6d}  {sorted(r['per_replica'].values())}")
    print(f"on / off req/s: {results[True]['rps'] / results[False]['rps']:.2f}")
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--adapters", type=int, default=12)
    p.add_argument("--slots", type=int, default=8, help="--max-loaded-adapters of each replica")
    p.add_argument("--adapter-cache-mb", type=int, default=2048, help="each replica's host-memory tier (0: every "
                   "swap reads the adapter from disk)")
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=8)
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(main())
